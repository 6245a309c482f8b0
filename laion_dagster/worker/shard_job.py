"""One claimed shard while a worker process works on it: its rows, records and files."""

from __future__ import annotations

import asyncio
import dataclasses

import pyarrow as pa

from laion_dagster.core.input import parts
from laion_dagster.core.queue.protocol import (
    RETRY_ROUND,
    Claim,
    Outcome,
    decode_table,
    original_shard,
)
from laion_dagster.core.settings import Settings
from laion_dagster.core.shards import records
from laion_dagster.core.shards.files import (
    ShardWriter,
    complete_shards,
    read_complete_shard,
    shard_complete,
)
from laion_dagster.core.shards.recipe import Recipe
from laion_dagster.core.shards.records import SampleRecord


class ShardJob:
    """Everything about one claimed shard while it is being worked on."""

    def __init__(self, claim: Claim, settings: Settings, recipe: Recipe, source: str | None):
        self.claim = claim
        self.recipe = recipe
        self.table = decode_table(claim.payload)
        self.prefix = parts.sample_prefix(claim.partition)
        self.key_columns = records.key_columns_of(self.table)
        self.rejected = records.rejected_rows(self.table)
        part_dir = settings.store_root / parts.relative_dir(claim.partition)
        # A retry shard's rows go back into the part's shard they came from, when this host
        # holds it: the new outcomes are merged into its files (see control/retry.py).
        original = original_shard(claim.shard) if claim.shard >= RETRY_ROUND else None
        self.merge = original is not None and shard_complete(part_dir, original)
        spool = (settings.spool_root / parts.relative_dir(claim.partition)
                 if settings.in_bucket else None)
        self.writer = ShardWriter(part_dir, original if self.merge else claim.shard,
                                  recipe.output_format, records.made_with(recipe, source), spool)
        self.records: list[SampleRecord] = []
        # While its rows are fetched: how many are left, when they are done, what failed.
        self.pending = 0
        self.done = asyncio.Event()
        self.failure: BaseException | None = None
        self.abandoned = False
        self.fetches: set[asyncio.Task] = set()
        # Rows tried again later (retry_rounds): row -> what its earlier tries met; and the
        # rows waiting for their later try: row -> (timer, record, server).
        self.earlier: dict[int, list[str]] = {}
        self.later: dict[int, tuple[asyncio.TimerHandle, SampleRecord, str]] = {}
        self.recovered = 0  # rows that succeeded on a later try

    def close(self) -> None:
        self.writer.close(self.records, self.extra_columns(), merge=self.merge,
                          notes={"retried": len(self.earlier), "recovered": self.recovered})

    def extra_columns(self) -> pa.Table:
        return self.table.drop_columns([c for c in records.OUR_COLUMNS
                                        if c in self.table.column_names])

    def samples(self) -> list[SampleRecord]:
        """A record per row, in row order; rows rejected at enqueue are failed already."""
        table = self.table
        extra = self.extra_columns()
        extras = extra.to_pylist() if extra.num_columns else [{}] * table.num_rows
        samples = []
        for row, url, caption, more in zip(table.column("row").to_pylist(),
                                           table.column("url").to_pylist(),
                                           table.column("caption").to_pylist(), extras,
                                           strict=True):
            record = SampleRecord(row=row, key=records.sample_key(self.prefix, row), url=url,
                                  caption=caption, extra=more)
            reason = self.rejected.get(row)
            if reason is not None:
                record.status, record.error_class = "failed", "invalid_url"
                record.error_message, record.rejected = reason, True
            samples.append(record)
        return samples

    def fail_all(self, error_class: str, message: str) -> None:
        """Every row not rejected at enqueue fails with `error_class` (a dead-lettered shard:
        its shard parquet is written without touching an image)."""
        for record in self.samples():
            if not record.rejected:
                record.status, record.error_class = "failed", error_class
                record.error_message = message
            self.records.append(record)

    def outcome(self) -> Outcome:
        samples = records.records_table(self.records)
        for name in self.key_columns:
            samples = samples.append_column(name, self.table.column(name))
        return dataclasses.replace(
            records.outcome_of(samples, self.rejected, self.key_columns),
            retried=len(self.earlier), recovered=self.recovered)

    def cancel_later(self) -> list[tuple[SampleRecord, str]]:
        """Stop the timers of the rows waiting for a later try; returns those rows."""
        waiting = []
        for timer, record, server in self.later.values():
            timer.cancel()
            waiting.append((record, server))
        self.later.clear()
        return waiting


def outcome_in_store(settings: Settings, claim: Claim, recipe: Recipe, source: str | None,
                     listed: dict[tuple[str, str], set[int]]) -> Outcome | None:
    """Incremental mode: a shard an earlier run wrote completely, from the same file with the
    same recipe, is reported, not redone. In a bucket, the part is listed once (per generation,
    kept in `listed`) rather than asked about shard by shard: a shard completed since by another
    worker is not claimed again anyway, and one missed is only written twice."""
    part_dir = settings.store_root / parts.relative_dir(claim.partition)
    complete = None
    if settings.in_bucket:
        complete = listed.get((claim.partition, claim.generation))
        if complete is None:
            complete = complete_shards(part_dir)
            listed[(claim.partition, claim.generation)] = complete
    table = decode_table(claim.payload)
    keys = records.key_columns_of(table)
    samples = read_complete_shard(part_dir, claim.shard, table.column("row").to_pylist(),
                                  records.made_with(recipe, source), keys, complete)
    return None if samples is None else records.outcome_of(samples, records.rejected_rows(table),
                                                            keys)
