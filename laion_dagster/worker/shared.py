"""What a worker pool's supervisor shares with its processes, and their entry point.

Kept apart from process.py on purpose: the supervisor imports only this, so it starts its
processes within a few hundredths of a second of its own start, and each process pays for the
heavy imports (aiohttp, pyarrow, Pillow) in parallel with the others instead of after the
supervisor has paid for them too.
"""

from __future__ import annotations

import os
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
    # RawArray('q', 4): ok, failed, bytes of this process's completed shards, and rows
    # fetched so far (any outcome; what shows progress while a shard is still open)
    counters: Any
    # RawValue('b'), set by the process on ENOSPC, cleared by the supervisor once space is
    # freed: the process claims nothing meanwhile.
    out_of_space: Any
    # RawArray('c', PROBLEM_BYTES): why this process's last shard failed, empty once a shard
    # completes again; the supervisor puts it in the host report, so `run` and `status` can
    # say why nothing moves instead of leaving it in a log file.
    problem: Any
    # RawValue('d'): when this process stored its first image (epoch seconds, 0 before):
    # `run` reports the time from Enter to the first image.
    first_image: Any
    # RawValue('q'): rows of this process waiting for their later try (retry_delay): what a
    # run whose bar stands still near its end is waiting for.
    waiting: Any

    def set_problem(self, text: str) -> None:
        self.problem.value = text.encode("utf-8", "replace")[:PROBLEM_BYTES - 1]

    def read_problem(self) -> str:
        return self.problem.value.decode("utf-8", "replace")


PROBLEM_BYTES = 300


def run_process(settings_json: str, index: int, shared: Shared) -> None:
    """Entry point of a spawned worker process."""
    # Arrow's buffers (parts read, shard tables and parquet written) from glibc's malloc, whose
    # free pages the process hands back every few seconds (process._return_free_memory),
    # rather than from jemalloc, which keeps freed pages for a while: peak RSS per worker
    # 250 -> 234-240 MB on bench/field.py (265 -> 245-249 MB in its lab), CPU unchanged. Set
    # before pyarrow picks its default pool (on first use), and only here, in the process.
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    from laion_dagster.worker import process

    process.main(settings_json, index, shared)
