"""Real faults in real processes: every row ends done, failed with a record, or still queued.

Each test ends the way a user checks a run: rows = ok + failed + invalid for every part, each
row once in the outputs, no half-written shard, and the files agreeing with the counters.
"""

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster import build_sensor_context, instance_for_test, materialize

from laion_dagster.core.control.enqueue import enqueue_part
from laion_dagster.core.input import parts
from laion_dagster.core.queue import embedded
from laion_dagster.core.queue.connection import connect
from laion_dagster.core.queue.protocol import GROUP, Queue
from laion_dagster.defs.assets import enqueued_part
from laion_dagster.defs.partitions import PARTS
from laion_dagster.defs.resources import LaionResource
from laion_dagster.defs.sensors import finalize_parts
from laion_dagster.demo.dataset import write_dataset
from laion_dagster.instance import failure_message
from tests.conftest import TEST_HOSTS, mount_tmpfs, worker_env
from tests.outputs import all_done, check_part, leftovers, shard_rows, wait_until
from tests.pool import start_worker, stop_worker


def balanced(queue: Queue, settings, found, dataset) -> None:
    for part in found:
        state = queue.part(part.key)
        assert state.done and state.rows == state.ok + state.failed + state.invalid, state
        rows = check_part(settings, part, dataset)
        ok = sum(1 for s in rows.column("status").to_pylist() if s == "success")
        assert ok == state.ok  # the counters agree with the files


def shard_entries(queue: Queue) -> list[tuple[str, int]]:
    """(partition, shard) of every entry on the task stream."""
    return [(fields[b"p"].decode(), int(fields[b"s"]))
            for _, fields in queue.r.xrange(queue.keys.shards)]


def lesser_settings(settings, **changes):
    return settings.model_copy(update=changes)


# ------------------------------------------------------------------ Redis


def test_a_redis_crash_mid_run_loses_nothing(settings, image_server, images, tmp_path):
    """The embedded server is SIGKILLed while workers download and an enqueue waits on the
    high watermark. The pool brings it back at the same address from its append-only file;
    workers, the enqueue and the sensors reconnect by themselves and the run completes."""
    own = lesser_settings(settings, redis_url=None, data_dir=tmp_path / "own",
                          queue_high_watermark=120, shard_size=20)
    dataset = write_dataset(own.parts_root, [image_server.url(h) for h in TEST_HOSTS],
                            rows_per_part=120, images=images, seed=5)
    found = parts.discover(own.parts_root)
    queue = Queue(connect(own), own.prefix)
    errors = []

    def enqueue_everything():
        try:
            for part in found:
                enqueue_part(queue, part, own, poll=0.1)
        except Exception as error:  # reported below, in the test's thread
            errors.append(error)

    feeder = threading.Thread(target=enqueue_everything)
    feeder.start()
    worker = start_worker(own)
    try:
        wait_until(lambda: sum(queue.part(p.key).shards_done for p in found) >= 3, 60,
                   what="some shards done")
        # Every process up first: one still starting would connect after the crash and bring
        # the server back itself, before the supervisor's heartbeat has noticed anything.
        wait_until(lambda: len(queue.r.xinfo_consumers(queue.keys.shards, GROUP))
                   >= own.processes, 30, what="every worker process polling")
        first = embedded.read_state(own.redis_dir)
        os.kill(first.pid, signal.SIGKILL)
        wait_until(lambda: (s := embedded.read_state(own.redis_dir)) and s.pid != first.pid
                   and embedded.is_alive(s), 30, what="the pool to restart Redis")
        assert embedded.read_state(own.redis_dir).url == first.url
        feeder.join(120)
        assert not feeder.is_alive() and not errors, errors
        wait_until(lambda: all_done(queue, [p.key for p in found]), 120, what="all parts done")
    finally:
        log = stop_worker(worker)
        feeder.join(5)
        embedded.stop(own.redis_dir)
    # Started again only when the run completed: a failure above leaves no server behind.
    embedded.ensure_running(own.redis_dir)  # the checks below read the queue again
    try:
        assert "could not report host state" in log  # it did notice the crash
        balanced(queue, own, found, dataset)
        # A sensor tick after the crash reads the queue as usual.
        laion = LaionResource(data_dir=str(own.data_dir), parquet_dir=str(own.parts_root),
                              store_dir=str(own.store_root), prefix=own.prefix)
        with instance_for_test() as instance:
            instance.add_dynamic_partitions(PARTS, [p.key for p in found])
            result = finalize_parts(build_sensor_context(instance=instance,
                                                         resources={"laion": laion}))
        assert sorted(r.partition_key for r in result) == sorted(p.key for p in found)
    finally:
        queue.r.close()
        embedded.stop(own.redis_dir)


def test_a_pool_started_before_redis_waits_for_it(settings, dataset, tmp_path):
    """Redis unreachable at start: the pool says so in one line and waits; when Redis comes
    up, it downloads. A Dagster run started meanwhile fails with a sentence, not a wall."""
    directory = tmp_path / "late-redis"
    server = embedded.ensure_running(directory)
    embedded.stop(directory)  # it will come back at this address
    late = settings.with_overrides(redis_url=server.url)
    worker = start_worker(late)
    try:
        laion = LaionResource(data_dir=str(late.data_dir), parquet_dir=str(late.parts_root),
                              store_dir=str(late.store_root), redis_url=server.url,
                              prefix=late.prefix, shard_size=late.shard_size)
        found = parts.discover(late.parts_root)
        with instance_for_test() as instance:
            instance.add_dynamic_partitions(PARTS, [found[0].key])
            started = time.monotonic()
            failed = materialize([enqueued_part], partition_key=found[0].key, instance=instance,
                                 resources={"laion": laion}, raise_on_error=False)
            message = failure_message(instance, failed.run_id)
        assert not failed.success and time.monotonic() - started < 60
        assert "cannot reach Redis at redis://***@127.0.0.1:" in message
        assert "Traceback" not in message and server.url not in message  # no password shown
        assert worker.poll() is None  # still waiting, not exited
        embedded.ensure_running(directory)
        queue = Queue(connect(late), late.prefix)
        for part in found:
            enqueue_part(queue, part, late)
        wait_until(lambda: all_done(queue, [p.key for p in found]), 90, what="all parts done")
    finally:
        log = stop_worker(worker)
        embedded.stop(directory)
    assert "cannot reach Redis" in log and "waiting for it" in log
    assert log.count("waiting for it") <= 3  # one line every 10 s, not a flood
    embedded.ensure_running(directory)
    try:
        balanced(queue, late, found, dataset)
    finally:
        embedded.stop(directory)


# ------------------------------------------------------------------ workers and hosts


def test_a_host_gone_for_good_mid_shard_is_taken_over(settings, image_server, images, queue):
    """Host a holds shards waiting on slow URLs when it vanishes (supervisor and processes
    SIGKILLed, never back). Host b takes them over after the visibility timeout."""
    dataset = write_dataset(settings.parts_root, [image_server.url(h) for h in TEST_HOSTS],
                            rows_per_part=120, images=images, seed=4, slow_rows=True)
    quick = settings.with_overrides(visibility_timeout=3.0, shard_size=30)
    found = parts.discover(quick.parts_root)
    for part in found:
        enqueue_part(queue, part, quick)
    doomed = start_worker(quick.with_overrides(host_id="a"))
    wait_until(lambda: queue.r.xpending(queue.keys.shards, "workers")["pending"] >= 2, 30,
               what="host a holding shards")
    time.sleep(1.0)
    os.killpg(doomed.pid, signal.SIGKILL)  # the host is gone: nothing is handed back
    doomed.wait(10)
    held = queue.r.xpending(queue.keys.shards, "workers")["pending"]
    assert held >= 1
    survivor = start_worker(quick.with_overrides(host_id="b"))
    try:
        wait_until(lambda: all_done(queue, [p.key for p in found]), 90, what="all parts done")
    finally:
        log = stop_worker(survivor)
    balanced(queue, quick, found, dataset)
    assert not leftovers(quick.store_root), log


def test_a_claim_whose_reply_was_lost_is_handed_back_before_the_timeout(
        settings, image_server, images, queue):
    """Redis served a worker's claim but the reply never reached it (the server was killed
    after writing it to its append-only file, or the connection dropped; the client's retry
    then claimed the next shard). Here the test makes that claim itself, in the worker's name.
    The shard is handed back within seconds, not left for the 10-minute visibility timeout
    (a run's end waited that long), and is downloaded once."""
    dataset = write_dataset(settings.parts_root, [image_server.url(h) for h in TEST_HOSTS],
                            rows_per_part=120, images=images, seed=7)
    # Four shards at a time: the worker, polling already, must leave a shard for the test's
    # claim in its name (with room for more it can take all 24 before the test claims one).
    own = settings.with_overrides(visibility_timeout=600.0, shard_size=20, processes=1,
                                  shards_in_flight=4)
    found = parts.discover(own.parts_root)
    worker = start_worker(own)
    try:
        consumers = wait_until(lambda: queue.consumers(), 30, what="the worker polling")
        [consumer] = consumers
        for part in found:
            enqueue_part(queue, part, own)
        reply = queue.r.xreadgroup(GROUP, consumer, {queue.keys.shards: ">"}, count=1)
        [[_, [(lost_id, _)]]] = reply
        wait_until(lambda: all_done(queue, [p.key for p in found]), 90, what="all parts done")
    finally:
        log = stop_worker(worker)
    assert "claim reply never arrived" in log and lost_id.decode() in log, log
    balanced(queue, own, found, dataset)


def test_a_slow_live_worker_keeps_its_shard(settings, image_server, images, queue):
    """Two live hosts, visibility timeout 2 s, URLs that take 5 s: the holder refreshes its
    claim, so no shard is ever done twice (each is logged by exactly one host)."""
    dataset = write_dataset(settings.parts_root, [image_server.url(h) for h in TEST_HOSTS],
                            rows_per_part=60, images=images, seed=6, slow_rows=True)
    slow = settings.with_overrides(visibility_timeout=2.0, shard_size=20, processes=1)
    found = parts.discover(slow.parts_root)
    for part in found:
        enqueue_part(queue, part, slow)
    a = start_worker(slow.with_overrides(host_id="a"))
    b = start_worker(slow.with_overrides(host_id="b"))
    try:
        wait_until(lambda: all_done(queue, [p.key for p in found]), 90, what="all parts done")
    finally:
        logs = [stop_worker(a), stop_worker(b)]
    done = Counter(line.split("shard ", 1)[1].split(":", 1)[0]
                   for log in logs for line in log.splitlines() if " ok, " in line)
    assert sum(done.values()) == sum(queue.part(p.key).shards_total for p in found)
    assert set(done.values()) == {1}, done
    balanced(queue, slow, found, dataset)


def test_a_poison_shard_is_dead_lettered_and_the_rest_carries_on(settings, image_server,
                                                                 images, queue):
    """Every process that takes one shard dies (SIGKILL, as from a segfault or the OOM
    killer). After max_deliveries it lands in the dead stream, its rows count as failed with
    class dead_letter, and every other shard is downloaded."""
    dataset = write_dataset(settings.parts_root, [image_server.url(h) for h in TEST_HOSTS],
                            rows_per_part=120, images=images, seed=7, slow_rows=True)
    poison_settings = settings.with_overrides(visibility_timeout=2.0, max_deliveries=2,
                                              shard_size=30)
    found = parts.discover(poison_settings.parts_root)
    for part in found:
        enqueue_part(queue, part, poison_settings)
    # The poison is a shard with a slow row, so each delivery lives long enough to be seen.
    urls = pq.read_table(found[0].path).column("URL").to_pylist()
    slow_row = next(i for i, url in enumerate(urls) if url and "/slow/" in url)
    target = (found[0].key, slow_row // 30)
    [entry_id] = [eid for eid, f in queue.r.xrange(queue.keys.shards)
                  if (f[b"p"].decode(), int(f[b"s"])) == target]
    worker = start_worker(poison_settings)
    killed = set()
    try:
        deadline = time.monotonic() + 90
        while not all_done(queue, [p.key for p in found]):
            assert time.monotonic() < deadline, "the run did not finish"
            pending = queue.r.xpending_range(queue.keys.shards, "workers", min=entry_id,
                                             max=entry_id, count=1)
            if pending:
                pid = int(pending[0]["consumer"].decode().rsplit(":", 1)[1])
                poisonous = pending[0]["times_delivered"] <= poison_settings.max_deliveries
                if poisonous and pid not in killed and psutil.pid_exists(pid):
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
            time.sleep(0.05)
    finally:
        log = stop_worker(worker)
    assert len(killed) == 2, log  # each of the two deliveries killed its process
    assert "restarting" in log  # the supervisor brought the processes back
    # Only the poison shard: shards that shared a process with it ran again, the second
    # time beside nothing suspect, and completed.
    dead_entries = queue.r.xrange(queue.keys.dead)
    assert len(dead_entries) == 1, log
    [(_, dead)] = dead_entries
    assert (dead[b"p"].decode(), int(dead[b"s"])) == target
    state = queue.part(found[0].key)
    assert state.rows == state.ok + state.failed + state.invalid, (state, log)
    first = target[1] * 30
    assert queue.classes(found[0].key).get("dead_letter") == 30 - sum(
        1 for (name, row), cls in dataset.expected_by_row.items()
        if name == found[0].path.name and first <= row < first + 30 and cls == "invalid_url")
    for part in found[1:]:
        check_part(poison_settings, part, dataset)
    assert not leftovers(poison_settings.store_root)


# ------------------------------------------------------------------ enqueue


def test_an_enqueue_killed_half_way_then_run_again_queues_each_row_once(settings, tmp_path):
    folder = settings.parts_root / "laion2B-en"
    folder.mkdir(parents=True)
    rows = 300_000
    path = folder / "part-00000-big-c000.snappy.parquet"
    pq.write_table(pa.table({
        "URL": [f"http://img-a.test/{i}.jpg" for i in range(rows)],
        "TEXT": [f"caption {i}" for i in range(rows)]}), path, row_group_size=10_000)
    big = settings.with_overrides(shard_size=500)
    part = parts.discover(big.parts_root)[0]
    queue = Queue(connect(big), big.prefix)
    script = ("from laion_dagster.core.input import parts; "
              "from laion_dagster.core.queue.connection import connect; "
              "from laion_dagster.core.control.enqueue import enqueue_part; "
              "from laion_dagster.core.queue.protocol import Queue; "
              "from laion_dagster.core.settings import Settings; s = Settings(); "
              "p = parts.discover(s.parts_root)[0]; "
              "enqueue_part(Queue(connect(s), s.prefix), p, s)")
    child = subprocess.Popen([sys.executable, "-c", script], env=worker_env(big))
    try:
        wait_until(lambda: queue.part(part.key).shards >= 100, 60, what="half the shards")
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
    partial = queue.part(part.key)
    assert 100 <= partial.shards < rows // 500 and not partial.enqueued
    report = enqueue_part(queue, part, big)
    assert report.shards_skipped == partial.shards
    assert report.shards_added == rows // 500 - partial.shards
    state = queue.part(part.key)
    assert (state.rows, state.shards, state.shards_total) == (rows, rows // 500, rows // 500)
    entries = shard_entries(queue)
    assert sorted(s for _, s in entries) == list(range(rows // 500))  # each shard once
    assert queue.queued_rows() == rows


def test_the_same_part_materialized_twice_while_workers_run_is_downloaded_once(
        settings, dataset, queue):
    found = parts.discover(settings.parts_root)
    laion = LaionResource(data_dir=str(settings.data_dir), parquet_dir=str(settings.parts_root),
                          store_dir=str(settings.store_root), redis_url=settings.redis_url,
                          prefix=settings.prefix, shard_size=settings.shard_size)
    worker = start_worker(settings)
    try:
        with instance_for_test() as instance:
            instance.add_dynamic_partitions(PARTS, [p.key for p in found])
            for _ in range(2):
                for part in found:
                    assert materialize([enqueued_part], partition_key=part.key,
                                       instance=instance, resources={"laion": laion}).success
        # ... and twice more at the same moment, from two threads, as two hands would.
        threads = [threading.Thread(target=enqueue_part, args=(queue, found[0], settings))
                   for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        wait_until(lambda: all_done(queue, [p.key for p in found]), 90, what="all parts done")
    finally:
        stop_worker(worker)
    for part in found:
        assert queue.part(part.key).shards == queue.part(part.key).shards_total
    entries = shard_entries(queue)
    assert len(entries) == len(set(entries))  # no shard queued twice
    balanced(queue, settings, found, dataset)


# ------------------------------------------------------------------ disk


def test_enospc_while_writing_leaves_no_partial_shard_and_resumes(settings, dataset, queue,
                                                                  tmp_path):
    """A store with room for a few images only and no free-space floor: writes hit ENOSPC.
    The shard is dropped whole and handed back (no delivery used up), the host reports why it
    paused, and everything completes once space is freed."""
    store = tmp_path / "tiny-disk"
    if not mount_tmpfs(store, 16):
        pytest.skip("cannot mount a tmpfs here (needs root and mount rights)")
    try:
        tight = settings.with_overrides(store_dir=store, disk_min_free_gb=0.0, max_deliveries=2)
        ballast = store / "ballast"
        with open(ballast, "wb") as handle:  # leave ~300 KB: a few images, not a shard
            handle.write(b"\0" * (16 * 1024 * 1024 - 300 * 1024))
        found = parts.discover(tight.parts_root)
        for part in found:
            enqueue_part(queue, part, tight)
        worker = start_worker(tight)
        try:
            wait_until(lambda: any(r.get("paused") for r in queue.hosts().values()), 30,
                       what="the host to pause")
            report = next(iter(queue.hosts().values()))
            assert "no space left on device" in report["pause_reason"]
            # Every shard in flight when the disk filled (in this or another process) ends:
            # written whole, or dropped with its temporary files; none lingers half written.
            wait_until(lambda: not leftovers(store), 30, what="the partial shards to be dropped")
            done_before = sum(queue.part(p.key).shards_done for p in found)
            time.sleep(2)
            assert sum(queue.part(p.key).shards_done for p in found) == done_before  # paused
            ballast.unlink()
            wait_until(lambda: all_done(queue, [p.key for p in found]), 90, what="resume")
        finally:
            log = stop_worker(worker)
        assert "no space left" in log and "resuming" in log
        assert not queue.r.xlen(queue.keys.dead)  # a full disk is not poison
        balanced(queue, tight, found, dataset)
        assert all(shard_rows(tight.store_root / p.relative_dir).num_rows for p in found)
    finally:
        subprocess.run(["umount", "-l", str(store)], capture_output=True)
