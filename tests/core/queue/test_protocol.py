"""The queue protocol on a real server: enqueue once, claim, reclaim, complete once, dead-letter."""

import asyncio
import time

import pyarrow as pa
import pytest
import redis.asyncio as aioredis

from laion_dagster.core.control.enqueue import auto_shard_size, enqueue_part
from laion_dagster.core.input import parts
from laion_dagster.core.queue.protocol import AsyncQueue, Outcome, Queue, decode_table, encode_table


def _write_part(settings, rows: int, bad_every: int = 0):
    folder = settings.parts_root / "laion2B-en"
    folder.mkdir(parents=True, exist_ok=True)
    urls = [None if bad_every and i % bad_every == 0 else f"http://img-a.test/{i}.jpg"
            for i in range(rows)]
    import pyarrow.parquet as pq

    path = folder / "part-00000-abc-c000.snappy.parquet"
    pq.write_table(pa.table({"URL": urls, "TEXT": [f"c{i}" for i in range(rows)]}), path)
    return parts.discover(settings.parts_root)[0]


@pytest.fixture
def queue(client, settings):
    q = Queue(client, settings.prefix, visibility_timeout=0.3, max_deliveries=2)
    q.ensure_group()
    return q


@pytest.fixture
def one_shard(queue, settings):
    part = _write_part(settings, rows=50)
    enqueue_part(queue, part, settings)
    return part


def _async_queue(redis_server, settings, consumer, visibility=0.3):
    return AsyncQueue(aioredis.Redis.from_url(redis_server.url), settings.prefix, consumer,
                      visibility_timeout=visibility, max_deliveries=2)


def test_enqueue_counts_rows_and_is_idempotent(queue, settings):
    part = _write_part(settings, rows=125, bad_every=10)
    first = enqueue_part(queue, part, settings)
    assert (first.rows, first.invalid, first.shards, first.shards_added) == (125, 13, 3, 3)
    again = enqueue_part(queue, part, settings)
    assert again.shards_added == 0 and again.shards_skipped == 3
    state = queue.part(part.key)
    assert (state.rows, state.invalid, state.shards_total, state.pending) == (125, 13, 3, 112)
    assert queue.queued_rows() == 112
    # The shard stream keeps the name 0.1 gave it, so a queue survives an upgrade.
    assert queue.r.xlen(f"{settings.prefix}:tasks") == 3
    errors = queue.read_errors(part.key)
    assert errors.num_rows == 13 and set(errors.column("error_class").to_pylist()) == {
        "invalid_url"}


@pytest.mark.parametrize(("rows", "processes", "expected"), [
    (2_000, 2, 250),  # a first try: 8 shards for 2 processes, never below 250 rows
    (20_000, 2, 2_500),  # every process gets 4 shards, so none idles on its last slow URL
    (5_000, 16, 250),
    (18_000_000, 16, 10_000),  # a LAION part: img2dataset's 10,000 rows
])
def test_shard_size_fits_the_part_and_the_pool_when_unset(queue, settings, rows, processes,
                                                          expected):
    part = _write_part(settings, rows=rows) if rows <= 20_000 else None
    assert auto_shard_size(rows, processes) == expected
    if part is None:
        return
    unset = settings.model_copy(update={"shard_size": None, "processes": processes})
    report = enqueue_part(queue, part, unset)
    assert report.shards == -(-rows // expected)
    assert queue.part(part.key).shard_size == expected
    # A later run with more processes keeps the size the part was cut with: the same rows,
    # not some twice and some never.
    again = enqueue_part(queue, part, unset.with_overrides(processes=processes * 8))
    assert again.shards == report.shards and again.shards_added == 0


def test_enqueue_pauses_above_high_watermark(queue, settings):
    part = _write_part(settings, rows=200)
    tight = settings.with_overrides(queue_high_watermark=500)
    queue.r.set(queue.keys.queued_rows, 1000)  # someone else's part is still queued

    queued_while_full = []

    def drain_soon():
        deadline = time.monotonic() + 30
        while not queue.r.exists(queue.keys.part(part.key)) and time.monotonic() < deadline:
            time.sleep(0.02)  # until the enqueue has begun the part
        time.sleep(0.5)  # the other part stays queued a while after that
        queued_while_full.append(queue.r.xlen(queue.keys.shards))
        queue.r.set(queue.keys.queued_rows, 0)

    import threading

    threading.Thread(target=drain_soon, daemon=True).start()
    report = enqueue_part(queue, part, tight, poll=0.1)
    # Nothing went on the queue above the watermark; all of it once the queue drained.
    assert queued_while_full == [0]
    assert report.waited_seconds > 0 and report.shards_added == 4


def test_claim_complete_counts_once_even_when_two_workers_finish(queue, settings, redis_server,
                                                                  one_shard):
    part = one_shard

    async def scenario():
        a = _async_queue(redis_server, settings, "host-a:1")
        b = _async_queue(redis_server, settings, "host-b:1")
        task = await a.claim(block_ms=100)
        assert task is not None and task.rows == 50 and task.deliveries == 1
        await asyncio.sleep(0.5)  # a looks dead: past the visibility timeout
        stolen = await b.claim(block_ms=100)
        assert stolen is not None and stolen.entry_id == task.entry_id
        assert stolen.deliveries == 2
        outcome = Outcome(ok=40, failed=10, bytes=4000, classes={"http_4xx": 10})
        first = await b.complete(stolen, outcome)
        second = await a.complete(task, outcome)  # the slow worker finishes too
        await a.r.aclose()
        await b.r.aclose()
        return first, second

    assert asyncio.run(scenario()) == (1, 0)
    state = queue.part(part.key)
    assert (state.ok, state.failed, state.bytes, state.shards_done) == (40, 10, 4000, 1)
    assert state.done and queue.queued_rows() == 0
    assert queue.classes(part.key) == {"http_4xx": 10}
    assert queue.r.xlen(queue.keys.shards) == 0


def test_a_live_worker_keeps_its_shard(queue, settings, redis_server, one_shard):
    async def scenario():
        a = _async_queue(redis_server, settings, "host-a:1")
        b = _async_queue(redis_server, settings, "host-b:1")
        task = await a.claim(block_ms=100)
        for _ in range(4):  # refresh more often than the visibility timeout
            await asyncio.sleep(0.15)
            await a.refresh([task])
        other = await b.claim(block_ms=100)
        await a.r.aclose()
        await b.r.aclose()
        return other

    assert asyncio.run(scenario()) is None


def test_released_shard_is_taken_at_once_without_using_up_a_delivery(queue, settings,
                                                                     redis_server, one_shard):
    async def scenario():
        a = _async_queue(redis_server, settings, "host-a:1", visibility=60)
        b = _async_queue(redis_server, settings, "host-b:1", visibility=60)
        taken = []
        task = await a.claim(block_ms=100)
        for _ in range(5):  # five stops in a row: handed back every time
            await a.hand_back([task])
            task = await b.claim(block_ms=100)
            taken.append(task)
            a, b = b, a
        await a.r.aclose()
        await b.r.aclose()
        return taken

    taken = asyncio.run(scenario())
    assert all(t is not None and t.entry_id == taken[0].entry_id for t in taken)
    # Each hand-over is one delivery, not an extra one: the shard stays far from max_deliveries.
    assert [t.deliveries for t in taken] == [1] * 5


def test_dead_letter_counts_rows_as_failed(queue, settings, redis_server, one_shard):
    part = one_shard

    async def scenario():
        a = _async_queue(redis_server, settings, "host-a:1")
        task = await a.claim(block_ms=100)
        table = decode_table(task.payload)
        errors = pa.table({"row": table.column("row"), "url": table.column("url"),
                           "caption": table.column("caption"),
                           "error_class": ["dead_letter"] * table.num_rows,
                           "error_message": ["poison"] * table.num_rows})
        result = await a.dead_letter(task, Outcome(0, task.rows, 0, {"dead_letter": task.rows},
                                                   encode_table(errors)), "poison")
        await a.r.aclose()
        return result

    assert asyncio.run(scenario()) == 1
    assert queue.dead_letters() == 1
    state = queue.part(part.key)
    assert state.failed == 50 and state.done
    assert queue.read_errors(part.key).num_rows == 50


def test_reset_starts_a_new_generation_and_ignores_late_results(queue, settings, redis_server,
                                                                 one_shard):
    part = one_shard

    async def scenario():
        a = _async_queue(redis_server, settings, "host-a:1", visibility=60)
        old = await a.claim(block_ms=100)
        assert queue.reset(part.key) == 2
        assert queue.queued_rows() == 0
        report = enqueue_part(queue, part, settings)
        assert report.generation == 2 and report.shards_added == 1
        late = await a.complete(old, Outcome(50, 0, 1, {}))  # the old generation's result
        await a.r.aclose()
        return late

    assert asyncio.run(scenario()) == -1
    state = queue.part(part.key)
    assert state.ok == 0 and state.pending == 50 and queue.queued_rows() == 50
