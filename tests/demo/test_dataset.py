"""The demo dataset looks like a LAION release, and the loopback server fails the way it says."""

from __future__ import annotations

import io
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from laion_dagster.demo.dataset import (
    OUTCOMES,
    DemoDataset,
    DemoImage,
    make_images,
    write_dataset,
)
from laion_dagster.demo.server import FLAKY_SECONDS, ImageServer
from tests.outputs import wait_until

BASES = ["http://img-a.test:8001", "http://img-b.test:8002", "http://img-c.test:8003"]
PART_NAME = re.compile(r"^part-\d{5}-[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}"
                       r"-c000\.snappy\.parquet$")
ORIGINAL_COLUMNS = {"SAMPLE_ID": pa.int64(), "URL": pa.string(), "TEXT": pa.string(),
                    "HEIGHT": pa.int32(), "WIDTH": pa.int32(), "LICENSE": pa.string(),
                    "NSFW": pa.string(), "similarity": pa.float64()}


@pytest.fixture(scope="module")
def images() -> list[DemoImage]:
    return make_images(60, seed=3)


@pytest.fixture(scope="module")
def server(images: list[DemoImage]) -> Iterator[ImageServer]:
    with ImageServer({image.path: image for image in images}) as running:
        yield running


@pytest.fixture()
def dataset(tmp_path: Path, images: list[DemoImage]) -> DemoDataset:
    return write_dataset(tmp_path, BASES, rows_per_part=300, seed=7, images=images)


def fetch(url: str, timeout: float = 5.0) -> tuple[int, str, bytes]:
    """(status, content type, body) with HTTP errors as values, other failures raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read()


def local(url: str, server: ImageServer) -> str:
    """The same URL on 127.0.0.1 and the server's port, since urllib has no custom resolver."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"127.0.0.1:{server.port}"))


# ---------------------------------------------------------------- images

def test_images_are_real_mixed_formats_and_fast() -> None:
    started = time.perf_counter()
    made = make_images(200, seed=1)
    assert time.perf_counter() - started < 5
    assert len({image.path for image in made}) == 200
    formats = {}
    for image in made:
        with Image.open(io.BytesIO(image.body)) as opened:
            opened.load()
            assert min(opened.size) >= 32 and max(opened.size) <= 256
            formats[opened.format] = formats.get(opened.format, 0) + 1
        assert image.content_type == f"image/{opened.format.lower()}"
        assert image.path.startswith("/img/")
    assert formats["JPEG"] > formats["PNG"] > 0 and formats["WEBP"] > 0
    jpeg_sizes = sorted(len(i.body) for i in made if i.content_type == "image/jpeg")
    assert jpeg_sizes[0] > 500 and jpeg_sizes[-1] > 10_000


def test_images_are_deterministic() -> None:
    assert make_images(5, seed=9) == make_images(5, seed=9)
    assert make_images(5, seed=9) != make_images(5, seed=10)


# ---------------------------------------------------------------- parquet parts

def test_parts_are_named_and_laid_out_like_spark(dataset: DemoDataset, tmp_path: Path) -> None:
    assert len(dataset.parts) == 4
    for subset in ("laion2B-en", "laion2B-multi"):
        folder = tmp_path / subset
        names = sorted(p.name for p in folder.glob("part-*.parquet"))
        assert [n[:10] for n in names] == ["part-00000", "part-00001"]
        assert all(PART_NAME.match(n) for n in names)
        assert len({n[11:47] for n in names}) == 1  # one uuid per subset
        assert (folder / "_SUCCESS").stat().st_size == 0
        assert {f".{n}.crc" for n in names} <= {p.name for p in folder.glob(".*.crc")}
    en_uuid = dataset.parts[0].name[11:47]
    multi_uuid = dataset.parts[2].name[11:47]
    assert en_uuid != multi_uuid


def test_parts_have_the_original_columns(dataset: DemoDataset) -> None:
    sample_ids: set[int] = set()
    for path in dataset.parts:
        table = pq.read_table(path)
        wanted = dict(ORIGINAL_COLUMNS)
        if "multi" in path.parent.name:
            wanted["LANGUAGE"] = pa.string()
        assert {f.name: f.type for f in table.schema} == wanted
        assert table.num_rows == 300
        assert set(table.column("NSFW").to_pylist()) <= {"UNLIKELY", "UNSURE", "NSFW"}
        licenses = table.column("LICENSE").to_pylist()
        assert licenses.count("?") > 0.8 * len(licenses)
        sample_ids.update(table.column("SAMPLE_ID").to_pylist())
    assert len(sample_ids) == 1200
    captions = [c for p in dataset.parts for c in pq.read_table(p).column("TEXT").to_pylist()]
    assert None in captions and "" in captions
    assert any(not c.isascii() for c in captions if c)


def test_every_row_has_an_expected_outcome(dataset: DemoDataset) -> None:
    for path in dataset.parts:
        urls = pq.read_table(path).column("URL").to_pylist()
        for row, url in enumerate(urls):
            outcome = dataset.expected_by_row[(path.name, row)]
            if url is None:
                assert outcome == "invalid_url"
            else:
                assert dataset.expected[url] == outcome
    assert len(dataset.expected_by_row) == 1200
    counts = dataset.outcome_counts()
    assert set(counts) == set(OUTCOMES) - {"timeout"}
    assert counts["success"] == 4 * 240
    assert counts["http_4xx"] == max(n for k, n in counts.items() if k != "success")


def test_failing_urls_use_the_agreed_forms(dataset: DemoDataset) -> None:
    for url, outcome in dataset.expected.items():
        if outcome == "dns":
            assert re.fullmatch(r"http://dead-host-\d+\.invalid/.+", url)
        elif outcome == "invalid_url":
            assert not url.startswith(("http://", "https://"))
        else:
            assert url.startswith(tuple(BASES))


def test_some_urls_repeat(dataset: DemoDataset) -> None:
    urls = [u for p in dataset.parts for u in pq.read_table(p).column("URL").to_pylist() if u]
    repeated = [u for u in set(urls) if urls.count(u) > 1]
    assert repeated
    assert all(dataset.expected[u] in ("success", "invalid_url") for u in repeated)


def test_slow_rows_are_opt_in_and_few(tmp_path: Path, images: list[DemoImage]) -> None:
    made = write_dataset(tmp_path, BASES, subsets=("laion2B-en",), rows_per_part=100,
                         images=images, slow_rows=True)
    slow = [key for key, outcome in made.expected_by_row.items() if outcome == "timeout"]
    assert 0 < len(slow) <= 2 * len(made.parts)
    assert all("/slow/" in url for url, o in made.expected.items() if o == "timeout")


def test_dataset_is_deterministic(tmp_path: Path, images: list[DemoImage]) -> None:
    first = write_dataset(tmp_path / "a", BASES, rows_per_part=50, seed=5, images=images,
                          row_group_size=16)
    second = write_dataset(tmp_path / "b", BASES, rows_per_part=50, seed=5, images=images)
    assert [p.name for p in first.parts] == [p.name for p in second.parts]
    assert first.expected_by_row == second.expected_by_row
    for a, b in zip(first.parts, second.parts, strict=True):
        assert pq.read_table(a).equals(pq.read_table(b))
    assert pq.ParquetFile(first.parts[0]).metadata.num_row_groups == 4


def test_no_failures_when_rate_is_zero(tmp_path: Path, images: list[DemoImage]) -> None:
    made = write_dataset(tmp_path, BASES, rows_per_part=40, failure_rate=0.0, images=images)
    assert set(made.outcome_counts()) == {"success"}


# ---------------------------------------------------------------- server

def test_server_serves_images_byte_for_byte(server: ImageServer,
                                            images: list[DemoImage]) -> None:
    image = images[0]
    status, content_type, body = fetch(server.url() + image.path)
    assert (status, content_type, body) == (200, image.content_type, image.body)
    with Image.open(io.BytesIO(body)) as opened:
        opened.load()
    assert server.requests[image.path] >= 1


def test_server_ignores_the_host_header(server: ImageServer, images: list[DemoImage]) -> None:
    request = urllib.request.Request(server.url() + images[1].path,
                                     headers={"Host": f"img-b.test:{server.port}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.read() == images[1].body


@pytest.mark.parametrize("path, status", [("/status/404/x", 404), ("/status/403/a.jpg", 403),
                                          ("/status/503/a.jpg", 503), ("/nowhere.jpg", 404),
                                          ("/status/nonsense", 404)])
def test_server_statuses(server: ImageServer, path: str, status: int) -> None:
    got, content_type, _ = fetch(server.url() + path)
    assert got == status
    assert content_type.startswith("text/html")


def test_server_html_and_corrupt_bodies(server: ImageServer) -> None:
    status, content_type, body = fetch(server.url() + "/html/a.jpg")
    assert status == 200 and content_type.startswith("text/html") and b"<html>" in body
    status, content_type, body = fetch(server.url() + "/corrupt/a.jpg")
    assert status == 200 and content_type == "image/jpeg" and body.startswith(b"\xff\xd8\xff")
    with pytest.raises(OSError):
        Image.open(io.BytesIO(body)).load()


def test_server_close_is_a_quick_connection_error(server: ImageServer) -> None:
    started = time.perf_counter()
    with pytest.raises((ConnectionError, urllib.error.URLError)):
        fetch(server.url() + "/close/a.jpg", timeout=5)
    assert time.perf_counter() - started < 1


def test_slow_requests_block_neither_others_nor_stop(images: list[DemoImage]) -> None:
    running = ImageServer({image.path: image for image in images}).start()
    errors: list[BaseException] = []

    def slow() -> None:
        try:
            fetch(running.url() + "/slow/a.jpg", timeout=30)
        except (OSError, urllib.error.URLError) as error:
            errors.append(error)

    waiter = threading.Thread(target=slow)
    waiter.start()
    time.sleep(0.1)
    started = time.perf_counter()
    assert fetch(running.url() + images[0].path)[0] == 200
    assert time.perf_counter() - started < 1
    running.stop()
    waiter.join(timeout=5)
    assert time.perf_counter() - started < 3
    assert not waiter.is_alive() and errors


def test_server_binds_loopback_and_frees_its_port(images: list[DemoImage]) -> None:
    with ImageServer({}) as running:
        port = running.port
        assert running.url("img-a.test") == f"http://img-a.test:{port}"
    with pytest.raises(RuntimeError):
        _ = running.port
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))  # released on stop


def test_every_local_row_gets_its_expected_outcome(tmp_path: Path, server: ImageServer,
                                                  images: list[DemoImage]) -> None:
    """The generator and the server agree: fetch each loopback URL and classify it."""
    made = write_dataset(tmp_path, BASES, subsets=("laion2B-en",), parts_per_subset=1,
                         rows_per_part=120, images=images, seed=11)
    checked = 0
    flaky = []
    for url, outcome in made.expected.items():
        if outcome in ("dns", "invalid_url"):
            continue  # never resolved: the machine's resolver is not on loopback
        got = _classify(local(url, server))
        if "/flaky/" in url:  # dropped at first; the downloader's later try gets it
            assert got == "connection", url
            flaky.append((url, outcome))
            continue
        assert got == outcome, url
        checked += 1
    assert checked > 100 and flaky
    for url, outcome in flaky:  # as a later try finds them
        wait_until(lambda u=url, o=outcome: _classify(local(u, server)) == o, FLAKY_SECONDS + 5,
                   what=f"{url} served")


def test_flaky_rows_drop_requests_for_a_moment_only(server: ImageServer,
                                                    images: list[DemoImage]) -> None:
    url = server.url() + "/flaky/row-1" + images[0].path
    started = time.monotonic()
    assert _classify(url) == "connection"
    assert _classify(url) == "connection"  # a quick retry is dropped too
    wait_until(lambda: _classify(url) == "success", FLAKY_SECONDS + 5, what="served")
    assert time.monotonic() - started >= FLAKY_SECONDS
    assert fetch(url)[2] == images[0].body


def _classify(url: str) -> str:
    try:
        status, content_type, body = fetch(url, timeout=5)
    except (ConnectionError, urllib.error.URLError):
        return "connection"
    if status >= 400:
        return "http_5xx" if status >= 500 else "http_4xx"
    if not content_type.startswith("image/"):
        return "not_image"
    try:
        Image.open(io.BytesIO(body)).load()
    except OSError:
        return "decode_error"
    return "success"
