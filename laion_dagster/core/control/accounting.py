"""A part's final accounting: totals, error classes and the error file.

The successor of save_error_task.py. Error records travel through Redis (worker hosts may have
their own disks), so finalizing drains them into `<error_dir>/<partition>.parquet` and only then
lets them leave Redis: a crash in between leaves them in Redis for the next attempt.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from laion_dagster.core.input import parts
from laion_dagster.core.outcomes import fix_sentence
from laion_dagster.core.queue.protocol import PartState, Queue
from laion_dagster.core.settings import Settings
from laion_dagster.core.shards.records import ERROR_SCHEMA
from laion_dagster.core.storage import Where, arrow_file, write_parquet


class PartNotDone(RuntimeError):
    """Finalize was asked for a part whose shards are not all complete."""


@dataclass
class PartSummary:
    partition: str
    rows: int
    ok: int
    failed: int
    invalid: int
    bytes: int
    shards: int
    duration: float
    classes: dict[str, int] = field(default_factory=dict)
    error_file: str | None = None
    error_rows: int = 0
    output_dir: str = ""
    retried: int = 0  # rows tried again later in their shard (Settings.retry_rounds)
    recovered: int = 0  # of those, rows that then succeeded
    part_file: str | None = None  # the file it was enqueued from

    @property
    def fix(self) -> str | None:
        """What the user can do about the class that dominates its failures, if anything."""
        return fix_sentence(self.classes)

    @property
    def success_rate(self) -> float:
        attempted = self.ok + self.failed
        return self.ok / attempted if attempted else 0.0

    @property
    def images_per_second(self) -> float:
        return (self.ok + self.failed) / self.duration if self.duration > 0 else 0.0

    @property
    def balanced(self) -> bool:
        return self.rows == self.ok + self.failed + self.invalid


def summarize(state: PartState, classes: dict[str, int], settings: Settings) -> PartSummary:
    end = state.done_at or state.started_at or 0.0
    return PartSummary(
        partition=state.partition, rows=state.rows, ok=state.ok, failed=state.failed,
        invalid=state.invalid, bytes=state.bytes, shards=state.shards_total or state.shards,
        duration=max(0.0, end - (state.started_at or end)), classes=classes,
        output_dir=str(settings.store_root / parts.relative_dir(state.partition)),
        retried=state.retried, recovered=state.recovered, part_file=state.path,
    )


def error_file_path(settings: Settings, partition: str) -> Where:
    return settings.errors_root / f"{partition}.parquet"


def write_error_file(path: Where, table: pa.Table | None) -> int:
    """Atomically write the part's error rows (an empty file when there are none)."""
    if table is None:
        table = ERROR_SCHEMA.empty_table()
    table = table.sort_by("row") if table.num_rows else table
    write_parquet(table, path, compression="zstd")
    return table.num_rows


def finalize_part(queue: Queue, partition: str, settings: Settings) -> PartSummary:
    """Write the part's error file and return its totals. Safe to run again."""
    state = queue.part(partition)
    if not state.done:
        raise PartNotDone(
            f"{partition}: {state.shards_done} of {state.shards_total or '?'} shards complete "
            f"({state.pending:,} rows still queued or in flight)")
    summary = summarize(state, queue.classes(partition), settings)
    path = error_file_path(settings, partition)
    errors = queue.read_errors(partition)
    if errors is None and state.finalized_at is not None and path.exists():
        # Finalized before: the records already left Redis for this file.
        summary.error_rows = pq.ParquetFile(arrow_file(path)).metadata.num_rows
    else:
        summary.error_rows = write_error_file(path, errors)
        queue.mark_finalized(partition)
    summary.error_file = str(path)
    return summary


def part_errors(queue: Queue, partition: str, settings: Settings) -> pa.Table:
    """A part's error rows so far: its error file once final, Redis's records before that."""
    live = queue.read_errors(partition)
    path = error_file_path(settings, partition)
    if live is not None:
        return live.sort_by("row")
    if path.exists():
        return pq.read_table(arrow_file(path))
    if queue.part(partition).finalized_at is not None:
        # Its records left Redis for a file we cannot see: the wrong store, most likely.
        raise FileNotFoundError(f"{partition} is final but its error file {path} is missing "
                                "(is the store/error dir the one its run used?)")
    return ERROR_SCHEMA.empty_table()


def export_errors(queue: Queue, partition: str, settings: Settings, out_dir: Path,
                  progress: Callable[[int, int], None] | None = None
                  ) -> tuple[Path, Path, int]:
    """Write a part's failed rows as parquet and JSON lines (what save_error_task.py did).

    `progress(done, total)` is called as the JSON lines are written: on a LAION part that can
    be millions of rows.
    """
    table = part_errors(queue, partition, settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = partition.replace(parts.SEPARATOR, "_")
    parquet_path = out_dir / f"{name}.errors.parquet"
    jsonl_path = out_dir / f"{name}.errors.jsonl"
    pq.write_table(table, parquet_path, compression="zstd")
    with open(jsonl_path, "w") as handle:
        for start in range(0, table.num_rows, 10_000):
            for record in table.slice(start, 10_000).to_pylist():
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            if progress is not None:
                progress(min(start + 10_000, table.num_rows), table.num_rows)
    return parquet_path, jsonl_path, table.num_rows
