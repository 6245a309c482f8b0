"""Fetching with the real aiohttp client against the loopback image server, and image checks."""

import asyncio
import contextlib
import gzip
import hashlib
import io
import socket
import struct
import time
import uuid
import warnings
import zlib

import pytest
from aiohttp import web
from PIL import Image

from laion_dagster.core.fetch.fetcher import Fetcher, address_blocked
from laion_dagster.core.images.checks import NotAnImage
from laion_dagster.core.images.checks import inspect as inspect_image
from laion_dagster.demo.dataset import CORRUPT_JPEG


def fetch_all(settings, urls):
    """Fetch `urls` one after another in one Fetcher session; returns (result, seconds) pairs."""

    async def run():
        out = []
        async with Fetcher(settings) as fetcher:
            for url in urls:
                started = time.monotonic()
                result = await fetcher.fetch(url)
                out.append((result, time.monotonic() - started))
        return out

    return asyncio.run(run())


def fetch_one(settings, url):
    [(result, _)] = fetch_all(settings, [url])
    return result


def by_format(images_list, fmt):
    for image in images_list:
        with Image.open(io.BytesIO(image.body)) as opened:
            if opened.format == fmt:
                return image
    raise AssertionError(f"no {fmt} image in the fixture")


def unique(route):
    """A path on a failure route that no other test has requested."""
    return f"/{route}/{uuid.uuid4().hex}.jpg"


# ---------------------------------------------------------------- successes

def test_success_returns_the_exact_body_and_a_correct_image_info(settings, image_server, images):
    """A 200 image comes back byte for byte; inspect() reports format, size and sha256."""
    base = image_server.url("img-a.test")
    chosen = [by_format(images, f) for f in ("JPEG", "PNG", "WEBP")]

    results = fetch_all(settings, [base + image.path for image in chosen])

    for image, (result, _) in zip(chosen, results, strict=True):
        assert result.ok, result.error_message
        assert result.error_class is None and result.http_status is None
        assert result.body == image.body
        assert result.content_type == image.content_type
        info = inspect_image(result.body)
        with Image.open(io.BytesIO(image.body)) as opened:
            assert (info.format, info.width, info.height) == (opened.format, *opened.size)
        assert info.sha256 == hashlib.sha256(image.body).hexdigest()


def test_several_host_names_reach_the_same_server(settings, image_server, images):
    """Each host_map name resolves to the loopback server without real DNS."""
    image = images[0]
    urls = [image_server.url(h) + image.path for h in ("img-a.test", "img-b.test", "IMG-C.TEST")]

    for result, _ in fetch_all(settings, urls):
        assert result.ok and result.body == image.body


# ---------------------------------------------------------------- failure classes

def test_http_errors_are_classified_with_their_status(settings, image_server):
    """404 is http_4xx, 503 is http_5xx, each with its status code."""
    base = image_server.url("img-a.test")

    (r404, _), (r403, _), (r503, _), (r500, _) = fetch_all(settings, [
        base + unique("status/404"), base + unique("status/403"),
        base + unique("status/503"), base + unique("status/500")])

    assert (r404.error_class, r404.http_status) == ("http_4xx", 404)
    assert (r403.error_class, r403.http_status) == ("http_4xx", 403)
    assert (r503.error_class, r503.http_status) == ("http_5xx", 503)
    assert (r500.error_class, r500.http_status) == ("http_5xx", 500)
    for r in (r404, r403, r503, r500):
        assert not r.ok and r.body is None and r.error_message


def test_unknown_host_is_dns_without_a_real_lookup(settings, image_server, monkeypatch):
    """A name outside host_map is a `dns` failure, answered without asking the system resolver."""
    asked = []
    real_getaddrinfo = socket.getaddrinfo

    def spy(host, *args, **kwargs):
        asked.append(host)
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", spy)
    url = f"http://nowhere.test:{image_server.port}/x.jpg"

    [(result, seconds)] = fetch_all(settings, [url])

    assert result.error_class == "dns"
    assert "nowhere.test" in result.error_message
    assert not any(h and "nowhere" in str(h) for h in asked), asked
    assert seconds < 1.0


def test_closed_connection_is_connection_and_quick(settings, image_server):
    """A server that hangs up without answering is a `connection` failure, reported at once."""
    [(result, seconds)] = fetch_all(settings, [image_server.url("img-a.test") + unique("close")])

    assert result.error_class == "connection"
    assert result.http_status is None
    assert seconds < 2.0


def test_slow_server_times_out_within_the_deadline(settings, image_server):
    """A server that does not answer is a `timeout` after about `timeout` seconds, not 60."""
    fast = settings.with_overrides(timeout=1.0)

    [(result, seconds)] = fetch_all(fast, [image_server.url("img-a.test") + unique("slow")])

    assert result.error_class == "timeout"
    assert 0.8 <= seconds < 3.0, seconds


def test_body_larger_than_max_bytes_is_too_large(settings, image_server, images):
    """An image bigger than max_bytes is refused as too_large, without returning a body."""
    image = max(images, key=lambda i: len(i.body))
    capped = settings.with_overrides(max_bytes=len(image.body) - 1)

    result = fetch_one(capped, image_server.url("img-a.test") + image.path)

    assert result.error_class == "too_large" and result.body is None
    exact = settings.with_overrides(max_bytes=len(image.body))
    assert fetch_one(exact, image_server.url("img-a.test") + image.path).body == image.body


@pytest.mark.parametrize("url", [
    "ftp://files.example.com/a.jpg",
    "data:image/gif;base64,R0lGODlhAQABAAAAACw=",
    "file:///etc/passwd",
    "http:///no-host.jpg",
])
def test_non_http_urls_are_invalid_url(settings, url):
    """URLs that are not http(s) with a host are `invalid_url`, never a crash or a file read."""
    result = fetch_one(settings, url)

    assert result.error_class == "invalid_url"
    assert result.body is None


# ---------------------------------------------------------------- address guard

def test_name_resolving_to_loopback_is_blocked(settings, image_server, images):
    """With private addresses refused, a host name mapped to 127.0.0.1 is never fetched."""
    guarded = settings.with_overrides(allow_private_addresses=False)
    path = unique("img-guard")
    before = image_server.requests[path]

    result = fetch_one(guarded, image_server.url("img-a.test") + path)

    assert result.error_class == "blocked_address"
    assert image_server.requests[path] == before == 0


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]", "[::ffff:127.0.0.1]"])
def test_ip_literal_to_loopback_is_blocked(settings, image_server, host):
    """An address literal is checked too (it never goes through the resolver)."""
    guarded = settings.with_overrides(allow_private_addresses=False)
    path = unique("img-literal")

    result = fetch_one(guarded, f"http://{host}:{image_server.port}{path}")

    assert result.error_class == "blocked_address"
    assert image_server.requests[path] == 0


def test_cloud_metadata_address_is_blocked_without_connecting(settings):
    """169.254.169.254 is refused before any connection attempt, so the answer is immediate."""
    guarded = settings.with_overrides(allow_private_addresses=False, connect_timeout=5.0)

    [(result, seconds)] = fetch_all(guarded, ["http://169.254.169.254/latest/meta-data"])

    assert result.error_class == "blocked_address"
    assert seconds < 0.5


@pytest.mark.parametrize("address", [
    "10.0.0.1", "192.168.1.1", "172.16.5.4", "127.0.0.1", "169.254.169.254", "0.0.0.0",
    "100.64.0.1", "::1", "fe80::1", "fe80::1%eth0", "fc00::1", "::ffff:10.0.0.1",
    "::ffff:127.0.0.1", "224.0.0.1", "ff02::1",
])
def test_address_blocked_for_non_public_addresses(address):
    """Private, loopback, link-local, carrier-NAT, mapped and multicast addresses are blocked."""
    assert address_blocked(address) is True


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700::1",
                                     "2a00:1450:4001:80b::200e"])
def test_address_blocked_allows_public_addresses(address):
    """Public IPv4 and IPv6 addresses are fetchable."""
    assert address_blocked(address) is False


# ---------------------------------------------------------------- retries

def test_server_errors_are_retried(settings, image_server):
    """With retries=2 a 503 is asked three times in all, then reported as http_5xx."""
    path = unique("status/503")

    result = fetch_one(settings.with_overrides(retries=2), image_server.url("img-a.test") + path)

    assert (result.error_class, result.http_status) == ("http_5xx", 503)
    assert image_server.requests[path] == 3


def test_too_many_requests_is_retried(settings, image_server):
    """429 is the one 4xx worth another try."""
    path = unique("status/429")

    result = fetch_one(settings.with_overrides(retries=1), image_server.url("img-a.test") + path)

    assert (result.error_class, result.http_status) == ("http_4xx", 429)
    assert image_server.requests[path] == 2


def test_client_errors_are_not_retried(settings, image_server):
    """A 404 is final: one request only, even with retries configured."""
    path = unique("status/404")

    result = fetch_one(settings.with_overrides(retries=2), image_server.url("img-a.test") + path)

    assert result.error_class == "http_4xx"
    assert image_server.requests[path] == 1


def test_no_retry_when_retries_is_zero(settings, image_server):
    """retries=0 means a single attempt for a 503."""
    path = unique("status/503")

    result = fetch_one(settings, image_server.url("img-a.test") + path)

    assert result.error_class == "http_5xx"
    assert image_server.requests[path] == 1


# ---------------------------------------------------------------- images.inspect

def _png_claiming(width, height):
    """A PNG whose header claims `width`x`height` pixels, with a tiny IDAT (no pixel data)."""

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_inspect_identifies_real_images_with_their_extension(images):
    """JPEG, PNG and WebP from real encoders get jpg/png/webp and their real size."""
    for fmt, ext in (("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")):
        image = by_format(images, fmt)
        info = inspect_image(image.body)
        with Image.open(io.BytesIO(image.body)) as opened:
            assert (info.format, info.ext, info.width, info.height) == (fmt, ext, *opened.size)


def test_inspect_html_is_not_image(settings, image_server):
    """An HTML page served with 200 where an image was expected is `not_image`."""
    result = fetch_one(settings, image_server.url("img-a.test") + unique("html"))
    assert result.ok and result.body

    with pytest.raises(NotAnImage) as error:
        inspect_image(result.body)
    assert error.value.error_class == "not_image"


def test_inspect_corrupt_jpeg_is_decode_error(settings, image_server):
    """A body with JPEG magic that does not parse is a broken image: `decode_error`."""
    result = fetch_one(settings, image_server.url("img-a.test") + unique("corrupt"))
    assert result.ok and result.body == CORRUPT_JPEG

    with pytest.raises(NotAnImage) as error:
        inspect_image(result.body)
    assert error.value.error_class == "decode_error"


@pytest.mark.parametrize("body", [b"", b"   ", b'{"error": "not found"}', b"GIF"])
def test_inspect_non_images_are_not_image(body):
    """Empty bodies and text are `not_image`."""
    with pytest.raises(NotAnImage) as error:
        inspect_image(body)
    assert error.value.error_class == "not_image"


@pytest.mark.parametrize("side", [30_000, 10_000])
def test_inspect_decompression_bomb_is_decode_error(side):
    """A header claiming far too many pixels is a `decode_error`, not an exception escaping
    (30000² is past Pillow's hard limit, 10000² past its warning limit)."""
    assert side * side > Image.MAX_IMAGE_PIXELS
    body = _png_claiming(side, side)

    with pytest.raises(NotAnImage) as error:
        inspect_image(body)

    assert error.value.error_class == "decode_error"
    assert "bomb" in str(error.value)


def test_inspect_small_crafted_png_is_fine():
    """The same crafted PNG with a sane size is accepted: the bomb check is about size."""
    info = inspect_image(_png_claiming(10, 7))
    assert (info.format, info.ext, info.width, info.height) == ("PNG", "png", 10, 7)


# ---------------------------------------------------------------- other servers

def fetch_from(settings, handle, paths):
    """Serve `handle` (an aiohttp handler) on loopback, fetch `paths` from it in one session;
    returns the results and how often each path was asked."""
    hits = {}

    async def counted(request):
        hits[request.path] = hits.get(request.path, 0) + 1
        return await handle(request)

    async def run():
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", counted)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1,
                               handler_cancellation=True)
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        port = sock.getsockname()[1]
        await web.SockSite(runner, sock).start()
        try:
            async with Fetcher(settings) as fetcher:
                return [await fetcher.fetch(f"http://img-b.test:{port}{p}") for p in paths], hits
        finally:
            await runner.cleanup()

    return asyncio.run(run())


def fetch_with_redirector(settings, routes, paths):
    """`routes` map a path to (status, Location or None)."""

    async def handle(request):
        status, location = routes[request.path]
        headers = {"Location": location} if location is not None else {}
        return web.Response(status=status, headers=headers)

    return fetch_from(settings, handle, paths)


def test_compressed_body_is_capped_after_decompression(settings):
    """A small gzip body that inflates past max_bytes is too_large (a gzip bomb)."""
    inflated = 8_000_000
    compressed = gzip.compress(b"\x00" * inflated, compresslevel=9)
    assert len(compressed) < 100_000

    async def handle(request):
        return web.Response(body=compressed, headers={"Content-Encoding": "gzip",
                                                      "Content-Type": "image/jpeg"})

    capped = settings.with_overrides(max_bytes=1_000_000)
    [result], _ = fetch_from(capped, handle, ["/bomb.jpg"])
    assert result.error_class == "too_large" and result.body is None

    roomy = settings.with_overrides(max_bytes=inflated)
    [result], _ = fetch_from(roomy, handle, ["/bomb.jpg"])
    assert result.ok and len(result.body) == inflated


def test_trickling_server_cannot_hold_a_slot(settings):
    """A server that keeps sending a byte now and then is cut off at the total deadline."""

    async def handle(request):
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        await response.prepare(request)
        for _ in range(200):
            await response.write(b"\xff")
            await asyncio.sleep(0.1)
        return response

    started = time.monotonic()
    [result], _ = fetch_from(settings.with_overrides(timeout=1.0), handle, ["/drip.jpg"])

    assert result.error_class == "timeout"
    assert time.monotonic() - started < 3.0


async def paced(request, piece: bytes, count: int, pause: float,
                length: int | None = None) -> web.StreamResponse:
    """A 200 image answer sent as `count` writes of `piece`, `pause` seconds apart."""
    response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
    if length is not None:
        response.content_length = length
    await response.prepare(request)
    for _ in range(count):
        await response.write(piece)
        await asyncio.sleep(pause)
    return response


def test_a_silent_server_frees_the_slot_after_read_timeout_not_the_deadline(settings):
    """A server that takes the request and says nothing fails after `read_timeout`, well before
    the total `timeout`, and is not retried within the fetch; one that is slow but keeps
    sending is not cut off by it."""

    async def handle(request):
        if request.path == "/silent.jpg":
            await asyncio.sleep(60)
        return await paced(request, b"\xff", 8, 0.2)  # 1.6 s in all, never 1 s without a byte

    patient = settings.with_overrides(timeout=30.0, read_timeout=1.0, retries=1)
    started = time.monotonic()
    [silent], hits = fetch_from(patient, handle, ["/silent.jpg"])
    assert silent.error_class == "timeout"
    assert "read_timeout" in silent.error_message
    assert time.monotonic() - started < 5.0
    assert hits["/silent.jpg"] == 1  # not asked again: it would hold the slot once more
    [slow], _ = fetch_from(patient, handle, ["/slow.jpg"])
    assert slow.body == b"\xff" * 8


def test_a_body_too_slow_to_make_the_deadline_is_given_up_early(settings):
    """A body that trickles (a byte now and then, never silent for read_timeout) fails as a
    timeout once its pace shows it cannot arrive by the deadline, not at the deadline, and is
    not asked again; a slow body whose pace does make the deadline arrives whole, and so does
    one that starts late (silence is read_timeout's to judge)."""

    async def handle(request):
        if request.path == "/trickle.jpg":  # a byte every 0.3 s: a minute, unless given up
            return await paced(request, b"\xff", 200, 0.3, length=100_000)
        if request.path == "/late.jpg":  # headers, 4 s of silence, then the body at once
            response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
            response.content_length = 100_000
            await response.prepare(request)
            await asyncio.sleep(4.0)
            await response.write(b"\xff" * 100_000)
            return response
        # 10 KB/s: 4 s in all, against a 6 s deadline
        return await paced(request, b"\xff" * 5_000, 8, 0.5, length=40_000)

    patient = settings.with_overrides(timeout=30.0, read_timeout=5.0, retries=1)
    started = time.monotonic()
    [trickle], hits = fetch_from(patient, handle, ["/trickle.jpg"])
    assert trickle.error_class == "timeout"
    assert "too slow" in trickle.error_message and "of 100,000 bytes" in trickle.error_message
    assert time.monotonic() - started < 8.0  # judged after 3 s, not held for the 30 s
    assert hits["/trickle.jpg"] == 1
    tight = settings.with_overrides(timeout=6.0, read_timeout=5.0)
    [steady], _ = fetch_from(tight, handle, ["/steady.jpg"])
    # Silence before the first byte is read_timeout's to judge, not the pace's.
    [late], _ = fetch_from(patient, handle, ["/late.jpg"])
    assert late.ok and late.body == b"\xff" * 100_000, late.error_message
    assert steady.ok and steady.body == b"\xff" * 40_000


def test_a_large_body_of_known_length_arrives_whole(settings):
    """A body far larger than aiohttp's read buffer, of known length, sent in many pieces: the
    fetcher takes it once it is all in, so nothing may stall it before the end (the reader
    pauses the socket when its buffer fills and no one reads)."""
    body = bytes(range(256)) * (5 * 4096)  # 5 MB

    async def handle(request):
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        response.content_length = len(body)
        await response.prepare(request)
        for start in range(0, len(body), 100_000):
            await response.write(body[start:start + 100_000])
        return response

    started = time.monotonic()
    [result], _ = fetch_from(settings.with_overrides(timeout=20.0), handle, ["/big.jpg"])
    assert result.ok and result.body == body
    assert time.monotonic() - started < 10.0


def test_redirects_are_followed_to_the_image(settings, image_server, images):
    """Absolute and relative redirects lead to the image's bytes."""
    image = images[3]
    target = image_server.url("img-a.test") + image.path
    routes = {"/abs": (301, target), "/rel": (302, "/abs"), "/see-other": (303, "rel")}

    results, _ = fetch_with_redirector(settings, routes, ["/abs", "/rel", "/see-other"])

    for result in results:
        assert result.ok and result.body == image.body


def test_redirect_loops_stop_after_max_redirects(settings):
    """A redirect loop ends after max_redirects hops with an error instead of spinning."""
    capped = settings.with_overrides(max_redirects=3)

    [result], hits = fetch_with_redirector(capped, {"/loop": (302, "/loop")}, ["/loop"])

    assert not result.ok and result.error_class == "redirect"
    assert "more than 3 redirects" in result.error_message
    assert hits["/loop"] == 4  # the first request plus three redirects


def test_redirect_to_another_scheme_or_without_location_is_redirect_trouble(settings):
    """Each hop is checked: a redirect to ftp:// or one with no Location is class `redirect`
    (the server's fault), not `invalid_url` (the input row's), so `errors retry --classes`
    can tell them apart."""
    routes = {"/to-ftp": (302, "ftp://files.example.com/a.jpg"), "/nowhere": (302, None)}

    results, _ = fetch_with_redirector(settings, routes, ["/to-ftp", "/nowhere"])

    assert [r.error_class for r in results] == ["redirect", "redirect"]
    assert "a redirect led to not an http(s) URL: ftp://files.example.com/a.jpg" in \
        results[0].error_message
    assert "without a Location header" in results[1].error_message


def test_inspect_bomb_check_holds_with_two_threads(images, monkeypatch):
    """The worker identifies images in two threads at once; a bomb in one thread must still be a
    decode_error while the other thread finishes an ordinary image. The interleaving is forced
    with events around Pillow's open (the inspect code itself runs unchanged)."""
    import threading

    from PIL import Image as PILImage

    real_open = PILImage.open
    a_inside, b_inside, a_done = threading.Event(), threading.Event(), threading.Event()
    names = {}

    def paced_open(fp, *args, **kwargs):
        who = names.get(threading.get_ident())
        if who == "a":
            a_inside.set()
            b_inside.wait(5)
        elif who == "b":
            b_inside.set()
            a_done.wait(5)
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(PILImage, "open", paced_open)
    bomb = _png_claiming(10_000, 10_000)  # past the warning limit, under the hard limit
    outcome = {}

    def thread_a():
        names[threading.get_ident()] = "a"
        inspect_image(images[0].body)
        a_done.set()

    def thread_b():
        names[threading.get_ident()] = "b"
        a_inside.wait(5)
        try:
            outcome["b"] = inspect_image(bomb)
        except NotAnImage as error:
            outcome["b"] = error.error_class

    with warnings.catch_warnings():  # whatever the threads leave behind is undone here
        warnings.simplefilter("ignore")
        threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)

    assert outcome["b"] == "decode_error", outcome


# ---------------------------------------------------------------- politeness and DNS

def fetch_concurrently(settings, handle, urls_for_port):
    """Serve `handle` on loopback and fetch `urls_for_port(port)` all at once in one session."""

    async def run():
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        await web.SockSite(runner, sock).start()
        try:
            async with Fetcher(settings) as fetcher:
                urls = urls_for_port(sock.getsockname()[1])
                return await asyncio.gather(*(fetcher.fetch(u) for u in urls))
        finally:
            await runner.cleanup()

    return asyncio.run(run())


def test_per_host_limit_caps_one_host_without_holding_back_the_others(settings, images):
    """40 URLs on each of two hosts, 64 fetch slots, per_host_limit 3: never more than 3
    requests at once on a host, and both hosts are served side by side."""
    body = images[0].body
    now = {"img-a.test": 0, "img-b.test": 0}
    peak = dict(now)
    peak_total = 0

    async def handle(request):
        nonlocal peak_total
        host = request.host.split(":")[0]
        now[host] += 1
        peak[host] = max(peak[host], now[host])
        peak_total = max(peak_total, sum(now.values()))
        await asyncio.sleep(0.05)
        now[host] -= 1
        return web.Response(body=body, headers={"Content-Type": "image/jpeg"})

    polite = settings.with_overrides(per_host_limit=3, concurrency=64)
    results = fetch_concurrently(polite, handle, lambda port: [
        f"http://{host}:{port}/{i}.jpg" for host in now for i in range(40)])
    assert all(r.ok for r in results)
    assert peak == {"img-a.test": 3, "img-b.test": 3}
    assert peak_total == 6


def test_a_host_is_resolved_once_per_process_not_once_per_url(settings, images, monkeypatch):
    """60 URLs on one host, every response closing its connection (so each URL needs a new
    one): the name is looked up once, from the fetcher's DNS cache afterwards."""
    from laion_dagster.core.fetch import fetcher as fetch_module

    lookups = []
    real_resolve = fetch_module.StaticResolver.resolve

    async def counting(self, host, port=0, family=socket.AF_INET):
        lookups.append(host)
        return await real_resolve(self, host, port, family)

    monkeypatch.setattr(fetch_module.StaticResolver, "resolve", counting)
    body = images[0].body

    async def handle(request):
        return web.Response(body=body, headers={"Content-Type": "image/jpeg",
                                                "Connection": "close"})

    results = fetch_concurrently(settings.with_overrides(per_host_limit=4), handle,
                                 lambda port: [f"http://img-c.test:{port}/{i}.jpg"
                                               for i in range(60)])
    assert all(r.ok for r in results)
    assert lookups == ["img-c.test"]


# ---------------------------------------------------------------- dead hosts and idle connections

def blackhole_port() -> tuple[socket.socket, list[socket.socket]]:
    """A loopback port whose connects time out like a dead host's: its listen queue is full,
    so the kernel drops every further SYN."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(listener.getsockname())  # EINPROGRESS: queued, never accepted
        fillers.append(filler)
    time.sleep(0.2)
    return listener, fillers


def test_a_dead_host_costs_two_connect_timeouts_not_one_per_url(settings, image_server, images):
    """Ten URLs on a host whose connects time out, fetched one after another: the first two
    wait out connect_timeout, the other eight fail at once with the same class and say why;
    a live host on the same fetcher is not affected."""
    listener, fillers = blackhole_port()
    port = listener.getsockname()[1]
    quick = settings.with_overrides(connect_timeout=0.5, timeout=5.0, retries=0,
                                    retry_delay=20.0)  # the host is left alone for 5 s
    urls = [f"http://img-a.test:{port}/{i}.jpg" for i in range(10)]
    live = image_server.url("img-b.test") + images[0].path
    try:
        results = fetch_all(quick, [*urls, live])
    finally:
        for sock in (listener, *fillers):
            sock.close()
    dead = [result for result, _ in results[:10]]
    assert [r.error_class for r in dead] == ["timeout"] * 10, [r.error_message for r in dead]
    assert all(seconds >= 0.45 for _, seconds in results[:2])
    assert all(seconds < 0.1 for _, seconds in results[2:10])
    assert not any(r.error_message.startswith("not tried") for r in dead[:2])
    assert all(r.tried for r in dead[:2])
    assert all(r.error_message.startswith(f"not tried: http://img-a.test:{port} failed to "
                                          "connect") and not r.tried for r in dead[2:])
    assert results[10][0].ok


def test_a_connect_timeout_is_not_retried_within_the_fetch(settings):
    """A host that leaves the connect unanswered costs its URL one connect_timeout, even with
    retries on: TCP re-sent the SYN within it already, and a second wait would hold the slot
    as long again (`retry` asks later)."""
    listener, fillers = blackhole_port()
    port = listener.getsockname()[1]
    patient = settings.with_overrides(connect_timeout=0.5, timeout=5.0, retries=2)
    try:
        [(result, seconds)] = fetch_all(patient, [f"http://img-a.test:{port}/x.jpg"])
    finally:
        for sock in (listener, *fillers):
            sock.close()
    assert result.error_class == "timeout", result.error_message
    assert 0.45 <= seconds < 0.9


def test_a_host_that_failed_once_is_still_tried(settings, image_server, images):
    """One refused connect is not a dead host: the next URL of that host is fetched."""
    closed = closed_port()
    results = fetch_all(settings, [f"http://img-a.test:{closed}/x.jpg",
                                   image_server.url("img-a.test") + images[0].path])
    assert results[0][0].error_class == "connection"
    assert results[1][0].ok  # same host name, a live port


def closed_port() -> int:
    """A loopback port nothing listens on: connects to it are refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_dead_port_of_a_live_host_costs_only_its_own_urls(settings, image_server, images):
    """One host name, two ports: one refuses every connect, the other serves. After the dead
    port refused twice, only its own URLs are turned away (marked not tried); every URL of
    the live port is fetched, before and after. (The memory was by host name: 2,000 rows on
    such a host gave 407 ok of 1,820 servable.)"""
    dead = closed_port()
    live = image_server.url("img-a.test")
    urls = []
    for i in range(30):
        urls.append(f"http://img-a.test:{dead}/{i}.jpg" if i % 3 == 0
                    else live + images[i % len(images)].path)
    results = [r for r, _ in fetch_all(settings.with_overrides(retry_delay=20.0), urls)]
    served = [r for r, url in zip(results, urls, strict=True) if f":{dead}/" not in url]
    refused = [r for r, url in zip(results, urls, strict=True) if f":{dead}/" in url]
    assert all(r.ok for r in served), [r.error_message for r in served if not r.ok]
    assert [r.error_class for r in refused] == ["connection"] * 10
    assert [r.tried for r in refused] == [True, True] + [False] * 8
    assert all(f"http://img-a.test:{dead} failed to connect" in r.error_message
               for r in refused[2:])


@contextlib.asynccontextmanager
async def serving(sock: socket.socket, body: bytes, ssl_context=None):
    """`body` for every path, from a socket bound earlier (refusing connects until now)."""
    async def handle(request):
        return web.Response(body=body, headers={"Content-Type": "image/jpeg"})

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock.listen(16)
    sock.setblocking(False)
    await web.SockSite(runner, sock, ssl_context=ssl_context).start()
    try:
        yield
    finally:
        await runner.cleanup()


def test_an_endpoint_that_failed_is_probed_again_after_a_while(settings, images):
    """A port refuses while its server is down; once the server is back and the endpoint's
    time is up, one URL probes it and, served, clears it: the next URLs are fetched at once.
    With later tries on, that time is a quarter of the retry delay."""
    quick = settings.with_overrides(retry_delay=1.2)  # left alone for 0.3 s

    async def run():
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        url = f"http://img-b.test:{sock.getsockname()[1]}/a.jpg"
        async with Fetcher(quick) as fetcher:
            first = [await fetcher.fetch(url) for _ in range(3)]  # nobody listens yet
            async with serving(sock, images[0].body):
                still_down = await fetcher.fetch(url)  # within 0.3 s of the last refusal
                await asyncio.sleep(0.35)
                later = [await fetcher.fetch(url) for _ in range(3)]
        return first, still_down, later

    first, still_down, later = asyncio.run(run())
    assert [r.tried for r in first] == [True, True, False]
    assert not still_down.ok and not still_down.tried
    assert all(r.ok for r in later), [r.error_message for r in later]


def test_urls_asked_during_a_probe_wait_for_what_it_finds(settings, images):
    """Eight URLs of an endpoint whose time is up, asked at once: one probes it, the others
    wait for the verdict. Its server back, all eight are fetched; still dead (connects time
    out), the probe alone waits out connect_timeout and the others are turned away with it,
    never asked (so a dead host costs one connect per probe, not one per URL)."""
    quick = settings.with_overrides(retry_delay=1.2, connect_timeout=0.5, retries=0)

    async def back_again():
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        url = f"http://img-b.test:{sock.getsockname()[1]}/a.jpg"
        async with Fetcher(quick) as fetcher:
            [await fetcher.fetch(url) for _ in range(2)]  # refused twice: down
            async with serving(sock, images[0].body):
                await asyncio.sleep(0.35)  # its time (0.3 s) is up
                return await asyncio.gather(*(fetcher.fetch(url) for _ in range(8)))

    async def still_dead(port):
        url = f"http://img-b.test:{port}/a.jpg"
        async with Fetcher(quick) as fetcher:
            [await fetcher.fetch(url) for _ in range(2)]  # two connect timeouts: down
            await asyncio.sleep(0.35)
            started = time.monotonic()
            results = await asyncio.gather(*(fetcher.fetch(url) for _ in range(8)))
            return results, time.monotonic() - started

    back = asyncio.run(back_again())
    assert all(r.ok for r in back), [r.error_message for r in back]
    listener, fillers = blackhole_port()
    try:
        dead, seconds = asyncio.run(still_dead(listener.getsockname()[1]))
    finally:
        for sock in (listener, *fillers):
            sock.close()
    assert [r.error_class for r in dead] == ["timeout"] * 8
    assert sum(r.tried for r in dead) == 1  # the probe
    assert 0.45 <= seconds < 0.9  # one connect_timeout for all eight


class KeepAliveServer:
    """A bare HTTP/1.1 keep-alive server on loopback that counts the connections it accepted
    and those still open."""

    def __init__(self, body: bytes):
        self.body = body
        self.accepted = 0
        self.open = 0

    async def serve(self, reader, writer):
        self.accepted += 1
        self.open += 1
        try:
            while (await reader.readuntil(b"\r\n\r\n")):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n"
                             b"Content-Length: %d\r\n\r\n" % len(self.body) + self.body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            writer.close()


def test_idle_connections_are_bounded_and_the_most_recent_hosts_keep_theirs(settings, images):
    """idle_connections=3: after ten hosts, only three idle connections stay open (the
    others are closed, not kept for hosts never asked again); the three most recent hosts
    are fetched again over them, without a new connection; an older host needs a new one."""
    names = [f"h{i}.test" for i in range(10)]
    bounded = settings.with_overrides(idle_connections=3,
                                      host_map={name: "127.0.0.1" for name in names})
    server = KeepAliveServer(images[0].body)

    async def run():
        listening = await asyncio.start_server(server.serve, "127.0.0.1", 0)
        port = listening.sockets[0].getsockname()[1]
        try:
            async with Fetcher(bounded) as fetcher:
                async def fetch(name):
                    result = await fetcher.fetch(f"http://{name}:{port}/a.jpg")
                    assert result.ok, result.error_message
                for name in names:
                    await fetch(name)
                await asyncio.sleep(0.2)  # the server sees the closed ones go
                open_after_ten = server.open
                for name in reversed(names[-3:]):
                    await fetch(name)
                reused = server.accepted
                await fetch(names[0])
                return open_after_ten, reused, server.accepted
        finally:
            listening.close()
            await listening.wait_closed()

    open_after_ten, accepted_after_reuse, accepted_at_end = asyncio.run(run())
    assert open_after_ten == 3
    assert accepted_after_reuse == 10  # the three recent hosts reused their connections
    assert accepted_at_end == 11


# ---------------------------------------------------------------- a private certificate authority

@pytest.fixture(scope="module")
def private_ca(tmp_path_factory):
    """A CA of the test's own and a certificate for img-a.test it signed (openssl)."""
    import subprocess

    d = tmp_path_factory.mktemp("ca")

    def openssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"), "-days", "2",
            "-subj", "/CN=laion-dagster test CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(d / "server.key"), "-out", str(d / "server.csr"),
            "-subj", "/CN=img-a.test")
    (d / "server.ext").write_text("subjectAltName=DNS:img-a.test\nbasicConstraints=CA:FALSE\n"
                                  "extendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.pem"),
            "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "1",
            "-extfile", str(d / "server.ext"), "-out", str(d / "server.pem"))
    return d


def test_a_private_ca_is_trusted_with_the_ca_bundle_setting(settings, images, private_ca):
    """A server whose certificate a private CA signed fails as tls (the class whose fix names
    ca_bundle); with --ca-bundle pointing at that CA's certificate, it is fetched."""
    import ssl

    body = images[0].body
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(private_ca / "server.pem", private_ca / "server.key")

    async def fetch_with(chosen):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        async with serving(sock, body, context), Fetcher(chosen) as fetcher:
            return await fetcher.fetch(f"https://img-a.test:{sock.getsockname()[1]}/a.jpg")

    untrusted = asyncio.run(fetch_with(settings))
    assert untrusted.error_class == "tls", untrusted.error_message
    with pytest.raises(ValueError, match=r"(?s)ca_bundle.*not a readable PEM file"):
        settings.with_overrides(ca_bundle=private_ca / "missing.pem")
    trusted = asyncio.run(fetch_with(settings.with_overrides(ca_bundle=private_ca / "ca.pem")))
    assert trusted.ok and trusted.body == body, trusted.error_message
