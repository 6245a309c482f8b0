"""A worker process's health: its success rate, and the memory it hands back."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import time
from collections import Counter

from laion_dagster.core.queue.protocol import Outcome

log = logging.getLogger("laion_dagster.worker")

TRIM_EVERY = 2.0  # seconds between malloc_trim calls


class SuccessWatch:
    """Warns when the success rate over the last `window` rows drops under `floor`.

    On LAION a healthy run keeps most of its rows; a rate under half is nearly always this
    host's DNS resolver giving up under load (class `dns`), or its network, not the web.
    """

    def __init__(self, window: int = 1000, floor: float = 0.5, every: float = 60.0):
        self.window, self.floor, self.every = window, floor, every
        self.recent: list[Outcome] = []
        self.last_warning = -every

    def add(self, outcome: Outcome) -> str | None:
        self.recent.append(outcome)
        while len(self.recent) > 1 and sum(o.ok + o.failed for o in self.recent[1:]) >= \
                self.window:
            self.recent.pop(0)
        rows = sum(o.ok + o.failed for o in self.recent)
        if rows < self.window:
            return None
        rate = sum(o.ok for o in self.recent) / rows
        now = time.monotonic()
        if rate >= self.floor or now - self.last_warning < self.every:
            return None
        self.last_warning = now
        classes = Counter()
        for o in self.recent:
            classes.update(o.classes)
        top, count = classes.most_common(1)[0] if classes else ("unknown", 0)
        advice = (" Most failures are dns: this host's resolver is likely overwhelmed; use a "
                  "local caching resolver (e.g. unbound or systemd-resolved) with generous "
                  "limits." if top == "dns" else "")
        message = (f"success rate {rate:.0%} over the last {rows:,} rows is under "
                   f"{self.floor:.0%}; top failure {top} ({count:,} rows).{advice}")
        log.warning(message)
        return message


async def return_free_memory() -> None:
    """Give the heap's free pages back to the system every few seconds.

    Every image passes through a few transient buffers of its size between long-lived small
    objects; glibc's heap then keeps the freed pages and a worker's RSS creeps up steadily.
    malloc_trim hands them back for a moment of CPU."""
    trim = malloc_trim()
    if trim is None:
        return
    while True:
        await asyncio.sleep(TRIM_EVERY)
        trim(0)


def malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
