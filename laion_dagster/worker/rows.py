"""One row's fetch and store: the fetch slot, the body's checks, the sample in its shard,
and a later try for a row whose failure may pass.

Up to `concurrency` fetches run at once across the process, in the order dispatch.py gives: one
queue per server, a server's rows back to back on its warm connections, at most
`per_host_limit` at once. Decoding and resizing run in a small thread pool, off the event loop;
a plain image's header check, hash and append to its shard are cheaper than the hand-off and
run on the loop.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from laion_dagster.core.fetch.fetcher import Fetcher, FetchResult, host_of
from laion_dagster.core.images import checks
from laion_dagster.core.outcomes import is_transient
from laion_dagster.core.settings import Settings
from laion_dagster.core.shards.files import ShardWriter
from laion_dagster.core.shards.records import SampleRecord, extra_name, with_earlier_tries
from laion_dagster.worker.dispatch import SLOW_FETCH, Dispatcher
from laion_dagster.worker.shard_job import ShardJob
from laion_dagster.worker.shared_memory import Shared

# Images up to this size are checked and stored on the event loop when nothing is resized;
# bigger ones, and every decode or resize, go to the thread pool.
INLINE_BYTES = 1_000_000


def store(writer: ShardWriter, record: SampleRecord, body: bytes, filters: checks.Filters,
          resize: checks.Resize, expected_sha256: str | None) -> SampleRecord:
    """A success's checks: identify, hash, check, resize and write the image."""
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


class RowWork:
    """Fetches and stores the rows of every shard the process works on."""

    def __init__(self, settings: Settings, shared: Shared, pool: ThreadPoolExecutor,
                 finished: Callable[[ShardJob, int], None]):
        self.settings = settings
        self.shared = shared
        self.pool = pool
        self.finished = finished  # rows of a shard got their outcome
        self.dispatcher = Dispatcher(settings.concurrency, settings.per_host_limit)
        self.can_dispatch = self.dispatcher.listen()
        self.slow_fetches: set[asyncio.Task] = set()  # past SLOW_FETCH (dispatch.py)
        self.fetcher: Fetcher | None = None  # set while the process runs

    def start(self, job: ShardJob) -> None:
        """Queue a shard's rows for fetching; rows rejected at enqueue have their outcome."""
        rows = []
        for record in job.samples():
            if record.rejected:
                job.records.append(record)
            else:
                rows.append((host_of(record.url), (job, record)))
        self.finished(job, len(job.records))
        job.pending = len(rows)
        if not rows:
            job.done.set()
        self.dispatcher.add(rows)

    def stop(self, job: ShardJob) -> None:
        """Stopped or failed half way: its other rows are not fetched here, and its fetches
        under way are cancelled (their slots come back as they end)."""
        job.abandoned = True
        self.shared.waiting.value -= len(job.cancel_later())
        self.dispatcher.drop(lambda row: row[0] is job)
        for fetch in list(job.fetches):
            fetch.cancel()

    async def dispatch(self) -> None:
        """Start the next fetch whenever a slot is free and a row can use it."""
        loop = asyncio.get_running_loop()
        while True:
            item = self.dispatcher.take()
            if item is None:
                self.can_dispatch.clear()
                await self.can_dispatch.wait()
                continue
            server, (job, record) = item
            # Kept by its shard (a task nothing refers to may be collected mid-flight), and
            # cancelled with it if the shard is abandoned.
            fetch = asyncio.create_task(self.one(job, record, server))
            job.fetches.add(fetch)
            # The slot comes back in a done-callback, not in the coroutine's `finally`: a task
            # cancelled before its first step never enters its body, and its slot would be
            # lost for good (enough of them and the process fetches nothing at all).
            timer = loop.call_later(SLOW_FETCH, self._slowed, server, fetch)
            fetch.add_done_callback(functools.partial(self._ended, server, job, timer))

    def _slowed(self, server: str, fetch: asyncio.Task) -> None:
        if not fetch.done():
            self.slow_fetches.add(fetch)
            self.dispatcher.slowed(server)

    def _ended(self, server: str, job: ShardJob, timer: asyncio.TimerHandle,
               fetch: asyncio.Task) -> None:
        timer.cancel()
        job.fetches.discard(fetch)
        slow = fetch in self.slow_fetches
        self.slow_fetches.discard(fetch)
        self.dispatcher.finish(server, slow)

    async def one(self, job: ShardJob, record: SampleRecord, server: str) -> None:
        # The fetch slot is held until the image is stored, not just fetched: when resizing
        # is slower than the network, bodies would otherwise pile up in the thread pool's
        # queue (a whole shard's worth); this way at most `concurrency` are held in memory.
        began = asyncio.get_running_loop().time()
        try:
            result: FetchResult = await self.fetcher.fetch(record.url, server)
            if job.abandoned:
                return
            if not result.ok and self._try_later(job, record, server, result, began):
                return
            self.shared.counters[3] += 1
            if not result.ok:
                record.status, record.error_class = "failed", result.error_class
                record.error_message = with_earlier_tries(result.error_message,
                                                          job.earlier.get(record.row))
                record.http_status = result.http_status
            else:
                column = job.recipe.verify_hash_column
                expected = record.extra.get(extra_name(column)) if column else None
                arguments = (job.writer, record, result.body, job.recipe.filters,
                             job.recipe.resize, expected)
                if job.recipe.resize_mode == "no" and len(result.body) <= INLINE_BYTES:
                    # A header check, a hash and an append to the shard cost less than
                    # handing them to a thread and back (the GIL gives threads nothing here).
                    record = store(*arguments)
                else:
                    loop = asyncio.get_running_loop()
                    record = await loop.run_in_executor(self.pool, store, *arguments)
                if record.status == "success":
                    job.recovered += record.row in job.earlier
                    if not self.shared.first_image.value:
                        self.shared.first_image.value = time.time()
            job.records.append(record)
            self.finished(job, 1)
            job.pending -= 1
            if job.pending == 0:
                job.done.set()
        except asyncio.CancelledError:
            pass  # its shard was abandoned
        except Exception as error:  # storing failed (a full disk): the shard fails
            if job.failure is None:
                job.failure = error
            job.done.set()

    def _try_later(self, job: ShardJob, record: SampleRecord, server: str,
                   result: FetchResult, began: float) -> bool:
        """Give a row whose failure may pass (retry_classes), or that was not tried at all,
        another try `retry_delay` seconds after this one began; False if it has had its tries.

        The row stays in its shard, which is written once every row has its outcome: no
        second pass over the part, and no shard written twice. Measured from the start of the
        try, so a row whose try took long (a dead server's connect timeout) waits no longer
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
        timer = loop.call_later(delay, self._try_again, job, record, server)
        job.later[record.row] = (timer, record, server)
        self.shared.waiting.value += 1
        return True

    def _try_again(self, job: ShardJob, record: SampleRecord, server: str) -> None:
        job.later.pop(record.row, None)
        self.shared.waiting.value -= 1
        if not job.abandoned:  # due now: ahead of the rows still on their first try
            self.dispatcher.add([(server, (job, record))], due=True)
