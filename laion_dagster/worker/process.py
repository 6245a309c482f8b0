"""One worker process: an asyncio loop that claims shards and sees each through its life.

A shard's life: claimed (claims.py), its rows fetched and stored (rows.py) into its files
(shard_job.py), completed on the queue. A new shard is claimed whenever fewer than
LOOKAHEAD × concurrency rows wait for a slot, so shards waiting on their slowest URLs (a dead
server's connect timeout, a server that never answers: up to `timeout` seconds) never idle the
process, and a process never holds shards it will not start on soon (they stay claimable by
other processes and hosts): it works on up to `shards_in_flight` shards, and MAX_OPEN_ROWS
rows, at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa

from laion_dagster.core.fetch.fetcher import Fetcher
from laion_dagster.core.images import checks
from laion_dagster.core.queue.connection import connect_async
from laion_dagster.core.queue.protocol import AsyncQueue, Claim, Outcome
from laion_dagster.core.settings import Settings
from laion_dagster.core.shards.recipe import Recipe
from laion_dagster.core.storage import StoreError
from laion_dagster.worker.claims import Claims
from laion_dagster.worker.health import SuccessWatch, return_free_memory
from laion_dagster.worker.rows import RowWork
from laion_dagster.worker.shard_job import ShardJob, outcome_in_store
from laion_dagster.worker.shared_memory import Shared

log = logging.getLogger("laion_dagster.worker")

_terminated = False  # set by SIGTERM sent to this process alone
CLAIM_PROBLEM = "cannot claim shards"
# Rows without an outcome yet that a process takes on at most (their records and payloads).
MAX_OPEN_ROWS = 20_000
# Rows of open shards a process holds at most, outcomes included: a shard whose last rows wait
# for their later try (retry_delay) keeps its other rows' records until it is written.
MAX_HELD_ROWS = 2 * MAX_OPEN_ROWS
LOOKAHEAD = 24  # rows queued ahead, in units of concurrency
# Seconds a process claims nothing after its store (a bucket) failed a write.
STORE_BACKOFF = 15.0


class WorkerProcess:
    def __init__(self, settings: Settings, index: int, shared: Shared):
        self.settings = settings
        self.index = index
        self.shared = shared
        host = settings.host_id or socket.gethostname()
        self.consumer = f"{host}:{os.getpid()}"
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="shard-cpu")
        # Shards are written (and, for a bucket, uploaded) off the image pool: an upload
        # waits on the network, and images must not wait behind it.
        self.publishing = ThreadPoolExecutor(max_workers=2, thread_name_prefix="shard-publish")
        # Incremental mode in a bucket: (part, generation) -> its shards complete before this
        # process claimed any, from one listing (see shard_job.outcome_in_store).
        self.listed: dict[tuple[str, str], set[int]] = {}
        self.store_down_until = 0.0  # monotonic time; see _handle
        self.health = SuccessWatch()
        # The recipe of parts enqueued without one (see shards/recipe.py).
        self.own_recipe = Recipe.from_settings(settings)
        self.stopping = asyncio.Event()
        self.rows = RowWork(settings, shared, self.pool,
                            lambda job, n: self.claims.finished(job.claim, n))
        self.wants_a_shard = self.rows.dispatcher.listen()

    async def run(self) -> None:
        s = self.settings
        client = connect_async(s, name=f"worker:{self.consumer}")
        self.queue = AsyncQueue(client, s.prefix, self.consumer, s.visibility_timeout,
                                s.max_deliveries)
        self.claims = Claims(self.queue, s.visibility_timeout)
        await self.queue.ensure_group()
        running: set[asyncio.Task] = set()
        upkeep = [asyncio.create_task(c) for c in (
            self.claims.keep_fresh(), self.claims.hand_back_unreceived(), return_free_memory(),
            self._watch_stop())]
        try:
            async with Fetcher(s) as fetcher:
                self.rows.fetcher = fetcher
                dispatching = asyncio.create_task(self.rows.dispatch())
                try:
                    await self._claim_loop(running)
                    await self._drain(running)
                finally:
                    dispatching.cancel()
        finally:
            for task in upkeep:
                task.cancel()
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
                claim = await self.queue.claim(block_ms=1000)
            except Exception as error:  # Redis down: back off, carry on
                log.warning("claim failed (%s); retrying", error)
                self.shared.set_problem(f"{CLAIM_PROBLEM}: {error}")
                await self._sleep(2.0)
                continue
            if self.shared.read_problem().startswith(CLAIM_PROBLEM):
                self.shared.set_problem("")
            if claim is None:
                continue
            suspect = claim.deliveries > 1
            if suspect:
                self.claims.suspect = claim  # kept fresh while it waits, so nobody takes it
                alone = await self._alone(running)
                self.claims.suspect = None
                if not alone:
                    await self.claims.hand_back([claim])
                    break
            self.claims.take(claim)
            shard = asyncio.create_task(self._handle(claim))
            running.add(shard)
            shard.add_done_callback(running.discard)
            # Its end frees room for another shard only once it has left `running`.
            shard.add_done_callback(lambda _: self.rows.dispatcher.notify())
            if suspect:
                await self._alone(running)

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
        parent = self.shared.supervisor or os.getppid()
        while not (self.shared.stop.value or _terminated):
            if os.getppid() != parent:
                log.warning("the supervisor is gone; stopping")
                break
            await asyncio.sleep(0.2)
        self.stopping.set()

    async def _drain(self, running: set[asyncio.Task]) -> None:
        """On stop: let in-flight shards finish within the grace period, then hand them back."""
        if not running:
            return
        done, pending = await asyncio.wait(running, timeout=self.settings.shutdown_grace)
        for job in pending:
            job.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        unfinished = [j.claim for j in self.claims.jobs.values()]
        for job in self.claims.jobs.values():
            job.writer.abort()
        await self.claims.hand_back(unfinished)

    async def _handle(self, claim: Claim) -> None:
        try:
            await self._work(claim)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self.claims.abandon(claim)
            if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
                # Not the shard's fault: its half-written files are gone; hand it back without
                # using up a delivery, and claim nothing until the supervisor sees space again.
                self.shared.out_of_space.value = 1
                log.error("shard %s/%05d: no space left in %s; handed back, pausing until "
                          "space is freed", claim.partition, claim.shard, self.settings.disk_root)
                await self.claims.hand_back([claim])
            elif isinstance(error, StoreError):
                # The bucket (or its endpoint) failed: not the shard's fault either. Hand it
                # back without using up a delivery, so an outage never dead-letters rows,
                # and claim nothing for a while; the host's report says why.
                self.store_down_until = time.monotonic() + STORE_BACKOFF
                log.error("shard %s/%05d: %s; handed back, claiming again in %.0f s",
                          claim.partition, claim.shard, error, STORE_BACKOFF)
                self.shared.set_problem(f"cannot write to the store: {error}")
                await self.claims.hand_back([claim])
            else:
                self.claims.left_to_timeout.add(claim.entry_id)
                log.exception("shard %s/%s failed; it will be retried after the visibility "
                              "timeout", claim.partition, claim.shard)
                self.shared.set_problem(f"shard {claim.partition}/{claim.shard:05d} failed: "
                                        f"{type(error).__name__}: {error}")
        finally:
            self.claims.let_go(claim)
            self.rows.dispatcher.notify()

    async def _room_for_a_shard(self, running: set[asyncio.Task]) -> None:
        """Wait until fewer than LOOKAHEAD × concurrency rows wait for a slot, within
        shards_in_flight shards, MAX_OPEN_ROWS rows without an outcome and MAX_HELD_ROWS in
        all. (A shard whose last rows wait for their later try holds little but its records:
        the process takes on others meanwhile.)

        Rows waiting here are what the dispatcher groups by server: with a few seconds of work
        queued, a server's rows from several shards go out back to back on one warm
        connection, which spares most TLS handshakes without keeping idle connections."""
        lookahead = LOOKAHEAD * self.settings.concurrency
        claims = self.claims
        while not (self.rows.dispatcher.queued + claims.arriving_rows < lookahead
                   and claims.open_rows < MAX_OPEN_ROWS
                   and claims.held_rows < MAX_HELD_ROWS
                   and len(running) < self.settings.shards_in_flight):
            self.wants_a_shard.clear()
            await self.wants_a_shard.wait()

    async def _work(self, claim: Claim) -> None:
        generation, stored_recipe, source = await self.queue.current_generation(claim.partition)
        if generation != claim.generation:
            # The part was reset: this entry belongs to a generation nobody wants any more.
            await self.queue.complete(claim, Outcome(0, 0, 0, {}))
            return
        recipe = Recipe.from_json(stored_recipe) if stored_recipe else self.own_recipe
        if claim.deliveries > self.settings.max_deliveries:
            await self._dead_letter(claim, recipe, source)
            return
        loop = asyncio.get_running_loop()
        if not recipe.overwrite:
            existing = await loop.run_in_executor(self.pool, outcome_in_store, self.settings,
                                                  claim, recipe, source, self.listed)
            if existing is not None:
                await self.queue.complete(claim, existing)
                log.info("shard %s/%05d: complete in the store already (%d ok, %d failed); "
                         "not downloaded", claim.partition, claim.shard, existing.ok,
                         existing.failed)
                return
        job = await loop.run_in_executor(self.pool, ShardJob, claim, self.settings, recipe,
                                         source)
        self.claims.jobs[claim.entry_id] = job
        started = time.monotonic()
        self.rows.start(job)
        self.claims.arrived(claim)
        try:
            await job.done.wait()
        finally:
            if not job.done.is_set() or job.failure is not None:
                self.rows.stop(job)
        if job.failure is not None:
            # One sample could not be stored (e.g. the disk is full): the others stop here.
            raise job.failure
        job.records.sort(key=lambda r: r.row)
        if not await self.queue.still_mine(claim):
            # Another worker has it (we were cut off or stalled): its attempt is the one that
            # counts, and ours must not replace the files it publishes.
            self.claims.abandon(claim)
            log.warning("shard %s/%05d: taken over by another worker while this one worked on "
                        "it; discarding this attempt", claim.partition, claim.shard)
            return
        await loop.run_in_executor(self.publishing, job.close)
        outcome = job.outcome()
        counted = await self.queue.complete(claim, outcome)
        self.claims.jobs.pop(claim.entry_id, None)
        if counted != 1:
            log.info("shard %s/%05d: already completed by another worker (or the part was "
                     "reset); not counted again", claim.partition, claim.shard)
            return
        self.shared.counters[0] += outcome.ok
        self.shared.counters[1] += outcome.failed
        self.shared.counters[2] += outcome.bytes
        self.shared.set_problem("")
        self._log_completed(claim, outcome, time.monotonic() - started)
        self.health.add(outcome)

    @staticmethod
    def _log_completed(claim: Claim, outcome: Outcome, elapsed: float) -> None:
        errors = ",".join(f"{k}:{v}" for k, v in
                          sorted(outcome.classes.items(), key=lambda kv: -kv[1]))
        # A sentence for people, then key=value fields for log tools.
        log.info("shard %s/%05d: %d ok, %d failed, %.1f MB in %.1fs (%.0f rows/s); %d rows "
                 "tried again later, %d of them recovered | part=%s shard=%d rows=%d ok=%d "
                 "failed=%d bytes=%d seconds=%.3f retried=%d recovered=%d errors=%s",
                 claim.partition, claim.shard, outcome.ok, outcome.failed, outcome.bytes / 1e6,
                 elapsed, claim.rows / max(elapsed, 1e-9), outcome.retried, outcome.recovered,
                 claim.partition, claim.shard, claim.rows, outcome.ok, outcome.failed,
                 outcome.bytes, elapsed, outcome.retried, outcome.recovered, errors or "-")

    async def _dead_letter(self, claim: Claim, recipe: Recipe, source: str | None) -> None:
        """Give up on a shard that killed too many workers: its rows are failed (class
        dead_letter) in a shard parquet of their own, written without touching an image."""
        message = (f"shard was delivered {claim.deliveries} times without completing "
                   f"(max_deliveries={self.settings.max_deliveries}); it is in the dead stream")
        loop = asyncio.get_running_loop()
        job = await loop.run_in_executor(self.pool, ShardJob, claim, self.settings, recipe,
                                         source)
        job.fail_all("dead_letter", message)
        log.error("dead-lettering %s/%05d after %d deliveries", claim.partition, claim.shard,
                  claim.deliveries)
        await loop.run_in_executor(self.publishing, job.close)
        await self.queue.dead_letter(claim, job.outcome(), message)


def _on_sigterm(*_: object) -> None:
    global _terminated
    _terminated = True


def main(settings_json: str, index: int, shared: Shared) -> None:
    """A worker process's life (started through entry.run_process)."""
    # Ctrl-C reaches the whole process group; the supervisor decides what happens, and tells
    # us through `shared.stop`. SIGTERM sent to this process alone means the same.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s worker[{index}] %(levelname)s %(message)s")
    settings = Settings.model_validate_json(settings_json)
    if index == 0:
        build = checks.pillow_build()
        hint = "" if "SIMD" in build else " (Pillow-SIMD resizes faster: docs/operations.md)"
        log.info("images decoded and resized with %s%s; Arrow's memory pool: %s", build, hint,
                 pa.default_memory_pool().backend_name)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    runner(WorkerProcess(settings, index, shared).run())
