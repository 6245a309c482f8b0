"""Fetching URLs with aiohttp: one session per worker process, capped in size, time and hops.

Why aiohttp and one shared SSL context: CPU per image decides how many machines a LAION-5B
download needs, and on the web nearly every image is a new TLS connection; one event loop per
process with one SSL context for every connection (making one loads the whole CA bundle) keeps
that cost low (docs/how-it-works.md, "Why it is built this way"). Redirects are followed by
hand so that every hop is checked (scheme, address guard, hop count). The whole fetch of a URL,
retries included, has one deadline, so a server that trickles or streams forever cannot hold a
slot; a body whose pace says it cannot arrive by then is given up early (hopeless_pace).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import random
import socket
import ssl
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from laion_dagster.core.fetch.resolve import CachingResolver
from laion_dagster.core.settings import Settings

REDIRECTS = {301, 302, 303, 307, 308}
# Asked again within the fetch, after a pause. Not a timeout: a server silent for
# read_timeout, a server that left the connect unanswered for connect_timeout (TCP re-sent its
# SYN several times by then) or a body too slow for the deadline would hold the slot as long
# once more (the row's later try, or `errors retry`, asks them later); on bench/field.py a
# second connect to a blackholed server made its rows the last ones of the run.
RETRIABLE = {"connection", "http_5xx"}
CHUNK = 64 * 1024
# A body is judged on its pace only after PACE_AFTER seconds of it (TCP's slow start is over by
# then even at 400 ms round trips), and given up only if the rest would take PACE_MARGIN times
# the time left: a row whose pace merely holds, or doubles, is never lost to the judgement.
PACE_AFTER = 3.0
PACE_MARGIN = 2.0


class BlockedAddress(OSError):
    """The server's name resolves to an address we refuse to fetch from (private, loopback,
    ...)."""


class UnknownHost(OSError):
    """A host name that the configured resolver does not know."""


@dataclass
class FetchResult:
    url: str
    body: bytes | None = None
    error_class: str | None = None
    error_message: str | None = None
    http_status: int | None = None
    content_type: str | None = None
    # False when no request was made: the URL's endpoint had just failed to connect for
    # other URLs (DownEndpoints). Such a row says nothing about its own server yet.
    tried: bool = True
    # When the work that decided a failure began, where the fetch did not do it all itself
    # (the event loop's clock): the try that found its endpoint down, or a look-up of its
    # name it shared or found in the cache. A row's later try is timed from it.
    since: float | None = None

    @property
    def ok(self) -> bool:
        return self.error_class is None


class FetchFailed(Exception):
    def __init__(self, error_class: str, message: str, http_status: int | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.error_class = error_class
        self.http_status = http_status
        self.retry_after = retry_after


class NotTried(FetchFailed):
    """Not asked: the endpoint failed to connect for other URLs moments ago."""

    def __init__(self, error_class: str, message: str, since: float):
        super().__init__(error_class, message)
        self.since = since


def hopeless_pace(received: int, length: int, elapsed: float, left: float) -> str | None:
    """Why a body arriving at this pace cannot be in by the deadline, or None while it can.

    Bodies that trickle (a byte every few seconds, forever) otherwise hold a fetch slot for
    the whole `timeout` and, at the end of a job, the job itself: on bench/field.py they were
    what a run waited for last. Judged on the average pace since the body's first bytes
    (`elapsed`), only after PACE_AFTER seconds, with a margin of PACE_MARGIN, so a large image
    from a slow but steady server keeps its whole deadline; silence, before the body or within
    it, is read_timeout's to judge.
    """
    if elapsed < PACE_AFTER or not received or received >= length:
        return None
    rest = (length - received) * elapsed / received
    if rest <= PACE_MARGIN * left:
        return None
    return (f"too slow: {received:,} of {length:,} bytes in {elapsed:.0f}s; at that pace the "
            f"rest needs {rest:,.0f}s, the deadline is {max(left, 0):.0f}s away")


# X-Robots-Tag directives that take a value after a colon; anything else before a colon is a
# user-agent token ("googlebot: noindex").
_VALUED_DIRECTIVES = {"unavailable_after", "max-snippet", "max-image-preview",
                      "max-video-preview"}


def opt_out_directive(values: list[str], token: str, directives: list[str]) -> str | None:
    """The first opt-out directive in X-Robots-Tag values that applies to us, or None.

    Directives apply to every robot unless a `token:` prefix names one; a prefix applies to the
    directives after it in the same header value, as search engines read it.
    """
    wanted = {d.lower() for d in directives}
    token = token.lower()
    for value in values:
        addressee: str | None = None
        for item in value.split(","):
            item = item.strip().lower()
            if ":" in item:
                head, rest = (part.strip() for part in item.split(":", 1))
                if head not in _VALUED_DIRECTIVES and " " not in head:
                    addressee, item = head, rest
            if item in wanted and addressee in (None, token):
                return item
    return None


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds: a number, or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# Left as written in a URL's path and query: RFC 3986's reserved and unreserved characters and
# "%", so existing escapes (even lower-case ones) and delimiters reach the server unchanged.
_AS_WRITTEN = "!$&'()*+,;=:@/?-._~%"
# Around a URL, never part of it: whitespace and control characters from sloppy exports.
_AROUND = "".join(map(chr, range(33))) + "\x7f"


def request_url(url: str) -> URL:
    """The URL to request, as its author wrote it.

    yarl's own parsing normalises escapes (`%7E` becomes `~`, `%3B` becomes `;`, a space in
    the query becomes `+`), which changes what signed URLs and picky servers answer. Here only
    what cannot travel as is gets escaped (non-ASCII, spaces, `"<>\\^`{|}`), the host becomes
    its IDNA form, and the fragment stays home.
    """
    split = urlsplit(url.strip(_AROUND))
    origin = URL(f"{split.scheme}://{split.netloc}")  # validates and IDNA-encodes the host
    return URL.build(scheme=origin.scheme, authority=origin.raw_authority,
                     path=quote(split.path, safe=_AS_WRITTEN) or "/",
                     query_string=quote(split.query, safe=_AS_WRITTEN), encoded=True)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.lru_cache(maxsize=65_536)
def address_blocked(address: str, allowed: tuple[Network, ...] = ()) -> bool:
    """True for addresses we refuse to fetch from: not global, or multicast.

    Cached: every fetch asks it of the address it connects to, and parsing the address and
    testing it against the special ranges showed in a profile of a worker on bench/field.py.

    `allowed` (Settings.allowed_networks) lets named non-public networks through, so tests can
    serve from 127.0.0.1 while the guard still refuses 10.x or 169.254.169.254. Mapped IPv6
    (::ffff:10.0.0.1) is judged as the IPv4 address it reaches.
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    if any(ip in network for network in allowed):
        return False
    return not ip.is_global or ip.is_multicast


def _idna(name: str) -> str:
    try:
        return name.lower().rstrip(".").encode("idna").decode("ascii")
    except UnicodeError:
        return name.lower().rstrip(".")


class StaticResolver(AbstractResolver):
    """Resolves only the names it is given: what tests and the demo use, so no DNS is asked."""

    def __init__(self, names: dict[str, str]):
        # Asked for the IDNA form of a name (xn--...), so keys are stored in it too.
        self.names = {_idna(k): v for k, v in names.items()}

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        address = self.names.get(host.lower().rstrip("."))
        if address is None:
            raise UnknownHost(socket.EAI_NONAME, f"unknown host {host!r} (not in host_map)")
        fam = socket.AF_INET6 if ":" in address else socket.AF_INET
        return [ResolveResult(hostname=host, host=address, port=port, family=fam, proto=0,
                              flags=socket.AI_NUMERICHOST)]

    async def close(self) -> None:
        return None


class GuardedResolver(AbstractResolver):
    """Wraps a resolver and refuses names that resolve to non-public addresses.

    Checking the resolved address (not the name) is what stops DNS names that point at
    169.254.169.254 or 10.x from reaching a cloud metadata service or a private network.
    """

    def __init__(self, inner: AbstractResolver, allow_private: bool,
                 allowed: tuple[Network, ...] = ()):
        self.inner = inner
        self.allow_private = allow_private
        self.allowed = allowed

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self.inner.resolve(host, port, family)
        if not self.allow_private:
            results = [r for r in results if not address_blocked(r["host"], self.allowed)]
            if not results:
                raise BlockedAddress(0, f"{host} resolves only to non-public addresses")
        return results

    async def close(self) -> None:
        await self.inner.close()


def classify(error: BaseException) -> tuple[str, str]:
    """One error class per failure, as docs/outputs.md lists them ("Error classes"), plus the
    original message."""
    message = f"{type(error).__name__}: {error}".strip()
    if isinstance(error, FetchFailed):
        return error.error_class, str(error)
    if isinstance(error, TimeoutError | asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return "timeout", message or "timed out"
    if isinstance(error, aiohttp.ClientConnectorError):
        cause = error.os_error
        if isinstance(cause, BlockedAddress):
            return "blocked_address", str(cause)
        if isinstance(error, aiohttp.ClientConnectorDNSError) or isinstance(
                cause, socket.gaierror | UnknownHost):
            return "dns", message
        if isinstance(error, aiohttp.ClientSSLError):
            return "tls", message
        return "connection", message
    if isinstance(error, ssl.SSLError | aiohttp.ClientSSLError):
        return "tls", message
    if isinstance(error, aiohttp.InvalidURL | ValueError):
        return "invalid_url", message
    if isinstance(error, aiohttp.ClientError | OSError):
        return "connection", message
    return "connection", message


def host_of(url: str) -> str:
    """The host name a URL is fetched from, by which per_host_limit and the dispatcher count
    its server (lower case, no trailing dot); "" for a URL without one, which fails as
    invalid_url anyway."""
    try:
        return (urlsplit(url.strip(_AROUND)).hostname or "").rstrip(".")
    except ValueError:
        return ""


def _could_not_connect(error: BaseException) -> bool:
    """A failure to reach the server at all (no TCP connection), not a bad answer or a slow
    one after connecting: what says the server is down."""
    if isinstance(error, aiohttp.ConnectionTimeoutError):
        return True
    if isinstance(error, aiohttp.ClientConnectorError) and not isinstance(
            error, aiohttp.ClientConnectorDNSError | aiohttp.ClientSSLError):
        return not isinstance(error.os_error, BlockedAddress)
    return False


Endpoint = tuple[str, str, int]  # scheme, host, port: what one connect failure speaks for


def endpoint_of(url: URL) -> Endpoint:
    return url.scheme, (url.host or "").lower().rstrip("."), url.port or 0


def endpoint_text(endpoint: Endpoint) -> str:
    scheme, host, port = endpoint
    return f"{scheme}://{host}:{port}"


@dataclass
class _Down:
    failures: int  # in a row
    at: float  # when the last one was (or the last probe began)
    began: float  # when the last failed try began
    error_class: str
    message: str
    probe: asyncio.Future | None = None  # settled when the probe under way tells


class DownEndpoints:
    """Endpoints (scheme, host and port) that just failed to connect, remembered for a while.

    A dead server (its packets dropped, connects timing out) would otherwise cost every one of
    its URLs a whole `connect_timeout`, holding a fetch slot each. After DOWN_AFTER failures in
    a row, the endpoint's other URLs are turned away at once (NotTried) for `seconds`; then one
    URL probes it while the others of that moment wait for what it finds, and a success (any
    answer, even an error, once connected) clears it. A server that failed once by chance costs
    nothing; one that comes back is not held against the URLs that asked during its probe.

    The memory speaks only for what failed: a host name's port 80 refusing says nothing of its
    port 443, and neither says anything of another name on the same address. (A name's
    connect fails only once every address it resolves to has failed: aiohttp tries them all.)
    Rows it turns away were never asked; the worker tries them again later (retry_rounds).
    """

    DOWN_AFTER = 2
    SECONDS = 60.0
    KEPT = 10_000  # endpoints remembered at most; past it, those whose time is up are dropped

    def __init__(self, seconds: float = SECONDS) -> None:
        self.seconds = seconds
        self._entries: dict[Endpoint, _Down] = {}

    async def admit(self, endpoint: Endpoint) -> bool:
        """Whether a URL of `endpoint` may be asked: False to ask it as usual, True to ask it
        as the endpoint's probe (the caller then reports what it found); raises NotTried for
        a URL turned away."""
        loop = asyncio.get_running_loop()
        while True:
            entry = self._entries.get(endpoint)
            if entry is None:
                return False
            now = loop.time()
            if entry.failures < self.DOWN_AFTER:
                if now - entry.at > self.seconds:
                    del self._entries[endpoint]
                return False
            if entry.probe is not None:
                await asyncio.shield(entry.probe)  # a verdict is coming: wait for it
                continue
            if now - entry.at >= self.seconds:
                entry.at = now
                entry.probe = loop.create_future()
                return True
            raise NotTried(entry.error_class,
                           f"not tried: {endpoint_text(endpoint)} failed to connect "
                           f"{entry.failures} times in a row, the last {now - entry.at:.0f}s ago "
                           f"({entry.message})", entry.began)

    def failed(self, endpoint: Endpoint, error_class: str, message: str, began: float,
               now: float) -> None:
        entry = self._entries.get(endpoint)
        if entry is None:
            if len(self._entries) >= self.KEPT:
                self._forget_old(now)
            self._entries[endpoint] = _Down(1, now, began, error_class, message)
            return
        entry.failures += 1
        entry.at, entry.began, entry.error_class, entry.message = now, began, error_class, message
        _settle(entry)

    def succeeded(self, endpoint: Endpoint) -> None:
        entry = self._entries.pop(endpoint, None)
        if entry is not None:
            _settle(entry)

    def probe_ended(self, endpoint: Endpoint) -> None:
        """A probe that ended without a verdict (cancelled): the next URL probes instead."""
        entry = self._entries.get(endpoint)
        if entry is not None and entry.probe is not None:
            entry.at -= self.seconds
            _settle(entry)

    def _forget_old(self, now: float) -> None:
        for endpoint, entry in list(self._entries.items()):
            if now - entry.at >= self.seconds and entry.probe is None:
                del self._entries[endpoint]


def _settle(entry: _Down) -> None:
    if entry.probe is not None:
        if not entry.probe.done():
            entry.probe.set_result(None)
        entry.probe = None


def down_seconds(settings: Settings) -> float:
    """How long an endpoint that failed to connect (or a name whose look-up timed out) is left
    alone. With later tries on, a quarter of their delay: a row's later try comes `retry_delay`
    after its first began, which may have taken up to `connect_timeout` (half the delay by
    default) to fail, and must find the memory of that failure gone, so that it asks (or
    probes) rather than being turned away by what it met itself."""
    if settings.retry_rounds and settings.retry_delay > 0:
        return min(DownEndpoints.SECONDS, settings.retry_delay / 4)
    return DownEndpoints.SECONDS


class BoundedPoolConnector(aiohttp.TCPConnector):
    """A TCPConnector that keeps at most `max_idle` idle connections, closing the least
    recently used first.

    aiohttp bounds the connections in use (`limit`), not the idle ones it keeps for
    `keepalive_timeout`; with LAION's thousands of servers, that was thousands of TLS
    connections, each holding its buffers, kept for servers never asked again. The few servers
    that serve many URLs use theirs all the time, so they stay. Two private methods of aiohttp
    are extended (tests/core/fetch/test_fetcher.py checks the bound still holds).
    """

    def __init__(self, *args: Any, max_idle: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._max_idle = max_idle
        self._idle: OrderedDict[Any, Any] = OrderedDict()  # protocol -> its key, oldest first

    def _release(self, key: Any, protocol: Any, *args: Any, **kwargs: Any) -> None:
        super()._release(key, protocol, *args, **kwargs)
        pooled = self._conns.get(key)
        if not pooled or pooled[-1][0] is not protocol:
            return  # closed, not kept
        self._idle[protocol] = key
        while len(self._idle) > self._max_idle:
            oldest, oldest_key = self._idle.popitem(last=False)
            queue = self._conns.get(oldest_key)
            for entry in queue or ():
                if entry[0] is oldest:
                    queue.remove(entry)
                    if not queue:
                        del self._conns[oldest_key]
                    # abort(), not close(): an idle connection needs no TLS close_notify,
                    # and close() keeps the transport for the peer's reply (closing evicted
                    # connections that way cost a worker CPU for nothing).
                    oldest.abort()
                    break

    async def _get(self, key: Any, *args: Any, **kwargs: Any) -> Any:
        connection = await super()._get(key, *args, **kwargs)
        if connection is not None:
            self._idle.pop(connection.protocol, None)
        return connection


def shared_ssl_context(cafile: str | None = None) -> ssl.SSLContext:
    """One context per process: creating one loads the whole CA bundle, which is costly.
    `cafile`: the CAs to trust instead of the system's (Settings.ca_bundle)."""
    return ssl.create_default_context(cafile=cafile)


class Fetcher:
    """An aiohttp session with the caps of the settings; use as an async context manager."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.session: aiohttp.ClientSession | None = None
        self._busy: Counter[str] = Counter()  # server (host name) -> its fetches under way
        self._gates: dict[str, asyncio.Semaphore] = {}  # server -> its per_host_limit
        self.down = DownEndpoints(down_seconds(settings))
        # Parsed once here; the same networks open both guards (resolver and IP literals).
        self.allowed = tuple(ipaddress.ip_network(n) for n in settings.allowed_networks)

    async def __aenter__(self) -> Fetcher:
        s = self.settings
        inner: AbstractResolver = (
            StaticResolver(s.host_map) if s.host_map
            else CachingResolver(s.connect_timeout, s.dns_servers, down_seconds(s)))
        connector = BoundedPoolConnector(
            max_idle=s.idle_connections,
            limit=s.concurrency,
            limit_per_host=0,  # per_host_limit is applied by _gate (and by the dispatcher)
            # Real DNS: one cache, CachingResolver's (TTLs, negative answers, bounded);
            # aiohttp's would keep every name of a weeks-long run a second time, unbounded.
            use_dns_cache=bool(s.host_map),
            ttl_dns_cache=300,
            ssl=shared_ssl_context(str(s.ca_bundle) if s.ca_bundle else None),
            resolver=GuardedResolver(inner, s.allow_private_addresses, self.allowed),
            # Not enable_cleanup_closed: it keeps every closed TLS transport referenced for a
            # while, which with a new connection per image made a worker's memory grow far
            # past its usual size and cost CPU (bench/compare.py, https without keep-alive).
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            # The whole fetch has one deadline (fetch()). The read timeout costs a timer
            # reschedule per chunk received (a small share of a worker's CPU), and frees the
            # slot of a server that never answers after read_timeout instead of at the
            # deadline: on bench/field.py such servers held a large share of the fetches in
            # flight.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=s.connect_timeout,
                                          sock_read=s.read_timeout),
            headers={"User-Agent": s.user_agent},
            auto_decompress=True,
            max_line_size=16 * 1024,
            max_field_size=16 * 1024,
        )
        return self

    async def __aexit__(self, *exc) -> None:
        if self.session is not None:
            await self.session.close()

    async def fetch(self, url: str, host: str | None = None) -> FetchResult:
        """Fetch one URL within the total deadline; never raises for a bad URL or server.
        `host`: host_of(url), the server's host name, when the caller has it already (the
        worker's dispatcher)."""
        host = host_of(url) if host is None else host
        self._busy[host] += 1
        try:
            gate = self._gate(host)
            if gate is None:
                return await self._fetch(url)
            async with gate:
                return await self._fetch(url)
        finally:
            self._busy[host] -= 1
            if not self._busy[host]:
                del self._busy[host]
                self._gates.pop(host, None)

    def _gate(self, host: str) -> asyncio.Semaphore | None:
        """The server's share of this process: per_host_limit fetches at once.

        Kept here rather than in aiohttp's connector (limit_per_host): with thousands of
        servers, its waiter bookkeeping took a large share of a worker's CPU (bench/field.py);
        a semaphore per busy server costs next to nothing, and goes when the server has no
        fetch under way.
        """
        limit = self.settings.per_host_limit
        if not limit:
            return None
        gate = self._gates.get(host)
        if gate is None:
            gate = self._gates[host] = asyncio.Semaphore(limit)
        return gate

    async def _fetch(self, url: str) -> FetchResult:
        s = self.settings
        attempt = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + s.timeout
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    body, content_type = await self._follow(url, deadline)
                return FetchResult(url=url, body=body, content_type=content_type)
            except Exception as error:  # every failure becomes a class, never a crash
                error_class, message = classify(error)
                if isinstance(error, NotTried):
                    return FetchResult(url=url, error_class=error_class, error_message=message,
                                       tried=False, since=error.since)
                status = getattr(error, "http_status", None)
                if isinstance(error, TimeoutError) and loop.time() >= deadline:
                    message = f"no complete response within {s.timeout:g}s"
                elif isinstance(error, aiohttp.SocketTimeoutError):
                    message = f"the server sent nothing for {s.read_timeout:g}s (read_timeout)"
                retriable = error_class in RETRIABLE or status == 429
                pause = min(8.0, 0.5 * 2 ** attempt) * (0.5 + random.random())
                asked = getattr(error, "retry_after", None)
                if asked is not None:
                    if asked > s.max_retry_after:
                        retriable = False  # the server asks for longer than we will wait
                    pause = max(pause, asked)
                if retriable and attempt < s.retries and loop.time() + pause < deadline:
                    attempt += 1
                    await asyncio.sleep(pause)
                    continue
                return FetchResult(url=url, error_class=error_class, error_message=message,
                                   http_status=status,
                                   since=getattr(getattr(error, "os_error", None), "began",
                                                 None))

    async def _follow(self, url: str, deadline: float) -> tuple[bytes, str | None]:
        assert self.session is not None
        s = self.settings
        loop = asyncio.get_running_loop()
        for hop in range(s.max_redirects + 1):
            # A bad URL after a redirect is the server's doing, not the row's: class redirect.
            bad_url, led_to = ("redirect", "a redirect led to ") if hop else ("invalid_url", "")
            try:
                target = request_url(url)
            except ValueError as error:
                raise FetchFailed(bad_url, f"{led_to}not a valid URL ({error}): {url[:200]}") \
                    from None
            if target.scheme not in ("http", "https") or not target.host:
                raise FetchFailed(bad_url, f"{led_to}not an http(s) URL: {url[:200]}")
            if not s.allow_private_addresses:
                try:
                    if address_blocked(target.host, self.allowed):
                        raise FetchFailed("blocked_address", f"{target.host} is not public")
                except ValueError:
                    pass  # a name, not an address literal: the resolver guards it
            endpoint = endpoint_of(target)
            probing = await self.down.admit(endpoint)
            began = loop.time()
            try:
                request = await self.session.get(target, allow_redirects=False)
            except Exception as error:
                if _could_not_connect(error):
                    self.down.failed(endpoint, *classify(error), began, loop.time())
                elif probing:  # connected, or not even that far: no verdict on the endpoint
                    self.down.succeeded(endpoint)
                raise
            except BaseException:  # cancelled (the deadline, an abandoned shard)
                if probing:
                    self.down.probe_ended(endpoint)
                raise
            self.down.succeeded(endpoint)
            async with request as response:
                if response.status in REDIRECTS:
                    location = response.headers.get("Location")
                    if not location:
                        raise FetchFailed("redirect", f"HTTP {response.status} redirect "
                                          "without a Location header", response.status)
                    url = urljoin(str(response.url), location)
                    continue
                if response.status >= 400:
                    family = "http_4xx" if response.status < 500 else "http_5xx"
                    raise FetchFailed(family, f"HTTP {response.status} {response.reason}",
                                      response.status,
                                      retry_after_seconds(response.headers.get("Retry-After")))
                directive = opt_out_directive(response.headers.getall("X-Robots-Tag", []),
                                              s.user_agent_token, s.opt_out_directives)
                if directive is not None:
                    raise FetchFailed("opted_out", f"X-Robots-Tag: {directive}",
                                      response.status)
                length = response.content_length
                if length is not None and length > s.max_bytes:
                    raise FetchFailed("too_large", f"Content-Length {length} > {s.max_bytes}")
                encoded = response.headers.get("Content-Encoding", "identity").lower()
                if length is not None and encoded in ("identity", ""):
                    body = await _whole_body(response.content, length, deadline)
                else:  # no length, or decompressed here: counted as it grows
                    body = await _body_in_chunks(response.content, length, s.max_bytes,
                                                 deadline)
                return body, response.headers.get("Content-Type")
        raise FetchFailed("redirect", f"more than {s.max_redirects} redirects (max_redirects); "
                                      f"the last led to {url[:200]}")


async def _whole_body(content: aiohttp.StreamReader, length: int, deadline: float) -> bytes:
    """A body of known length (at most max_bytes), taken once it is all in.

    One wake-up of the fetch when the body is complete, not one per read: on the web a body
    arrives in several reads (paced by the server, a TLS record at a time), and waking the
    fetch for each was a good part of why a row cost more CPU there than on loopback
    (bench/field.py). The pace is judged on a timer instead, PACE_AFTER seconds in and every
    second after.
    """
    if content.is_eof():  # all in already (an empty body has no buffer to raise)
        return content.read_nowait()
    loop = asyncio.get_running_loop()
    content.set_read_chunk_size(length)  # never paused for a full buffer before the end
    started = loop.time()
    check = started + PACE_AFTER
    while not content.is_eof():
        try:
            async with asyncio.timeout_at(check):
                await content.wait_eof()
        except TimeoutError:
            now = loop.time()
            if not content.total_bytes:
                started = now  # the pace counts from the first bytes (to within a second)
            why = hopeless_pace(content.total_bytes, length, now - started, deadline - now)
            if why is not None:
                raise FetchFailed("timeout", why) from None
            check = now + 1.0
    return content.read_nowait()


async def _body_in_chunks(content: aiohttp.StreamReader, length: int | None, max_bytes: int,
                          deadline: float) -> bytes:
    """A body of unknown length, or one decompressed as it arrives, counted read by read so
    that no more than max_bytes is ever held. With a length (compressed, so the decompressed
    bytes overstate the pace), the pace can only be judged leniently."""
    loop = asyncio.get_running_loop()
    chunks = []
    size = 0
    started: float | None = None
    async for chunk in content.iter_chunked(CHUNK):
        size += len(chunk)
        if size > max_bytes:
            raise FetchFailed("too_large", f"body larger than {max_bytes} bytes")
        chunks.append(chunk)
        if length is not None:
            now = loop.time()
            started = now if started is None else started  # the pace counts from here
            why = hopeless_pace(size, length, now - started, deadline - now)
            if why is not None:
                raise FetchFailed("timeout", why)
    return b"".join(chunks)
