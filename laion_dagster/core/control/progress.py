"""What every part, every worker host and the queue look like now, and when to say so.

The figures the Dagster UI shows while a download runs (runless observations: see
defs/observations.py), from the queue's named keys alone, as `status` reads them. `Watch`
remembers what it reported last. A downloading part is reported (at most once a tick, every
`observe_interval` seconds) when it moved by STEP of its rows or MOVING_EVERY seconds passed
since its last report; when why it stands still changes; otherwise every HEARTBEAT seconds; its
end once. The hosts and the queue are reported at the next tick when their state changed (a
host paused, gone or failing; the hold; a part's state), when only their numbers moved every
MOVING_EVERY seconds, and otherwise every ASSET_HEARTBEAT; the table of every part only when
a part's state changed (or every TABLE_HEARTBEAT). A part of any size so costs a few events
a minute at most, never one per row or shard (bench/observe.py measures it).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from laion_dagster.core.control.hosts import is_stale
from laion_dagster.core.control.policy import hold_reasons, worker_reasons
from laion_dagster.core.outcomes import ERROR_CLASSES, fix_sentence
from laion_dagster.core.queue.protocol import PartCounts, PartState, Queue
from laion_dagster.core.settings import Settings

# A part's states, in the order it goes through them.
STATES = ("queued", "enqueuing", "downloading", "paused", "finalizing", "final", "failed")
HEARTBEAT = 600.0  # seconds: a part that does not move is reported again this often
STEP = 0.005  # of a part's rows: a part that moved this much is reported at the next tick
MOVING_EVERY = 120.0  # seconds: a part that moves less is reported this often
ASSET_HEARTBEAT = 300.0  # the hosts and the queue, when nothing about them changed
TABLE_HEARTBEAT = 1800.0  # the table of every part, when no part changed state


@dataclass
class PartView(PartCounts):
    """A part as the UI shows it: the same keys while it downloads and once it is final, so
    one plot covers its whole life."""

    partition: str
    state: str
    rows_done: int = 0  # rows with an outcome (in complete shards, and rejected ones)
    shards: int = 0
    classes: dict[str, int] = field(default_factory=dict)
    images_per_second: float = 0.0  # since it was last reported (final: over its whole life)
    eta_s: float | None = None
    duration_s: float = 0.0
    why: str = ""  # why it does not move, "" while it does
    # The error classes its figures name: every one (a final part's), or those it has had
    # (while it downloads: a dozen zeros per event would double the event log's size).
    shown_classes: tuple[str, ...] = ERROR_CLASSES

    @property
    def paused(self) -> bool:
        return self.state == "paused"

    def figures(self) -> dict[str, Any]:
        """Its metadata: plain values under the keys every plot and check reads."""
        attempted = self.ok + self.failed
        figures: dict[str, Any] = {
            "state": self.state,
            "rows": self.rows,
            "rows_done": self.rows_done,
            "ok": self.ok,
            "failed": self.failed,
            "invalid_rows": self.invalid,
            "success_rate": round(self.ok / attempted, 4) if attempted else 0.0,
            "size_mb": round(self.bytes / 1e6, 1),
            "images_per_second": round(self.images_per_second, 1),
            "eta_s": round(self.eta_s) if self.eta_s is not None else None,
            "duration_s": round(self.duration_s, 1),
            "shards": self.shards,
            "shards_done": self.shards_done,
            "retried_rows": self.retried,
            "recovered_rows": self.recovered,
            "paused": self.paused,
            "why": self.why,
            "to_fix": fix_sentence(self.classes) or "",
        }
        for name in self.shown_classes:
            figures[f"failed_{name}"] = self.classes.get(name, 0)
        return figures


def part_state(state: PartState, failed: bool = False, paused: bool = False) -> str:
    """Where a part is in its life, from its queue state (and whether its Dagster run
    failed, and whether every live worker host is paused)."""
    if failed:
        return "failed"
    if state.finalized_at is not None:
        return "final"
    if state.done:
        return "finalizing"
    if not state.generation:
        return "queued"
    if not state.enqueued:
        return "enqueuing"
    return "paused" if paused else "downloading"


def view_part(state: PartState, classes: dict[str, int], *, now: float, failed: bool = False,
              paused: bool = False, why: str = "", last: tuple[int, float] | None = None
              ) -> PartView:
    """A part's view at `now` (epoch seconds); `last`: rows done and when, as last reported,
    for the rate over the interval since (else over its life so far)."""
    rows_done = state.ok + state.failed + state.invalid
    phase = part_state(state, failed, paused)
    started = state.started_at or now
    end = state.done_at if state.done_at is not None else now
    if last is not None and now > last[1] and phase not in ("final", "failed"):
        rate = max(rows_done - last[0], 0) / (now - last[1])
    else:
        rate = (state.ok + state.failed) / (end - started) if end > started else 0.0
    left = max(state.rows - rows_done, 0) if state.enqueued else None
    eta = (left / rate if rate > 0 else None) if left else (0.0 if left == 0 else None)
    moving = phase in ("downloading", "enqueuing")
    return PartView(
        partition=state.partition, state=phase, **state.counts(), rows_done=rows_done,
        shards=state.shards_total or state.shards,
        classes={k: v for k, v in classes.items() if v},
        images_per_second=rate, eta_s=eta, duration_s=max(end - started, 0.0),
        why=why if moving or phase == "paused" else "")


@dataclass
class HostView:
    """A worker host as the UI shows it (a row of worker_hosts' table: the short columns
    first, so that a narrow table still shows them)."""

    host: str
    state: str  # running, paused, gone (no heartbeat for a while)
    disk_free_gb: float
    disk_used_gb: float
    images_per_second: float
    alive_processes: int
    processes: int
    waiting: int  # rows waiting for their later try
    last_heartbeat: str  # UTC, to the second
    reason: str
    problems: list[str]


def view_hosts(reports: dict[str, dict], settings: Settings, now: float) -> list[HostView]:
    views = []
    for host, report in sorted(reports.items()):
        stale = is_stale(report, settings, now)
        paused = bool(report.get("paused"))
        views.append(HostView(
            host=host, state="gone" if stale else "paused" if paused else "running",
            reason=(report.get("pause_reason") or "paused") if paused else "",
            disk_used_gb=float(report.get("disk_used_gb", 0)),
            disk_free_gb=float(report.get("disk_free_gb", 0)),
            images_per_second=float(report.get("rate", 0)),
            processes=int(report.get("processes", 0)),
            alive_processes=int(report.get("alive_processes", 0)),
            waiting=int(report.get("waiting") or 0),
            last_heartbeat=time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                         time.gmtime(float(report.get("seen_at", 0)))),
            problems=list(report.get("problems") or [])))
    return views


def hosts_figures(views: list[HostView]) -> dict[str, Any]:
    """The worker hosts' metadata: totals, and a row per host (for a table)."""
    live = [v for v in views if v.state != "gone"]
    return {
        "hosts": len(live),
        "hosts_paused": sum(v.state == "paused" for v in live),
        "hosts_gone": len(views) - len(live),
        "images_per_second": round(sum(v.images_per_second for v in live), 1),
        "processes": sum(v.alive_processes for v in live),
        "disk_free_gb_min": round(min((v.disk_free_gb for v in live), default=0.0), 3),
        "rows_waiting_for_later_try": sum(v.waiting for v in live),
        "table": [asdict(v) | {"problems": "; ".join(v.problems)} for v in views],
    }


@dataclass
class Snapshot:
    """Everything the UI is told in one tick: parts (those to report), hosts, the queue."""

    parts: list[PartView]
    hosts: dict[str, Any] | None  # None: nothing new to say
    queue: dict[str, Any] | None


class Watch:
    """What was reported last (kept in a sensor's cursor, or by `run`), and what to report
    now."""

    def __init__(self, memory: dict | None = None):
        memory = memory or {}
        # partition -> [rows_done, state, why, when reported (epoch s), classes reported]
        self.parts: dict[str, list] = memory.get("parts", {})
        # [state, when, figures] as last reported (Watch._due)
        self.hosts: list = memory.get("hosts", [None, 0.0])
        self.queue: list = memory.get("queue", [None, 0.0])
        self.table: list = memory.get("table", [None, 0.0])

    @classmethod
    def from_json(cls, text: str | None) -> Watch:
        try:
            return cls(json.loads(text) if text else None)
        except (ValueError, TypeError):
            return cls()

    def to_json(self) -> str:
        return json.dumps({"parts": self.parts, "hosts": self.hosts, "queue": self.queue,
                           "table": self.table}, separators=(",", ":"))

    def look(self, states: dict[str, PartState], classes: dict[str, dict[str, int]],
             reports: dict[str, dict], queued_rows: int, dead_letters: int,
             settings: Settings, failed: set[str] = frozenset(), now: float | None = None
             ) -> Snapshot:
        """What to report now about `states` (every known part), the hosts' reports and the
        queue; remembers it as reported."""
        now = time.time() if now is None else now
        live = {h: r for h, r in reports.items() if not is_stale(r, settings, now)}
        all_paused = bool(live) and all(r.get("paused") for r in live.values())
        stalls = worker_reasons(reports, settings, now)
        if not live:
            stalls.append("no worker is reporting")
        views = {}
        for key, state in states.items():
            last = self.parts.get(key)
            views[key] = view_part(
                state, classes.get(key, {}), now=now, failed=key in failed,
                paused=all_paused, why="; ".join(stalls),
                last=(last[0], last[3]) if last and last[1] not in ("final", "failed") else None)
        parts = [v for v in views.values() if self._report_part(v, now)]
        queue = self._queue(views, queued_rows, dead_letters, reports, settings, now)
        hosts = hosts_figures(view_hosts(reports, settings, now))
        state = [[row["host"], row["state"], gist(row["reason"]), gist(row["problems"])]
                 for row in hosts["table"]]
        due = self._due(self.hosts, json.dumps(state), now, json.dumps(hosts, sort_keys=True))
        return Snapshot(parts, hosts if due else None, queue)

    def read(self, queue: Queue, keys: list[str], settings: Settings,
             failed: set[str] = frozenset(), states: dict[str, PartState] | None = None,
             reports: dict[str, dict] | None = None) -> Snapshot:
        """look() at what the queue says now of `keys` (the states and host reports a caller
        has just read are not read again)."""
        states = queue.parts_states(keys) if states is None else states
        classes = dict(zip(keys, queue.classes_of(keys), strict=True))
        reports = queue.hosts() if reports is None else reports
        return self.look(states, classes, reports, queue.queued_rows(), queue.dead_letters(),
                         settings, failed)

    def _report_part(self, view: PartView, now: float) -> bool:
        last = self.parts.get(view.partition)
        if view.state == "queued":
            return False  # nothing to see yet: the queue's table lists it
        if last is None:
            due = True
        elif view.state in ("final", "failed"):
            due = last[1] != view.state
        else:
            moved = view.rows_done - last[0]
            due = (view.state != last[1] or gist(view.why) != gist(last[2])
                   or (moved and (moved >= STEP * view.rows or now - last[3] >= MOVING_EVERY))
                   or now - last[3] >= HEARTBEAT)
        if due:
            if view.state not in ("final", "failed"):
                # A class once shown stays (at 0 after `errors retry`): the UI shows each
                # key's latest value, and a key left out would keep its old one.
                had = last[4] if last is not None and len(last) > 4 else []
                view.shown_classes = tuple(name for name in ERROR_CLASSES
                                           if name in view.classes or name in had)
            self.parts[view.partition] = [view.rows_done, view.state, view.why, now,
                                          list(view.shown_classes)]
        return due

    def _queue(self, views: dict[str, PartView], queued_rows: int, dead_letters: int,
               reports: dict[str, dict], settings: Settings, now: float) -> dict | None:
        counts = {state: 0 for state in STATES}
        for view in views.values():
            counts[view.state] += 1
        held = hold_reasons(queued_rows, reports, settings)
        figures: dict[str, Any] = {
            "queued_rows": queued_rows,
            "queue_threshold": settings.queue_threshold,
            "queue_high_watermark": settings.queue_high_watermark,
            "dead_letters": dead_letters,
            "hold": ("holding new parts: " + "; ".join(held)) if held and counts["queued"]
            else "none",
            **{f"parts_{state}": n for state, n in counts.items()},
        }
        states_now = json.dumps(sorted([v.partition, v.state] for v in views.values()))
        table_due = self._due(self.table, states_now, now, heartbeat=TABLE_HEARTBEAT)
        # Its state: the figures but the depth, and the hold's reasons but their numbers.
        state = json.dumps({k: gist(v) if k == "hold" else v
                            for k, v in figures.items() if k != "queued_rows"}, sort_keys=True)
        if not (self._due(self.queue, state, now, json.dumps(figures, sort_keys=True))
                or table_due):
            return None
        if table_due:
            order = sorted(views.values(), key=lambda v: (STATES.index(v.state), v.partition))
            figures["parts"] = [parts_row(view) for view in order]
        return figures

    @staticmethod
    def _due(memory: list, state: str, now: float, figures: str | None = None,
             heartbeat: float = ASSET_HEARTBEAT) -> bool:
        """Whether to report now: its state changed, its figures moved and MOVING_EVERY
        passed, or its heartbeat is due; remembers it as reported. `memory`: [state, when,
        figures] as last reported."""
        since = now - memory[1]
        moved = figures is not None and memory[2:3] != [figures] and since >= MOVING_EVERY
        if memory[0] == state and since < heartbeat and not moved:
            return False
        memory[:] = [state, now, figures]
        return True


def gist(text: str) -> str:
    """A reason without its numbers ("host a paused: # MB free ≤ # MB"): a reason whose
    numbers move (free space, rows waiting for their later try) is not news each tick; one
    that changes is."""
    return re.sub(r"\d[\d,.]*", "#", text)


def parts_row(view: PartView) -> dict[str, Any]:
    """A part's row in the table of every part (the queue asset's)."""
    return {"part": view.partition, "state": view.state, "rows": view.rows,
            "rows_done": view.rows_done, "ok": view.ok, "failed": view.failed,
            "images_per_second": round(view.images_per_second, 1),
            "eta_s": round(view.eta_s) if view.eta_s is not None else None,
            "shards_done": view.shards_done, "shards": view.shards, "why": view.why}
