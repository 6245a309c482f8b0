"""Real worker processes against a real Redis and a real image server."""

import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from laion_dagster.core.control.enqueue import enqueue_part
from laion_dagster.core.input import parts
from laion_dagster.demo.dataset import write_dataset
from tests.conftest import TEST_HOSTS, mount_tmpfs
from tests.outputs import all_done, check_part, leftovers, wait_until
from tests.pool import start_worker, stop_worker


def shards_done(queue, found) -> int:
    return sum(queue.part(p.key).shards_done for p in found)


def assert_every_row_accounted(queue, settings, found, dataset, log: str = "") -> None:
    """Each part balances (rows = ok + failed + invalid) and its outputs match the input."""
    for part in found:
        state = queue.part(part.key)
        assert state.rows == state.ok + state.failed + state.invalid, log
        check_part(settings, part, dataset)


def enqueue_all(queue, settings):
    found = parts.discover(settings.parts_root)
    for part in found:
        enqueue_part(queue, part, settings)
    return found


def test_pool_downloads_every_row_once_with_the_served_bytes(settings, dataset, queue):
    found = enqueue_all(queue, settings)
    worker = start_worker(settings)
    try:
        wait_until(lambda: all_done(queue, [p.key for p in found]), 60, what="all parts done")
    finally:
        log = stop_worker(worker)
    assert worker.returncode == 0, log
    assert_every_row_accounted(queue, settings, found, dataset, log)
    assert queue.queued_rows() == 0
    assert "shard " in log  # one structured line per shard


def test_sigkilled_processes_are_restarted_and_their_shards_taken_at_once(
        settings, image_server, images, queue):
    """Six SIGKILLs (what the OOM killer sends) mid-shard, with the default 600 s visibility
    timeout: the supervisor hands the dead process's shards back at once, so the run takes
    seconds, not ten minutes, and loses nothing."""
    # Rows on /slow/ keep shards in flight for seconds: on loopback the others take a second.
    dataset = write_dataset(settings.parts_root, [image_server.url(h) for h in TEST_HOSTS],
                            rows_per_part=120, images=images, seed=3, slow_rows=True)
    slow = settings.with_overrides(concurrency=2, shard_size=20, max_deliveries=10)
    assert slow.visibility_timeout == 600
    found = enqueue_all(queue, slow)
    worker = start_worker(slow)
    started = time.monotonic()
    try:
        supervisor = psutil.Process(worker.pid)
        wait_until(lambda: len(supervisor.children()) >= 2 and shards_done(queue, found) >= 2,
                   30, what="first shards")
        for _ in range(6):  # kill a fetching process mid-shard, six times
            # A process that holds a shard right now (on loopback a process can be between
            # shards, and killing it then would test nothing).
            holder = wait_until(lambda: _holding_a_shard(queue, supervisor), 30,
                                what="a process holding a shard")
            holder.send_signal(signal.SIGKILL)
            time.sleep(0.7)
        wait_until(lambda: all_done(queue, [p.key for p in found]), 120, what="all parts done")
    finally:
        log = stop_worker(worker)
    assert time.monotonic() - started < 120  # far from one visibility timeout (600 s)
    assert "restarting it and handing its shards back" in log and "handed back the" in log
    assert_every_row_accounted(queue, slow, found, dataset, log)
    # Dead processes leave the consumer group once their shards are taken.
    assert len(queue.consumers()) <= slow.processes + 6


def _holding_a_shard(queue, supervisor) -> psutil.Process | None:
    """A live worker process of `supervisor` that holds at least one shard, if any."""
    holding = {int(consumer.rsplit(":", 1)[1]) for consumer, count in queue.consumers().items()
               if count}
    return next((c for c in supervisor.children() if c.pid in holding and c.is_running()),
                None)


def test_a_whole_pool_killed_and_started_again_finishes_the_job(settings, image_server, images,
                                                                queue):
    """Supervisor and processes SIGKILLed at once (the OOM killer taking the lot): the next
    pool on this host takes the dead processes' shards at once, not after 600 s."""
    # Rows on /slow/ keep shards in flight for seconds, so the kill finds shards held (on
    # loopback the whole job could otherwise be over before it, and nothing handed back).
    dataset = write_dataset(settings.parts_root, [image_server.url(h) for h in TEST_HOSTS],
                            rows_per_part=120, images=images, seed=3, slow_rows=True)
    slow = settings.with_overrides(concurrency=2, shard_size=20)
    assert slow.visibility_timeout == 600
    found = enqueue_all(queue, slow)
    first = start_worker(slow)
    supervisor = psutil.Process(first.pid)
    wait_until(lambda: shards_done(queue, found) >= 2 and _holding_a_shard(queue, supervisor),
               30, what="first shards, and a shard held")
    os.killpg(first.pid, signal.SIGKILL)  # the host dies: supervisor and children at once
    first.wait(10)
    second = start_worker(slow)
    try:
        # Far within one visibility timeout (600 s), which is how long the dead processes'
        # shards would wait if nobody handed them back: wait_until fails the test past 90 s.
        wait_until(lambda: all_done(queue, [p.key for p in found]), 90, what="all parts done")
    finally:
        log = stop_worker(second)
    assert "handed back the" in log
    assert_every_row_accounted(queue, slow, found, dataset, log)


def test_sigterm_finishes_or_hands_back_in_flight_shards(settings, image_server, images, queue):
    # Rows on /slow/ hold their shard until the 5 s deadline: those shards cannot finish
    # within the 0.5 s grace, whatever the machine's speed, and must be handed back.
    dataset = write_dataset(settings.parts_root, [image_server.url(h) for h in TEST_HOSTS],
                            rows_per_part=120, images=images, seed=3, slow_rows=True)
    slow = settings.with_overrides(concurrency=2, shard_size=30, shutdown_grace=0.5)
    found = enqueue_all(queue, slow)
    worker = start_worker(slow)
    wait_until(lambda: shards_done(queue, found) >= 1, 30, what="a first shard")
    log = stop_worker(worker)
    assert worker.returncode == 0, log
    assert not leftovers(slow.store_root)  # nothing half-written
    done = shards_done(queue, found)
    total = sum(queue.part(p.key).shards_total for p in found)
    assert done < total
    # What was not finished went back to the queue at once, not after the visibility timeout.
    again = start_worker(slow.with_overrides(visibility_timeout=600.0))
    try:
        wait_until(lambda: all_done(queue, [p.key for p in found]), 60, what="all parts done")
    finally:
        stop_worker(again)
    for part in found:
        check_part(slow, part, dataset)


def test_a_process_claims_only_the_shards_it_can_start_on_soon(settings, image_server,
                                                               images, queue):
    """A shard claimed is a shard no other process or host can take. One fetch at a time and
    rows on /slow/ that hold it for seconds: the process keeps about LOOKAHEAD rows waiting
    (two 30-row shards), not shards_in_flight shards, and the rest stays in the queue. (Later
    tries off: a shard whose last row waits for its later try lets the process take another,
    which it starts on at once; that is not what this test counts.)"""
    write_dataset(settings.parts_root, [image_server.url(h) for h in TEST_HOSTS],
                  rows_per_part=120, images=images, seed=3, slow_rows=True)
    one = settings.with_overrides(processes=1, concurrency=1, shard_size=30, retry_rounds=0)
    assert one.shards_in_flight >= 16
    found = enqueue_all(queue, one)
    total = sum(queue.part(p.key).shards_total for p in found)
    worker = start_worker(one)
    try:
        wait_until(lambda: queue.consumers(), 30, what="the process to claim")
        held = []
        for _ in range(20):
            held.append(sum(queue.consumers().values()))
            time.sleep(0.25)
    finally:
        log = stop_worker(worker)
    assert total == 16
    # Two shards being fetched, and under load up to two more whose rows are all done while
    # they are written and acknowledged: still claimed, never the 16 the queue holds.
    assert 1 <= max(held) <= 4, (held, log)


def test_full_disk_pauses_the_pool_until_space_frees_up(settings, dataset, queue, tmp_path):
    store = tmp_path / "small-disk"
    if not mount_tmpfs(store, 64):
        pytest.skip("cannot mount a tmpfs here (needs root and mount rights)")
    try:
        ballast = store / "ballast"
        small = settings.with_overrides(store_dir=store, disk_min_free_gb=0.03)
        with open(ballast, "wb") as handle:  # leave ~10 MB free: below the 30 MB floor
            handle.write(b"\0" * (54 * 1024 * 1024))
        found = enqueue_all(queue, small)
        worker = start_worker(small)
        try:
            report = wait_until(lambda: queue.hosts() and next(iter(queue.hosts().values())),
                                20, what="a host report")
            wait_until(lambda: next(iter(queue.hosts().values()))["paused"], 10, what="pause")
            time.sleep(2)
            assert shards_done(queue, found) == 0
            report = next(iter(queue.hosts().values()))
            # Small numbers in MB, not a bare "0.0 GB free ≤ 0.0 GB".
            assert re.fullmatch(r"\d+ MB free ≤ 31 MB", report["pause_reason"]), report
            ballast.unlink()
            wait_until(lambda: all_done(queue, [p.key for p in found]), 60, what="resume")
        finally:
            stop_worker(worker)
        for part in found:
            check_part(small, part, dataset)
    finally:
        subprocess.run(["umount", "-l", str(store)], capture_output=True)


def test_a_stop_during_a_slow_shard_hands_it_back_within_the_grace(settings, image_server,
                                                                    images, queue):
    """A worker whose only shard waits on a URL that never answers still stops within its
    grace period, and the shard is handed back at once: another worker can take it now, not
    after the visibility timeout."""
    import asyncio

    import pyarrow as pa
    import pyarrow.parquet as pq
    import redis.asyncio as aioredis

    from laion_dagster.core.queue.protocol import AsyncQueue

    base = image_server.url("img-a.test")
    urls = [base + i.path for i in images[:4]] + [f"{base}/slow/never.jpg"]
    folder = settings.parts_root / "laion2B-en"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"URL": urls}), folder / "part-00000-s-c000.snappy.parquet")
    slow = settings.with_overrides(timeout=60.0, shutdown_grace=1.0, shards_in_flight=1,
                                   shard_size=5, visibility_timeout=600.0)
    enqueue_all(queue, slow)
    before = image_server.requests["/slow/never.jpg"]
    worker = start_worker(slow)
    wait_until(lambda: image_server.requests["/slow/never.jpg"] > before, 30,
               what="the slow request")
    started = time.monotonic()
    stop_worker(worker)
    assert time.monotonic() - started < 10, "the stop waited for the slow shard"
    assert not leftovers(slow.store_root)

    async def take_over():
        client = aioredis.Redis.from_url(slow.redis_url)
        other = AsyncQueue(client, slow.prefix, "other-host:1", visibility_timeout=600.0)
        task = await other.claim(block_ms=200)
        await client.aclose()
        return task

    task = asyncio.run(take_over())
    assert task is not None and task.rows == 5


def test_a_hosts_rows_do_not_wait_behind_its_hanging_row(settings, image_server, images,
                                                        queue):
    """A host whose first row hangs: its other rows go out on a connection of their own a few
    seconds later (dispatch.SLOW_FETCH), not one after the other behind the hang, which held a
    shard of the field benchmark 67 s instead of 35."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from laion_dagster.worker.dispatch import SLOW_FETCH

    base = image_server.url("img-a.test")
    plain = [i.path for i in images[:3]]
    urls = [f"{base}/slow/hangs.jpg"] + [base + path for path in plain]
    folder = settings.parts_root / "laion2B-en"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"URL": urls}), folder / "part-00000-h-c000.snappy.parquet")
    hanging = settings.with_overrides(timeout=40.0, shard_size=4, shutdown_grace=0.5)
    enqueue_all(queue, hanging)
    before = {path: image_server.requests[path] for path in [*plain, "/slow/hangs.jpg"]}
    worker = start_worker(hanging)
    try:
        wait_until(lambda: image_server.requests["/slow/hangs.jpg"] > before["/slow/hangs.jpg"],
                   30, what="the hanging request")
        hung_at = time.monotonic()
        wait_until(lambda: all(image_server.requests[p] > before[p] for p in plain),
                   SLOW_FETCH + 8, what="the host's other rows, while its first one hangs")
        assert time.monotonic() - hung_at < hanging.timeout / 2
    finally:
        stop_worker(worker)


def test_a_low_success_rate_is_a_warning_that_names_the_likely_cause(caplog):
    from laion_dagster.core.queue.protocol import Outcome
    from laion_dagster.worker.health import SuccessWatch

    watch = SuccessWatch(window=1000, floor=0.5, every=60.0)
    healthy = Outcome(ok=700, failed=300, bytes=0, classes={"http_4xx": 300})
    broken = Outcome(ok=200, failed=800, bytes=0, classes={"dns": 700, "timeout": 100})
    assert watch.add(healthy) is None
    assert watch.add(Outcome(ok=100, failed=100, bytes=0, classes={"dns": 100})) is None
    with caplog.at_level("WARNING", logger="laion_dagster.worker"):
        message = watch.add(broken)
    assert message and "under 50%" in message and "top failure dns (700 rows)" in message
    assert "resolver" in message and "success rate" in caplog.text
    assert watch.add(broken) is None  # once a minute, not once a shard
    watch.last_warning -= 61
    other = Outcome(ok=100, failed=900, bytes=0, classes={"http_5xx": 900})
    assert "resolver" not in watch.add(other)


def test_a_process_whose_supervisor_is_gone_before_it_starts_stops(settings):
    """A supervisor killed while its processes start (the OOM killer, a pool killed at once):
    a process that finds another parent than the supervisor that made it stops by itself
    instead of claiming shards as an orphan forever."""
    import multiprocessing as mp

    from laion_dagster.worker.entry import run_process
    from laion_dagster.worker.shared_memory import Shared

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    ctx = mp.get_context("spawn")
    shared = Shared.create(ctx, ctx.RawValue("b", 0), ctx.RawValue("b", 0))
    shared.supervisor = gone.pid  # the pid of a supervisor that no longer runs
    child = ctx.Process(target=run_process, args=(settings.model_dump_json(), 0, shared))
    child.start()
    child.join(60)
    alive = child.is_alive()
    if alive:
        child.kill()
    assert not alive and child.exitcode == 0
