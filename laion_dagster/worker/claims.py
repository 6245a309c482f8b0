"""The shards a worker process holds, and their upkeep: kept fresh, handed back, counted.

A claim stays this process's while it refreshes it (every quarter of the visibility timeout);
what it cannot finish it hands back at once rather than leaving it to the timeout, except a
shard that failed here, which must use up its deliveries to reach the dead-letter stream.
The counts of held and unfinished rows are what bound the process's memory (process.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from laion_dagster.core.queue.protocol import AsyncQueue, Claim
from laion_dagster.worker.shard_job import ShardJob

log = logging.getLogger("laion_dagster.worker")

# Seconds between looks for shards claimed in Redis whose claim reply never arrived, and the
# idle time after which such a shard is handed back: well past any reply still on its way.
UNRECEIVED_EVERY = 10.0


class Claims:
    def __init__(self, queue: AsyncQueue, visibility_timeout: float):
        self.queue = queue
        self.visibility_timeout = visibility_timeout
        self.jobs: dict[str, ShardJob] = {}  # entry id -> the job of a shard being worked on
        self.suspect: Claim | None = None  # claimed, waiting to run alone (process.py)
        # Shards that failed here and are left to the visibility timeout on purpose (a shard
        # that fails every worker must use up its deliveries): not handed back early.
        self.left_to_timeout: set[str] = set()
        # entry id -> rows of a claimed shard without an outcome yet; and the rows of every
        # claimed shard, outcomes or not (see process.MAX_OPEN_ROWS, MAX_HELD_ROWS)
        self.unfinished: dict[str, int] = {}
        self.held_rows = 0
        # entry id -> rows of a shard claimed whose rows are not in the dispatcher yet (it
        # reads Redis and opens its files first): they count as waiting, or the claim loop
        # would take shards_in_flight shards at once before the first one's rows arrive.
        self.arriving: dict[str, int] = {}

    def take(self, claim: Claim) -> None:
        self.unfinished[claim.entry_id] = claim.rows
        self.held_rows += claim.rows
        self.arriving[claim.entry_id] = claim.rows

    def arrived(self, claim: Claim) -> None:
        """The shard's rows are with the dispatcher now."""
        self.arriving.pop(claim.entry_id, None)

    def finished(self, claim: Claim, rows: int) -> None:
        """`rows` of a shard have their outcome: room for the process to take on others."""
        if claim.entry_id in self.unfinished:
            self.unfinished[claim.entry_id] -= rows

    def let_go(self, claim: Claim) -> None:
        """The shard is done with here, however it ended."""
        self.unfinished.pop(claim.entry_id, None)
        self.held_rows -= claim.rows
        self.arriving.pop(claim.entry_id, None)

    def abandon(self, claim: Claim) -> None:
        """Drop a shard's job and its half-written files."""
        job = self.jobs.pop(claim.entry_id, None)
        if job is not None:
            job.writer.abort()

    @property
    def arriving_rows(self) -> int:
        return sum(self.arriving.values())

    @property
    def open_rows(self) -> int:
        return sum(self.unfinished.values())

    async def hand_back(self, claims: list[Claim]) -> None:
        """Give shards back to the queue for anyone to take, without using a delivery; a
        failure leaves them to the visibility timeout, which ends the same way."""
        with contextlib.suppress(Exception):
            await self.queue.hand_back(claims)

    async def keep_fresh(self) -> None:
        period = max(0.5, self.visibility_timeout / 4)
        while True:
            await asyncio.sleep(period)
            try:
                suspect = [self.suspect] if self.suspect is not None else []
                await self.queue.refresh([j.claim for j in self.jobs.values()] + suspect)
            except Exception as error:
                log.warning("could not refresh claims: %s", error)

    async def hand_back_unreceived(self) -> None:
        """Hand back at once the shards Redis gave this process whose claim reply was lost
        (see AsyncQueue.unreceived), instead of leaving them to the visibility timeout."""
        while True:
            await asyncio.sleep(UNRECEIVED_EVERY)
            known = set(self.jobs) | set(self.arriving) | self.left_to_timeout
            if self.suspect is not None:
                known.add(self.suspect.entry_id)
            try:
                lost, held = await self.queue.unreceived(known, UNRECEIVED_EVERY)
                self.left_to_timeout &= held
                if lost:
                    await self.queue.hand_back(lost)
                    log.warning("handed back %d shard(s) that Redis gave this process but whose "
                                "claim reply never arrived (a Redis restart or a dropped "
                                "connection): %s", len(lost), ", ".join(c.entry_id for c in lost))
            except Exception as error:
                log.warning("could not look for unreceived shards: %s", error)
