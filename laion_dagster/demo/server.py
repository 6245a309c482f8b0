"""A loopback image server for the demo and the tests, run from sync code in its own thread.

It serves `DemoImage`s by path and fails on purpose on a few route prefixes, so a dataset from
`laion_dagster.demo.dataset` meets every failure class without leaving the machine:

- `/status/<code>/...`  that HTTP status (200-599) with a small HTML body
- `/html/...`           200 text/html: a page where an image was expected
- `/corrupt/...`        200 image/jpeg whose body has JPEG magic then garbage
- `/close/...`          the connection is closed without any response
- `/flaky/<image path>` requests within FLAKY_SECONDS of the path's first one are closed
                        without a response (the fetch's own quick retry among them), later
                        ones get the image: a server that drops connections for a moment
- `/slow/...`           an answer only after 60 s, for timeouts
- anything else         404

The Host header is ignored, so several names mapped to 127.0.0.1 look like several hosts.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections import Counter
from types import TracebackType

from aiohttp import web

from laion_dagster.demo.dataset import CORRUPT_JPEG, DemoImage

SLOW_SECONDS = 60.0
FLAKY_SECONDS = 1.0
START_TIMEOUT = 10.0
# How long stop() lets in-flight handlers finish; slow ones are cancelled after this.
SHUTDOWN_GRACE = 0.2
_PAGE = ("<!doctype html><html><head><title>{title}</title></head>"
         "<body><h1>{title}</h1></body></html>")


class ImageServer:
    """`with ImageServer(images) as server: server.url("img-a.test")` gives a base URL."""

    def __init__(self, images: dict[str, DemoImage], host: str = "127.0.0.1",
                 port: int = 0, delay: float = 0.0) -> None:
        self.images = images
        self.delay = delay  # seconds before each image: a deliberately slow server
        self.host = host
        self.requests: Counter[str] = Counter()
        self._first_seen: dict[str, float] = {}  # /flaky/ path -> when it was first asked
        self._wanted_port = port
        self._port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the image server is not started")
        return self._port

    def url(self, hostname: str = "127.0.0.1") -> str:
        return f"http://{hostname}:{self.port}"

    def start(self) -> ImageServer:
        """Listen in a background thread; returns once the socket accepts connections."""
        if self._loop is not None:
            return self
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="demo-image-server", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            future = asyncio.run_coroutine_threadsafe(self._serve(), loop)
            self._port = future.result(timeout=START_TIMEOUT)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Close the socket, cancel slow handlers after a short grace, and end the thread."""
        loop, thread, runner = self._loop, self._thread, self._runner
        self._loop = self._thread = self._runner = None
        self._port = None
        if loop is None or thread is None:
            return
        if runner is not None:
            cleanup = asyncio.run_coroutine_threadsafe(runner.cleanup(), loop)
            cleanup.result(timeout=START_TIMEOUT)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=START_TIMEOUT)
        if not thread.is_alive():
            loop.close()

    def __enter__(self) -> ImageServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    async def _serve(self) -> int:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # No access log: at thousands of requests a second, logging would cost more than serving.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_GRACE,
                               handler_cancellation=True)
        await runner.setup()
        self._runner = runner
        sock = _listening_socket(self.host, self._wanted_port)
        await web.SockSite(runner, sock, backlog=1024).start()
        return sock.getsockname()[1]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.requests[path] += 1
        image = self.images.get(path)
        if image is not None:
            if self.delay:
                await asyncio.sleep(self.delay)
            return web.Response(body=image.body, headers={"Content-Type": image.content_type})
        route, _, rest = path.lstrip("/").partition("/")
        if route == "status":
            return _status(rest)
        if route == "html":
            return _html(200, "Image not available")
        if route == "corrupt":
            return web.Response(body=CORRUPT_JPEG, headers={"Content-Type": "image/jpeg"})
        if route == "close":
            return _close(request)
        if route == "flaky":
            image = self.images.get("/" + rest.partition("/")[2])
            now = asyncio.get_running_loop().time()
            if image is None or now - self._first_seen.setdefault(path, now) < FLAKY_SECONDS:
                return _close(request)
            return web.Response(body=image.body, headers={"Content-Type": image.content_type})
        if route == "slow":
            await asyncio.sleep(SLOW_SECONDS)
            return _html(200, "Too late")
        return _html(404, "Not Found")


def _listening_socket(host: str, port: int) -> socket.socket:
    """Bound here rather than by aiohttp so the chosen port is known without private fields."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.setblocking(False)
    return sock


def _html(status: int, title: str) -> web.Response:
    return web.Response(status=status, text=_PAGE.format(title=title), content_type="text/html")


def _status(rest: str) -> web.Response:
    code = rest.partition("/")[0]
    if not code.isdigit() or not 200 <= int(code) <= 599:
        return _html(404, "Not Found")
    return _html(int(code), f"Status {code}")


def _close(request: web.Request) -> web.StreamResponse:
    """Drop the connection like a dying server: the client gets no status line at all."""
    transport = request.transport
    if transport is not None:
        transport.close()
    raise asyncio.CancelledError
