"""A row's outcome is what its own server did: rows whose first try met a passing failure are
tried again later in their shard (retry_rounds), with real worker processes, a real Redis and
real image servers whose faults the tests control."""

import socket
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

from laion_dagster.core.input import parts
from laion_dagster.demo.server import ImageServer
from tests.outputs import shard_rows, wait_until
from tests.pool import download, start_worker, stop_worker


def free_port() -> int:
    """A loopback port nothing listens on (refused) until a server takes it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_part(settings, urls: list[str], name: str = "part-00000-x-c000.parquet") -> parts.Part:
    folder = settings.parts_root / "hosts"
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table({"SAMPLE_ID": list(range(len(urls))), "URL": urls,
                      "TEXT": [f"caption {i}" for i in range(len(urls))]})
    pq.write_table(table, folder / name)
    return parts.discover(settings.parts_root)[0]


def outcomes(settings, part: parts.Part) -> list[dict]:
    return shard_rows(settings.store_root / part.relative_dir).sort_by("row").to_pylist()


def test_a_dead_port_of_a_live_host_fails_only_its_own_rows(settings, image_server, images):
    """One host name, a live port and a closed one, rows of both in every shard: every row of
    the live port is stored; the closed port's rows fail as connection, each after a later
    try, with the messages of both tries. (Keyed by host name, the memory of failed connects
    failed 1,413 servable rows of 1,820 on such a host.)"""
    dead = free_port()
    live = image_server.url("img-a.test")
    urls = [f"http://img-a.test:{dead}/{i}.jpg" if i % 10 == 0
            else f"{live}{images[i % len(images)].path}?n={i}" for i in range(300)]
    part = write_part(settings, urls)
    result = download(settings, part)
    rows = outcomes(settings, part)
    served = [r for r in rows if f":{dead}/" not in r["url"]]
    refused = [r for r in rows if f":{dead}/" in r["url"]]
    assert Counter(r["status"] for r in served) == {"success": 270}
    assert Counter(r["error_class"] for r in refused) == {"connection": 30}
    assert all("(earlier try 1: connection: " in r["error_message"] for r in refused)
    state = result.queue.part(part.key)
    assert (state.ok, state.failed, state.retried, state.recovered) == (270, 30, 30, 0)


def test_a_host_down_for_a_few_seconds_costs_no_rows(settings, images):
    """A host that refuses connections when the download starts and comes back while it runs
    (a CDN's deploy): the rows that met it down, those tried and those turned away without
    being asked, are tried again retry_delay after their first try, and every one is stored.
    The part's counts say how many rows were tried again and how many recovered."""
    port = free_port()
    back = ImageServer({image.path: image for image in images}, port=port)
    live = ImageServer({image.path: image for image in images}).start()
    patient = settings.with_overrides(retry_delay=4.0, concurrency=4, processes=1)
    urls = []
    for i in range(240):
        base = f"http://img-a.test:{port}" if i % 2 else live.url("img-b.test")
        urls.append(f"{base}{images[i % len(images)].path}?n={i}")
    part = write_part(settings, urls)
    from laion_dagster.core.control.enqueue import enqueue_part
    from laion_dagster.core.queue.connection import connect
    from laion_dagster.core.queue.protocol import Queue

    queue = Queue(connect(patient), patient.prefix)
    enqueue_part(queue, part, patient)
    worker = start_worker(patient)
    try:
        # The pool is well into the part (it met the down host many times) before it is back;
        # the host's report says how many rows wait for their later try (what `run`'s
        # progress line and `status` show while the bar stands still).
        wait_until(lambda: sum(live.requests.values()) >= 40, 30, what="40 rows fetched")
        wait_until(lambda: any(h.get("waiting") for h in queue.hosts().values()), 10,
                   what="rows waiting for their later try, reported")
        back.start()
        wait_until(lambda: queue.part(part.key).done, 60, what="the part done")
    finally:
        log = stop_worker(worker)
        back.stop()
        live.stop()
    rows = outcomes(patient, part)
    assert Counter(r["status"] for r in rows) == {"success": 240}, log
    state = queue.part(part.key)
    assert state.ok == 240 and state.failed == 0
    assert state.retried >= 2 and state.recovered == state.retried
    assert "tried again later" in log


def test_later_tries_off_keep_the_first_outcome(settings, image_server, images):
    """retry_rounds=0: a row that met a closed port fails at once, with one try's message."""
    dead = free_port()
    urls = [f"http://img-a.test:{dead}/{i}.jpg" for i in range(4)]
    urls += [f"{image_server.url('img-b.test')}{images[0].path}?n={i}" for i in range(4)]
    part = write_part(settings, urls)
    off = settings.with_overrides(retry_rounds=0)
    result = download(off, part)
    rows = outcomes(off, part)
    assert [r["error_class"] for r in rows[:4]] == ["connection"] * 4
    assert not any("earlier try" in r["error_message"] for r in rows[:4])
    assert result.queue.part(part.key).retried == 0
