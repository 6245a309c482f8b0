"""What a worker pool's supervisor shares with its processes, and their entry point.

Kept apart from process.py on purpose: the supervisor imports only this, so it starts its
processes within a few hundredths of a second of its own start, and each process pays for the
heavy imports (aiohttp, pyarrow, Pillow) in parallel with the others instead of after the
supervisor has paid for them too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Shared:
    """Lock-free shared memory on purpose: a multiprocessing Event's lock can be left held by a
    process killed at the wrong moment (or by a signal handler), which hangs everyone else.
    Each flag has one writer (the supervisor) and each counter one writer (its process).
    """

    stop: Any  # RawValue('b'): finish in-flight shards, claim nothing new
    paused: Any  # RawValue('b'): the disk is full; claim nothing new until it clears
    counters: Any  # RawArray('q', 3): ok, failed, bytes done by this process
    # RawValue('b'), set by the process on ENOSPC, cleared by the supervisor once space is
    # freed: the process claims nothing meanwhile.
    out_of_space: Any


def run_process(settings_json: str, index: int, shared: Shared) -> None:
    """Entry point of a spawned worker process."""
    from laion_dagster.worker import process

    process.main(settings_json, index, shared)
