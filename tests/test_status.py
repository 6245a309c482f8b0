"""`laion-dagster status`: what an operator sees mid-run, read from named keys only."""

import json

from laion_dagster.core import parts
from laion_dagster.core.connection import connect
from laion_dagster.core.enqueue import enqueue_part
from laion_dagster.core.queue import Queue
from laion_dagster.core.status import collect, render
from tests.outputs import all_done, wait_until
from tests.pool import start_worker, stop_worker


def test_status_mid_run_shows_rates_etas_parts_hosts_and_top_errors(settings, dataset):
    queue = Queue(connect(settings), settings.prefix)
    found = parts.discover(settings.parts_root)
    enqueue_part(queue, found[0], settings)
    worker = start_worker(settings.with_overrides(host_id="gpu-07"))
    try:
        wait_until(lambda: all_done(queue, [found[0].key]), 60, what="the first part done")
        wait_until(lambda: "gpu-07" in queue.hosts(), 10, what="a heartbeat")
        status = collect(queue, settings)
    finally:
        stop_worker(worker)
    expected = dataset.outcome_counts()
    state = queue.part(found[0].key)
    assert status.images_per_second > 0 and status.mb_per_second > 0
    assert status.images_per_second_hour > 0
    # The other three parts are not enqueued: the dataset ETA counts them from their footers.
    assert status.dataset_rows == 4 * 120 and status.rows_remaining == 3 * 120
    assert status.dataset_eta_seconds is not None and status.dataset_eta_seconds > 0
    top = dict(status.top_errors)
    assert top and all(name in expected for name in top)
    assert sum(top.values()) <= state.failed + state.invalid
    [part] = status.parts
    assert (part["ok"], part["state"]) == (state.ok, "done")
    [host] = status.hosts
    assert host["host"] == "gpu-07" and not host["stale"] and not host["paused"]
    text = render(status)
    assert "360 of 480 rows to go" in text and "gpu-07" in text and "MB/s" in text
    assert "[####################]" in text  # the finished part's bar
    json.dumps(status.to_dict())  # --json works on the same data


def test_status_never_scans_the_keyspace(settings, dataset):
    """Against a remote Redis holding billions of rows, KEYS or SCAN would be a disaster."""
    queue = Queue(connect(settings), settings.prefix)
    enqueue_part(queue, parts.discover(settings.parts_root)[0], settings)
    before = {k: v["calls"] for k, v in queue.r.info("commandstats").items()
              if k in ("cmdstat_scan", "cmdstat_keys")}
    collect(queue, settings)
    after = {k: v["calls"] for k, v in queue.r.info("commandstats").items()
             if k in ("cmdstat_scan", "cmdstat_keys")}
    assert after == before
