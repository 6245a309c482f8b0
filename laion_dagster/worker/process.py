"""One worker process: an asyncio loop that claims shards, fetches their URLs and writes them.

Up to `concurrency` fetches run at once across the process, in the order dispatch.py gives:
one queue per host, a host's rows back to back on its warm connections, at most
`per_host_limit` at once. A new shard is claimed whenever fewer than LOOKAHEAD × concurrency
rows wait for a slot, so shards waiting on their slowest URLs (a dead host's connect timeout, a
server that never answers: up to `timeout` seconds) never idle the process, and a process never
holds shards it will not start on soon (they stay claimable by other processes and hosts): it
works on up to `shards_in_flight` shards, and MAX_OPEN_ROWS rows, at a time. Decoding and
resizing run in a small thread pool, off the event loop; a plain image's header check, hash
and append to its shard are cheaper than the hand-off and run on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import errno
import functools
import logging
import os
import signal
import socket
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc

from laion_dagster.core.fetch.fetcher import Fetcher, FetchResult, host_of
from laion_dagster.core.images import checks
from laion_dagster.core.input import parts
from laion_dagster.core.outcomes import is_transient
from laion_dagster.core.queue.connection import connect_async
from laion_dagster.core.queue.protocol import RETRY_ROUND, AsyncQueue, Outcome, Task, original_shard
from laion_dagster.core.settings import Settings
from laion_dagster.core.shards.files import (
    SampleRecord,
    ShardWriter,
    complete_shards,
    failed_rows,
    read_complete_shard,
    records_table,
    sample_key,
    shard_complete,
)
from laion_dagster.core.shards.recipe import Recipe
from laion_dagster.core.storage import StoreError
from laion_dagster.worker.dispatch import SLOW_FETCH, Dispatcher
from laion_dagster.worker.shared import Shared

log = logging.getLogger("laion_dagster.worker")

OUR_COLUMNS = ("row", "url", "caption", parts.REJECT)
# Images up to this size are checked and stored on the event loop when nothing is resized;
# bigger ones, and every decode or resize, go to the thread pool.
INLINE_BYTES = 1_000_000
_terminated = False  # set by SIGTERM sent to this process alone
CLAIM_PROBLEM = "cannot claim shards"
# Rows without an outcome yet that a process takes on at most (their records and payloads).
MAX_OPEN_ROWS = 20_000
# Rows of open shards a process holds at most, outcomes included: a shard whose last rows wait
# for their later try (retry_delay) keeps its other rows' records until it is written.
MAX_HELD_ROWS = 2 * MAX_OPEN_ROWS
TRIM_EVERY = 2.0  # seconds between malloc_trim calls
LOOKAHEAD = 24  # rows queued ahead, in units of concurrency
# Seconds between looks for shards claimed in Redis whose claim reply never arrived, and the
# idle time after which such a shard is handed back: well past any reply still on its way.
UNRECEIVED_EVERY = 10.0
# Seconds a process claims nothing after its store (a bucket) failed a write.
STORE_BACKOFF = 15.0


def _store(writer: ShardWriter, record: SampleRecord, body: bytes, filters: checks.Filters,
           resize: checks.Resize, expected_sha256: str | None) -> SampleRecord:
    """Thread-pool side of a success: identify, hash, check, resize and write the image."""
    try:
        info = checks.inspect(body)
        filters.check(info, expected_sha256)
        stored, ext, width, height = checks.transform(body, info, resize)
    except checks.NotAnImage as error:
        record.status, record.error_class, record.error_message = "failed", error.error_class, \
            str(error)
        return record
    record.original_width, record.original_height = info.width, info.height
    record.width, record.height, record.sha256 = width, height, info.sha256
    record.format, record.bytes = ext, len(stored)
    writer.add(record, stored)
    return record


class ShardJob:
    """Everything about one claimed shard while it is being worked on."""

    def __init__(self, task: Task, settings: Settings, recipe: Recipe, source: str | None):
        self.task = task
        self.recipe = recipe
        self.table = parts.decode_table(task.payload)
        self.prefix = parts.sample_prefix(task.partition)
        self.key_columns = parts.key_columns_of(self.table)
        self.rejected = rejected_rows(self.table)
        part_dir = settings.store_root / parts.relative_dir(task.partition)
        # A retry shard's rows go back into the part's shard they came from, when this host
        # holds it: the new outcomes are merged into its files (see retry.py).
        original = original_shard(task.shard) if task.shard >= RETRY_ROUND else None
        self.merge = original is not None and shard_complete(part_dir, original)
        spool = (settings.spool_root / parts.relative_dir(task.partition)
                 if settings.in_bucket else None)
        self.writer = ShardWriter(part_dir, original if self.merge else task.shard,
                                  recipe.output_format, made_with(recipe, source), spool)
        self.records: list[SampleRecord] = []
        # While its rows are fetched: how many are left, when they are done, what failed.
        self.pending = 0
        self.done = asyncio.Event()
        self.failure: BaseException | None = None
        self.abandoned = False
        self.fetches: set[asyncio.Task] = set()
        # Rows tried again later (retry_rounds): row -> what its earlier tries met; and the
        # rows waiting for their later try: row -> (timer, record, host).
        self.earlier: dict[int, list[str]] = {}
        self.later: dict[int, tuple[asyncio.TimerHandle, SampleRecord, str]] = {}
        self.recovered = 0  # rows that succeeded on a later try

    def close(self) -> None:
        self.writer.close(self.records, self.extra_columns(), merge=self.merge,
                          notes={"retried": len(self.earlier), "recovered": self.recovered})

    def extra_columns(self) -> pa.Table:
        return self.table.drop_columns([c for c in OUR_COLUMNS if c in self.table.column_names])

    def samples(self) -> list[SampleRecord]:
        """A record per row, in row order; rows rejected at enqueue are failed already."""
        table = self.table
        extra = self.extra_columns()
        extras = extra.to_pylist() if extra.num_columns else [{}] * table.num_rows
        records = []
        for row, url, caption, more in zip(table.column("row").to_pylist(),
                                           table.column("url").to_pylist(),
                                           table.column("caption").to_pylist(), extras,
                                           strict=True):
            record = SampleRecord(row=row, key=sample_key(self.prefix, row), url=url,
                                  caption=caption, extra=more)
            reason = self.rejected.get(row)
            if reason is not None:
                record.status, record.error_class = "failed", "invalid_url"
                record.error_message, record.rejected = reason, True
            records.append(record)
        return records

    def outcome(self) -> Outcome:
        samples = records_table(self.records)
        for name in self.key_columns:
            samples = samples.append_column(name, self.table.column(name))
        return dataclasses.replace(outcome_of(samples, self.rejected, self.key_columns),
                                   retried=len(self.earlier), recovered=self.recovered)

    def cancel_later(self) -> list[tuple[SampleRecord, str]]:
        """Stop the timers of the rows waiting for a later try; returns those rows."""
        waiting = []
        for timer, record, host in self.later.values():
            timer.cancel()
            waiting.append((record, host))
        self.later.clear()
        return waiting


def made_with(recipe: Recipe, source: str | None) -> dict:
    """What a shard's content depends on (kept in its _stats.json): the part's recipe and the
    fingerprint of the file its rows came from, so incremental mode never takes a shard made
    from an older version of the part for this one."""
    return {**recipe.made_with, "source": source} if source else recipe.made_with


def with_earlier_tries(message: str | None, earlier: list[str] | None) -> str | None:
    """A row's last failure, followed by what its earlier tries met: a row that failed twice
    keeps both messages."""
    if not earlier:
        return message
    tries = "; ".join(f"try {n}: {text}" for n, text in enumerate(earlier, 1))
    return f"{message} (earlier {tries})"


def rejected_rows(table: pa.Table) -> dict[int, str]:
    """Rows of a shard payload that are not fetched (no usable URL), with the reason."""
    if parts.REJECT not in table.column_names:
        return {}
    rejected = table.filter(pc.is_valid(table.column(parts.REJECT)))
    return dict(zip(rejected.column("row").to_pylist(),
                    rejected.column(parts.REJECT).to_pylist(), strict=True))


def outcome_of(samples: pa.Table, rejected: dict[int, str] | None = None,
               key_columns: list[str] = ()) -> Outcome:
    """A shard's counts, error classes and error records, from its sample table. Rows rejected
    at enqueue are left out: the enqueue counted them and recorded their errors."""
    if rejected:
        samples = samples.filter(pc.invert(pc.is_in(
            samples.column("row"), pa.array(list(rejected), pa.int64()))))
    status = samples.column("status").to_pylist()
    sizes = samples.column("bytes").to_pylist()
    classes = Counter(c or "unknown" for c, st in
                      zip(samples.column("error_class").to_pylist(), status, strict=True)
                      if st != "success")
    ok = status.count("success")
    errors = failed_rows(samples, key_columns)
    return Outcome(ok=ok, failed=len(status) - ok,
                   bytes=sum(b or 0 for b, st in zip(sizes, status, strict=True)
                             if st == "success"),
                   classes=dict(classes),
                   errors=parts.encode_table(errors) if errors.num_rows else b"")


class SuccessWatch:
    """Warns when the success rate over the last `window` rows drops under `floor`.

    On LAION a healthy run keeps 60-80% of its rows; under 50% it is nearly always this host's
    DNS resolver giving up under load (class `dns`), or its network, not the web.
    """

    def __init__(self, window: int = 1000, floor: float = 0.5, every: float = 60.0):
        self.window, self.floor, self.every = window, floor, every
        self.recent: list[Outcome] = []
        self.last_warning = -every

    def add(self, outcome: Outcome) -> str | None:
        self.recent.append(outcome)
        while len(self.recent) > 1 and sum(o.ok + o.failed for o in self.recent[1:]) >= \
                self.window:
            self.recent.pop(0)
        rows = sum(o.ok + o.failed for o in self.recent)
        if rows < self.window:
            return None
        rate = sum(o.ok for o in self.recent) / rows
        now = time.monotonic()
        if rate >= self.floor or now - self.last_warning < self.every:
            return None
        self.last_warning = now
        classes = Counter()
        for o in self.recent:
            classes.update(o.classes)
        top, count = classes.most_common(1)[0] if classes else ("unknown", 0)
        advice = (" Most failures are dns: this host's resolver is likely overwhelmed; use a "
                  "local caching resolver (e.g. unbound or systemd-resolved) with generous "
                  "limits." if top == "dns" else "")
        message = (f"success rate {rate:.0%} over the last {rows:,} rows is under "
                   f"{self.floor:.0%}; top failure {top} ({count:,} rows).{advice}")
        log.warning(message)
        return message


class WorkerProcess:
    def __init__(self, settings: Settings, index: int, shared: Shared):
        self.settings = settings
        self.index = index
        self.shared = shared
        host = settings.host_id or socket.gethostname()
        self.consumer = f"{host}:{os.getpid()}"
        self.active: dict[str, ShardJob] = {}
        self.held: Task | None = None  # a suspect shard claimed, waiting to run alone
        # Shards that failed here and are left to the visibility timeout on purpose (a shard
        # that fails every worker must use up its deliveries): not handed back early.
        self.left_to_timeout: set[str] = set()
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="shard-cpu")
        # Shards are written (and, for a bucket, uploaded) off the image pool: an upload
        # waits on the network, and images must not wait behind it.
        self.publishing = ThreadPoolExecutor(max_workers=2, thread_name_prefix="shard-publish")
        # Incremental mode in a bucket: (part, generation) -> its shards complete before this
        # process claimed any, from one listing (see _outcome_on_disk).
        self.listed: dict[tuple[str, int], set[int]] = {}
        self.store_down_until = 0.0  # monotonic time; see _handle
        self.health = SuccessWatch()
        # The recipe of parts enqueued without one (see recipe.py).
        self.own_recipe = Recipe.from_settings(settings)
        self.stopping = asyncio.Event()
        # entry id -> rows of a claimed shard without an outcome yet; and the rows of every
        # claimed shard, outcomes or not (see MAX_OPEN_ROWS, MAX_HELD_ROWS)
        self.unfinished: dict[str, int] = {}
        self.held_rows = 0
        # entry id -> rows of a shard claimed whose rows are not in the dispatcher yet (it
        # reads Redis and opens its files first): they count as waiting, or the claim loop
        # would take shards_in_flight shards at once before the first one's rows arrive.
        self.arriving: dict[str, int] = {}
        self.dispatcher = Dispatcher(settings.concurrency, settings.per_host_limit)
        self.wants_a_shard = self.dispatcher.listen()
        self.can_dispatch = self.dispatcher.listen()
        self.slow_fetches: set[asyncio.Task] = set()  # past SLOW_FETCH (dispatch.py)

    async def run(self) -> None:
        s = self.settings
        client = connect_async(s, name=f"worker:{self.consumer}")
        self.queue = AsyncQueue(client, s.prefix, self.consumer, s.visibility_timeout,
                                s.max_deliveries)
        await self.queue.ensure_group()
        running: set[asyncio.Task] = set()
        keeper = asyncio.create_task(self._keep_claims())
        finder = asyncio.create_task(self._hand_back_unreceived())
        tidier = asyncio.create_task(self._return_free_memory())
        watcher = asyncio.create_task(self._watch_stop())
        try:
            async with Fetcher(s) as fetcher:
                self.fetcher = fetcher
                dispatching = asyncio.create_task(self._dispatch())
                try:
                    await self._claim_loop(running)
                    await self._drain(running)
                finally:
                    dispatching.cancel()
        finally:
            keeper.cancel()
            finder.cancel()
            tidier.cancel()
            watcher.cancel()
            self.pool.shutdown(wait=True)
            self.publishing.shutdown(wait=True)
            await client.aclose()

    async def _claim_loop(self, running: set[asyncio.Task]) -> None:
        while not self.stopping.is_set():
            if self.shared.paused.value or self.shared.out_of_space.value:
                await self._sleep(1.0)
                continue
            wait = self.store_down_until - time.monotonic()
            if wait > 0:  # the bucket failed a write: claim nothing until it may be back
                await self._sleep(wait)
                continue
            # Claim only with room: a shard taken while every fetch slot is busy would wait
            # here instead of on a process or host that has room.
            if not await self._unless_stopped(self._room_for_a_shard(running)):
                break
            try:
                task = await self.queue.claim(block_ms=1000)
            except Exception as error:  # Redis down: back off, carry on
                log.warning("claim failed (%s); retrying", error)
                self.shared.set_problem(f"{CLAIM_PROBLEM}: {error}")
                await self._sleep(2.0)
                continue
            if self.shared.read_problem().startswith(CLAIM_PROBLEM):
                self.shared.set_problem("")
            if task is None:
                continue
            suspect = task.deliveries > 1
            if suspect:
                self.held = task  # kept fresh while it waits, so nobody takes it
                alone = await self._alone(running)
                self.held = None
                if not alone:
                    with contextlib.suppress(Exception):
                        await self.queue.release([task])
                    break
            self.unfinished[task.entry_id] = task.rows
            self.held_rows += task.rows
            self.arriving[task.entry_id] = task.rows
            shard = asyncio.create_task(self._handle(task))
            running.add(shard)
            shard.add_done_callback(running.discard)
            # Its end frees room for another shard only once it has left `running`.
            shard.add_done_callback(lambda _: self.dispatcher.notify())
            if suspect:
                await self._alone(running)

    async def _dispatch(self) -> None:
        """Start the next fetch whenever a slot is free and a row can use it."""
        loop = asyncio.get_running_loop()
        while True:
            item = self.dispatcher.take()
            if item is None:
                self.can_dispatch.clear()
                await self.can_dispatch.wait()
                continue
            host, (job, record) = item
            # Kept by its shard (a task nothing refers to may be collected mid-flight), and
            # cancelled with it if the shard is abandoned.
            fetch = asyncio.create_task(self._one(job, record, host))
            job.fetches.add(fetch)
            # The slot comes back in a done-callback, not in the coroutine's `finally`: a task
            # cancelled before its first step never enters its body, and its slot would be
            # lost for good (enough of them and the process fetches nothing at all).
            timer = loop.call_later(SLOW_FETCH, self._fetch_slowed, host, fetch)
            fetch.add_done_callback(functools.partial(self._fetch_ended, host, job, timer))

    def _fetch_slowed(self, host: str, fetch: asyncio.Task) -> None:
        if not fetch.done():
            self.slow_fetches.add(fetch)
            self.dispatcher.slowed(host)

    def _fetch_ended(self, host: str, job: ShardJob, timer: asyncio.TimerHandle,
                     fetch: asyncio.Task) -> None:
        timer.cancel()
        job.fetches.discard(fetch)
        slow = fetch in self.slow_fetches
        self.slow_fetches.discard(fetch)
        self.dispatcher.finish(host, slow)

    async def _alone(self, running: set[asyncio.Task]) -> bool:
        """Wait until no shard is in flight (False if a stop comes first).

        A shard delivered before was in a process that died or stalled: it may be the cause.
        It runs alone, so if it kills this process too, no innocent shard dies with it and
        uses up a delivery; a poison shard then reaches the dead-letter stream by itself.
        """
        if not running:
            return True
        return await self._unless_stopped(asyncio.wait(set(running)))

    async def _unless_stopped(self, awaitable) -> bool:
        """Await `awaitable` unless a stop comes first (True if it completed).

        A stop must not wait for a slot to free up: that can take a whole shard, and the grace
        period for handing shards back starts only once the claiming loop has ended.
        """
        if self.stopping.is_set():
            return False
        wanted = asyncio.ensure_future(awaitable)
        stop = asyncio.ensure_future(self.stopping.wait())
        done, _ = await asyncio.wait({wanted, stop}, return_when=asyncio.FIRST_COMPLETED)
        if wanted in done:
            stop.cancel()
            return True
        wanted.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await wanted
        return False

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    async def _watch_stop(self) -> None:
        parent = os.getppid()
        while not (self.shared.stop.value or _terminated):
            if os.getppid() != parent:
                log.warning("the supervisor is gone; stopping")
                break
            await asyncio.sleep(0.2)
        self.stopping.set()

    async def _keep_claims(self) -> None:
        period = max(0.5, self.settings.visibility_timeout / 4)
        while True:
            await asyncio.sleep(period)
            try:
                held = [self.held] if self.held is not None else []
                await self.queue.refresh([j.task for j in self.active.values()] + held)
            except Exception as error:
                log.warning("could not refresh claims: %s", error)

    async def _hand_back_unreceived(self) -> None:
        """Hand back at once the shards Redis gave this process whose claim reply was lost
        (see AsyncQueue.unreceived), instead of leaving them to the visibility timeout."""
        while True:
            await asyncio.sleep(UNRECEIVED_EVERY)
            known = set(self.active) | set(self.arriving) | self.left_to_timeout
            if self.held is not None:
                known.add(self.held.entry_id)
            try:
                lost, held = await self.queue.unreceived(known, UNRECEIVED_EVERY)
                self.left_to_timeout &= held
                if lost:
                    await self.queue.release(lost)
                    log.warning("handed back %d shard(s) that Redis gave this process but whose "
                                "claim reply never arrived (a Redis restart or a dropped "
                                "connection): %s", len(lost), ", ".join(t.entry_id for t in lost))
            except Exception as error:
                log.warning("could not look for unreceived shards: %s", error)

    async def _return_free_memory(self) -> None:
        """Give the heap's free pages back to the system every few seconds.

        Every image passes through a few transient buffers of its size (~60 KB) between
        long-lived small objects; glibc's heap then keeps the freed pages, and a worker's RSS
        crept up by ~8 MB a second on bench/field.py. malloc_trim hands them back (~2 ms)."""
        trim = _malloc_trim()
        if trim is None:
            return
        while True:
            await asyncio.sleep(TRIM_EVERY)
            trim(0)

    async def _drain(self, running: set[asyncio.Task]) -> None:
        """On stop: let in-flight shards finish within the grace period, then hand them back."""
        if not running:
            return
        done, pending = await asyncio.wait(running, timeout=self.settings.shutdown_grace)
        for job in pending:
            job.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        unfinished = [j.task for j in self.active.values()]
        for job in self.active.values():
            job.writer.abort()
        with contextlib.suppress(Exception):
            await self.queue.release(unfinished)

    async def _handle(self, task: Task) -> None:
        try:
            await self._work(task)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self._abandon(task)
            if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
                # Not the shard's fault: its half-written files are gone; hand it back without
                # using up a delivery, and claim nothing until the supervisor sees space again.
                self.shared.out_of_space.value = 1
                log.error("shard %s/%05d: no space left in %s; handed back, pausing until "
                          "space is freed", task.partition, task.shard, self.settings.disk_root)
                with contextlib.suppress(Exception):
                    await self.queue.release([task])
            elif isinstance(error, StoreError):
                # The bucket (or its endpoint) failed: not the shard's fault either. Hand it
                # back without using up a delivery, so an outage never dead-letters rows,
                # and claim nothing for a while; the host's report says why.
                self.store_down_until = time.monotonic() + STORE_BACKOFF
                log.error("shard %s/%05d: %s; handed back, claiming again in %.0f s",
                          task.partition, task.shard, error, STORE_BACKOFF)
                self.shared.set_problem(f"cannot write to the store: {error}")
                with contextlib.suppress(Exception):
                    await self.queue.release([task])
            else:
                self.left_to_timeout.add(task.entry_id)
                log.exception("shard %s/%s failed; it will be retried after the visibility "
                              "timeout", task.partition, task.shard)
                self.shared.set_problem(f"shard {task.partition}/{task.shard:05d} failed: "
                                        f"{type(error).__name__}: {error}")
        finally:
            self.unfinished.pop(task.entry_id, None)
            self.held_rows -= task.rows
            self.arriving.pop(task.entry_id, None)
            self.dispatcher.notify()

    async def _room_for_a_shard(self, running: set[asyncio.Task]) -> None:
        """Wait until fewer than LOOKAHEAD × concurrency rows wait for a slot, within
        shards_in_flight shards, MAX_OPEN_ROWS rows without an outcome and MAX_HELD_ROWS in
        all. (A shard whose last rows wait for their later try holds little but its records:
        the process takes on others meanwhile.)

        Rows waiting here are what the dispatcher groups by host: with a few seconds of work
        queued, a host's rows from several shards go out back to back on one warm
        connection, which spares most TLS handshakes without keeping idle connections."""
        lookahead = LOOKAHEAD * self.settings.concurrency
        while not (self.dispatcher.queued + sum(self.arriving.values()) < lookahead
                   and sum(self.unfinished.values()) < MAX_OPEN_ROWS
                   and self.held_rows < MAX_HELD_ROWS
                   and len(running) < self.settings.shards_in_flight):
            self.wants_a_shard.clear()
            await self.wants_a_shard.wait()

    def _abandon(self, task: Task) -> None:
        job = self.active.pop(task.entry_id, None)
        if job is not None:
            job.writer.abort()

    async def _work(self, task: Task) -> None:
        generation, stored_recipe, source = await self.queue.current_generation(task.partition)
        if generation != task.generation:
            # The part was reset: this entry belongs to a generation nobody wants any more.
            await self.queue.complete(task, Outcome(0, 0, 0, {}))
            return
        recipe = Recipe.from_json(stored_recipe) if stored_recipe else self.own_recipe
        if task.deliveries > self.settings.max_deliveries:
            await self._dead_letter(task, recipe, source)
            return
        loop = asyncio.get_running_loop()
        if not recipe.overwrite:
            existing = await loop.run_in_executor(self.pool, self._outcome_on_disk, task,
                                                  recipe, source)
            if existing is not None:
                await self.queue.complete(task, existing)
                log.info("shard %s/%05d: complete on disk already (%d ok, %d failed); "
                         "not downloaded", task.partition, task.shard, existing.ok,
                         existing.failed)
                return
        job = await loop.run_in_executor(self.pool, ShardJob, task, self.settings, recipe,
                                         source)
        self.active[task.entry_id] = job
        started = time.monotonic()
        rows = []
        for record in job.samples():
            if record.rejected:
                job.records.append(record)
            else:
                rows.append((host_of(record.url), (job, record)))
        self._finished(task, len(job.records))  # rejected rows have their outcome already
        job.pending = len(rows)
        if not rows:
            job.done.set()
        self.arriving.pop(task.entry_id, None)
        self.dispatcher.add(rows)
        try:
            await job.done.wait()
        finally:
            if not job.done.is_set() or job.failure is not None:
                # Stopped or failed half way: its other rows are not fetched here, and its
                # fetches under way are cancelled (their slots come back as they end).
                job.abandoned = True
                self.shared.waiting.value -= len(job.cancel_later())
                self.dispatcher.drop(lambda row: row[0] is job)
                for fetch in list(job.fetches):
                    fetch.cancel()
        if job.failure is not None:
            # One sample could not be stored (e.g. the disk is full): the others stop here.
            raise job.failure
        job.records.sort(key=lambda r: r.row)
        if not await self.queue.still_mine(task):
            # Another worker has it (we were cut off or stalled): its attempt is the one that
            # counts, and ours must not replace the files it publishes.
            self._abandon(task)
            log.warning("shard %s/%05d: taken over by another worker while this one worked on "
                        "it; discarding this attempt", task.partition, task.shard)
            return
        await loop.run_in_executor(self.publishing, job.close)
        outcome = job.outcome()
        counted = await self.queue.complete(task, outcome)
        self.active.pop(task.entry_id, None)
        if counted != 1:
            log.info("shard %s/%05d: already completed by another worker (or the part was "
                     "reset); not counted again", task.partition, task.shard)
            return
        self.shared.counters[0] += outcome.ok
        self.shared.counters[1] += outcome.failed
        self.shared.counters[2] += outcome.bytes
        self.shared.set_problem("")
        elapsed = time.monotonic() - started
        errors = ",".join(f"{k}:{v}" for k, v in
                          sorted(outcome.classes.items(), key=lambda kv: -kv[1]))
        # A sentence for people, then key=value fields for log tools.
        log.info("shard %s/%05d: %d ok, %d failed, %.1f MB in %.1fs (%.0f rows/s); %d rows "
                 "tried again later, %d of them recovered | part=%s shard=%d rows=%d ok=%d "
                 "failed=%d bytes=%d seconds=%.3f retried=%d recovered=%d errors=%s",
                 task.partition, task.shard, outcome.ok, outcome.failed, outcome.bytes / 1e6,
                 elapsed, task.rows / max(elapsed, 1e-9), outcome.retried, outcome.recovered,
                 task.partition, task.shard, task.rows, outcome.ok, outcome.failed,
                 outcome.bytes, elapsed, outcome.retried, outcome.recovered, errors or "-")
        self.health.add(outcome)

    def _outcome_on_disk(self, task: Task, recipe: Recipe, source: str | None
                         ) -> Outcome | None:
        """Incremental mode: a shard an earlier run wrote completely, from the same file with
        the same recipe, is reported, not redone. In a bucket, the part is listed once (per
        generation) rather than asked about shard by shard: a shard completed since by another
        worker is not claimed again anyway, and one missed is only written twice."""
        part_dir = self.settings.store_root / parts.relative_dir(task.partition)
        complete = None
        if self.settings.in_bucket:
            complete = self.listed.get((task.partition, task.generation))
            if complete is None:
                complete = complete_shards(part_dir)
                self.listed[(task.partition, task.generation)] = complete
        table = parts.decode_table(task.payload)
        keys = parts.key_columns_of(table)
        samples = read_complete_shard(part_dir, task.shard, table.column("row").to_pylist(),
                                      made_with(recipe, source), keys, complete)
        return None if samples is None else outcome_of(samples, rejected_rows(table), keys)

    async def _one(self, job: ShardJob, record: SampleRecord, host: str) -> None:
        # The fetch slot is held until the image is stored, not just fetched: when resizing
        # is slower than the network, bodies would otherwise pile up in the thread pool's
        # queue (a whole shard's worth, hundreds of MB); this way at most `concurrency` are
        # held in memory.
        began = asyncio.get_running_loop().time()
        try:
            result: FetchResult = await self.fetcher.fetch(record.url, host)
            if job.abandoned:
                return
            if not result.ok and self._try_later(job, record, host, result, began):
                return
            self.shared.counters[3] += 1
            if not result.ok:
                record.status, record.error_class = "failed", result.error_class
                record.error_message = with_earlier_tries(result.error_message,
                                                          job.earlier.get(record.row))
                record.http_status = result.http_status
            else:
                column = job.recipe.verify_hash_column
                expected = record.extra.get(parts.extra_name(column)) if column else None
                arguments = (job.writer, record, result.body, job.recipe.filters,
                             job.recipe.resize, expected)
                if job.recipe.resize_mode == "no" and len(result.body) <= INLINE_BYTES:
                    # Header check, hash and an append to the shard: ~0.15 ms, less than
                    # handing it to a thread and back costs (the GIL gives threads nothing).
                    record = _store(*arguments)
                else:
                    loop = asyncio.get_running_loop()
                    record = await loop.run_in_executor(self.pool, _store, *arguments)
                if record.status == "success":
                    job.recovered += record.row in job.earlier
                    if not self.shared.first_image.value:
                        self.shared.first_image.value = time.time()
            job.records.append(record)
            self._finished(job.task, 1)
            job.pending -= 1
            if job.pending == 0:
                job.done.set()
        except asyncio.CancelledError:
            pass  # its shard was abandoned
        except Exception as error:  # storing failed (a full disk): the shard fails
            if job.failure is None:
                job.failure = error
            job.done.set()

    def _try_later(self, job: ShardJob, record: SampleRecord, host: str, result: FetchResult,
                   began: float) -> bool:
        """Give a row whose failure may pass (retry_classes), or that was not tried at all,
        another try `retry_delay` seconds after this one began; False if it has had its tries.

        The row stays in its shard, which is written once every row has its outcome: no
        second pass over the part, and no shard written twice. Measured from the start of the
        try, so a row whose try took long (a dead host's connect timeout) waits no longer
        than one that failed at once; and where the failure was decided by work the try only
        shared (the try that found its endpoint down, a look-up of its name under way or
        cached), from the start of that work, so its later try, which may redo the work in
        full, ends no later than the work did, plus the delay: the run's end moves by at most
        the delay.
        """
        s = self.settings
        earlier = job.earlier.get(record.row, [])
        if len(earlier) >= s.retry_rounds or not is_transient(
                result.error_class, result.http_status, result.tried, s.retry_classes):
            return False
        if result.since is not None:
            began = min(began, result.since)
        job.earlier[record.row] = [*earlier, f"{result.error_class}: {result.error_message}"]
        loop = asyncio.get_running_loop()
        # Not sooner on a stop: a later try made at once would meet what the first met (a
        # server that drops connections for a few seconds) and fail a row that would pass.
        # A shard whose later tries do not fit in the grace period is handed back whole, and
        # the next worker gives its rows their tries at their time.
        delay = max(0.0, began + s.retry_delay - loop.time())
        timer = loop.call_later(delay, self._try_again, job, record, host)
        job.later[record.row] = (timer, record, host)
        self.shared.waiting.value += 1
        return True

    def _try_again(self, job: ShardJob, record: SampleRecord, host: str) -> None:
        job.later.pop(record.row, None)
        self.shared.waiting.value -= 1
        if not job.abandoned:  # due now: ahead of the rows still on their first try
            self.dispatcher.add([(host, (job, record))], due=True)

    def _finished(self, task: Task, rows: int) -> None:
        """`rows` of a shard have their outcome: room for the process to take on others."""
        if task.entry_id in self.unfinished:
            self.unfinished[task.entry_id] -= rows

    async def _dead_letter(self, task: Task, recipe: Recipe, source: str | None) -> None:
        """Give up on a shard that killed too many workers: its rows are failed (class
        dead_letter) in a shard parquet of their own, written without touching an image."""
        message = (f"shard was delivered {task.deliveries} times without completing "
                   f"(max_deliveries={self.settings.max_deliveries}); it is in the dead stream")
        loop = asyncio.get_running_loop()
        job = await loop.run_in_executor(self.pool, ShardJob, task, self.settings, recipe,
                                         source)
        for record in job.samples():
            if not record.rejected:
                record.status, record.error_class = "failed", "dead_letter"
                record.error_message = message
            job.records.append(record)
        log.error("dead-lettering %s/%05d after %d deliveries", task.partition, task.shard,
                  task.deliveries)
        await loop.run_in_executor(self.publishing, job.close)
        await self.queue.dead_letter(task, job.outcome(), message)


def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def _on_sigterm(*_: object) -> None:
    global _terminated
    _terminated = True


def main(settings_json: str, index: int, shared: Shared) -> None:
    """A worker process's life (started through shared.run_process)."""
    # Ctrl-C reaches the whole process group; the supervisor decides what happens, and tells
    # us through `shared.stop`. SIGTERM sent to this process alone means the same.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s worker[{index}] %(levelname)s %(message)s")
    settings = Settings.model_validate_json(settings_json)
    if index == 0:
        build = checks.pillow_build()
        hint = "" if "SIMD" in build else " (Pillow-SIMD resizes about twice as fast: README)"
        log.info("images decoded and resized with %s%s; Arrow's memory pool: %s", build, hint,
                 pa.default_memory_pool().backend_name)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    runner(WorkerProcess(settings, index, shared).run())
