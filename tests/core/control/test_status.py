"""`laion-dagster status`: what an operator sees mid-run, read from named keys only."""

import json

import pytest

from laion_dagster.core.control.enqueue import enqueue_part
from laion_dagster.core.control.status import collect, plural, render
from laion_dagster.core.input import parts
from laion_dagster.core.queue.connection import connect
from laion_dagster.core.queue.protocol import Queue
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


def test_rates_cover_the_time_they_claim_and_the_eta_follows_them(settings, queue):
    """The recent rate divides by the seconds it covers (the current minute so far and the
    previous one), so it never drops to 0 at a minute boundary, and the queue's ETA is its
    depth at that rate: 1,000 rows at 8 images/s is about 125 s, not 20 minutes."""
    now = queue.r.time()[0]
    minute = now // 60
    seconds_in = now - minute * 60
    # 8 images/s since the start of the previous minute, none yet in this one's first second.
    done = round(8 * (60 + seconds_in))
    queue.r.hset(f"{queue.keys.rate_prefix}{minute - 1}", mapping={"ok": done - 10,
                                                                   "failed": 10, "bytes": 0})
    queue.r.set(queue.keys.queued_rows, 1_000)

    status = collect(queue, settings)

    assert 60 <= status.window_seconds <= 121
    assert status.ok_recent == done - 10 and status.failed_recent == 10
    assert status.images_per_second == pytest.approx(8, rel=0.05)
    assert status.eta_seconds == pytest.approx(125, rel=0.05)
    assert "ok_last_minute" not in status.to_dict()
    assert f"over the last {status.window_seconds:.0f}s" in render(status)


def test_failures_and_invalid_rows_add_up_and_long_names_show_where_they_were_cut(
        settings, queue, tmp_path):
    """The failed count and the classes listed under it add up (invalid rows are counted on
    their own, not mixed in); a name too long for its column ends in an ellipsis; a
    parquet folder that cannot be read is named."""
    for key, ok, failed, invalid, classes in (
            ("laion2B-en/00000", 200, 780, 20, {"http_4xx": 500, "dns": 280,
                                                "invalid_url": 20}),
            ("a-subset-with-a-very-long-name-indeed-for-sure/part-with-a-long-name-too", 5,
             0, 0, {})):
        queue.begin(key)
        queue.r.hset(queue.keys.part(key), mapping={"rows": ok + failed + invalid, "ok": ok,
                                                    "failed": failed, "invalid": invalid})
        if classes:
            queue.r.hset(queue.keys.classes(key), mapping=classes)
    elsewhere = settings.with_overrides(parquet_dir=tmp_path / "on-another-machine")

    status = collect(queue, elsewhere)
    text = render(status)

    assert status.failed == 780 and status.invalid == 20
    assert dict(status.top_errors) == {"http_4xx": 500, "dns": 280}
    assert sum(count for _, count in status.top_errors) == status.failed
    assert "failed: 780 rows, top classes: http_4xx 500, dns 280;  invalid (no usable URL): 20" \
        in text
    long_line = next(line for line in text.splitlines() if "a-subset-with" in line)
    assert "a-subset-with-a-very-long-name-indeed-for-sure/part-with-a-… [" in long_line
    assert f"dataset: {tmp_path / 'on-another-machine'} is not readable from here" in text


def test_counts_of_things_read_as_english():
    assert plural(1, "part") == "1 part" and plural(4, "part") == "4 parts"
    assert plural(1_000, "row") == "1,000 rows"
