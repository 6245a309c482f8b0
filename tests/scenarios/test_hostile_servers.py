"""Servers that misbehave on purpose: each fetch ends with the right error class, in time.

One raw asyncio server (in its own thread, so its stalls never pause the client's loop) plays
every part by request path; the protocol-level failures need raw sockets, not a web framework.
The address guard stays on here (allow_private_addresses=False): only 127.0.0.1/32 is allowed,
so the redirects to 169.254.169.254 and 10.x show the guard refusing before any connect().
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import struct
import threading
import time

import pytest
from pydantic import ValidationError

from laion_dagster.core.fetch.fetcher import Fetcher
from laion_dagster.core.settings import Settings

TIMEOUT = 1.5
MARGIN = 1.5  # a fetch must return by TIMEOUT + MARGIN whatever the server does


class HostileServer:
    """A loopback HTTP/1.1 server whose paths each misbehave in one way; one request per
    connection (every answer says Connection: close), so no test depends on keep-alive."""

    def __init__(self, image: bytes):
        self.image = image
        self.paths: list[str] = []
        self.port = 0
        self.tasks: set[asyncio.Task] = set()

    # -------------------------------------------------------------- plumbing

    def __enter__(self) -> HostileServer:
        ready = threading.Event()

        def serve():
            self.loop = asyncio.new_event_loop()
            self.server = self.loop.run_until_complete(
                asyncio.start_server(self._connection, "127.0.0.1", 0))
            self.port = self.server.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        assert ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        async def stop():
            for task in list(self.tasks):  # handlers still sleeping or streaming
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def url(self, path: str, host: str = "hostile.test") -> str:
        return f"http://{host}:{self.port}{path}"

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        task = asyncio.current_task()
        self.tasks.add(task)
        try:
            request = await reader.readuntil(b"\r\n\r\n")
            path = request.split(b" ", 2)[1].decode()
            self.paths.append(path)
            await self._route(path, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client gave up first: that is what most tests expect
        finally:
            writer.close()
            self.tasks.discard(task)

    @staticmethod
    def _head(status: str, headers: dict[str, str | int]) -> bytes:
        lines = [f"HTTP/1.1 {status}", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    @staticmethod
    async def _until_client_leaves(reader: asyncio.StreamReader, seconds: float = 10.0):
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reader.read(), seconds)

    # -------------------------------------------------------------- behaviours

    async def _route(self, path: str, reader, writer) -> None:
        write = writer.write
        if path == "/image":
            write(self._head("200 OK", {"Content-Type": "image/jpeg",
                                        "Content-Length": len(self.image)}) + self.image)
        elif path == "/gzip":
            body = gzip.compress(self.image)
            write(self._head("200 OK", {"Content-Type": "image/jpeg", "Content-Encoding": "gzip",
                                        "Content-Length": len(body)}) + body)
        elif path == "/slow-first-byte":
            await asyncio.sleep(10)
            write(self._head("200 OK", {"Content-Length": len(self.image)}) + self.image)
        elif path == "/trickle":
            write(self._head("200 OK", {"Content-Type": "image/jpeg", "Content-Length": 1000}))
            for _ in range(1000):
                write(b"\xff")
                await writer.drain()
                await asyncio.sleep(1.0)
        elif path == "/endless":
            write(self._head("200 OK", {"Content-Type": "image/jpeg",
                                        "Transfer-Encoding": "chunked"}))
            while not writer.is_closing():
                write(b"400\r\n" + b"\xff" * 0x400 + b"\r\n")
                await writer.drain()
                await asyncio.sleep(0.01)
        elif path == "/declares-200mb":
            write(self._head("200 OK", {"Content-Type": "image/jpeg",
                                        "Content-Length": 200_000_000}) + b"\xff" * 65536)
            await self._until_client_leaves(reader)
        elif path == "/reset-mid-body":
            write(self._head("200 OK", {"Content-Length": 5000}) + self.image[:1000])
            await writer.drain()
            await asyncio.sleep(0.1)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()  # linger 0: the close sends RST, not FIN
        elif path == "/close-without-response":
            pass
        elif path == "/garbage":
            write(b"HELLO\r\n\r\n\x00\x01garbage")
            await self._until_client_leaves(reader)  # open: the parser must refuse, not wait
        elif path == "/truncated":
            write(self._head("200 OK", {"Content-Length": 5000}) + self.image[:100])
        elif path == "/long-header":
            write(self._head("200 OK", {"X-Filler": "a" * 100_000, "Content-Length": 0}))
            await self._until_client_leaves(reader)
        elif path.startswith("/chain/"):  # /chain/3 -> literal, relative, then a name
            left = int(path.rsplit("/", 1)[1])
            location = {3: self.url("/chain/2", host="127.0.0.1"), 2: "/chain/1",
                        1: self.url("/image")}[left]
            write(self._head("302 Found", {"Location": location, "Content-Length": 0}))
        else:
            location = {"/loop": "/loop", "/to-file": "file:///etc/passwd",
                        "/to-metadata": "http://169.254.169.254/latest/meta-data",
                        "/to-private": "http://10.0.0.1/x",
                        "/to-intranet": "http://intranet.test/x"}[path]
            write(self._head("302 Found", {"Location": location, "Content-Length": 0}))
        if not writer.is_closing():
            await writer.drain()


# ------------------------------------------------------------------ fixtures and helpers

@pytest.fixture
def server(images):
    with HostileServer(images[0].body) as running:
        yield running


@pytest.fixture
def hostile(settings: Settings) -> Settings:
    """Tight caps, no retries, the guard on with only 127.0.0.1 let through."""
    return settings.with_overrides(
        timeout=TIMEOUT, connect_timeout=1.0, max_bytes=10_000_000, retries=0, max_redirects=5,
        allow_private_addresses=False, allowed_networks=["127.0.0.1/32"],
        host_map={"hostile.test": "127.0.0.1", "intranet.test": "10.1.2.3"})


def fetch(settings: Settings, url: str):
    """One fetch in a fresh session: (result, seconds)."""

    async def run():
        async with Fetcher(settings) as fetcher:
            started = time.monotonic()
            result = await fetcher.fetch(url)
            return result, time.monotonic() - started

    return asyncio.run(run())


def assert_failed(result, seconds, error_class):
    assert result.error_class == error_class, (result.error_class, result.error_message)
    assert result.body is None
    assert seconds < TIMEOUT + MARGIN, seconds


# ------------------------------------------------------------------ slow servers

def test_slow_first_byte_is_timeout(hostile, server):
    """Headers that come after 10 s: timeout at the deadline."""
    result, seconds = fetch(hostile, server.url("/slow-first-byte"))
    assert_failed(result, seconds, "timeout")
    assert seconds >= TIMEOUT - 0.1


def test_one_byte_a_second_is_timeout(hostile, server):
    """Valid headers, then a byte a second: each read is quick, the total deadline ends it."""
    result, seconds = fetch(hostile, server.url("/trickle"))
    assert_failed(result, seconds, "timeout")
    assert seconds >= TIMEOUT - 0.1


def test_endless_chunked_body_is_timeout_under_a_large_cap(hostile, server):
    """Chunks forever, never reaching max_bytes in time: timeout."""
    result, seconds = fetch(hostile, server.url("/endless"))
    assert_failed(result, seconds, "timeout")


def test_endless_chunked_body_is_too_large_under_a_small_cap(hostile, server):
    """The same stream with a small max_bytes is cut off as too_large, long before the deadline."""
    result, seconds = fetch(hostile.with_overrides(max_bytes=10_000), server.url("/endless"))
    assert_failed(result, seconds, "too_large")
    assert seconds < 1.0


def test_200mb_declared_body_is_too_large_without_reading_it(hostile, server):
    """Content-Length over max_bytes is refused from the headers alone."""
    result, seconds = fetch(hostile, server.url("/declares-200mb"))
    assert_failed(result, seconds, "too_large")
    assert "Content-Length 200000000" in result.error_message
    assert seconds < 1.0


# ------------------------------------------------------------------ broken protocol

@pytest.mark.parametrize("path", ["/reset-mid-body", "/close-without-response", "/garbage",
                                  "/truncated", "/long-header"])
def test_broken_responses_are_connection(hostile, server, path):
    """RST mid-body, a hang-up, non-HTTP bytes, a short body, a 100 KB header line: all
    `connection`, at once (none of them waits for the deadline)."""
    result, seconds = fetch(hostile, server.url(path))
    assert_failed(result, seconds, "connection")
    assert result.http_status is None
    assert seconds < 1.0
    # retries=0, yet aiohttp itself resends a GET once when the server hangs up before any
    # response (RFC 9112 9.3.1, meant for stale keep-alive connections); still one deadline.
    assert server.paths == [path] * (2 if path == "/close-without-response" else 1)


# ------------------------------------------------------------------ redirects

def test_redirect_chain_of_three_reaches_the_image(hostile, server, images):
    """Literal 127.0.0.1, relative, then a host_map name: allowed_networks opens both guards."""
    result, seconds = fetch(hostile, server.url("/chain/3"))
    assert result.ok, result.error_message
    assert result.body == images[0].body
    assert server.paths == ["/chain/3", "/chain/2", "/chain/1", "/image"]
    assert seconds < 1.0


def test_redirect_loop_is_redirect(hostile, server):
    result, seconds = fetch(hostile.with_overrides(max_redirects=3), server.url("/loop"))
    assert_failed(result, seconds, "redirect")
    assert "more than 3 redirects" in result.error_message
    assert server.paths == ["/loop"] * 4


def test_redirect_to_a_file_url_is_redirect(hostile, server):
    result, seconds = fetch(hostile, server.url("/to-file"))
    assert_failed(result, seconds, "redirect")
    assert "file:///etc/passwd" in result.error_message


@pytest.mark.parametrize("path", ["/to-metadata", "/to-private", "/to-intranet"])
def test_redirect_to_non_public_address_is_blocked_before_connecting(
        hostile, server, connects, path):
    """169.254.169.254, 10.0.0.1 and a name mapped to 10.1.2.3 are refused without a connect()
    to them: only the loopback server itself is ever connected to."""
    connects.clear()
    result, seconds = fetch(hostile, server.url(path))
    assert_failed(result, seconds, "blocked_address")
    assert seconds < 1.0
    assert connects == ["127.0.0.1"]  # the spy works: it saw the first hop, and nothing else


def test_host_map_name_on_a_private_address_is_blocked_without_connecting(hostile, connects):
    connects.clear()
    result, seconds = fetch(hostile, "http://intranet.test/x.jpg")
    assert_failed(result, seconds, "blocked_address")
    assert "intranet.test" in result.error_message
    assert seconds < 1.0
    assert connects == []


def test_allowed_networks_allow_only_what_they_name(hostile, server):
    """127.0.0.1/32 does not open the rest of 127/8 or ::1; the flag still allows everything."""
    for host in ("127.0.0.2", "[::1]"):
        result, _ = fetch(hostile, server.url("/image", host=host))
        assert result.error_class == "blocked_address", host
    everything = hostile.with_overrides(allow_private_addresses=True, allowed_networks=[])
    result, _ = fetch(everything, server.url("/image", host="127.0.0.1"))
    assert result.ok, result.error_message
    assert server.paths == ["/image"]  # the blocked ones never reached the server


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "not-a-network", "10.0.0.1/8"])
def test_invalid_allowed_networks_fail_at_validation(tmp_path, bad):
    with pytest.raises(ValidationError, match="allowed_networks: not a network in CIDR"):
        Settings(data_dir=tmp_path, allowed_networks=[bad])


# ------------------------------------------------------------------ encodings

def test_gzip_body_is_decoded_to_the_image(hostile, server, images):
    result, seconds = fetch(hostile, server.url("/gzip"))
    assert result.ok, result.error_message
    assert result.body == images[0].body
    assert seconds < 1.0
