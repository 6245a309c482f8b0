"""When a part is enqueued, held, or finalized: the successor of add_task.py's loop.

Two orchestrators drive downloads: the sensors (under the Dagster daemon or `up`) and the
`run` command, which drives one folder to its end without the daemon. Both ask this module,
so they launch the same parts in the same order, hold for the same reasons in the same words,
and finalize the same parts; only how they start the work differs (a Dagster run request, or
a run or process of their own).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from laion_dagster.core.control.hosts import full_hosts, is_stale
from laion_dagster.core.queue.protocol import PartState
from laion_dagster.core.settings import Settings

# Parts enqueued at once: a part held at the high watermark must not stall the ones behind
# it, and each enqueue is a process reading a file.
ENQUEUES_AT_ONCE = 4


@dataclass(frozen=True)
class EnqueueDecision:
    start: list[str]  # parts to start enqueuing now, in order
    held: list[str]  # why the waiting parts are held (empty when they are not)
    waiting: list[str]  # parts not on the queue yet, not being enqueued and not set aside

    def hold_message(self) -> str:
        return f"holding {len(self.waiting)} parts: " + "; ".join(self.held)


def next_enqueues(keys: list[str], states: dict[str, PartState], queued_rows: int,
                  hosts: dict[str, dict], settings: Settings,
                  enqueuing: Collection[str] = (),
                  set_aside: Collection[str] = ()) -> EnqueueDecision:
    """Which waiting parts to enqueue now, in `keys` order. `enqueuing`: parts whose enqueue
    is under way; `set_aside`: parts this orchestrator will not enqueue now (they failed, or
    it has just queued them)."""
    waiting = [k for k in keys if not states[k].enqueued and k not in enqueuing
               and k not in set_aside]
    if not waiting:
        return EnqueueDecision([], [], [])
    held = hold_reasons(queued_rows, hosts, settings)
    if held:
        return EnqueueDecision([], held, waiting)
    room = max(0, ENQUEUES_AT_ONCE - len(enqueuing))
    return EnqueueDecision(waiting[:room], [], waiting)


def to_finalize(states: dict[str, PartState], set_aside: Collection[str] = ()) -> list[str]:
    """Parts whose every shard is complete and that are not final yet (a retry round makes a
    final part unfinished again)."""
    return [k for k, s in states.items()
            if s.done and s.finalized_at is None and k not in set_aside]


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
