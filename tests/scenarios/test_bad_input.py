"""Bad input, end to end: broken parts fail alone and clearly, bad rows are accounted for.

A broken part (empty, no URL column, corrupt, truncated, wrong URL type, not parquet at all)
fails its own Dagster run with a message naming the file and the problem, and leaves every
other part's run, queue entries and downloads untouched. A bad row (unusable URL, odd
caption, duplicate URL) is one row's problem: it is counted once, as invalid, failed or ok,
and every other row of its part is downloaded. Each end-to-end case is queued with
`enqueue_part`, downloaded by a real `laion-dagster worker` pool, and checked in the shard
parquets, the webdataset tars and the Redis counters (rows = ok + failed + invalid).

All traffic goes to servers started here on 127.0.0.1; host names go through the settings'
host_map, so nothing is ever looked up in DNS.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from aiohttp import web
from dagster import DagsterEventType, instance_for_test, materialize

from laion_dagster.core.fetch.fetcher import Fetcher
from laion_dagster.core.input import parts
from laion_dagster.core.queue.connection import connect
from laion_dagster.core.queue.protocol import Queue
from laion_dagster.core.shards import records
from laion_dagster.defs.assets import enqueued_part
from laion_dagster.defs.partitions import PARTS
from laion_dagster.defs.resources import LaionResource
from laion_dagster.demo.dataset import DemoImage
from laion_dagster.instance import failure_message
from tests.outputs import all_done, leftovers, shard_rows, tar_members, wait_until
from tests.pool import Downloaded, download, start_worker, stop_worker

# bücher.test as it travels: URLs carry the Unicode form, the resolver sees the IDNA form.
IDN_HOST = "bücher.test"
IDN_ASCII = IDN_HOST.encode("idna").decode()  # xn--bcher-kva.test


# ---------------------------------------------------------------- helpers

class ExactServer:
    """Serves image bytes at exact request targets (raw path and query, as sent on the wire)
    and counts every target it is asked for, so a test sees precisely what reached it."""

    def __init__(self, routes: dict[str, DemoImage]):
        self.routes = routes
        self.requests: Counter[str] = Counter()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="exact-server")
        self._runner: web.AppRunner | None = None

    def url(self, host: str = "img-a.test") -> str:
        return f"http://{host}:{self.port}"

    async def _handle(self, request: web.Request) -> web.Response:
        target = request.raw_path
        self.requests[target] += 1
        image = self.routes.get(target)
        if image is None:
            return web.Response(status=404, text=f"nothing at {target}")
        return web.Response(body=image.body, headers={"Content-Type": image.content_type})

    async def _start(self) -> int:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        return self._runner.addresses[0][1]

    def __enter__(self) -> ExactServer:
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture
def server():
    with ExactServer({}) as s:
        yield s


@pytest.fixture
def small(settings):
    """The test settings with small shards and one worker process (fast to start)."""
    return settings.with_overrides(shard_size=4, processes=1, concurrency=8)


def write_part(settings, name: str, table: pa.Table, subset: str = "bad-input",
               row_group_size: int | None = None) -> parts.Part:
    path = settings.parts_root / subset / f"{name}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return parts.Part(path=path, subset=subset, stem=name)


def check_accounting(settings, done: Downloaded,
                     rows: int) -> tuple[pa.Table, pa.Table, dict[str, bytes]]:
    """Every input row is counted exactly once and is in exactly one shard parquet: ok, failed,
    or invalid (rejected at enqueue, never fetched); Redis counters agree; the tars hold
    exactly the successful samples; nothing temporary is left and no traceback was logged.

    Returns (shard rows, invalid rows, tar members by name)."""
    key = done.part.key
    state = done.queue.part(key)
    assert state.done, state
    assert state.rows == rows
    assert state.ok + state.failed + state.invalid == state.rows, state

    samples = shard_rows(done.part_dir)
    got = samples.column("row").to_pylist()
    assert len(got) == len(set(got)), "a row appears twice in the shard parquets"
    assert set(got) == set(range(rows)), "a row is missing from the shard parquets"
    # Rows rejected at enqueue are in their shard parquet too, failed as invalid_url with the
    # reason, and in the part's error records once.
    invalid = samples.filter(pc.equal(samples.column("error_class"), "invalid_url"))
    invalid_rows = invalid.column("row").to_pylist()
    assert state.invalid == len(invalid_rows)
    if invalid_rows:
        assert set(invalid.column("status").to_pylist()) == {"failed"}
        assert all(invalid.column("error_message").to_pylist())
        errors = done.queue.read_errors(key)
        listed = errors.filter(pc.equal(errors.column("error_class"), "invalid_url"))
        assert sorted(listed.column("row").to_pylist()) == sorted(invalid_rows)

    status = samples.column("status").to_pylist()
    assert state.ok == status.count("success")
    assert state.failed == len(status) - status.count("success") - len(invalid_rows)

    members = tar_members(done.part_dir)
    assert len(members) == 3 * state.ok  # image, .txt and .json per success, nothing else
    prefix = parts.sample_prefix(key)
    for record in samples.to_pylist():
        key_ = record["key"]
        assert key_ == f"{prefix}_{record['row']:010d}"
        if record["status"] == "success":
            assert f"{key_}.{record['format']}" in members
            assert members[f"{key_}.txt"] == (record["caption"] or "").encode()
            meta = json.loads(members[f"{key_}.json"])
            assert meta["url"] == record["url"] and meta["row"] == record["row"]
        else:
            assert record["error_class"] and record["error_message"]
            assert not any(name.startswith(key_ + ".") for name in members)
    assert not leftovers(settings.store_root)
    assert "Traceback" not in done.log, done.log
    return samples, invalid, members


def download_table(settings, name: str, table: pa.Table):
    """Write `table` as a part, download it and check its accounting: (the download, sample
    records by row, invalid rows, tar members)."""
    part = write_part(settings, name, table)
    done = download(settings, part)
    samples, invalid, members = check_accounting(settings, done, table.num_rows)
    return done, by_row(samples), invalid, members


def by_row(table: pa.Table) -> dict[int, dict]:
    return {r["row"]: r for r in table.to_pylist()}


# ---------------------------------------------------------------- broken parts, via Dagster

def _corrupt_first_row_group(path: Path) -> None:
    """Scramble the URL column's compressed pages; the footer stays intact, so the part
    counts its rows but cannot read them."""
    chunk = pq.ParquetFile(path).metadata.row_group(0).column(0)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    data = bytearray(path.read_bytes())
    for i in range(start + 20, start + chunk.total_compressed_size - 4):
        data[i] = (data[i] * 7 + 13) % 256
    path.write_bytes(bytes(data))


def _run_metadata(instance, run_id: str) -> dict:
    records = instance.get_records_for_run(
        run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION).records
    (record,) = records
    materialization = record.event_log_entry.dagster_event.event_specific_data.materialization
    return {k: v.value for k, v in materialization.metadata.items()}


def test_broken_parts_fail_their_own_runs_and_every_other_part_downloads(
        settings, image_server, images):
    """One folder with good and broken parts: every partition is materialized; each broken
    one fails with its file and its problem named (no traceback), leaves no trace in the
    queue, and the good ones are enqueued with the right counts and then downloaded."""
    base = image_server.url("img-b.test")

    def good(n: int, salt: int, invalid: tuple[int, ...] = ()) -> pa.Table:
        urls = [f"{base}{images[(salt + i) % len(images)].path}" for i in range(n)]
        for i in invalid:
            urls[i] = "ftp://img-b.test/not-http.jpg"
        return pa.table({"URL": urls, "TEXT": [f"part {salt} row {i}" for i in range(n)]})

    goods = {  # part -> (rows, invalid rows)
        write_part(settings, "good-a", good(23, 0, invalid=(3, 17)), subset="mixed",
                   row_group_size=7): (23, 2),
        write_part(settings, "good-b", good(9, 20), subset="mixed"): (9, 0),
        write_part(settings, "good-c", good(12, 40, invalid=(0,)), subset="other"): (12, 1),
    }
    empty = write_part(settings, "empty", pa.table({"URL": pa.array([], pa.string()),
                                                    "TEXT": pa.array([], pa.string())}),
                       subset="mixed")
    no_url = write_part(settings, "no-url", pa.table({"link": [f"{base}/x.jpg"],
                                                      "TEXT": ["x"]}), subset="mixed")
    int_url = write_part(settings, "int-url", pa.table({"URL": pa.array([1, 2, 3], pa.int64()),
                                                        "TEXT": ["a", "b", "c"]}),
                         subset="mixed")
    corrupt = write_part(settings, "corrupt", good(40, 7), subset="mixed")
    _corrupt_first_row_group(corrupt.path)
    truncated = write_part(settings, "truncated", good(200, 9), subset="mixed",
                           row_group_size=50)
    whole = truncated.path.read_bytes()
    truncated.path.write_bytes(whole[: len(whole) // 2])
    not_parquet = settings.parts_root / "mixed" / "not-parquet.parquet"
    not_parquet.write_bytes(b"URL,TEXT\nhttp://img-b.test/1.jpg,a csv file\n"
                            + random.Random(4).randbytes(512))
    bad = {  # part key -> (file, what the message must say besides the file)
        empty.key: (empty.path, ["empty part (0 rows)"]),
        no_url.key: (no_url.path, ["no URL column", "link", "TEXT"]),
        int_url.key: (int_url.path, ["URL column 'URL' has type int64", "expected string"]),
        corrupt.key: (corrupt.path, ["cannot read rows"]),
        truncated.key: (truncated.path, ["not a readable parquet file"]),
        "mixed/not-parquet": (not_parquet, ["not a readable parquet file"]),
    }
    keys = [p.key for p in parts.discover(settings.parts_root)]
    assert sorted(keys) == sorted([p.key for p in goods] + list(bad))

    laion = LaionResource(data_dir=str(settings.data_dir), parquet_dir=str(settings.parts_root),
                          store_dir=str(settings.store_root), redis_url=settings.redis_url,
                          prefix=settings.prefix, shard_size=5)
    client = connect(settings)
    queue = Queue(client, settings.prefix)
    try:
        with instance_for_test() as instance:
            instance.add_dynamic_partitions(PARTS, keys)
            results = {key: materialize([enqueued_part], partition_key=key, instance=instance,
                                        resources={"laion": laion}, raise_on_error=False)
                       for key in sorted(keys)}  # bad and good interleaved

            for key, (path, needles) in bad.items():
                assert not results[key].success, key
                message = failure_message(instance, results[key].run_id)
                assert str(path) in message, message
                for needle in needles:
                    assert needle in message, (key, message)
                assert "Traceback" not in message and len(message) < 1000, message
                # Refused before the part was registered: nothing of it is queued.
                assert key not in queue.partitions()
                assert queue.part(key).generation == 0

            for part, (rows, invalid) in goods.items():
                result = results[part.key]
                assert result.success, failure_message(instance, result.run_id)
                meta = _run_metadata(instance, result.run_id)
                assert (meta["rows"], meta["invalid_rows"]) == (rows, invalid), part.key
                assert meta["shards"] == -(-rows // 5)
                state = queue.part(part.key)
                assert state.enqueued and (state.rows, state.invalid) == (rows, invalid)
        assert queue.queued_rows() == sum(r - i for r, i in goods.values())

        worker = start_worker(settings)
        try:
            wait_until(lambda: all_done(queue, [p.key for p in goods]), 60,
                       what="the good parts downloaded")
        finally:
            log = stop_worker(worker)
        for part, (rows, _) in goods.items():
            done = Downloaded(part=part, queue=queue,
                              part_dir=settings.store_root / part.relative_dir, log=log)
            samples, invalid, _ = check_accounting(settings, done, rows)
            # Every row with a URL downloaded; the invalid ones are in the shards, failed.
            status = samples.column("status").to_pylist()
            assert status.count("success") == rows - goods[part][1] == rows - invalid.num_rows
        assert queue.queued_rows() == 0
        for key in bad:  # nothing was written for a broken part
            assert not (settings.store_root / parts.relative_dir(key)).exists()
    finally:
        client.close()


# ---------------------------------------------------------------- bad URLs in one part

def test_bad_urls_are_counted_invalid_with_a_reason_and_odd_valid_ones_download(
        small, server, images):
    """Unusable URLs are kept aside as invalid_url with their reason; Unicode, IDN,
    percent-encoded, spaced and very long but legal URLs download, and the server sees
    exactly the request target a browser would send (encoding preserved)."""
    base = server.url()
    long_path = "/long/" + "L" * (4000 - len(base) - len("/long/"))
    cases: list[tuple[str | None, tuple]] = [
        # (URL, expected): ("ok", exact target), ("invalid", reason at enqueue),
        # ("failed", class, text in the message)
        (f"{base}/plain.jpg", ("ok", "/plain.jpg")),
        (None, ("invalid", "missing URL")),
        ("", ("invalid", "not an http(s) URL")),
        ("    ", ("invalid", "not an http(s) URL")),
        ("\t\r\n", ("invalid", "not an http(s) URL")),
        ("ftp://img-a.test/a.jpg", ("invalid", "not an http(s) URL")),
        ("file:///etc/passwd", ("invalid", "not an http(s) URL")),
        ("javascript:alert(1)//http://img-a.test/a.jpg", ("invalid", "not an http(s) URL")),
        ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
         "+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==", ("invalid", "not an http(s) URL")),
        ("http://", ("invalid", "URL too short")),
        ("https://", ("invalid", "URL too short")),
        (f"{base}/" + "x" * (10_000 - len(base) - 1), ("invalid", "longer than 4096")),
        ("http:///no-host.jpg", ("invalid", "URL has no host")),
        ("http://:80/no-host.jpg", ("invalid", "URL has no host")),
        (f"{base}/missing.jpg", ("failed", "http_4xx", "404")),
        (f"{base}{long_path}", ("ok", long_path)),
        (f"{base}/ä/猫 café.jpg", ("ok", "/%C3%A4/%E7%8C%AB%20caf%C3%A9.jpg")),
        (f"http://{IDN_HOST}:{server.port}/bücher/ä.jpg", ("ok", "/b%C3%BCcher/%C3%A4.jpg")),
        (f"{base}/caf%C3%A9%20au%20lait.jpg?q=%E6%9D%B1%E4%BA%AC&x=1",
         ("ok", "/caf%C3%A9%20au%20lait.jpg?q=%E6%9D%B1%E4%BA%AC&x=1")),
        (f"{base}/a%2Fb/100%25/%2B.jpg", ("ok", "/a%2Fb/100%25/%2B.jpg")),
        (f"{base}/with space/and  two.jpg", ("ok", "/with%20space/and%20%20two.jpg")),
        (f"HTTP://IMG-A.TEST:{server.port}/Upper.JPG", ("ok", "/Upper.JPG")),
        (f"  {base}/leading-space.jpg", ("ok", "/leading-space.jpg")),
        (f"{base}/trailing-newline.jpg\r\n", ("ok", "/trailing-newline.jpg")),
    ]
    ok_targets = [exp[1] for _, exp in cases if exp[0] == "ok"]
    for i, target in enumerate(ok_targets):
        server.routes[target] = images[i]
    urls = [u for u, _ in cases]
    part = write_part(small, "urls", pa.table({
        "URL": pa.array(urls, pa.string()),
        "TEXT": [f"caption {i}" for i in range(len(urls))],
        "SAMPLE_ID": pa.array(range(100, 100 + len(urls)), pa.int64()),
    }))
    # The resolver is asked for the IDNA (punycode) name: that is the form host_map needs.
    settings = small.with_overrides(host_map={**small.host_map, IDN_ASCII: "127.0.0.1"})

    done = download(settings, part)

    samples, invalid, members = check_accounting(settings, done, len(urls))
    fetched, kept_aside = by_row(samples), by_row(invalid)
    for row, (url, expected) in enumerate(cases):
        if expected[0] == "invalid":
            assert row in kept_aside, (row, url)
            assert kept_aside[row]["url"] == url
            assert kept_aside[row]["caption"] == f"caption {row}"
            assert expected[1] in kept_aside[row]["error_message"], kept_aside[row]
            assert kept_aside[row]["SAMPLE_ID"] == 100 + row  # its input columns travel too
            continue
        record = fetched[row]
        assert record["url"] == url and record["SAMPLE_ID"] == 100 + row
        if expected[0] == "failed":
            assert record["status"] == "failed"
            assert record["error_class"] == expected[1], record
            assert expected[2] in record["error_message"], record
        else:
            assert record["status"] == "success", record
            body = members[f"{record['key']}.{record['format']}"]
            assert body == server.routes[expected[1]].body
    # Every legal URL reached the server once, at exactly the expected target; nothing else
    # was asked for (no invalid row was fetched, no target was re-encoded or decoded).
    assert server.requests == Counter({**{t: 1 for t in ok_targets}, "/missing.jpg": 1})
    # The error records (the part's error file) carry each row's sample key and the input's
    # key column, so they join back to LAION's metadata.
    prefix = parts.sample_prefix(part.key)
    for record in done.queue.read_errors(part.key).to_pylist():
        assert record["key"] == f"{prefix}_{record['row']:010d}"
        assert record["SAMPLE_ID"] == 100 + record["row"]
    state = done.queue.part(part.key)
    invalid_count = sum(1 for _, e in cases if e[0] == "invalid")
    assert (state.ok, state.failed, state.invalid) == (len(ok_targets), 1, invalid_count)
    assert done.queue.classes(part.key) == {"invalid_url": invalid_count, "http_4xx": 1}


def test_urls_without_a_host_are_invalid_at_enqueue(tmp_path):
    """An http(s) URL without a host can never be fetched: it is kept aside at enqueue, like
    'http://', with a reason that says what is wrong."""
    urls = ["http:///no-host.jpg", "https://?q=1.jpg", "http://:80/x.jpg", "http://#x.jpg"]
    path = tmp_path / "s" / "p.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"URL": urls}), path)
    (shard,) = parts.iter_shards(path, 10)
    assert shard.valid.num_rows == 0
    assert shard.rejected.column("row").to_pylist() == [0, 1, 2, 3]
    for reason in shard.rejected.column(records.REJECT).to_pylist():
        assert "host" in reason, reason


async def _targets_seen(settings, server: ExactServer, url: str) -> tuple[bool, list[str]]:
    async with Fetcher(settings) as fetcher:
        result = await fetcher.fetch(url)
    return result.ok, list(server.requests)


@pytest.mark.parametrize("path, target", [
    pytest.param("/a%20b/%E6%9D%B1/100%25/a%2Fb%3Fc.jpg?sig=ab%2Bcd%3D%3D&q=a%20b",
                 "/a%20b/%E6%9D%B1/100%25/a%2Fb%3Fc.jpg?sig=ab%2Bcd%3D%3D&q=a%20b",
                 id="canonical-escapes"),
    pytest.param("/x.jpg ", "/x.jpg", id="trailing-space"),
    pytest.param("/caf%c3%a9.jpg", "/caf%c3%a9.jpg", id="lower-case-escapes"),
    pytest.param("/%7Euser/a.jpg", "/%7Euser/a.jpg", id="escaped-unreserved"),
    pytest.param("/a%3Bb%3D%40.jpg", "/a%3Bb%3D%40.jpg", id="escaped-delimiters-in-path"),
    pytest.param("/_next/image?url=%2Fimg%2Fa.jpg%3Fv%3D1&w=64",
                 "/_next/image?url=%2Fimg%2Fa.jpg%3Fv%3D1&w=64",
                 id="escaped-delimiters-in-query"),
    pytest.param("/q.jpg?q=a b", "/q.jpg?q=a%20b", id="space-in-query"),
])
def test_the_server_sees_the_request_target_as_written(settings, server, images, path,
                                                        target):
    """A legal URL reaches the server with its path and query exactly as written (only what
    cannot travel, such as a space or non-ASCII, is percent-encoded, as browsers do), so
    signed or case-sensitive URLs keep working."""
    server.routes[target] = images[0]
    ok, seen = asyncio.run(_targets_seen(settings, server, server.url() + path))
    assert seen == [target]
    assert ok


def test_host_map_accepts_a_unicode_host_name(settings, server, images):
    """host_map given the Unicode form of a name resolves URLs that use that name."""
    server.routes["/%C3%A4.jpg"] = images[0]
    mapped = settings.with_overrides(host_map={IDN_HOST: "127.0.0.1"})
    ok, seen = asyncio.run(_targets_seen(mapped, server,
                                         f"http://{IDN_HOST}:{server.port}/ä.jpg"))
    assert seen == ["/%C3%A4.jpg"]
    assert ok


# ---------------------------------------------------------------- captions

def test_odd_captions_round_trip_to_the_tar_and_the_shard_parquet(small, server, images):
    """Control characters, CR LF, tabs, NUL, escape sequences, empty and missing captions
    and a 100 KB caption are stored as read: the .txt, the .json and the shard parquet all
    hold exactly the reader's caption."""
    huge = ("Ünïcödé 東京 😍 caption with\ttabs and\r\nbreaks " * 3000)[:100_000]
    captions = ["plain", "nul\x00byte", "\x1b[31mred\x1b[0m terminal", "windows\r\nline",
                "tab\tseparated\tvalues", "bell\x07 del\x7f bs\x08", "\u2028line sep\u2029",
                "\ufeffbom first", "", None, "  spaces around  ", huge]
    for i in range(len(captions)):
        server.routes[f"/c/{i}.jpg"] = images[i]
    _, records, invalid, members = download_table(small, "captions", pa.table({
        "URL": [f"{server.url()}/c/{i}.jpg" for i in range(len(captions))],
        "TEXT": pa.array(captions, pa.string()),
    }))

    assert invalid.num_rows == 0
    for row, caption in enumerate(captions):
        record = records[row]
        assert record["status"] == "success", record
        assert record["caption"] == caption
        key = record["key"]
        assert members[f"{key}.txt"] == (caption or "").encode("utf-8")
        assert json.loads(members[f"{key}.json"])["caption"] == caption
    assert len(members[f"{records[len(captions) - 1]['key']}.txt"]) >= 100_000


def test_invalid_utf8_captions_are_decoded_with_replacements_and_the_rows_kept(
        small, server, images):
    """A binary caption column with invalid UTF-8 costs no row: captions are decoded with
    replacement characters, each row is downloaded, and the .txt holds the decoded text."""
    raw = [f"caption {i} é".encode() for i in range(10)]
    raw[6] = b"\xff\xfe broken \xc3 utf-8 \x80"
    raw[9] = b"\xed\xa0\x80 lone surrogate"
    for i in range(len(raw)):
        server.routes[f"/u/{i}.jpg"] = images[i]
    _, records, _, members = download_table(small, "binary-captions", pa.table({
        "URL": [f"{server.url()}/u/{i}.jpg" for i in range(len(raw))],
        "TEXT": pa.array(raw, pa.binary()),
    }))

    for row, data in enumerate(raw):
        record = records[row]
        expected = data.decode("utf-8", errors="replace")
        assert record["status"] == "success"
        assert record["caption"] == expected
        assert members[f"{record['key']}.txt"] == expected.encode()


# ---------------------------------------------------------------- duplicate URLs

def test_duplicate_urls_get_one_sample_per_row(small, server, images):
    """The same URL in 5 rows (within and across shards) gives 5 samples keyed by row, all
    successful; nothing is merged, counted twice or lost."""
    same = f"{server.url()}/same.jpg"
    server.routes["/same.jpg"] = images[0]
    urls = [f"{server.url()}/other/{i}.jpg" for i in range(13)]
    duplicates = [1, 4, 5, 8, 12]
    for i in range(13):
        server.routes[f"/other/{i}.jpg"] = images[1 + i]
    for i in duplicates:
        urls[i] = same
    done, records, invalid, members = download_table(small, "duplicates", pa.table({
        "URL": urls, "TEXT": [f"row {i}" for i in range(13)],
    }))

    assert invalid.num_rows == 0
    state = done.queue.part(done.part.key)
    assert (state.rows, state.ok, state.failed, state.invalid) == (13, 13, 0, 0)
    assert sorted(records) == list(range(13))
    keys = set()
    for row in duplicates:
        record = records[row]
        assert record["url"] == same and record["status"] == "success"
        assert record["key"] == f"bad-input_duplicates_{row:010d}"
        keys.add(record["key"])
        assert members[f"{record['key']}.{record['format']}"] == images[0].body
        assert members[f"{record['key']}.txt"] == f"row {row}".encode()
        meta = json.loads(members[f"{record['key']}.json"])
        assert (meta["row"], meta["key"], meta["url"]) == (row, record["key"], same)
    assert len(keys) == 5
    assert sum(1 for r in records.values() if r["url"] == same) == 5
