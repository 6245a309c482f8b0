"""What the benchmarks share to run and measure the tools: the processes they start (each
in its own session, all stopped at any exit) and a sampler of each process tree's memory and
CPU (bench/compare.py on loopback, bench/field.py in the simulated internet)."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import threading
import time
from collections.abc import Callable


class Owned:
    """Every process a benchmark starts, so that an exit of any kind stops them."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def popen(self, *args, **kwargs) -> subprocess.Popen:
        kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(*args, **kwargs)
        self.procs.append(proc)
        return proc

    def forget(self, proc: subprocess.Popen) -> None:
        """Drop a process that has exited; one still running stays for the cleanup."""
        if proc.poll() is None:
            return
        with contextlib.suppress(ValueError):
            self.procs.remove(proc)

    def stop(self, proc: subprocess.Popen, grace: float = 10.0) -> None:
        """SIGTERM to its session, SIGKILL after `grace` seconds."""
        self._signal(proc, signal.SIGTERM)
        self._reap(proc, time.monotonic() + grace)
        self.forget(proc)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self._signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in reversed(self.procs):
            self._reap(proc, deadline)
        self.procs.clear()

    @staticmethod
    def _signal(proc: subprocess.Popen, signum: int) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signum)

    @classmethod
    def _reap(cls, proc: subprocess.Popen, deadline: float) -> None:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            cls._signal(proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)


class Sampler:
    """Peak RSS per process and of the whole tree, each process's last CPU times and its
    command line (a process that has exited before the end still counts)."""

    def __init__(self, roots: Callable[[], list[int]], interval: float = 0.2):
        import psutil

        self.psutil = psutil
        self.roots = roots  # the tree's root pids, asked at every sample
        self.interval = interval
        self.peak: dict[int, int] = {}
        self.role: dict[int, str] = {}  # root, child or (multiprocessing's) tracker
        self.cmdline: dict[int, str] = {}
        self.cpu: dict[int, float] = {}
        self.peak_tree = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while True:
            self.take()
            if self._stop.wait(self.interval):
                return

    def take(self) -> None:
        ps = self.psutil
        procs = []
        for pid in self.roots():
            with contextlib.suppress(ps.Error):
                root = ps.Process(pid)
                procs.append((root, "root"))
                procs += [(child, "child") for child in root.children(recursive=True)]
        tree = 0
        for proc, role in procs:
            try:
                with proc.oneshot():
                    rss = proc.memory_info().rss
                    times = proc.cpu_times()
                    # Read again while the process is young: a child seen between its
                    # fork and its exec still shows its parent's command line.
                    if proc.pid not in self.role or time.time() - proc.create_time() < 3.0:
                        line = " ".join(proc.cmdline())
                        self.cmdline[proc.pid] = line
                        self.role[proc.pid] = ("tracker" if "resource_tracker" in line
                                               else role)
            except ps.Error:
                continue
            tree += rss
            self.peak[proc.pid] = max(self.peak.get(proc.pid, 0), rss)
            self.cpu[proc.pid] = times.user + times.system
        self.peak_tree = max(self.peak_tree, tree)

    def peak_of(self, role: str | None = None) -> int:
        return max((rss for pid, rss in self.peak.items()
                    if role is None or self.role.get(pid) == role), default=0)


def process_kind(cmdline: str) -> str:
    """A short name for a process that is not a worker, for the CPU breakdown."""
    for word, kind in (("resource_tracker", "resource tracker"), ("valkey", "redis"),
                       ("redis", "redis"), ("laion-dagster run", "run"),
                       ("cli worker", "pool supervisor"), ("compute_log", "dagster log tail"),
                       ("img2dataset", "img2dataset")):
        if word in cmdline:
            return kind
    return "other"


def children_cpu() -> float:
    """CPU seconds of every child process this one has waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 60.0) -> None:
    """Until a server process we started accepts connections on 127.0.0.1:`port`."""
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start (exit {proc.poll()})") from None
            time.sleep(0.05)
