"""Fetching URLs with aiohttp: one session per worker process, capped in size, time and hops.

Why aiohttp and one shared SSL context: see DESIGN.md (CPU per image decides how many machines
a LAION-5B download needs). Redirects are followed by hand so that every hop is checked
(scheme, address guard, hop count). The whole fetch of a URL, retries included, has one
deadline, so a server that trickles or streams forever cannot hold a slot.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import socket
import ssl
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import quote, urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from laion_dagster.core.settings import Settings

REDIRECTS = {301, 302, 303, 307, 308}
RETRIABLE = {"timeout", "connection", "http_5xx"}
CHUNK = 64 * 1024


class BlockedAddress(OSError):
    """The host resolves to an address we refuse to fetch from (private, loopback, ...)."""


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


def address_blocked(address: str, allowed: tuple[Network, ...] = ()) -> bool:
    """True for addresses we refuse to fetch from: not global, or multicast.

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
    """One error class per failure, as DESIGN.md lists them, plus the original message."""
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


def shared_ssl_context() -> ssl.SSLContext:
    """One context per process: creating one loads the CA bundle (~22 ms)."""
    return ssl.create_default_context()


class Fetcher:
    """An aiohttp session with the caps of the settings; use as an async context manager."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.session: aiohttp.ClientSession | None = None
        # Parsed once here; the same networks open both guards (resolver and IP literals).
        self.allowed = tuple(ipaddress.ip_network(n) for n in settings.allowed_networks)

    async def __aenter__(self) -> Fetcher:
        s = self.settings
        inner: AbstractResolver = (StaticResolver(s.host_map) if s.host_map
                                   else aiohttp.ThreadedResolver())
        connector = aiohttp.TCPConnector(
            limit=s.concurrency,
            limit_per_host=s.per_host_limit,
            ttl_dns_cache=300,
            use_dns_cache=True,
            ssl=shared_ssl_context(),
            resolver=GuardedResolver(inner, s.allow_private_addresses, self.allowed),
            # Not enable_cleanup_closed: it keeps every closed TLS transport referenced for a
            # while, which with a new connection per image grew a worker past 600 MB and cost
            # ~7% of its CPU (bench/compare.py, https without keep-alive).
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=s.connect_timeout,
                                          sock_read=s.timeout),
            headers={"User-Agent": s.user_agent},
            auto_decompress=True,
            max_line_size=16 * 1024,
            max_field_size=16 * 1024,
        )
        return self

    async def __aexit__(self, *exc) -> None:
        if self.session is not None:
            await self.session.close()

    async def fetch(self, url: str) -> FetchResult:
        """Fetch one URL within the total deadline; never raises for a bad URL or server."""
        s = self.settings
        attempt = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + s.timeout
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    body, content_type = await self._follow(url)
                return FetchResult(url=url, body=body, content_type=content_type)
            except Exception as error:  # every failure becomes a class, never a crash
                error_class, message = classify(error)
                status = getattr(error, "http_status", None)
                if isinstance(error, TimeoutError) and loop.time() >= deadline:
                    message = f"no complete response within {s.timeout:g}s"
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
                                   http_status=status)

    async def _follow(self, url: str) -> tuple[bytes, str | None]:
        assert self.session is not None
        s = self.settings
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
            async with self.session.get(target, allow_redirects=False) as response:
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
                chunks = []
                size = 0
                async for chunk in response.content.iter_chunked(CHUNK):
                    size += len(chunk)
                    if size > s.max_bytes:
                        raise FetchFailed("too_large", f"body larger than {s.max_bytes} bytes")
                    chunks.append(chunk)
                return b"".join(chunks), response.headers.get("Content-Type")
        raise FetchFailed("redirect", f"more than {s.max_redirects} redirects (max_redirects); "
                                      f"the last led to {url[:200]}")
