"""Per-image quality features: opt-out headers, Retry-After, filters and hash checks."""

import asyncio
import hashlib
import threading
import time
from collections import Counter
from email.utils import formatdate

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from aiohttp import web

from laion_dagster.core.control.enqueue import enqueue_part
from laion_dagster.core.fetch.fetcher import Fetcher, opt_out_directive, retry_after_seconds
from laion_dagster.core.images import checks as image_checks
from laion_dagster.core.input import parts
from laion_dagster.core.queue.connection import connect
from laion_dagster.core.queue.protocol import Queue
from tests.outputs import shard_rows
from tests.pool import download


class QuirkServer:
    """A loopback server whose routes misbehave the way real hosts do."""

    def __init__(self, body: bytes):
        self.body = body
        self.requests: Counter = Counter()
        self.port = 0

    def _image(self, headers=None) -> web.Response:
        return web.Response(body=self.body, content_type="image/jpeg", headers=headers or {})

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.requests[path] += 1
        if path.startswith("/robots/"):
            values = {"noai": ["noai"], "upper": ["NoImageAI"], "other-bot": ["googlebot: noai"],
                      "us": ["googlebot: noindex, laion-dagster: noimageai"],
                      "second-header": ["nofollow", "noindex"], "harmless": ["nofollow"],
                      "dated": ["unavailable_after: 25 Jun 2010 15:00:00 PST"]}[path[8:]]
            response = self._image()
            for value in values:
                response.headers.add("X-Robots-Tag", value)
            return response
        if path == "/busy-once":  # 429 with Retry-After: 1, then fine
            if self.requests[path] == 1:
                return web.Response(status=429, headers={"Retry-After": "1"})
            return self._image()
        if path == "/busy-for-an-hour":
            return web.Response(status=429, headers={"Retry-After": "3600"})
        if path == "/flaky-503":  # 503 twice, then fine
            if self.requests[path] <= 2:
                return web.Response(status=503)
            return self._image()
        if path == "/gone":
            return web.Response(status=410)
        return self._image()

    def __enter__(self):
        ready = threading.Event()

        def serve():
            self.loop = asyncio.new_event_loop()
            app = web.Application()
            app.router.add_route("GET", "/{tail:.*}", self.handle)
            self.runner = web.AppRunner(app, access_log=None)
            self.loop.run_until_complete(self.runner.setup())
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            self.loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        ready.wait(10)
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def url(self, path: str) -> str:
        return f"http://img-a.test:{self.port}{path}"


@pytest.fixture
def quirks(images):
    with QuirkServer(images[0].body) as server:
        yield server


def fetch(settings, *urls):
    """Fetch concurrently; every URL, retries and waits included, ends within the deadline."""

    async def run():
        async with Fetcher(settings) as fetcher:
            return await asyncio.gather(*(fetcher.fetch(u) for u in urls))

    started = time.monotonic()
    results = asyncio.run(run())
    assert time.monotonic() - started < settings.timeout + 1.0
    return results


def test_x_robots_tag_opt_outs_are_honoured(settings, quirks):
    names = ["noai", "upper", "other-bot", "us", "second-header", "harmless", "dated"]
    results = fetch(settings, *(quirks.url(f"/robots/{n}") for n in names))
    got = {n: r.error_class for n, r in zip(names, results, strict=True)}
    assert got == {"noai": "opted_out", "upper": "opted_out", "other-bot": None,
                   "us": "opted_out", "second-header": "opted_out", "harmless": None,
                   "dated": None}
    assert results[3].error_message == "X-Robots-Tag: noimageai"


def test_opt_out_settings_are_the_users(settings, quirks):
    custom = settings.with_overrides(user_agent_token="mybot", opt_out_directives=["noai"])
    results = fetch(custom, quirks.url("/robots/us"), quirks.url("/robots/noai"))
    assert [r.error_class for r in results] == [None, "opted_out"]


def test_opt_out_parsing():
    token, wanted = "laion-dagster", ["noai", "noimageai", "noindex", "noimageindex"]
    assert opt_out_directive(["noindex, nofollow"], token, wanted) == "noindex"
    assert opt_out_directive(["otherbot: noai"], token, wanted) is None
    assert opt_out_directive(["otherbot: noai, laion-dagster: noai"], token, wanted) == "noai"
    assert opt_out_directive(["max-image-preview: large"], token, wanted) is None
    assert opt_out_directive([], token, wanted) is None


def test_429_retry_after_is_honoured_within_the_deadline(settings, quirks):
    patient = settings.with_overrides(retries=2)
    started = time.monotonic()
    (ok,) = fetch(patient, quirks.url("/busy-once"))
    assert ok.ok and ok.body == quirks.body
    assert time.monotonic() - started >= 0.95  # it waited as asked
    assert quirks.requests["/busy-once"] == 2
    started = time.monotonic()
    (busy,) = fetch(patient, quirks.url("/busy-for-an-hour"))
    assert (busy.error_class, busy.http_status) == ("http_4xx", 429)
    assert time.monotonic() - started < 2  # an hour is longer than we wait: give up at once
    assert quirks.requests["/busy-for-an-hour"] == 1


def test_flaky_503_then_success_and_no_retry_for_410(settings, quirks):
    patient = settings.with_overrides(retries=3)
    flaky, gone = fetch(patient, quirks.url("/flaky-503"), quirks.url("/gone"))
    assert flaky.ok and quirks.requests["/flaky-503"] == 3
    assert (gone.error_class, gone.http_status) == ("http_4xx", 410)
    assert quirks.requests["/gone"] == 1


def test_retry_after_formats():
    assert retry_after_seconds("5") == 5.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    later = retry_after_seconds(formatdate(time.time() + 60, usegmt=True))
    assert 55 <= later <= 61


def test_filters_and_hash_verification(images):
    body = images[0].body
    info = image_checks.inspect(body)
    sha = hashlib.sha256(body).hexdigest()
    keep = image_checks.Filters()
    keep.check(info, sha)
    keep.check(info, sha.upper() + " ")  # case and stray spaces in the column do not matter
    with pytest.raises(image_checks.NotAnImage) as mismatch:
        keep.check(info, "0" * 64)
    assert mismatch.value.error_class == "hash_mismatch"
    w, h = info.width, info.height
    refusing = [image_checks.Filters(min_size=min(w, h) + 1),
                image_checks.Filters(max_area=w * h - 1)]
    if w != h:
        refusing.append(image_checks.Filters(max_aspect_ratio=max(w, h) / min(w, h) * 0.99))
    for filters in refusing:
        with pytest.raises(image_checks.NotAnImage) as refused:
            filters.check(info)
        assert refused.value.error_class == "filtered", filters
    image_checks.Filters(min_size=min(w, h), max_area=w * h,
                         max_aspect_ratio=max(w, h) / min(w, h)).check(info)  # limits inclusive


def test_workers_record_filtered_and_hash_mismatch_rows(settings, image_server, images):
    """A part with a sha256 column and a size floor: each row gets the right class on disk."""
    chosen = images[:12]
    infos = [image_checks.inspect(i.body) for i in chosen]
    floor = sorted(min(i.width, i.height) for i in infos)[6]
    rows = []
    for n, (image, info) in enumerate(zip(chosen, infos, strict=True)):
        sha = info.sha256 if n % 3 else "f" * 64  # every third row has a wrong hash
        rows.append({"URL": image_server.url("img-a.test") + image.path, "TEXT": f"c{n}",
                     "sha256": sha})
    folder = settings.parts_root / "laion2B-en"
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "part-00000-q-c000.snappy.parquet")
    strict = settings.with_overrides(verify_hash_column="sha256", min_image_size=floor)
    done = download(strict)
    queue, part = done.queue, done.part
    table = shard_rows(done.part_dir).sort_by("row")
    for n, record in enumerate(table.to_pylist()):
        info = infos[n]
        if n % 3 == 0:
            expected = "hash_mismatch"
        elif min(info.width, info.height) < floor:
            expected = "filtered"
        else:
            expected = None
        assert record["error_class"] == expected, (n, record)
    assert queue.classes(part.key).get("hash_mismatch") == 4


def test_a_missing_hash_column_fails_the_part_before_it_is_queued(settings, dataset):
    strict = settings.with_overrides(verify_hash_column="md5")
    client = connect(strict)
    queue = Queue(client, strict.prefix)
    part = parts.discover(strict.parts_root)[0]
    with pytest.raises(parts.PartError, match="no column 'md5'"):
        enqueue_part(queue, part, strict)
    assert queue.partitions() == []  # nothing half registered
    client.close()


def test_incremental_runs_skip_complete_shards_and_overwrite_redoes_them(settings, dataset,
                                                                         image_server):
    """A part downloaded once, then queued again on a fresh Redis (new prefix): workers report
    the shards from disk without a single request; with overwrite they download again."""
    part = parts.discover(settings.parts_root)[0]

    def run_once(s):
        done = download(s, part)
        state = done.queue.part(part.key)
        errors = done.queue.read_errors(part.key)
        client = done.queue.r
        client.delete(*client.scan_iter(match=f"{s.prefix}:*"))
        return state, errors, done.log

    first, first_errors, _ = run_once(settings)
    served = sum(image_server.requests.values())
    again, again_errors, log = run_once(settings.with_overrides(prefix=settings.prefix + "b"))
    assert sum(image_server.requests.values()) == served  # nothing fetched again
    assert "complete in the store already" in log
    assert (again.ok, again.failed, again.invalid, again.bytes) == (
        first.ok, first.failed, first.invalid, first.bytes)
    assert sorted(again_errors.column("row").to_pylist()) == sorted(
        first_errors.column("row").to_pylist())
    redo, _, _ = run_once(settings.with_overrides(prefix=settings.prefix + "c", overwrite=True))
    assert sum(image_server.requests.values()) > served
    assert redo.ok == first.ok
