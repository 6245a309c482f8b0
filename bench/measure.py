"""What the benchmarks share to run and measure the tools: the environment they run in, the
processes they start (each in its own session, all stopped at any exit) and a sampler of each
process tree's memory and CPU."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bench.report import log

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- the environment

def clean_environ() -> None:
    """Nothing a benchmark starts may phone home, go through a proxy or read the caller's
    laion-dagster settings; called by the main() of every benchmark that starts processes."""
    os.environ.update(NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled", NO_PROXY="*",
                      no_proxy="*")
    for name in [n for n in os.environ if n.startswith("LAION_") or n == "DAGSTER_HOME"
                 or n.lower() in ("http_proxy", "https_proxy", "all_proxy")]:
        del os.environ[name]


def client_env(bundle: Path) -> dict[str, str]:
    """The environment of a tool under test: it trusts `bundle` (see trust_bundle) and, as
    img2dataset imports albumentations, which asks the internet for a newer version of itself
    unless told not to, NO_ALBUMENTATIONS_UPDATE=1 whatever the caller did."""
    env = {k: v for k, v in os.environ.items() if k != "SSL_CERT_DIR"}
    env.update(SSL_CERT_FILE=str(bundle), REQUESTS_CA_BUNDLE=str(bundle),
               NO_ALBUMENTATIONS_UPDATE="1", PYTHONUNBUFFERED="1")
    return env


def trust_bundle(certificate: Path, bundle: Path) -> Path:
    """`bundle`: the machine's whole CA bundle with the benchmark's `certificate` appended. A
    file with the test certificate alone would make each ssl.create_default_context() nearly
    free and hide the cost that clients building one context per connection (urllib in
    img2dataset) pay on the real web."""
    paths = ssl.get_default_verify_paths()
    system = next((Path(p) for p in (paths.cafile, paths.openssl_cafile)
                   if p and Path(p).is_file()), None)
    if system is None:
        log("warning: no system CA bundle; clients trust the test certificate alone, which "
            "understates the cost of building an SSL context per connection")
    bundle.write_text((system.read_text() if system else "") + certificate.read_text())
    return bundle


def bench_command(module: str, *args: str) -> list[str]:
    """A command running bench/`module`.py (from REPO: Owned.popen's default)."""
    return [sys.executable, "-m", f"bench.{module}", *args]


# ---------------------------------------------------------------- processes we own

class Owned:
    """Every process a benchmark starts, and every embedded Redis it starts for our runs, so
    that an exit of any kind stops them."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        # Each embedded Redis started, by directory, with its pid in case the directory is
        # gone before the cleanup.
        self.redis_servers: dict[Path, int] = {}

    def popen(self, *args, **kwargs) -> subprocess.Popen:
        """subprocess.Popen in a session of its own, from REPO unless told otherwise (where
        `python -m bench.NAME` finds bench)."""
        kwargs.setdefault("start_new_session", True)
        kwargs.setdefault("cwd", REPO)
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

    def redis(self, directory: Path):
        """The embedded Redis for `directory`, started and remembered for the cleanup."""
        from laion_dagster.core.queue import embedded

        state = embedded.ensure_running(directory)
        self.redis_servers[directory] = state.pid
        return state

    def stop_redis(self, directory: Path) -> None:
        stop_redis(directory, self.redis_servers.pop(directory, None))

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self._signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in reversed(self.procs):
            self._reap(proc, deadline)
        self.procs.clear()
        for directory in list(self.redis_servers):
            self.stop_redis(directory)

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


def stop_redis(directory: Path, pid: int | None = None) -> None:
    """Stop the embedded Redis of `directory`; `pid` is the one we started, for when its state
    file is gone. Only a server we started and have not stopped yet is ever signalled."""
    from laion_dagster.core.queue import embedded

    state = embedded.read_state(directory)
    if state is not None:
        embedded.stop(directory)
        pid = state.pid
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)  # a no-op unless SIGTERM was not enough
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def free_ports(count: int, addresses: tuple[str, ...] | list[str] = ("127.0.0.1",)) -> list[int]:
    """`count` ports free on every one of `addresses`."""
    found: list[int] = []
    while len(found) < count:
        with socket.socket() as probe:
            probe.bind((addresses[0], 0))
            port = probe.getsockname()[1]
        if port in found:
            continue
        try:
            for address in addresses:
                with socket.socket() as sock:
                    sock.bind((address, port))
        except OSError:
            continue
        found.append(port)
    return found


def wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 60.0,
                  host: str = "127.0.0.1") -> None:
    """Until a server process we started accepts connections on `host`:`port`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start on {host}:{port} "
                                   f"(exit {proc.poll()})") from None
            time.sleep(0.05)


# ---------------------------------------------------------------- measuring them

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
        if self._thread.is_alive():
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


def cpu_of(pids: list[int], children: bool = False) -> float:
    """User+system CPU seconds of the processes `pids` (with their direct children), now."""
    import psutil

    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            for one in [proc, *(proc.children() if children else [])]:
                with contextlib.suppress(psutil.Error):
                    times = one.cpu_times()
                    total += times.user + times.system
    return total


def stop_on_signals() -> None:
    """SIGTERM, and SIGINT even when a shell started us in the background with it ignored,
    raise KeyboardInterrupt, so that a benchmark's cleanup runs."""
    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
