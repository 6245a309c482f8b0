"""Resolving host names for the fetcher: asynchronous, cached, one look-up per name.

On LAION nearly every URL is on another server, so a download makes as many look-ups as
fetches. aiohttp's ThreadedResolver runs each in the event loop's default executor (a handful
of threads): a few slow or unanswered names then hold every other fetch behind them, and the
fetches in flight fall far below `concurrency` (on bench/field.py only a few look-ups were ever
pending, however many fetch slots were free). Here look-ups run on c-ares (aiodns), in the
event loop's own thread (LoopDNSResolver), and:

- answers are cached for their TTL (clamped to MIN_TTL..MAX_TTL);
- a name that does not exist, or has no address, fails at once for NEGATIVE_TTL afterwards;
  one that could not be resolved in time (timeout, SERVFAIL) for FAILED_TTL, or less when
  rows are tried again later (fetcher.down_seconds), so that their later try asks again;
- one look-up per name is in flight; other fetches of that name wait for its answer;
- each look-up has a deadline (`connect_timeout`). c-ares (since 1.32) shortens its retry
  timeouts to a few times the latency it has seen, so after many fast answers it gives up on a
  name that takes a second or two; within the deadline the name is asked again, as glibc's
  resolver keeps waiting (5 s, twice).
"""

from __future__ import annotations

import asyncio
import socket
import weakref
from typing import Any

import aiodns
import pycares
from aiohttp.abc import AbstractResolver, ResolveResult

MIN_TTL = 60.0
MAX_TTL = 3600.0
NEGATIVE_TTL = 600.0
FAILED_TTL = 60.0
# Names kept per process. LAION has tens of millions of host names and a run lasts weeks:
# without a bound the cache only grows, by an entry a name. Past it, expired answers go first,
# then the oldest half.
CACHE_ENTRIES = 200_000
# Per try of c-ares; its own adaptive timeouts may make them shorter.
TRY_TIMEOUT = 2.0
TRIES = 3

_NO_SUCH_NAME = {aiodns.error.ARES_ENOTFOUND, aiodns.error.ARES_ENONAME,
                 aiodns.error.ARES_ENODATA, aiodns.error.ARES_EBADNAME}


class LoopDNSResolver(aiodns.DNSResolver):
    """aiodns with c-ares's sockets watched by the event loop, not by pycares's own thread.

    With pycares 5, aiodns lets c-ares run a thread of its own, and every answer reaches the
    loop from it: the thread takes the GIL from the loop (which yields it only at its next
    switch interval) and wakes the loop through call_soon_threadsafe. On the web answers arrive
    one by one, so that thread switched in for nearly every row, and a worker without it
    spends less CPU per row (bench/README.md has the figures). aiodns's own fallback for a
    channel without that thread is used instead; its timer processes c-ares's timeouts each
    second.
    """

    def _make_channel(self, **kwargs: Any) -> tuple[bool, pycares.Channel]:
        owner = weakref.ref(self)  # the channel must not keep its resolver alive

        def sock_state(fd: int, readable: bool, writable: bool) -> None:
            resolver = owner()
            if resolver is not None:
                resolver._sock_state_cb(fd, readable, writable)

        return False, pycares.Channel(sock_state_cb=sock_state, timeout=self._timeout,
                                      **kwargs)


class LookupFailed(socket.gaierror):
    """A name that did not resolve: an OSError, so aiohttp reports it as a DNS error.
    `began`: when the look-up that found it began (the event loop's clock), for every fetch
    that shared it or met it in the cache: a row's later try is timed from it."""

    began: float | None = None

    @classmethod
    def at(cls, began: float, code: int, message: str) -> LookupFailed:
        failure = cls(code, message)
        failure.began = began
        return failure


class CachingResolver(AbstractResolver):
    """c-ares with a cache, negative caching, a deadline and one look-up per name."""

    def __init__(self, deadline: float, nameservers: list[str] | None = None,
                 failed_ttl: float = FAILED_TTL):
        self.deadline = deadline
        self.nameservers = nameservers
        # How long a look-up that failed in a way that may pass (no answer in time, SERVFAIL)
        # is not asked again: shorter than a row's later try waits, so that try asks again.
        self.failed_ttl = failed_ttl
        self._resolver: aiodns.DNSResolver | None = None
        self._cache: dict[tuple[str, int], tuple[float, Any]] = {}
        self._pending: dict[tuple[str, int], asyncio.Future] = {}
        self.lookups = 0  # look-ups sent to c-ares (not answered from the cache)

    def _channel(self) -> aiodns.DNSResolver:
        if self._resolver is None:  # created in the loop that uses it
            self._resolver = LoopDNSResolver(nameservers=self.nameservers or None,
                                             timeout=TRY_TIMEOUT, tries=TRIES)
        return self._resolver

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        # IPv4 first, IPv6 only for a name without an IPv4 address (see _look_up): asking for
        # both at once (AF_UNSPEC), c-ares reports "no data" when the A query times out
        # while the AAAA one comes back empty, which would fail a name that exists.
        key = (host.lower().rstrip("."), int(family))
        loop = asyncio.get_running_loop()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > loop.time():
            answer = cached[1]
        else:
            pending = self._pending.get(key)
            if pending is None:
                pending = loop.create_task(self._look_up(key))
                self._pending[key] = pending
                pending.add_done_callback(lambda _: self._pending.pop(key, None))
            # Shielded: a fetch that gives up (its deadline) must not cancel the look-up that
            # other fetches of the same name wait for.
            answer = await asyncio.shield(pending)
        if isinstance(answer, LookupFailed):
            raise LookupFailed.at(answer.began, answer.errno, answer.strerror)
        return [ResolveResult(hostname=host, host=address, port=port, family=fam, proto=0,
                              flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV)
                for address, fam in answer]

    async def _look_up(self, key: tuple[str, int]) -> list[tuple[str, int]] | LookupFailed:
        """The answer, or the failure, and into the cache with it. Never raises."""
        name, family = key
        loop = asyncio.get_running_loop()
        began = loop.time()
        end = began + self.deadline
        reason = "no answer"
        while (left := end - loop.time()) > 0.05:
            self.lookups += 1
            try:
                result = await asyncio.wait_for(self._ask(name, family), left)
            except TimeoutError:
                reason = f"no answer within {self.deadline:g}s"
                break
            except aiodns.error.DNSError as error:
                code = error.args[0] if error.args else None
                message = error.args[1] if len(error.args) > 1 else str(error)
                if code in _NO_SUCH_NAME:
                    failure = LookupFailed.at(began, socket.EAI_NONAME, f"{name}: {message}")
                    self._remember(key, loop.time() + NEGATIVE_TTL, failure)
                    return failure
                reason = message  # timeout, SERVFAIL, refused: ask again while time is left
                await asyncio.sleep(min(0.05, max(left - 0.05, 0)))
                continue
            addresses = [(node.addr[0].decode(), node.family) for node in result.nodes]
            if not addresses:
                failure = LookupFailed.at(began, socket.EAI_NODATA, f"{name}: no address")
                self._remember(key, loop.time() + NEGATIVE_TTL, failure)
                return failure
            ttl = min((node.ttl for node in result.nodes), default=MIN_TTL)
            self._remember(key, loop.time() + min(max(ttl, MIN_TTL), MAX_TTL), addresses)
            return addresses
        failure = LookupFailed.at(began, socket.EAI_AGAIN,
                                  f"{name}: {reason} (after {self.deadline:g}s)")
        self._remember(key, loop.time() + self.failed_ttl, failure)
        return failure

    def _remember(self, key: tuple[str, int], until: float, answer: Any) -> None:
        self._cache.pop(key, None)  # to the end: the newest entry is the last
        self._cache[key] = (until, answer)
        if len(self._cache) <= CACHE_ENTRIES:
            return
        now = asyncio.get_running_loop().time()
        kept = {k: v for k, v in self._cache.items() if v[0] > now}
        if len(kept) > CACHE_ENTRIES // 2:
            kept = dict(list(kept.items())[-(CACHE_ENTRIES // 2):])
        self._cache = kept

    async def _ask(self, name: str, family: int):
        """One getaddrinfo through c-ares; for an unspecified family, IPv4 first."""
        channel = self._channel()
        if family != socket.AF_UNSPEC:
            return await channel.getaddrinfo(name, family=family, type=socket.SOCK_STREAM)
        try:
            return await channel.getaddrinfo(name, family=socket.AF_INET,
                                             type=socket.SOCK_STREAM)
        except aiodns.error.DNSError as error:
            if not error.args or error.args[0] != aiodns.error.ARES_ENODATA:
                raise
        return await channel.getaddrinfo(name, family=socket.AF_INET6, type=socket.SOCK_STREAM)

    async def close(self) -> None:
        if self._resolver is not None:
            await self._resolver.close()
