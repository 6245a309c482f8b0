"""What `laion-dagster status` shows: the successor of speed.py.

Reads only named keys (the parts set, their hashes, the hosts hash, the rate buckets), never
scans the keyspace, so it is cheap against a remote Redis holding billions of rows.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from laion_dagster.core.control.hosts import is_stale
from laion_dagster.core.input import parts
from laion_dagster.core.outcomes import fix_sentence
from laion_dagster.core.queue.protocol import Queue
from laion_dagster.core.settings import Settings


@dataclass
class Status:
    queued_rows: int
    dead_letters: int
    window_seconds: float  # what the recent figures cover: the current and previous minute
    ok_recent: int
    failed_recent: int
    bytes_recent: int
    images_per_second: float
    mb_per_second: float
    images_per_second_hour: float
    mb_per_second_hour: float
    eta_seconds: float | None  # of the rows on the queue now, at the recent rate
    parquet_dir: str
    dataset_rows: int | None  # None where parquet_dir is not readable from here
    rows_remaining: int | None
    dataset_eta_seconds: float | None
    failed: int  # rows that failed to download, every part
    invalid: int  # rows without a usable URL (class invalid_url), every part
    top_errors: list[tuple[str, int]]  # download failures by class (invalid rows apart)
    retried: int  # rows tried again later in their shard, every part
    recovered: int  # of those, rows that then succeeded
    fix: str | None  # what to do about the class that dominates the failures, if anything
    parts: list[dict]
    hosts: list[dict]

    def to_dict(self) -> dict:
        return asdict(self)


# Rows of parts not yet enqueued, read from parquet footers once per process: a status view
# refreshing every few seconds must not reopen 384 files each time.
_footer_rows: dict[str, int] = {}


def _rows_not_enqueued(settings: Settings, enqueued: set[str]) -> tuple[int, int] | None:
    """(rows, parts) of the parts under parquet_dir that the queue has not seen; None where
    the folder is not readable from here (a status run on another machine)."""
    root = settings.parts_root
    try:
        if not root.is_dir():
            return None
        found = parts.discover(root)
    except (OSError, parts.PartError):  # a bucket this machine cannot read
        return None
    rows = count = 0
    for part in found:
        if part.key in enqueued:
            continue
        if part.key not in _footer_rows:
            _footer_rows[part.key] = parts.rows_if_readable(part)
        rows += _footer_rows[part.key]
        count += 1
    return rows, count


def collect(queue: Queue, settings: Settings) -> Status:
    keys = queue.partitions()
    states = queue.parts_states(keys)
    active = [st.started_at for st in states.values() if st.started_at and not st.done]
    since = min(active) if active else None
    # Rates over the time actually covered: the current and the previous minute (never a
    # partial minute counted as a whole), and the hour, or as much of it as work has run.
    recent, recent_seconds = queue.rates(minutes=2)
    hour, hour_seconds = queue.rates(minutes=60, since=since)
    per_second = (recent["ok"] + recent["failed"]) / recent_seconds
    per_second_hour = (hour["ok"] + hour["failed"]) / hour_seconds
    parts_seen = []
    classes: dict[str, int] = {}
    per_part = queue.classes_of(keys)
    for counts in per_part:
        for name, count in counts.items():
            if name != "invalid_url":  # the invalid rows, counted on their own
                classes[name] = classes.get(name, 0) + count
    remaining = 0
    for state, counts in zip(states.values(), per_part, strict=True):
        remaining += max(state.rows - state.ok - state.failed - state.invalid, 0)
        parts_seen.append({
            "partition": state.partition, "rows": state.rows, "ok": state.ok,
            "failed": state.failed, "invalid": state.invalid,
            "retried": state.retried, "recovered": state.recovered,
            "fix": fix_sentence(counts),
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
    unseen = _rows_not_enqueued(settings, set(keys))
    dataset_rows = rows_remaining = None
    if unseen is not None:
        rows_remaining = remaining + unseen[0]
        dataset_rows = sum(st.rows for st in states.values()) + unseen[0]
    steady = per_second_hour or per_second
    return Status(
        queued_rows=depth, dead_letters=queue.dead_letters(),
        window_seconds=round(recent_seconds, 1), ok_recent=recent["ok"],
        failed_recent=recent["failed"], bytes_recent=recent["bytes"],
        images_per_second=round(per_second, 1),
        mb_per_second=round(recent["bytes"] / recent_seconds / 1e6, 2),
        images_per_second_hour=round(per_second_hour, 2),
        mb_per_second_hour=round(hour["bytes"] / hour_seconds / 1e6, 2),
        eta_seconds=round(depth / per_second) if per_second > 0 and depth else None,
        parquet_dir=str(settings.parts_root),
        dataset_rows=dataset_rows, rows_remaining=rows_remaining,
        dataset_eta_seconds=(round(rows_remaining / steady)
                             if rows_remaining and steady > 0 else None),
        failed=sum(st.failed for st in states.values()),
        invalid=sum(st.invalid for st in states.values()),
        top_errors=sorted(classes.items(), key=lambda kv: -kv[1])[:6],
        retried=sum(st.retried for st in states.values()),
        recovered=sum(st.recovered for st in states.values()),
        fix=fix_sentence(classes), parts=parts_seen, hosts=hosts)


def plural(count: int, noun: str) -> str:
    """'1 part', '4 parts', '1,000 rows'."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def bar(done: int, total: int | None, width: int = 20) -> str:
    """`[####....]`: done out of total; question marks while the total is unknown."""
    if not total:
        return "[" + "?" * width + "]"
    filled = int(width * done / total)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def fit(text: str, width: int) -> str:
    """`text` in `width` characters, an ellipsis marking where it was cut."""
    return text if len(text) <= width else text[:width - 1] + "…"


def render(status: Status) -> str:
    whole = (f"dataset: {status.parquet_dir} is not readable from here, so only enqueued parts "
             "count" if status.dataset_rows is None else
             f"dataset: {status.rows_remaining:,} of {status.dataset_rows:,} rows to go, "
             f"ETA {_duration(status.dataset_eta_seconds)}")
    errors = ", ".join(f"{name} {count:,}" for name, count in status.top_errors) or "none"
    lines = [
        f"queue: {status.queued_rows:,} rows   dead-lettered shards: {status.dead_letters}"
        f"   ETA for the queue: {_duration(status.eta_seconds)}",
        f"rate: {status.images_per_second:,.1f} images/s, {status.mb_per_second:,.2f} MB/s "
        f"over the last {status.window_seconds:.0f}s (ok {status.ok_recent:,}, failed "
        f"{status.failed_recent:,});  {status.images_per_second_hour:,.1f} images/s, "
        f"{status.mb_per_second_hour:,.2f} MB/s over the last hour",
        whole,
        f"failed: {status.failed:,} rows, top classes: {errors};  invalid (no usable URL): "
        f"{status.invalid:,}",
    ]
    if status.retried:
        lines.append(f"tried again later: {status.retried:,} rows, {status.recovered:,} of them "
                     "recovered")
    if status.fix:
        lines.append(f"to fix: {status.fix}")
    lines += [
        "",
        f"parts ({len(status.parts):,}):",
    ]
    width = min(max((len(p["partition"]) for p in status.parts), default=0), 60)
    for p in status.parts:
        lines.append(f"  {fit(p['partition'], width):<{width}} "
                     f"{bar(p['shards_done'], p['shards_total'])} "
                     f"{p['shards_done']}/{p['shards_total'] or '?'} shards  ok {p['ok']:,}  "
                     f"failed {p['failed']:,}  invalid {p['invalid']:,}  {p['state']}"
                     + (f"  (retried {p['retried']:,}, recovered {p['recovered']:,})"
                        if p["retried"] else ""))
        if p["fix"] and p["fix"] != status.fix:
            lines.append(f"    to fix: {p['fix']}")
    if not status.parts:
        lines.append("  (none enqueued yet)")
    lines += ["", "hosts:"]
    for h in status.hosts:
        state = "gone?" if h["stale"] else "paused" if h.get("paused") else "running"
        lines.append(f"  {fit(h['host'], 24):<24} {state:<8} disk used "
                     f"{h['disk_used_gb']:,.0f} GB, free {h['disk_free_gb']:,.0f} GB   "
                     f"{h.get('rate', 0):,.1f} images/s   {h.get('alive_processes', '?')}/"
                     f"{h.get('processes', '?')} processes   seen {h['last_seen_s']}s ago")
        if h.get("paused") and h.get("pause_reason"):
            lines.append(f"    paused: {h['pause_reason']}")
        if h.get("waiting"):
            lines.append(f"    {h['waiting']:,} rows wait for their later try (retry_delay)")
        for problem in h.get("problems") or []:
            lines.append(f"    shards failing: {problem}")
    if not status.hosts:
        lines.append("  (no worker is reporting)")
    return "\n".join(lines)
