"""Whether a new part may be enqueued now, and if not, why: the successor of add_task.py's loop.

The sensor and the one-shot `run` command ask the same question, so they hold for the same
reasons and say so in the same words.
"""

from __future__ import annotations

from laion_dagster.core.control.hosts import full_hosts, is_stale
from laion_dagster.core.settings import Settings


def hold_reasons(queued_rows: int, hosts: dict[str, dict], settings: Settings) -> list[str]:
    """Sentences naming the numbers that hold new parts back; empty means go ahead."""
    reasons = []
    if queued_rows >= settings.queue_threshold:
        reasons.append(f"queue {queued_rows:,} rows ≥ {settings.queue_threshold:,}")
    reasons.extend(full_hosts(hosts, settings))
    return reasons


def worker_reasons(reports: dict[str, dict], settings: Settings,
                   now: float | None = None) -> list[str]:
    """Why the worker hosts may not be moving work right now, in sentences: paused hosts and
    why, shards failing and with what, rows waiting for their later try. (Whether any host
    reports at all is the caller's to say: it knows how long it has waited.)"""
    reasons = []
    live = {h: r for h, r in reports.items() if not is_stale(r, settings, now)}
    for host, report in sorted(live.items()):
        if report.get("paused"):
            reasons.append(f"host {host} paused: {report.get('pause_reason') or 'paused'}")
        for problem in report.get("problems") or []:
            reasons.append(f"shards failing on {host}: {problem}")
    later = sum(int(report.get("waiting") or 0) for report in live.values())
    if later:
        reasons.append(f"{later:,} row{'' if later == 1 else 's'} wait for their later try, "
                       f"{settings.retry_delay:g}s after their first began (retry_delay)")
    return reasons
