"""Child processes that do not outlive the command that started them.

`run` and `up` start a worker pool, enqueue processes, `dagster dev` (with its webserver,
daemon and code servers) and the embedded Redis. Each child starts in a session of its own,
so a Ctrl-C at the terminal reaches only the command, which stops its children in order with
`stop_all`; and each hears SIGINT whatever the command inherited (a script's background job
starts with SIGINT ignored, and so would every child). A SIGKILL of the command (the OOM
killer) leaves no chance to stop them: each child asks the kernel for a SIGTERM when its
parent dies (Linux's PR_SET_PDEATHSIG), and the pool then finishes or hands back its shards,
the server flushes its append-only file.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Any

import psutil

PR_SET_PDEATHSIG = 1
# After its grace period, a child that has not stopped gets SIGTERM, then SIGKILL this much later.
TERM_GRACE = 10.0


def die_with_parent() -> None:
    """For `preexec_fn`: runs in the child between fork and exec. A no-op off Linux."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _prepare_child() -> None:
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # not inherited as ignored


def start(argv: list[str], **popen: Any) -> subprocess.Popen:
    """A child in a session (and process group) of its own, tied to this process's life."""
    return subprocess.Popen(argv, start_new_session=True, preexec_fn=_prepare_child, **popen)


class Spawned:
    """A multiprocessing child (the worker pool's processes) seen as a Popen: `stop_all`
    stops it like any other child."""

    def __init__(self, process: Any):
        self._process = process
        self.pid = process.pid

    def poll(self) -> int | None:
        return self._process.exitcode  # reaps it once it has exited

    def send_signal(self, sig: signal.Signals) -> None:
        os.kill(self.pid, sig)


@dataclass
class Child:
    process: subprocess.Popen | Spawned
    # What asks it to stop in order; None when it was asked already (a shared flag).
    first: signal.Signals | None = signal.SIGTERM
    grace: float = 30.0  # how long it may take to stop after that
    whole_group: bool = False  # the first signal to its whole group (as a terminal's Ctrl-C)
    # How long SIGTERM, after the grace period, has before SIGKILL: none for a child whose
    # first request was a SIGTERM already in all but name.
    term_grace: float = TERM_GRACE


def _send(child: Child, sig: signal.Signals | None, group: bool) -> None:
    if sig is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group and os.getpgid(child.process.pid) == child.process.pid:
            os.killpg(child.process.pid, sig)
        else:
            child.process.send_signal(sig)


def _wait(children: list[Child], until: dict[int, float]) -> None:
    while any(c.process.poll() is None and time.monotonic() < until[c.process.pid]
              for c in children):
        time.sleep(0.1)


def _tree(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def stop_all(children: list[Child]) -> None:
    """Stop every child and everything it started: its first signal, up to its grace period,
    then SIGTERM to its group, then SIGKILL; a process of theirs still alive after that (one
    that left its group) is killed too. Returns once nothing of theirs runs."""
    tree = [p for c in children if c.process.poll() is None for p in _tree(c.process.pid)]
    for steps in ((lambda c: c.first, lambda c: c.grace, None),
                  (lambda c: signal.SIGTERM, lambda c: c.term_grace, True),
                  (lambda c: signal.SIGKILL, lambda c: 5.0, True)):
        sig_of, grace_of, group = steps
        alive = [c for c in children if c.process.poll() is None]
        if not alive:
            break
        for child in alive:
            _send(child, sig_of(child), child.whole_group if group is None else group)
        now = time.monotonic()
        _wait(alive, {c.process.pid: now + grace_of(c) for c in alive})
    lingering = [p for p in tree if _running(p)]
    for process in lingering:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, left = psutil.wait_procs(lingering, timeout=TERM_GRACE)
    for process in left:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(left, timeout=5)


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
