"""Whether a new part may be enqueued now, and if not, why: the successor of add_task.py's loop.

The sensor and the one-shot `run` command ask the same question, so they hold for the same
reasons and say so in the same words.
"""

from __future__ import annotations

from laion_dagster.core.hosts import full_hosts
from laion_dagster.core.settings import Settings


def hold_reasons(queued_rows: int, hosts: dict[str, dict], settings: Settings) -> list[str]:
    """Sentences naming the numbers that hold new parts back; empty means go ahead."""
    reasons = []
    if queued_rows >= settings.queue_threshold:
        reasons.append(f"queue {queued_rows:,} rows ≥ {settings.queue_threshold:,}")
    reasons.extend(full_hosts(hosts, settings))
    return reasons
