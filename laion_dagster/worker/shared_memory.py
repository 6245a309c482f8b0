"""What a worker pool's supervisor shares with its processes: flags and counters.

Light on purpose (see entry.py): the supervisor imports it before starting any process.
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
    # The supervisor's pid, as it gave it: a process whose parent is another (the supervisor
    # died, even before this process ran a line) stops. Its own getppid() at start-up would
    # already name init then, and it would never notice.
    supervisor: int = 0

    @classmethod
    def create(cls, ctx: Any, stop: Any, paused: Any) -> Shared:
        """A process's share, made by its supervisor (this process) with the pool's flags."""
        return cls(stop=stop, paused=paused, counters=ctx.RawArray("q", 4),
                   out_of_space=ctx.RawValue("b", 0), problem=ctx.RawArray("c", PROBLEM_BYTES),
                   first_image=ctx.RawValue("d", 0.0), waiting=ctx.RawValue("q", 0),
                   supervisor=os.getpid())

    def set_problem(self, text: str) -> None:
        self.problem.value = text.encode("utf-8", "replace")[:PROBLEM_BYTES - 1]

    def read_problem(self) -> str:
        return self.problem.value.decode("utf-8", "replace")


PROBLEM_BYTES = 300
