"""The UI's view of a download while it runs: core/control/progress.py's figures as runless
observations (what the watch_downloads sensor reports each tick, and `run` from its loop).

- `enqueued_part[part]`: each downloading part's counts. Its partition page shows them, merged
  with the enqueue's materialization (Dagster shows a partition's observations on top of its
  latest materialization; `part_images` has none before the part is final), and its plots
  chart them over time; the last one of a part carries its final figures.
- `worker_hosts`: every worker host (disk, paused and why, rate, processes, last heartbeat).
- `queue`: its depth against the threshold and watermark, why new parts are held, the parts by
  state, and (when a state changed) the table of every part.
Both are external assets upstream of `enqueued_part`: what the launch sensor decides by.
"""

from __future__ import annotations

from typing import Any

from dagster import (
    AssetKey,
    AssetObservation,
    AssetSpec,
    MetadataValue,
    TableColumn,
    TableRecord,
    TableSchema,
)

from laion_dagster.core.control.progress import Snapshot

GROUP = "laion"
QUEUE = AssetSpec("queue", group_name=GROUP, description=(
    "The Redis queue: rows queued against queue_threshold and queue_high_watermark, why new "
    "parts are held, the parts by state and a table of every part. Observed by "
    "watch_downloads (and `run`); launch_or_hold decides by it."))
WORKER_HOSTS = AssetSpec("worker_hosts", group_name=GROUP, description=(
    "The worker hosts (their heartbeats): disk used and free, paused and why, images/s, "
    "processes, rows waiting for a later try, last heartbeat. Observed by watch_downloads "
    "(and `run`); launch_or_hold holds new parts while one is full."))


def _table(rows: list[dict[str, Any]]) -> MetadataValue:
    """Rows of plain values as a table (its columns from the first row)."""
    if not rows:
        return MetadataValue.md("(none)")
    kinds = {int: "int", float: "float", bool: "bool"}
    columns = [TableColumn(name, kinds.get(type(value), "string"))
               for name, value in rows[0].items()]
    return MetadataValue.table(
        records=[TableRecord({k: v if v is None or isinstance(v, int | float | bool) else str(v)
                              for k, v in row.items()}) for row in rows],
        schema=TableSchema(columns=columns))


def events(snapshot: Snapshot, part_asset: AssetKey) -> list[AssetObservation]:
    """The observations of one tick."""
    observed = [AssetObservation(asset_key=part_asset, partition=view.partition,
                                 metadata=view.figures()) for view in snapshot.parts]
    if snapshot.hosts is not None:
        figures = dict(snapshot.hosts)
        figures["table"] = _table(figures["table"])
        observed.append(AssetObservation(asset_key=WORKER_HOSTS.key, metadata=figures))
    if snapshot.queue is not None:
        figures = dict(snapshot.queue)
        if "parts" in figures:
            figures["parts"] = _table(figures["parts"])
        observed.append(AssetObservation(asset_key=QUEUE.key, metadata=figures))
    return observed
