"""Putting a part on the queue: the successor of add_task.py.

Shard by shard, with constant memory, pausing while the queue is above its high watermark.
Enqueuing is idempotent per generation: a run killed half way and started again skips the
shards that are already queued (or done), so no row is queued twice and none is missed.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa

from laion_dagster.core.control import provenance
from laion_dagster.core.input import parts
from laion_dagster.core.queue.protocol import Queue, encode_table
from laion_dagster.core.settings import Settings
from laion_dagster.core.shards import records
from laion_dagster.core.shards.recipe import Recipe
from laion_dagster.core.shards.records import failed_rows, sample_key

log = logging.getLogger("laion_dagster.enqueue")


@dataclass
class EnqueueReport:
    partition: str
    path: str
    generation: int
    rows: int
    invalid: int
    shards: int
    shards_added: int
    shards_skipped: int
    waited_seconds: float
    duration: float
    recipe: Recipe

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.duration if self.duration > 0 else 0.0


def wait_below_watermark(queue: Queue, watermark: int, poll: float = 1.0,
                         on_wait: Callable[[int], None] | None = None) -> float:
    """Block while the queue holds more than `watermark` rows; returns the seconds waited."""
    waited = 0.0
    while (depth := queue.queued_rows()) > watermark:
        if on_wait is not None:
            on_wait(depth)
        time.sleep(poll)
        waited += poll
    return waited


def rejected_records(shard: records.Shard, partition: str) -> pa.Table:
    """The error records of a shard's rows that cannot be fetched (class invalid_url)."""
    rejected = shard.rejected
    prefix = parts.sample_prefix(partition)
    keys = [sample_key(prefix, row) for row in rejected.column("row").to_pylist()]
    samples = rejected.append_column("key", pa.array(keys, pa.string()))
    samples = samples.append_column("status", pa.array(["failed"] * len(keys), pa.string()))
    samples = samples.append_column("error_class",
                                    pa.array(["invalid_url"] * len(keys), pa.string()))
    samples = samples.append_column("error_message", rejected.column(records.REJECT))
    samples = samples.append_column("http_status", pa.nulls(len(keys), pa.int32()))
    return failed_rows(samples, records.key_columns_of(shard.table))


MAX_SHARD = 10_000
MIN_SHARD = 250
SHARDS_PER_PROCESS = 4


def auto_shard_size(rows: int, processes: int) -> int:
    """Shards small enough that each of `processes` gets about SHARDS_PER_PROCESS of a small
    part (a process whose only shard waits on its slowest URL would idle), within
    MIN_SHARD..MAX_SHARD rows (a LAION part of 18 M rows: 10,000, as img2dataset's)."""
    wanted = -(-rows // max(processes * SHARDS_PER_PROCESS, 1))
    return max(MIN_SHARD, min(MAX_SHARD, wanted))


def enqueue_part(queue: Queue, part: parts.Part, settings: Settings,
                 progress: Callable[[int, int], None] | None = None,
                 poll: float = 1.0, enqueuer: str | None = None) -> EnqueueReport:
    """Queue every shard of `part` not yet queued in its current generation.

    Raises provenance.PartChanged when the part's queue state was made from another version
    of the file; starts a new generation when it was made for another store.
    """
    started = time.monotonic()
    total_rows = parts.count_rows(part.path)  # fails early, with the file named, if unreadable
    source = parts.fingerprint(part.path)
    state = queue.part(part.key)
    verdict = provenance.check(state, part, settings, source)
    if verdict.restart:
        log.warning("%s", verdict.reason)
        queue.reset(part.key)
        state = queue.part(part.key)
    # A resumed generation keeps the shard size it was cut with: other boundaries would
    # queue some rows twice and others never.
    shard_size = (state.shard_size or settings.shard_size
                  or auto_shard_size(total_rows, settings.processes))
    if settings.shard_size and shard_size != settings.shard_size:
        log.warning("%s keeps the shard size it was enqueued with (%s rows); shard_size=%s is "
                    "not applied (reset the part to start it over with it)", part.key,
                    f"{shard_size:,}", f"{settings.shard_size:,}")
    required = (settings.verify_hash_column,) if settings.verify_hash_column else ()
    shards = parts.iter_shards(part.path, shard_size, settings.url_column,
                               settings.caption_column, required,
                               settings.save_additional_columns, settings.key_columns)
    # Read the first shard before the part is registered: a part with a missing column or
    # no rows fails here and leaves no trace in the queue.
    first = next(shards)
    wanted = Recipe.from_settings(settings)
    state = queue.begin(part.key, wanted.to_json(), enqueuer, source,
                        str(settings.store_root), shard_size, str(part.path),
                        provenance.fetch_policy(settings))
    generation = state.generation
    recipe = Recipe.from_json(state.recipe) if state.recipe else wanted
    if changed := recipe.differences(wanted):
        log.warning("%s keeps the recipe its first shards were made with; these settings are "
                    "not applied: %s (reset the part to start it over with them)", part.key,
                    ", ".join(f"{k}={new!r} (part: {old!r})" for k, (old, new) in
                              changed.items()))
    queue.ensure_group()
    rows = invalid = shards_seen = added = skipped = 0
    waited = 0.0
    last_note = 0.0

    def note_wait(depth: int) -> None:
        nonlocal last_note
        if time.monotonic() - last_note > 30:
            log.info("%s: queue holds %s rows > high watermark %s; waiting", part.key,
                     f"{depth:,}", f"{settings.queue_high_watermark:,}")
            last_note = time.monotonic()

    for shard in itertools.chain([first], shards):
        shards_seen += 1
        rows += shard.rows
        rejected = shard.invalid_rows
        invalid += rejected
        if queue.is_queued(part.key, shard.index):
            skipped += 1
            continue
        waited += wait_below_watermark(queue, settings.queue_high_watermark, poll, note_wait)
        result = queue.enqueue_shard(
            part.key, generation, shard.index, shard.rows - rejected, rejected,
            encode_table(shard.table),
            encode_table(rejected_records(shard, part.key)) if rejected else b"",
        )
        if result == -1:
            raise RuntimeError(f"{part.key}: the part was reset while being enqueued; run again")
        added += result
        if progress is not None:
            progress(rows, total_rows)
    queue.finish_enqueue(part.key, generation, shards_seen)
    return EnqueueReport(partition=part.key, path=str(part.path), generation=generation,
                         rows=rows, invalid=invalid, shards=shards_seen, shards_added=added,
                         shards_skipped=skipped,
                         waited_seconds=waited, duration=time.monotonic() - started,
                         recipe=recipe)
