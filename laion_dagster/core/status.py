"""What `laion-dagster status` shows: the successor of speed.py.

Reads only named keys (the parts set, their hashes, the hosts hash, the rate buckets), never
scans the keyspace, so it is cheap against a remote Redis holding billions of rows.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from laion_dagster.core.hosts import is_stale
from laion_dagster.core.queue import Queue
from laion_dagster.core.settings import Settings


@dataclass
class Status:
    queued_rows: int
    dead_letters: int
    ok_last_minute: int
    failed_last_minute: int
    bytes_last_minute: int
    images_per_second: float
    eta_seconds: float | None
    parts: list[dict]
    hosts: list[dict]

    def to_dict(self) -> dict:
        return asdict(self)


def collect(queue: Queue, settings: Settings) -> Status:
    # The current minute is partial; the previous whole minutes give a steadier rate.
    rate = queue.rates(minutes=2)
    per_second = (rate["ok"] + rate["failed"]) / 120.0
    parts = []
    for state in queue.parts_states(queue.partitions()).values():
        parts.append({
            "partition": state.partition, "rows": state.rows, "ok": state.ok,
            "failed": state.failed, "invalid": state.invalid,
            "shards_done": state.shards_done, "shards_total": state.shards_total,
            "state": ("final" if state.finalized_at else "done" if state.done
                      else "downloading" if state.enqueued else "enqueuing"),
        })
    hosts = []
    now = time.time()
    for host, report in sorted(queue.hosts().items()):
        hosts.append({**report, "host": host, "stale": is_stale(report, settings, now),
                      "last_seen_s": round(now - float(report.get("seen_at", 0)), 1)})
    depth = queue.queued_rows()
    return Status(
        queued_rows=depth, dead_letters=queue.dead_letters(), ok_last_minute=rate["ok"],
        failed_last_minute=rate["failed"], bytes_last_minute=rate["bytes"],
        images_per_second=round(per_second, 1),
        eta_seconds=round(depth / per_second) if per_second > 0 else None,
        parts=parts, hosts=hosts)


def _bar(done: int, total: int | None, width: int = 20) -> str:
    if not total:
        return "[" + "?" * width + "]"
    filled = int(width * done / total)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def render(status: Status) -> str:
    lines = [
        f"queue: {status.queued_rows:,} rows   dead-lettered shards: {status.dead_letters}",
        f"rate: {status.images_per_second:,.1f} images/s "
        f"(ok {status.ok_last_minute:,}, failed {status.failed_last_minute:,} in the last 2 min)"
        f"   ETA for the queue: {_duration(status.eta_seconds)}",
        "",
        "parts:",
    ]
    for p in status.parts:
        lines.append(f"  {p['partition'][:60]:<60} {_bar(p['shards_done'], p['shards_total'])} "
                     f"{p['shards_done']}/{p['shards_total'] or '?'} shards  ok {p['ok']:,}  "
                     f"failed {p['failed']:,}  {p['state']}")
    if not status.parts:
        lines.append("  (none enqueued yet)")
    lines += ["", "hosts:"]
    for h in status.hosts:
        state = "gone?" if h["stale"] else "paused" if h.get("paused") else "running"
        lines.append(f"  {h['host']:<24} {state:<8} disk used {h['disk_used_gb']:,.0f} GB, "
                     f"free {h['disk_free_gb']:,.0f} GB   {h.get('rate', 0):,.1f} images/s   "
                     f"{h.get('alive_processes', '?')}/{h.get('processes', '?')} processes   "
                     f"seen {h['last_seen_s']}s ago")
    if not status.hosts:
        lines.append("  (no worker is reporting)")
    return "\n".join(lines)
