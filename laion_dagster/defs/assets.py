"""The two assets of a part: its rows on the queue, and its images on disk.

Thin: each calls one core function and turns its report into metadata the UI can plot.
"""

import dataclasses
import os
import socket

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    Config,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)

from laion_dagster.core.control.accounting import PartNotDone, PartSummary, finalize_part
from laion_dagster.core.control.enqueue import EnqueueReport, enqueue_part
from laion_dagster.core.control.provenance import PartChanged
from laion_dagster.core.control.retry import RetryRefused, retry_failed
from laion_dagster.core.input import parts
from laion_dagster.core.outcomes import ERROR_CLASSES
from laion_dagster.core.queue.connection import RedisUnavailable
from laion_dagster.core.queue.embedded import EmbeddedServerError
from laion_dagster.core.settings import Settings
from laion_dagster.defs.observations import QUEUE, WORKER_HOSTS
from laion_dagster.defs.partitions import parts_partitions
from laion_dagster.defs.resources import LaionResource

GROUP = "laion"
BALANCED = "rows_accounted_for"
SUCCESS_RATE = "success_rate_floor"


class EnqueuedPartConfig(Config):
    """Leave empty to enqueue the part (or resume its enqueue). Name error classes (e.g.
    ["timeout", "http_5xx"]) to queue only the part's failed rows of those classes again, as
    `errors retry` does. Set start_over to begin the part again as a new generation, with the
    recipe (format, filters, resize) of this run's settings, as `laion-dagster reset` does."""

    retry_classes: list[str] = []
    start_over: bool = False


@asset(partitions_def=parts_partitions, group_name=GROUP, deps=[QUEUE, WORKER_HOSTS],
       description="A part's rows, cut into shards and queued on Redis for the workers. "
                   "While they download, its partition page shows their counts as the "
                   "watch_downloads sensor observes them.")
def enqueued_part(context: AssetExecutionContext, config: EnqueuedPartConfig,
               laion: LaionResource) -> MaterializeResult:
    settings = laion.settings()
    key = context.partition_key
    if config.retry_classes:
        return _retry(key, settings, laion, tuple(config.retry_classes))
    last_tenth = -1

    def progress(done: int, total: int) -> None:
        nonlocal last_tenth
        tenth = done * 10 // max(total, 1)
        if tenth != last_tenth:
            last_tenth = tenth
            context.log.info(f"{key}: {done:,} / {total:,} rows enqueued")

    try:
        part = parts.find(settings.parts_root, key)
        with laion.queue() as queue:
            if config.start_over:
                generation = queue.reset(key)
                context.log.info(f"{key}: starting over as generation {generation}")
            report = enqueue_part(queue, part, settings, progress=progress,
                                  enqueuer=f"{socket.gethostname()}:{os.getpid()}:"
                                           f"{context.run.run_id}")
    except (parts.PartError, PartChanged, RedisUnavailable, EmbeddedServerError) as error:
        # The message names the file and the problem; the core's traceback adds nothing.
        raise Failure(description=str(error)) from None
    return MaterializeResult(metadata=enqueue_metadata(report, settings))


def enqueue_metadata(report: EnqueueReport, settings: Settings) -> dict:
    """What an enqueued_part materialization records (also `run`'s record of a part it queued
    before Dagster started)."""
    return {
        "rows": report.rows,
        "invalid_rows": report.invalid,
        "queued_rows": report.rows - report.invalid,
        "shards": report.shards,
        "shards_added": report.shards_added,
        "shards_already_queued": report.shards_skipped,
        "rows_per_second": round(report.rows_per_second, 1),
        "duration_s": round(report.duration, 3),
        "waited_for_queue_s": round(report.waited_seconds, 1),
        "generation": report.generation,
        "part_file": MetadataValue.path(report.path),
        "store_dir": MetadataValue.path(str(settings.store_root)),
        "output_format": report.recipe.output_format,
        "recipe": MetadataValue.json(dataclasses.asdict(report.recipe)),
    }


def _retry(key: str, settings, laion: LaionResource, classes: tuple[str, ...]):
    try:
        with laion.queue() as queue:
            part = parts.locate(settings.parts_root, key, queue.part(key).path)
            report = retry_failed(queue, part, settings, classes)
    except (parts.PartError, RetryRefused, FileNotFoundError, RedisUnavailable,
            EmbeddedServerError) as error:
        raise Failure(description=str(error)) from None
    return MaterializeResult(metadata={
        "retried_rows": report.rows,
        "retry_shards": report.shards,
        "retry_round": report.round,
        "retried_classes": MetadataValue.md("\n".join(
            ["| error class | rows |", "|---|---:|"]
            + [f"| {k} | {v:,} |" for k, v in sorted(report.classes.items())])),
    })


def human_size(nbytes: int) -> str:
    """1234567 → '1.2 MB': sizes in the units people read."""
    size = float(nbytes)
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:,.0f} {unit}" if unit == "bytes" else f"{size:,.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def _part_file(settings, partition: str, recorded: str | None) -> str:
    """The part's file name, for the metadata (the key is short on purpose)."""
    try:
        return str(parts.locate(settings.parts_root, partition, recorded).path)
    except parts.PartError:
        return recorded or ""


def classes_table(summary: PartSummary) -> str:
    failed = summary.failed + summary.invalid
    lines = ["| error class | rows | share of failures |", "|---|---:|---:|"]
    for name, count in sorted(summary.classes.items(), key=lambda kv: -kv[1]):
        share = count / failed if failed else 0.0
        lines.append(f"| {name} | {count:,} | {share:.1%} |")
    if len(lines) == 2:
        lines.append("| (none) | 0 | |")
    return "\n".join(lines)


@asset(
    partitions_def=parts_partitions,
    group_name=GROUP,
    deps=[enqueued_part],
    description="A part's downloaded shards, its totals, and its error file.",
    check_specs=[
        AssetCheckSpec(BALANCED, asset="part_images",
                       description="rows = ok + failed + invalid: every input row accounted for"),
        AssetCheckSpec(SUCCESS_RATE, asset="part_images",
                       description="ok / attempted at least min_success_rate (below ~50% on "
                                   "LAION usually means a broken DNS resolver)"),
    ],
)
def part_images(context: AssetExecutionContext, laion: LaionResource) -> MaterializeResult:
    settings = laion.settings()
    try:
        with laion.queue() as queue:
            summary = finalize_part(queue, context.partition_key, settings)
    except (PartNotDone, RedisUnavailable, EmbeddedServerError) as error:
        raise Failure(description=str(error)) from None
    part_file = _part_file(settings, context.partition_key, summary.part_file)
    metadata = {
        "rows": summary.rows,
        "ok": summary.ok,
        "failed": summary.failed,
        "invalid_rows": summary.invalid,
        "size": human_size(summary.bytes),
        "size_mb": round(summary.bytes / 1e6, 1),
        "success_rate": round(summary.success_rate, 4),
        "images_per_second": round(summary.images_per_second, 1),
        "duration_s": round(summary.duration, 1),
        "shards": summary.shards,
        "retried_rows": summary.retried,
        "recovered_rows": summary.recovered,
        "to_fix": summary.fix or "",
        "error_rows": summary.error_rows,
        "error_classes": MetadataValue.md(classes_table(summary)),
        "output_dir": MetadataValue.path(summary.output_dir),
        "error_file": MetadataValue.path(summary.error_file or ""),
        "part_file": MetadataValue.path(part_file),
    }
    # Every class, zeros included: each partition then has the same metadata keys, which is
    # what the asset's plots across partitions are drawn from.
    for name in ERROR_CLASSES:
        metadata[f"failed_{name}"] = summary.classes.get(name, 0)
    # And the keys of the part's observations while it downloaded (core/control/progress.py), at
    # their final values: one plot covers its whole life.
    metadata.update({"state": "final", "rows_done": summary.rows, "shards_done": summary.shards,
                     "eta_s": 0, "paused": False, "why": ""})
    checks = [
        AssetCheckResult(
            check_name=BALANCED, passed=summary.balanced,
            metadata={"rows": summary.rows,
                      "ok_plus_failed_plus_invalid": summary.ok + summary.failed
                      + summary.invalid}),
        AssetCheckResult(
            check_name=SUCCESS_RATE, passed=summary.success_rate >= settings.min_success_rate,
            severity=AssetCheckSeverity.WARN,
            metadata={"success_rate": round(summary.success_rate, 4),
                      "floor": settings.min_success_rate}),
    ]
    return MaterializeResult(metadata=metadata, check_results=checks)
