"""Worker hosts' heartbeats: disk usage, state and rate, reported into Redis.

The successor of monitor_disk.py: each worker host checks the disk its store is on and stops
claiming when it is full, and the sensor reads every host's report to hold new parts. A host
whose report is older than `STALE_AFTER` heartbeats is treated as gone (it cannot be full).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from laion_dagster.core.settings import Settings

GB = 1024**3
STALE_AFTER = 12  # heartbeats


@dataclass
class DiskState:
    used_gb: float
    free_gb: float
    full: bool
    reason: str | None


def disk_state(path: Path, settings: Settings) -> DiskState:
    path.mkdir(parents=True, exist_ok=True)
    usage = psutil.disk_usage(str(path))
    used, free = usage.used / GB, usage.free / GB
    reason = full_reason(used, free, settings)
    return DiskState(used_gb=round(used, 3), free_gb=round(free, 3), full=reason is not None,
                     reason=reason)


def store_problem(settings: Settings, disk: bool = True) -> str | None:
    """Why workers could not write to the store at all, in a sentence; None if they can.

    Checked before a run starts: a read-only store, or (with `disk`) a disk under the
    free-space floor, would otherwise leave the run at 0% with the reason only in the
    workers' log. A worker pool, which waits for space by itself, checks only the first.
    """
    store = settings.store_root
    # In a bucket this also proves the credentials, the endpoint and the bucket's existence.
    probe = store / f".laion-dagster-write-check-{os.getpid()}"
    try:
        store.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        return f"store_dir {store} is not writable ({error.strerror or error})"
    where = settings.disk_root
    named = f"store_dir {store}" if where == store else f"spool_dir {where} (of store {store})"
    try:
        state = disk_state(where, settings) if disk else None
    except OSError as error:
        return f"{named} is not writable ({error.strerror or error})"
    if state is not None and state.full:
        return (f"{named}: its disk is full for this run ({state.reason}); free some "
                "space, or change --disk-min-free-gb / --disk-stop-used-gb")
    return None


def gigabytes(value: float) -> str:
    """4980 → '4,980 GB', 2.34 → '2.3 GB', 0.0123 → '12 MB': never a bare '0.0 GB'."""
    if value >= 100:
        return f"{value:,.0f} GB"
    if value >= 1:
        return f"{value:,.1f} GB"
    return f"{value * 1024:,.0f} MB"


def full_reason(used_gb: float, free_gb: float, settings: Settings) -> str | None:
    """Why a disk counts as full, in the words the sensor's skip reason uses; None if not."""
    if settings.disk_stop_used_gb is not None and used_gb >= settings.disk_stop_used_gb:
        return f"{gigabytes(used_gb)} used ≥ {gigabytes(settings.disk_stop_used_gb)}"
    if free_gb <= settings.disk_min_free_gb:
        return f"{gigabytes(free_gb)} free ≤ {gigabytes(settings.disk_min_free_gb)}"
    return None


@dataclass
class HostReport:
    host: str
    disk_used_gb: float
    disk_free_gb: float
    paused: bool
    pause_reason: str | None
    processes: int
    alive_processes: int
    rate: float  # images (ok + failed) per second over the last heartbeat
    ok: int
    failed: int
    bytes: int
    seen_at: float
    fetched: int = 0  # rows fetched so far (any outcome): progress before a shard completes
    problems: list[str] = field(default_factory=list)  # why shards fail, if they do
    first_image_at: float | None = None  # when the host stored its first image (epoch s)
    waiting: int = 0  # rows waiting for their later try (retry_delay)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def is_stale(report: dict, settings: Settings, now: float | None = None) -> bool:
    now = time.time() if now is None else now
    return now - float(report.get("seen_at", 0)) > STALE_AFTER * settings.heartbeat_interval


def full_hosts(reports: dict[str, dict], settings: Settings) -> list[str]:
    """Sentences naming each live host whose disk is full: 'host a: 4,980 GB used ≥ 4,900 GB'."""
    lines = []
    for host, report in sorted(reports.items()):
        if is_stale(report, settings):
            continue
        reason = full_reason(float(report.get("disk_used_gb", 0)),
                             float(report.get("disk_free_gb", 1e18)), settings)
        if reason is None and report.get("paused"):
            reason = report.get("pause_reason") or "paused"
        if reason:
            lines.append(f"host {host}: {reason}")
    return lines
