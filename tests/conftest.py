"""Shared fixtures: a real embedded Redis, a real loopback image server, real parquet parts.

Nothing here touches the machine's own Redis: the session starts its own embedded server, and
every test gets a unique key prefix that is deleted afterwards.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from laion_dagster.core.queue import embedded
from laion_dagster.core.queue.connection import connect
from laion_dagster.core.queue.protocol import Queue
from laion_dagster.core.settings import Settings
from laion_dagster.demo.dataset import DemoDataset, DemoImage, make_images, write_dataset
from laion_dagster.demo.server import ImageServer
from tests.s3 import S3Server, s3_env, serve

TEST_HOSTS = ("img-a.test", "img-b.test", "img-c.test")

# Nothing a test runs may phone home or read the developer's settings.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"  # no AWS SDK asks 169.254.169.254
for _name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
    os.environ.pop(_name, None)
for _name in [n for n in os.environ if n.startswith("LAION_")]:
    del os.environ[_name]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[embedded.EmbeddedServer]:
    directory = tmp_path_factory.mktemp("redis")
    server = embedded.ensure_running(directory)
    yield server
    embedded.stop(directory)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    yield from serve(tmp_path_factory)


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch) -> S3Server:
    """The S3 server, with this process's environment set as a user's shell would be."""
    for name, value in s3_env(s3_server).items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture
def prefix(redis_server) -> Iterator[str]:
    name = f"t{uuid.uuid4().hex[:10]}"
    yield name
    client = redis.Redis.from_url(redis_server.url)
    keys = list(client.scan_iter(match=f"{name}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def client(redis_server) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_server.url)
    yield c
    c.close()


@pytest.fixture(scope="session")
def images() -> list[DemoImage]:
    return make_images(60, seed=1)


@pytest.fixture
def image_server(images) -> Iterator[ImageServer]:
    """A test's own: what it has served (its request counts, the /flaky/ route's drops) is
    this test's alone. Starting one takes milliseconds."""
    with ImageServer({image.path: image for image in images}) as server:
        yield server


@pytest.fixture
def settings(tmp_path: Path, redis_server, prefix: str) -> Settings:
    """Settings for a test: its own folders and prefix, the session's Redis, loopback only."""
    return Settings(
        data_dir=tmp_path / "data",
        parquet_dir=tmp_path / "parquet",
        store_dir=tmp_path / "store",
        redis_url=redis_server.url,
        prefix=prefix,
        shard_size=50,
        processes=2,
        concurrency=16,
        allow_private_addresses=True,
        host_map={host: "127.0.0.1" for host in TEST_HOSTS},
        timeout=5.0,
        connect_timeout=2.0,
        heartbeat_interval=0.5,
        shutdown_grace=10.0,
        retries=0,
        retry_delay=1.5,  # later tries on, as by default; past the /flaky/ route's drops
    )


@pytest.fixture
def dataset(settings: Settings, image_server: ImageServer, images) -> DemoDataset:
    """Two subsets × two parts of 120 rows each, with LAION's mix of failures."""
    return write_dataset(settings.parts_root, [image_server.url(h) for h in TEST_HOSTS],
                         rows_per_part=120, images=images, seed=3)


@pytest.fixture
def queue(settings: Settings) -> Iterator[Queue]:
    """The queue under the test's prefix, as workers with these settings see it."""
    client = connect(settings)
    yield Queue(client, settings.prefix, settings.visibility_timeout, settings.max_deliveries)
    client.close()


def mount_tmpfs(path: Path, size_mb: int) -> bool:
    """A small file system of the test's own, for full-disk tests (needs root)."""
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs",
                             str(path)], capture_output=True)
    return result.returncode == 0


def shell_env(**settings: str) -> dict[str, str]:
    """What a user's shell has: no LAION_* of the developer's, no DAGSTER_HOME, no Redis URL
    (so the embedded server); plus the test hosts on loopback, quick timeouts, one worker
    process (each costs its imports; tests that need more say so), and the given
    LAION_<NAME> values."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("LAION_") and k != "DAGSTER_HOME"}
    env.update({
        "LAION_HOST_MAP": json.dumps({h: "127.0.0.1" for h in TEST_HOSTS}),
        "LAION_ALLOW_PRIVATE_ADDRESSES": "true",
        "LAION_SHARD_SIZE": "40",
        "LAION_PROCESSES": "1",
        "LAION_TIMEOUT": "5",
        "LAION_HEARTBEAT_INTERVAL": "0.5",
        "LAION_RETRIES": "0",
        "LAION_RETRY_DELAY": "1.5",
    })
    env.update({f"LAION_{name.upper()}": value for name, value in settings.items()})
    return env


def worker_env(settings: Settings) -> dict[str, str]:
    """The environment a worker subprocess needs to see these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAION_")}
    env.update(settings.to_env())
    return env


@pytest.fixture(autouse=True)
def connects(monkeypatch) -> list:
    """Every IP address a socket in this process connects to, for every test.

    (asyncio's sock_connect calls socket.connect.)
    Anything but loopback is refused here, never attempted: a broken guard then fails a test
    instead of reaching whatever answers on 10.x or 169.254.169.254 where the tests run.
    """
    seen = []
    real = socket.socket.connect

    def spy(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            seen.append(address[0])
            if not ipaddress.ip_address(address[0]).is_loopback:
                raise ConnectionRefusedError(errno.ECONNREFUSED, f"test refuses {address[0]}")
        return real(sock, address)

    monkeypatch.setattr(socket.socket, "connect", spy)
    return seen




# Files whose tests take longest (they wait on worker pools, Dagster daemons, a browser).
_LONG = ("tests/scenarios/test_ui.py", "tests/scenarios/test_daemon.py",
         "tests/worker/test_process.py", "tests/scenarios/test_faults.py", "tests/test_run.py",
         "tests/scenarios/test_bucket.py", "tests/test_cli.py", "tests/test_instance.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With N test processes, each starts on its share of the long tests: pytest-xdist's work
    stealing gives process i the i-th of N equal runs of the collection, and steals from their
    ends, so the long tests are dealt to the heads of those runs and the short ones fill up."""
    lanes = config.getoption("numprocesses", default=None)
    if not isinstance(lanes, int) or lanes < 2 or len(items) < lanes:
        return
    rank = {path: i for i, path in enumerate(_LONG)}
    long = sorted((i for i in items if i.nodeid.split("::")[0] in rank),
                  key=lambda i: rank[i.nodeid.split("::")[0]])
    short = [i for i in items if i.nodeid.split("::")[0] not in rank]
    sizes, left = [], len(items)
    for lane in range(lanes):  # the sizes worksteal's first split gives
        sizes.append(left // (lanes - lane))
        left -= sizes[-1]
    heads = [long[lane::lanes] for lane in range(lanes)]
    ordered = []
    for size, head in zip(sizes, heads, strict=True):
        take = max(size - len(head), 0)
        ordered += head + short[:take]
        short = short[take:]
    items[:] = ordered + short
