"""One command at a time per state folder: `run`, `demo` and `up` lock it for their lifetime.

Two of them on one folder share one embedded Redis and one Dagster instance without knowing
it: they initialise the instance's SQLite schema at once (Dagster's "alembic_version has more
than one head"), and a demo clears the folder under the other. An flock is released by the
kernel when its holder dies however it dies, so a crashed command never leaves the folder
locked; the file says who holds it, for the message the second command prints.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = "laion-dagster.lock"


class FolderBusy(RuntimeError):
    """Another command holds the folder; the message names it and what to do."""


class FolderUnwritable(RuntimeError):
    """The folder cannot be made or written (a read-only disk, no permission)."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another laion-dagster command"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
    return f"`{info.get('command', 'laion-dagster')}` (pid {info.get('pid', '?')}, since {since})"


@contextlib.contextmanager
def lock(folder: Path, command: str | None = None) -> Iterator[None]:
    """Lock `folder` for this process for the duration, or raise FolderBusy at once."""
    path = folder / LOCK_FILE
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
    except OSError as error:
        raise FolderUnwritable(
            f"{folder} is not writable ({error.strerror}); give this command a writable "
            "--data-dir") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderBusy(
                f"{folder} is in use by {_holder(path)}; wait for it to end, or give this "
                "command another --data-dir (or --store-dir)") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "since": time.time(),
                                 "command": command or " ".join(["laion-dagster",
                                                                 *sys.argv[1:2]])}))
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock


def is_held(folder: Path) -> bool:
    """Whether a command holds `folder` right now (a read-only command then leaves the
    embedded server to it)."""
    path = folder / LOCK_FILE
    if not path.exists():
        return False
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False
