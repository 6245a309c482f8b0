"""The order in which a worker process fetches the rows of its open shards.

One queue per server (a URL's host name). A server's rows go out at most `per_host_limit` at a
time; when one of its fetches ends, the server's next row goes out first, on the keep-alive
connection that fetch just left idle: no new TCP and TLS handshake, which is most of the CPU a
fetch costs on the web (bench/field.py). Other servers take turns (round robin) for the slots
left. So:

- the few servers that carry many LAION URLs are fetched back to back over a handful of
  connections, not a new connection per URL;
- a server at its limit never holds a slot another server could use: its rows wait here, in
  its queue, not in front of a connection;
- no server gets more than its limit, whatever order the rows came in;
- a row never waits long behind a slow one: a fetch still running after SLOW_FETCH seconds (a
  server that hangs or trickles, up to the whole `timeout`) no longer counts against its
  server's connection share, so the server's next row opens a connection of its own (within
  the limit). Without this, a server's rows queued behind one hanging row each waited out the
  whole `timeout`, one after the other, and held up the shard they belonged to
  (bench/README.md has the figures).

Pure bookkeeping, no I/O: the worker process's row work (rows.py) asks `take()` for the next
row while it has a free slot and reports each finished fetch with `finish()`.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import Callable, Iterable
from typing import Any

ROWS_PER_CONNECTION = 4
# Seconds after which a fetch stops counting against its server's connection share: well above
# what a fetch takes on the web (a new connection over a long round trip, a large image), well
# below the whole `timeout` a hanging server holds one.
SLOW_FETCH = 2.0


class Dispatcher:
    def __init__(self, concurrency: int, per_host_limit: int):
        self.free = concurrency  # fetch slots not in use
        self.limit = per_host_limit or concurrency  # 0: no limit of its own
        self.queues: dict[str, deque[Any]] = {}  # server -> its rows waiting
        self.ready: deque[str] = deque()  # servers with waiting rows and room, in turn order
        self._in_ready: set[str] = set()
        self.busy: Counter[str] = Counter()  # server -> its fetches under way
        self.slow: Counter[str] = Counter()  # server -> those of them past SLOW_FETCH
        self.due: Counter[str] = Counter()  # server -> rows due for their later try, at its head
        self.queued = 0
        self._listeners: list[asyncio.Event] = []

    def listen(self) -> asyncio.Event:
        """An event set at every change (a row added, a fetch finished)."""
        event = asyncio.Event()
        self._listeners.append(event)
        return event

    def notify(self) -> None:
        """Wake every listener (something the dispatcher does not see has changed)."""
        for event in self._listeners:
            event.set()

    def add(self, rows: Iterable[tuple[str, Any]], due: bool = False) -> None:
        """Queue (host, row) pairs, `host` naming the row's server; each row keeps its place in
        its server's queue. `due`: rows whose later try is due, which have waited their delay
        already: at the head of their server's queue, the server first in turn, and each may
        open a connection of its own (within per_host_limit) rather than wait for one to come
        free."""
        for host, row in rows:
            queue = self.queues.get(host)
            if queue is None:
                queue = self.queues[host] = deque()
            if due:
                queue.appendleft(row)
                self.due[host] += 1
            else:
                queue.append(row)
            self.queued += 1
            self._make_ready(host, due)
        self.notify()

    def _room(self, host: str, queue: deque | None) -> bool:
        """Whether the server `host` may have one more fetch under way: one connection serves
        its rows one after the other (reused, no new handshake); another opens only for every
        ROWS_PER_CONNECTION rows waiting, and another for each slow fetch, up to
        per_host_limit; a row due for its later try goes whenever the server is under it."""
        if not queue:
            return False
        if self.due[host]:  # the row at its head has waited its delay: within the limit
            return self.busy[host] < self.limit
        allowed = min(self.limit,
                      1 + (len(queue) - 1) // ROWS_PER_CONNECTION + self.slow[host])
        return self.busy[host] < allowed

    def _make_ready(self, host: str, first: bool = False) -> None:
        if host in self._in_ready or not self._room(host, self.queues.get(host)):
            return
        self._in_ready.add(host)
        if first:
            self.ready.appendleft(host)
        else:
            self.ready.append(host)

    def take(self) -> tuple[str, Any] | None:
        """The next (host, row) to fetch, taking a slot; None without a free slot or a row
        whose server has room."""
        if self.free <= 0:
            return None
        while self.ready:
            host = self.ready.popleft()
            self._in_ready.discard(host)
            queue = self.queues.get(host)
            if not self._room(host, queue):
                continue
            row = queue.popleft()
            self.queued -= 1
            if self.due[host] > 0:
                self.due[host] -= 1
                if not self.due[host]:
                    del self.due[host]
            if not queue:
                del self.queues[host]
            self.busy[host] += 1
            self.free -= 1
            self._make_ready(host)  # its next row, after the other servers' turns
            return host, row
        return None

    def slowed(self, host: str) -> None:
        """A fetch from `host` has run SLOW_FETCH seconds: the server may open another
        connection for its waiting rows. The caller says so with `finish(host, slow=True)`."""
        self.slow[host] += 1
        self._make_ready(host, first=True)
        self.notify()

    def finish(self, host: str, slow: bool = False) -> None:
        """A fetch from `host` ended: its slot is free, and the server's next row goes first."""
        self.free += 1
        self.busy[host] -= 1
        if self.busy[host] <= 0:
            del self.busy[host]
        if slow:
            self.slow[host] -= 1
            if self.slow[host] <= 0:
                del self.slow[host]
        self._make_ready(host, first=True)  # (a server already waiting its turn keeps it)
        self.notify()

    def drop(self, unwanted: Callable[[Any], bool]) -> int:
        """Remove the waiting rows for which `unwanted(row)` is true (an abandoned shard's);
        returns how many."""
        dropped = 0
        for host in list(self.queues):
            queue = self.queues[host]
            kept = deque(row for row in queue if not unwanted(row))
            dropped += len(queue) - len(kept)
            if kept:
                self.queues[host] = kept
            else:
                del self.queues[host]
            if self.due.get(host, 0) > len(kept):  # (some of the dropped may have been due)
                self.due[host] = len(kept)
        self.queued -= dropped
        if dropped:
            self.notify()
        return dropped

    @property
    def stalled(self) -> bool:
        """A slot is free but no waiting row can use it (none waits, or every one waits on
        its server's limit): time to take another shard."""
        return self.free > 0 and not self.ready
