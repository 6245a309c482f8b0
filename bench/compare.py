"""Our pipeline against img2dataset and a bare aiohttp loop, on one corpus (prints figures).

    python bench/compare.py                      # 20,000 images, 3 alternating rounds
    python bench/compare.py --quick              # smoke run: 2,000 images, 1 round
    python bench/compare.py --modes http,resized --rounds 5 --profile /tmp/prof

Everything is served on loopback by an nginx this script starts itself (Debian's nginx, its own
config in a temporary directory, one worker process, access log off), listening on 127.0.0.2 to
127.0.0.9 in three variants: http with keep-alive, https with keep-alive, and https with
keep-alive off and no TLS session reuse (every image a new TCP connection and a full
handshake, as on the real web). The certificate is self-signed (RSA 2048) for the addresses
and img1.test ... img8.test; every client trusts exactly that certificate: our workers and
img2dataset through SSL_CERT_FILE (both build their SSL context with
ssl.create_default_context(), which reads it), the bare loop through cafile=.

The corpus is deterministic and LAION-like: a pool of distinct images from
laion_dagster.demo.dataset.make_images (10-300 KB, mean about 60 KB, mostly JPEG, some PNG and
WebP, varied dimensions), each URL a distinct file name (hard links into the pool), spread
evenly over the eight addresses. Every tool gets the same URL list, with IP addresses in it
(no tool resolves anything; ours also has host_map set, so a name could not reach DNS). One
parquet part with URL and TEXT columns per transport; the bare loop reads the same URLs as text.

Tools: ours (the worker pool on an enqueued part: the workers' rate, start-up apart), run
(`laion-dagster run` with its defaults on the same rows cut in four parts, from launch to exit:
what a user times; https-newconn only), img2dataset, bare.

Modes:
  http           raw bytes over http (keep-alive where the client does it); img2dataset with
                 disable_all_reencoding=True, resize_mode=no
  https          raw bytes over https with keep-alive (informational, no target)
  https-newconn  raw bytes over https, keep-alive off on the server
  resized        over http, resize_mode keep_ratio, image_size 256, encode_format jpg
                 (ours: LAION_RESIZE_MODE=keep_ratio, LAION_IMAGE_SIZE=256); the bare loop does
                 not resize, so ours/bare there is against the bare http download

Every round runs each mode's tools in a rotated order; figures are medians over rounds. Times
are cold, from launching the tool to its last image on disk (ours: pool start, enqueue,
every shard done; img2dataset and the bare loop: process start to exit). "warm" excludes
process start-up for ours (the pool is up and idle when the enqueue starts) and the bare loop.
Client CPU is user+sys of the tool's whole process tree (getrusage of reaped children; ours
also counts the enqueue, run in this process); server CPU is nginx's. Ours also reports Redis
commands per image (INFO commandstats, this script's own polling subtracted; calls made inside
Lua scripts count) and peak Redis memory (a fresh embedded Redis per run).

Prints a table, the ratios and each target with PASS/FAIL; exits 1 when a target fails or a run
is incomplete. Nothing but loopback is ever contacted; no name is resolved; the machine's Redis
is not used (each run of ours starts the project's embedded server in a temporary directory).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import ipaddress
import json
import os
import random
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import measure  # bench/, beside this script
from measure import Sampler, children_cpu, process_kind
from targets import Targets

# Before anything that could import albumentations, and for every process started from here.
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "*"
for _name in [n for n in os.environ
              if n.startswith("LAION_") or n.lower() in ("http_proxy", "https_proxy",
                                                         "all_proxy")]:
    del os.environ[_name]

REPO = Path(__file__).resolve().parent.parent
I2D_VENV = Path("/work/i2d-venv")
HOSTS = 8
ADDRESSES = [f"127.0.0.{i + 2}" for i in range(HOSTS)]
HOST_MAP = {f"img{i + 1}.test": address for i, address in enumerate(ADDRESSES)}
ALL_MODES = ("http", "https", "https-newconn", "resized")
DEFAULT_MODES = ("http", "https-newconn", "resized")
TOOLS = ("ours", "run", "img2dataset", "bare")
END_TO_END_PARTS = 4
IMAGE_EXTS = {"jpg", "jpeg", "png", "webp", "gif", "bmp", "tiff", "avif", "heic", "ico"}
SUBSET = "bench"
PART_FILE = "part-00000-compare-c000.snappy.parquet"


@dataclass(frozen=True)
class Mode:
    name: str
    transport: str  # http, https, https-noka
    resize: bool


MODES = {
    "http": Mode("http", "http", False),
    "https": Mode("https", "https", False),
    "https-newconn": Mode("https-newconn", "https-noka", False),
    "resized": Mode("resized", "http", True),
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------- the bare loop (a child)

def bare_worker(args: argparse.Namespace) -> int:
    """One process of the bare loop: its share of the URLs, `concurrency` fetches at a time,
    one SSL context, each body written to its own file. Waits for 'go' on stdin after
    start-up, so the parent can time start-up and work apart."""
    import asyncio

    import aiohttp
    from aiohttp.abc import AbstractResolver

    class NoResolver(AbstractResolver):  # IP URLs only: a name must never reach DNS
        async def resolve(self, host, port=0, family=socket.AF_INET):
            raise OSError(f"bare loop: refusing to resolve {host!r}")

        async def close(self):
            return None

    urls = Path(args.urls).read_text().split()[args.index::args.nproc]
    out = Path(args.out) / f"p{args.index}"
    out.mkdir(parents=True, exist_ok=True)
    context = ssl.create_default_context(cafile=args.cafile)
    counts: Counter[str] = Counter()
    total = [0]

    async def run() -> None:
        connector = aiohttp.TCPConnector(limit=args.concurrency, ssl=context,
                                         resolver=NoResolver())
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            todo = iter(urls)

            async def fetcher() -> None:
                for url in todo:
                    try:
                        async with session.get(url) as response:
                            body = await response.read()
                            if response.status != 200:
                                counts[f"http {response.status}"] += 1
                                continue
                        with open(out / url.rsplit("/", 1)[1], "wb") as handle:
                            handle.write(body)
                        counts["ok"] += 1
                        total[0] += len(body)
                    except Exception as error:  # counted, never fatal
                        counts[type(error).__name__] += 1

            print("ready", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            await asyncio.gather(*(fetcher() for _ in range(args.concurrency)))

    runner = asyncio.run
    if args.loop == "uvloop":
        import uvloop

        runner = uvloop.run
    runner(run())
    ok = counts.pop("ok", 0)
    print(json.dumps({"ok": ok, "failed": sum(counts.values()), "bytes": total[0],
                      "errors": dict(counts)}), flush=True)
    return 0


# ---------------------------------------------------------------- processes we own

class Owned(measure.Owned):
    """measure.Owned, and the embedded Redis servers started for our runs."""

    def __init__(self) -> None:
        super().__init__()
        # Each embedded Redis started, by directory, with its pid in case the directory is
        # gone before the cleanup.
        self.redis_servers: dict[Path, int] = {}

    def redis(self, directory: Path):
        """The embedded Redis for `directory`, started and remembered for the cleanup."""
        from laion_dagster.core.queue import embedded

        state = embedded.ensure_running(directory)
        self.redis_servers[directory] = state.pid
        return state

    def stop_redis(self, directory: Path) -> None:
        stop_redis(directory, self.redis_servers.pop(directory, None))

    def stop_all(self) -> None:
        super().stop_all()
        for directory in list(self.redis_servers):
            self.stop_redis(directory)


def stop_redis(directory: Path, pid: int | None = None) -> None:
    """Stop the embedded Redis of `directory`; `pid` is the one we started, for when its state
    file is gone. Only a server we started and have not stopped yet is ever signalled."""
    from laion_dagster.core.queue import embedded

    state = embedded.read_state(directory)
    if state is not None:
        embedded.stop(directory)
        pid = state.pid
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)  # a no-op unless SIGTERM was not enough
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def child_env(cert: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["SSL_CERT_FILE"] = str(cert)
    env.pop("SSL_CERT_DIR", None)
    env["NO_ALBUMENTATIONS_UPDATE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


# ---------------------------------------------------------------- corpus

@dataclass
class Corpus:
    www: Path
    files: list[str]  # per row: file name under /i/
    hosts: list[int]  # per row: index into ADDRESSES
    captions: list[str]
    sizes: list[int]  # per row: body bytes
    pool_sizes: list[int]
    pool_types: Counter

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes)


def build_corpus(root: Path, images: int, pool_size: int, seed: int) -> Corpus:
    from laion_dagster.demo.dataset import make_images

    candidates = make_images(int(pool_size * 1.3) + 10, seed=seed, min_side=90, max_side=620)
    pool = [image for image in candidates if 10_000 <= len(image.body) <= 300_000][:pool_size]
    www = root / "www"
    (www / "pool").mkdir(parents=True)
    (www / "i").mkdir()
    names = []
    for index, image in enumerate(pool):
        ext = Path(image.path).suffix  # about one in ten has none, as on many CDNs
        name = f"{index:04d}{ext}"
        (www / "pool" / name).write_bytes(image.body)
        names.append((name, ext, len(image.body)))
    rnd = random.Random(f"compare:{seed}")
    words = ("photo", "vintage", "red", "dress", "summer", "beach", "house", "modern",
             "kitchen", "design", "cat", "dog", "wedding", "cake", "garden", "flower", "black",
             "white", "shoes", "car", "sale", "mountain", "lake", "sunset", "city", "art",
             "print", "poster", "wall", "decor", "logo", "icon", "stock", "image", "hd")
    files, hosts, captions, sizes = [], [], [], []
    for row in range(images):
        name, ext, size = names[rnd.randrange(len(names))]
        file = f"{row:07d}{ext}"
        os.link(www / "pool" / name, www / "i" / file)
        files.append(file)
        hosts.append(row % HOSTS if rnd.random() < 0.5 else rnd.randrange(HOSTS))
        captions.append(" ".join(rnd.choices(words, k=rnd.randint(2, 14))))
        sizes.append(size)
    types = Counter(image.content_type for image in pool)
    return Corpus(www, files, hosts, captions, sizes, [n[2] for n in names], types)


def write_lists(root: Path, corpus: Corpus, ports: dict[str, int]) -> dict[str, Path]:
    """Per transport: a parquet part (for ours and img2dataset) and a text list (bare)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lists: dict[str, Path] = {}
    for transport, port in ports.items():
        scheme = "http" if transport == "http" else "https"
        urls = [f"{scheme}://{ADDRESSES[h]}:{port}/i/{f}"
                for h, f in zip(corpus.hosts, corpus.files, strict=True)]
        for url in urls:  # no tool may ever need a resolver
            assert ipaddress.ip_address(urlsplit(url).hostname).is_loopback, url
        folder = root / "lists" / transport / SUBSET
        folder.mkdir(parents=True)
        pq.write_table(pa.table({"URL": urls, "TEXT": corpus.captions}), folder / PART_FILE,
                       compression="snappy")
        (root / "lists" / f"{transport}.txt").write_text("\n".join(urls) + "\n")
        lists[transport] = root / "lists" / transport
        # The same rows as END_TO_END_PARTS parts, for `laion-dagster run` end to end.
        folder = root / "lists" / f"{transport}-parts" / SUBSET
        folder.mkdir(parents=True)
        size = -(-len(urls) // END_TO_END_PARTS)
        for index in range(END_TO_END_PARTS):
            rows = slice(index * size, (index + 1) * size)
            pq.write_table(pa.table({"URL": urls[rows], "TEXT": corpus.captions[rows]}),
                           folder / f"part-{index:05d}-compare-c000.snappy.parquet",
                           compression="snappy")
        lists[f"{transport}-parts"] = root / "lists" / f"{transport}-parts"
    return lists


# ---------------------------------------------------------------- nginx

SYSTEM_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def make_cert(root: Path) -> tuple[Path, Path]:
    """A self-signed certificate, and the CA file every client trusts: the system's whole CA
    bundle with our certificate appended. A file with our certificate alone would make each
    `ssl.create_default_context()` nearly free and hide the cost that clients building one
    context per connection (urllib in img2dataset, requests) pay on the real web."""
    cert, key = root / "cert.pem", root / "key.pem"
    names = ",".join([f"DNS:{h}" for h in HOST_MAP] + [f"IP:{a}" for a in ADDRESSES])
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(root / "server.pem"), "-days", "2",
                    "-subj", "/CN=img1.test", "-addext", f"subjectAltName={names}"],
                   check=True, capture_output=True)
    system = SYSTEM_CA_BUNDLE.read_text() if SYSTEM_CA_BUNDLE.exists() else ""
    if not system:
        log(f"warning: no {SYSTEM_CA_BUNDLE}; clients trust the test certificate alone, which "
            "understates the cost of building an SSL context per connection")
    cert.write_text(system + (root / "server.pem").read_text())
    return cert, key


def free_ports(count: int) -> list[int]:
    """Ports free on every one of our addresses."""
    found: list[int] = []
    while len(found) < count:
        with socket.socket() as probe:
            probe.bind((ADDRESSES[0], 0))
            port = probe.getsockname()[1]
        if port in found:
            continue
        ok = True
        for address in ADDRESSES:
            with socket.socket() as sock:
                try:
                    sock.bind((address, port))
                except OSError:
                    ok = False
                    break
        if ok:
            found.append(port)
    return found


class Nginx:
    def __init__(self, owned: Owned, root: Path, www: Path, cert: Path, key: Path,
                 ports: dict[str, int]):
        self.owned = owned
        self.prefix = root / "nginx"
        self.ports = ports
        for sub in ("tmp/body", "tmp/proxy", "tmp/fastcgi", "tmp/uwsgi", "tmp/scgi"):
            (self.prefix / sub).mkdir(parents=True, exist_ok=True)
        self.conf = self.prefix / "nginx.conf"
        self.conf.write_text(self._config(www, cert, key))
        self.proc: subprocess.Popen | None = None

    def _config(self, www: Path, cert: Path, key: Path) -> str:
        p = self.prefix

        def listen(port: int, tls: bool) -> str:
            return "\n".join(f"        listen {a}:{port}{' ssl' if tls else ''};"
                             for a in ADDRESSES)

        server = (f"        root {www};\n"
                  f"        location / {{ }}\n")
        user = "user root;\n" if os.geteuid() == 0 else ""
        return f"""{user}worker_processes 1;
worker_rlimit_nofile 65536;
pid {p}/nginx.pid;
error_log {p}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 65;
    keepalive_requests 1000000;
    types {{ image/jpeg jpg jpeg; image/png png; image/webp webp; }}
    default_type application/octet-stream;
    client_body_temp_path {p}/tmp/body;
    proxy_temp_path {p}/tmp/proxy;
    fastcgi_temp_path {p}/tmp/fastcgi;
    uwsgi_temp_path {p}/tmp/uwsgi;
    scgi_temp_path {p}/tmp/scgi;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_session_cache off;
    ssl_session_tickets off;
    server {{
{listen(self.ports["http"], False)}
{server}    }}
    server {{
{listen(self.ports["https"], True)}
{server}    }}
    server {{
{listen(self.ports["https-noka"], True)}
        keepalive_timeout 0;
{server}    }}
}}
"""

    def start(self) -> None:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        with open(self.prefix / "stdout.log", "ab") as out:
            self.proc = self.owned.popen(
                [nginx, "-p", str(self.prefix), "-c", str(self.conf), "-e",
                 str(self.prefix / "error.log"), "-g", "daemon off;"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        for address in ADDRESSES:
            for port in self.ports.values():
                while True:
                    if self.proc.poll() is not None:
                        raise RuntimeError("nginx exited: "
                                           + (self.prefix / "error.log").read_text()[-2000:])
                    try:
                        socket.create_connection((address, port), timeout=1).close()
                        break
                    except OSError:
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"nginx not listening on {address}:{port}") from None
                        time.sleep(0.05)

    def log_size(self) -> int:
        with contextlib.suppress(OSError):
            return (self.prefix / "error.log").stat().st_size
        return 0

    def errors_since(self, offset: int) -> list[str]:
        """Lines nginx logged at error level or worse since `offset` (a run's start)."""
        try:
            with open(self.prefix / "error.log", "rb") as handle:
                handle.seek(offset)
                text = handle.read().decode(errors="replace")
        except OSError:
            return []
        return [line for line in text.splitlines()
                if any(f"[{level}]" in line for level in ("error", "crit", "alert", "emerg"))]

    def cpu(self) -> float:
        import psutil

        if self.proc is None:
            return 0.0
        total = 0.0
        with contextlib.suppress(psutil.Error):
            master = psutil.Process(self.proc.pid)
            for proc in [master, *master.children()]:
                with contextlib.suppress(psutil.Error):
                    times = proc.cpu_times()
                    total += times.user + times.system
        return total

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        if self.proc is not None:
            self.owned.forget(self.proc)


def check_served(lists: dict[str, Path], corpus: Corpus, cert: Path) -> None:
    """One URL of every transport and address, fetched and compared byte for byte."""
    import http.client

    context = ssl.create_default_context(cafile=str(cert))
    for transport, folder in lists.items():
        if transport.endswith("-parts"):
            continue  # the same URLs, cut in parts
        urls = (folder.parent / f"{transport}.txt").read_text().split()
        seen = set()
        for row, url in enumerate(urls):
            split = urlsplit(url)
            if split.hostname in seen:
                continue
            seen.add(split.hostname)
            if split.scheme == "https":
                conn = http.client.HTTPSConnection(split.hostname, split.port, timeout=5,
                                                   context=context)
            else:
                conn = http.client.HTTPConnection(split.hostname, split.port, timeout=5)
            conn.request("GET", split.path)
            response = conn.getresponse()
            body = response.read()
            conn.close()
            assert response.status == 200 and len(body) == corpus.sizes[row], \
                (url, response.status, len(body))
        assert len(seen) == HOSTS, f"{transport}: URLs reach only {len(seen)} addresses"


# ---------------------------------------------------------------- one run of one tool

@dataclass
class Result:
    tool: str
    mode: str
    round: int
    urls: int
    ok: int = 0
    failed: int = 0
    failures: Counter = field(default_factory=Counter)
    seconds: float = 0.0  # cold: launch to last image
    warm: float | None = None  # without process start-up
    startup: float | None = None
    client_cpu: float = 0.0
    server_cpu: float = 0.0
    peak_proc: int = 0  # largest process RSS (ours: largest worker process)
    peak_tree: int = 0
    peak_other: int = 0  # ours: the supervisor
    idle_proc: int = 0  # ours: largest worker process when the pool is up, before any work
    on_disk: int = 0  # images found in the outputs
    bytes_on_disk: int = 0
    bytes_expected: int | None = None
    redis_calls: float | None = None  # commandstats calls (incl. inside Lua), ours only
    redis_top: float | None = None  # total_commands_processed
    redis_breakdown: Counter = field(default_factory=Counter)
    redis_peak: int | None = None
    redis_cpu: float | None = None
    cpu_kinds: Counter = field(default_factory=Counter)  # run: CPU seconds by process kind
    error: str | None = None

    @property
    def rate(self) -> float:
        return self.urls / self.seconds if self.seconds else 0.0

    @property
    def warm_rate(self) -> float | None:
        return self.urls / self.warm if self.warm else None

    @property
    def complete(self) -> bool:
        good = self.ok == self.urls and self.on_disk == self.urls and self.error is None
        if self.bytes_expected is not None:
            good = good and self.bytes_on_disk == self.bytes_expected
        return good


def count_tars(folder: Path) -> tuple[int, int]:
    images = size = 0
    for path in sorted(folder.rglob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar:
                if member.isfile() and member.name.rsplit(".", 1)[-1].lower() in IMAGE_EXTS:
                    images += 1
                    size += member.size
    return images, size


class Bench:
    def __init__(self, args: argparse.Namespace, owned: Owned, root: Path, corpus: Corpus,
                 lists: dict[str, Path], cert: Path, nginx: Nginx):
        self.args = args
        self.owned = owned
        self.root = root
        self.corpus = corpus
        self.lists = lists
        self.cert = cert
        self.nginx = nginx
        self.env = child_env(cert)
        self.runs = 0

    def run(self, tool: str, mode: Mode, round_: int, profile: Path | None = None) -> Result:
        self.runs += 1
        run_dir = self.root / "runs" / f"{self.runs:03d}-{tool}-{mode.name}"
        run_dir.mkdir(parents=True)
        result = Result(tool, mode.name, round_, len(self.corpus.files))
        if not mode.resize:
            result.bytes_expected = self.corpus.total_bytes
        offset = self.nginx.log_size()
        try:
            getattr(self, f"_run_{tool.replace('2', '_to_')}")(mode, run_dir, result, profile)
            server_errors = self.nginx.errors_since(offset)
            if server_errors:
                raise RuntimeError(f"nginx logged {len(server_errors)} errors, first: "
                                   f"{server_errors[0]}")
        except Exception as error:  # one failed run is reported, the benchmark goes on
            result.error = f"{type(error).__name__}: {error}"
            log(f"  {tool} {mode.name} FAILED: {result.error} (logs in {run_dir})")
            self.args.keep = True
        finally:
            # Stop this run's Redis before its directory (and server.json) goes.
            for directory in [d for d in self.owned.redis_servers if run_dir in d.parents]:
                self.owned.stop_redis(directory)
            if not self.args.keep:
                shutil.rmtree(run_dir, ignore_errors=True)
        return result

    # -- ours
    def _run_ours(self, mode: Mode, run_dir: Path, result: Result, profile: Path | None):
        import redis

        from laion_dagster.core.control.enqueue import enqueue_part
        from laion_dagster.core.input import parts
        from laion_dagster.core.queue.connection import connect
        from laion_dagster.core.queue.protocol import GROUP, Keys, Queue
        from laion_dagster.core.settings import Settings

        a = self.args
        redis_dir = run_dir / "redis"
        state = self.owned.redis(redis_dir)
        resize = ({"resize_mode": "keep_ratio", "image_size": 256, "encode_format": "jpg"}
                  if mode.resize else {"resize_mode": "no"})
        settings = Settings(
            data_dir=run_dir, parquet_dir=self.lists[mode.transport],
            store_dir=run_dir / "store", redis_url=state.url, prefix="cmp",
            shard_size=a.shard_size, processes=a.processes, concurrency=a.concurrency,
            allow_private_addresses=True, host_map=HOST_MAP, shutdown_grace=5.0,
            disk_min_free_gb=0.5, output_format="webdataset", **resize)
        part = parts.discover(settings.parts_root)[0]
        keys = Keys(settings.prefix)
        watch = redis.Redis.from_url(state.url)
        mine: Counter[str] = Counter()
        queue = Queue(connect(settings, name="compare-enqueue"), settings.prefix)
        try:
            stats0 = watch.info("commandstats")
            total0 = int(watch.info("stats")["total_commands_processed"])
            mine["info"] += 2
            cpu0 = watch.info("cpu")
            mine["info"] += 1
            env = {**self.env, **settings.to_env()}
            ru0, srv0 = children_cpu(), self.nginx.cpu()
            launched = time.perf_counter()
            with open(run_dir / "worker.log", "ab") as out:
                proc = self.owned.popen([sys.executable, "-m", "laion_dagster.cli", "worker"],
                                        cwd=REPO, env=env, stdout=out,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            sampler = Sampler(lambda: [proc.pid]).start()
            deadline = time.monotonic() + 120
            while True:  # ready: every process has asked the queue for work
                with contextlib.suppress(redis.ResponseError):
                    mine["xinfo|consumers"] += 1
                    if len(watch.xinfo_consumers(keys.tasks, GROUP)) >= a.processes:
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the pool did not start (exit {proc.poll()})")
                time.sleep(0.02)
            ready = time.perf_counter()
            sampler.take()
            result.idle_proc = sampler.peak_of("child")
            spies = self._profile(profile, sampler, proc.pid, mode) if profile else []
            thread0 = time.thread_time()
            enqueue_part(queue, part, settings)
            enqueue_cpu = time.thread_time() - thread0
            deadline = time.monotonic() + a.run_timeout
            progress, moved = None, time.monotonic()
            while True:
                mine["hmget"] += 1
                done_at, ok, failed = watch.hmget(keys.part(part.key),
                                                  ["done_at", "ok", "failed"])
                if done_at is not None:
                    break
                if (ok, failed) != progress:
                    progress, moved = (ok, failed), time.monotonic()
                if proc.poll() is not None:
                    raise RuntimeError(f"the pool exited with {proc.returncode}")
                if time.monotonic() - moved > a.stall_timeout:
                    self._dump(sampler, run_dir)
                    raise RuntimeError(f"no shard completed for {a.stall_timeout:g}s "
                                       f"(ok {ok}, failed {failed}); py-spy dumps in "
                                       f"{run_dir}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"not done within {a.run_timeout:g}s")
                time.sleep(0.02)
            done = time.perf_counter()
            srv1 = self.nginx.cpu()
            stats1 = watch.info("commandstats")
            total1 = int(watch.info("stats")["total_commands_processed"])
            cpu1 = watch.info("cpu")
            memory = watch.info("memory")
            sampler.take()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
            self.owned.forget(proc)
            sampler.stop()
            for spy in spies:
                spy.wait(timeout=60)
                self.owned.forget(spy)
            ru1 = children_cpu()
        finally:
            watch.close()
        result.seconds = done - launched
        result.warm = done - ready
        result.startup = ready - launched
        result.client_cpu = max(ru1 - ru0, sum(sampler.cpu.values())) + enqueue_cpu
        result.server_cpu = srv1 - srv0
        result.peak_proc = sampler.peak_of("child")
        result.peak_other = sampler.peak_of("root")
        result.peak_tree = sampler.peak_tree
        calls = Counter()
        for name, entry in stats1.items():
            before = stats0.get(name, {}).get("calls", 0)
            calls[name.removeprefix("cmdstat_")] = entry["calls"] - before
        for name, n in mine.items():
            calls[name] -= n
        calls = Counter({k: v for k, v in calls.items() if v > 0 and k != "info"})
        result.redis_breakdown = calls
        result.redis_calls = sum(calls.values()) / result.urls
        result.redis_top = (total1 - total0 - sum(mine.values()) - 3) / result.urls
        result.redis_peak = int(memory["used_memory_peak"])
        result.redis_cpu = sum(float(cpu1[k]) - float(cpu0[k])
                               for k in ("used_cpu_user", "used_cpu_sys"))
        state_ = queue.part(part.key)
        result.ok, result.failed = state_.ok, state_.failed + state_.invalid
        result.failures = Counter(queue.classes(part.key))
        queue.r.close()
        result.on_disk, result.bytes_on_disk = count_tars(settings.store_root)

    def _dump(self, sampler: Sampler, run_dir: Path) -> None:
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        for pid in sampler.role:
            with open(run_dir / f"py-spy-dump-{pid}.txt", "wb") as out:
                subprocess.run([spy, "dump", "--pid", str(pid)], stdout=out,
                               stderr=subprocess.STDOUT, timeout=30, check=False)

    def _profile(self, profile: Path, sampler: Sampler, root: int, mode: Mode):
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        sampler.take()
        spies = []
        profile.mkdir(parents=True, exist_ok=True)
        for pid, role in sampler.role.items():
            if role == "child" and pid != root:
                out = profile / f"ours-{mode.name}-{pid}.txt"
                spies.append(self.owned.popen(
                    [spy, "record", "--pid", str(pid), "--rate", "200", "--format", "raw",
                     "--nonblocking", "--subprocesses", "-o", str(out)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1.0)  # py-spy attaches
        return spies

    # -- ours end to end: `laion-dagster run` with its defaults, from Enter to exit
    def _launch(self, command: list[str], run_dir: Path, env: dict[str, str], log: Path,
                result: Result, name: str) -> Sampler:
        """Run one tool's command to its end, timed and sampled: wall time, client CPU (the
        tree's, sampled, or its waited-for children's, whichever saw more), server CPU."""
        ru0, srv0 = children_cpu(), self.nginx.cpu()
        launched = time.perf_counter()
        with open(log, "ab") as out:
            proc = self.owned.popen(command, cwd=run_dir, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        sampler = Sampler(lambda: [proc.pid]).start()
        try:
            code = proc.wait(timeout=self.args.run_timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise RuntimeError(f"not done within {self.args.run_timeout:g}s") from None
        finally:
            self.owned.forget(proc)
            sampler.stop()
        done = time.perf_counter()
        srv1, ru1 = self.nginx.cpu(), children_cpu()
        if code != 0:
            raise RuntimeError(f"{name} exited with {code}; see {log}")
        result.seconds = done - launched
        result.client_cpu = max(ru1 - ru0, sum(sampler.cpu.values()))
        result.server_cpu = srv1 - srv0
        return sampler

    def _run_run(self, mode: Mode, run_dir: Path, result: Result, _profile):
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        store = run_dir / "store"
        command = [str(Path(sys.executable).with_name("laion-dagster")), "run",
                   "--parquet-dir", str(self.lists[f"{mode.transport}-parts"]),
                   "--store-dir", str(store), "--data-dir", str(run_dir / "data")]
        env = {k: v for k, v in self.env.items()
               if not k.startswith("LAION_") and k != "DAGSTER_HOME"}
        env["LAION_ALLOWED_NETWORKS"] = json.dumps(["127.0.0.0/8"])  # the IP-literal URLs
        if mode.resize:
            env.update(LAION_RESIZE_MODE="keep_ratio", LAION_IMAGE_SIZE="256",
                       LAION_ENCODE_FORMAT="jpg")
        sampler = self._launch(command, run_dir, env, run_dir / "run.log", result,
                               "laion-dagster run")
        first = re.search(r"first image stored ([\d.]+)s", (run_dir / "run.log").read_text())
        result.startup = float(first.group(1)) if first else None
        result.peak_proc = sampler.peak_of("child")
        result.peak_tree = sampler.peak_tree
        for pid, cpu in sampler.cpu.items():
            line = sampler.cmdline.get(pid, "")
            result.cpu_kinds["workers" if "spawn_main" in line else process_kind(line)] += cpu
        for path in sorted(store.rglob("[0-9]*.parquet")):
            if "_errors" in path.parts:
                continue  # the parts' error files
            status = pq.read_table(path, columns=["status", "error_class"])
            ok = pc.sum(pc.equal(status.column("status"), "success")).as_py() or 0
            result.ok += ok
            result.failed += status.num_rows - ok
            result.failures.update(c for c in status.column("error_class").to_pylist() if c)
        result.on_disk, result.bytes_on_disk = count_tars(store)

    # -- img2dataset
    def _run_img_to_dataset(self, mode: Mode, run_dir: Path, result: Result, _profile):
        a = self.args
        out = run_dir / "out"
        parquet = self.lists[mode.transport] / SUBSET / PART_FILE
        command = [str(I2D_VENV / "bin" / "img2dataset"), "--url_list", str(parquet),
                   "--input_format", "parquet", "--url_col", "URL", "--caption_col", "TEXT",
                   "--output_format", "webdataset", "--output_folder", str(out),
                   "--processes_count", str(a.processes), "--thread_count",
                   str(a.concurrency), "--number_sample_per_shard", str(a.shard_size),
                   "--timeout", "10", "--retries", "0", "--extract_exif", "False",
                   "--compute_hash", "sha256", "--enable_wandb", "False"]
        if mode.resize:
            command += ["--resize_mode", "keep_ratio", "--image_size", "256",
                        "--encode_format", "jpg", "--encode_quality", "95"]
        else:
            command += ["--resize_mode", "no", "--disable_all_reencoding", "True"]
        # self.env has NO_ALBUMENTATIONS_UPDATE=1 among the rest
        sampler = self._launch(command, run_dir, self.env, run_dir / "img2dataset.log",
                               result, "img2dataset")
        result.peak_proc = sampler.peak_of()
        result.peak_tree = sampler.peak_tree
        for path in sorted(out.glob("*_stats.json")):
            stats = json.loads(path.read_text())
            result.ok += stats["successes"]
            result.failed += stats["failed_to_download"] + stats["failed_to_resize"]
            result.failures.update({k: v for k, v in stats.get("status_dict", {}).items()
                                    if k != "success"})
        result.on_disk, result.bytes_on_disk = count_tars(out)

    # -- the bare loop
    def _run_bare(self, mode: Mode, run_dir: Path, result: Result, _profile):
        a = self.args
        urls = self.lists[mode.transport].parent / f"{mode.transport}.txt"
        out = run_dir / "out"
        ru0, srv0 = children_cpu(), self.nginx.cpu()
        launched = time.perf_counter()
        procs = []
        with open(run_dir / "bare.log", "ab") as log_file:
            for index in range(a.processes):
                procs.append(self.owned.popen(
                    [sys.executable, __file__, "--bare-worker", "--urls", str(urls), "--out",
                     str(out), "--index", str(index), "--nproc", str(a.processes),
                     "--cafile", str(self.cert), "--concurrency", str(a.concurrency),
                     "--loop", a.bare_loop],
                    env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=log_file))
        sampler = Sampler(lambda: [p.pid for p in procs]).start()
        try:
            for proc in procs:
                line = proc.stdout.readline()
                if line.strip() != b"ready":
                    raise RuntimeError(f"bare worker did not start: {line!r}")
            ready = time.perf_counter()
            for proc in procs:
                proc.stdin.write(b"go\n")
                proc.stdin.flush()
            replies = []
            for proc in procs:
                replies.append(json.loads(proc.stdout.read().decode().strip().splitlines()[-1]))
                proc.wait(timeout=a.run_timeout)
            done = time.perf_counter()
        finally:
            for proc in procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                self.owned.forget(proc)
            sampler.stop()
        srv1, ru1 = self.nginx.cpu(), children_cpu()
        result.seconds = done - launched
        result.warm = done - ready
        result.startup = ready - launched
        result.client_cpu = max(ru1 - ru0, sum(sampler.cpu.values()))
        result.server_cpu = srv1 - srv0
        result.peak_proc = sampler.peak_of()
        result.peak_tree = sampler.peak_tree
        for reply in replies:
            result.ok += reply["ok"]
            result.failed += reply["failed"]
            result.failures.update(reply["errors"])
        files = [p for p in out.rglob("*") if p.is_file()]
        result.on_disk = len(files)
        result.bytes_on_disk = sum(p.stat().st_size for p in files)


# ---------------------------------------------------------------- enqueue

def enqueue_bench(owned: Owned, root: Path, rows: int, rounds: int) -> dict:
    """bench/enqueue.py's part and measurement, into a fresh embedded Redis; median rows/s."""
    from laion_dagster.core.control.enqueue import enqueue_part
    from laion_dagster.core.input import parts
    from laion_dagster.core.queue.connection import connect
    from laion_dagster.core.queue.protocol import Queue
    from laion_dagster.core.settings import Settings

    spec = importlib.util.spec_from_file_location("bench_enqueue", REPO / "bench" / "enqueue.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    base = root / "enqueue"
    folder = base / "parquet" / "laion2B-en"
    folder.mkdir(parents=True)
    started = time.perf_counter()
    module.make_part(folder / "part-00000-bench-c000.snappy.parquet", rows)
    log(f"enqueue: wrote a {rows:,}-row part in {time.perf_counter() - started:.1f}s")
    redis_dir = base / "redis"
    state = owned.redis(redis_dir)
    rates, commands, memory = [], [], []
    try:
        for index in range(rounds):
            settings = Settings(data_dir=base, redis_url=state.url, shard_size=10_000,
                                queue_high_watermark=rows * 2, prefix=f"enq{index}")
            client = connect(settings, name="compare-enqueue")
            client.flushall()
            client.config_resetstat()
            used = int(client.info("memory")["used_memory"])
            part = parts.discover(settings.parts_root)[0]
            started = time.perf_counter()
            report = enqueue_part(Queue(client, settings.prefix), part, settings)
            elapsed = time.perf_counter() - started
            stats = client.info("stats")
            memory.append(int(client.info("memory")["used_memory"]) - used)
            commands.append(int(stats["total_commands_processed"]) / report.rows)
            rates.append(report.rows / elapsed)
            log(f"enqueue round {index + 1}: {report.rows:,} rows in {elapsed:.2f}s = "
                f"{rates[-1]:,.0f} rows/s")
            client.flushall()
            client.close()
    finally:
        owned.stop_redis(redis_dir)
        shutil.rmtree(base, ignore_errors=True)
    return {"rows": rows, "rate": statistics.median(rates), "rates": rates,
            "commands": statistics.median(commands), "memory": statistics.median(memory)}


# ---------------------------------------------------------------- the report

def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, spec: str = ",.0f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def summarize(results: list[Result]) -> dict[tuple[str, str], dict]:
    groups: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        groups.setdefault((r.mode, r.tool), []).append(r)
    summary = {}
    for key, runs in groups.items():
        good = [r for r in runs if r.error is None]
        summary[key] = {
            "runs": runs,
            "rate": median([r.rate for r in good]),
            "rates": [r.rate for r in good],
            "warm": median([r.warm_rate for r in good]),
            "startup": median([r.startup for r in good]),
            "cpu": median([r.client_cpu * 1000 / r.urls for r in good]),
            "server": median([r.server_cpu * 1000 / r.urls for r in good]),
            "server_core": median([r.server_cpu / r.seconds for r in good if r.seconds]),
            "peak_proc": max((r.peak_proc for r in runs), default=0),
            "peak_tree": max((r.peak_tree for r in runs), default=0),
            "peak_other": max((r.peak_other for r in runs), default=0),
            "idle_proc": max((r.idle_proc for r in runs), default=0),
            "complete": all(r.complete for r in runs),
            "ok": [r.ok for r in runs],
            "failures": sum((r.failures for r in runs), Counter()),
            "errors": [r.error for r in runs if r.error],
            "redis_calls": median([r.redis_calls for r in good]),
            "redis_calls_max": max((r.redis_calls for r in good if r.redis_calls is not None),
                                   default=None),
            "redis_top": median([r.redis_top for r in good]),
            "redis_peak": max((r.redis_peak for r in good if r.redis_peak), default=None),
            "redis_cpu": median([r.redis_cpu * 1000 / r.urls for r in good
                                 if r.redis_cpu is not None]),
            # Commands per run, averaged over the good runs.
            "redis_breakdown": Counter({k: v / len(good) for k, v in
                                        sum((r.redis_breakdown for r in good),
                                            Counter()).items()}) if good else Counter(),
            # CPU ms per image by process kind, over the good runs (run only).
            "cpu_kinds": Counter({k: v * 1000 / sum(r.urls for r in good) for k, v in
                                  sum((r.cpu_kinds for r in good), Counter()).items()}),
        }
    return summary


def write_json(path: Path, summary: dict[tuple[str, str], dict]) -> None:
    """The medians per mode and tool, for another script (bench/field.py's loopback run)."""
    keys = ("rate", "warm", "startup", "cpu", "server", "peak_proc", "complete", "ok", "errors")
    path.write_text(json.dumps({f"{mode}/{tool}": {k: s[k] for k in keys}
                                for (mode, tool), s in summary.items()}, indent=1))


def report(args, modes: list[Mode], results: list[Result], enqueue: dict | None,
           corpus: Corpus) -> bool:
    summary = summarize(results)
    mb = 1e6
    print()
    print(f"compare: {len(corpus.files):,} URLs per run, {args.rounds} round(s), "
          f"{args.processes} processes x {args.concurrency} concurrent, shard "
          f"{args.shard_size:,}; nginx 1 worker on {HOSTS} loopback addresses; "
          f"{os.cpu_count()} cores; load average now {os.getloadavg()[0]:.2f}")
    from laion_dagster.core.images.checks import pillow_build

    print(f"ours: {sys.executable} with {pillow_build()}")
    header = (f"{'mode':<14}{'tool':<12}{'img/s':>8}{'(min-max)':>16}{'warm':>8}"
              f"{'start s':>8}{'cli ms/img':>11}{'srv ms/img':>11}{'srv core':>9}"
              f"{'RSS/proc MB':>12}{'tree MB':>8}  ok/URLs")
    print("-" * len(header))
    print(header)
    print("-" * len(header))
    for mode in modes:
        for tool in TOOLS:
            s = summary.get((mode.name, tool))
            if s is None:
                continue
            rates = s["rates"]
            spread = f"({min(rates):,.0f}-{max(rates):,.0f})" if rates else "(failed)"
            oks = (f"{s['ok'][0]:,}" if len(set(s["ok"])) == 1
                   else "/".join(f"{o:,}" for o in s["ok"]))
            state = "all" if s["complete"] else "INCOMPLETE"
            print(f"{mode.name:<14}{tool:<12}{fmt(s['rate']):>8}{spread:>16}"
                  f"{fmt(s['warm']):>8}{fmt(s['startup'], '.2f'):>8}{fmt(s['cpu'], '.3f'):>11}"
                  f"{fmt(s['server'], '.3f'):>11}{fmt(s['server_core'], '.0%'):>9}"
                  f"{s['peak_proc'] / mb:>12,.0f}{s['peak_tree'] / mb:>8,.0f}  "
                  f"{oks} of {len(corpus.files):,} x{len(s['ok'])} ({state})")
            if s["failures"] or s["errors"]:
                top = ", ".join(f"{k} {v}" for k, v in s["failures"].most_common(5))
                print(f"{'':<26}failures: {top or '-'}; errors: {'; '.join(s['errors']) or '-'}")
    print("-" * len(header))
    print("img/s: cold (launch to last image), median; warm: without process start-up "
          "(ours: pool up and idle before the enqueue); cli ms/img: user+sys CPU of the tool's "
          "process tree per image (ours incl. the enqueue, excl. Redis); srv: nginx CPU; "
          "RSS/proc: largest process (ours: largest worker process)")
    ours_modes = [m for m in modes if (m.name, "ours") in summary]
    for mode in ours_modes:
        s = summary[(mode.name, "ours")]
        top = ", ".join(f"{k} {v / len(corpus.files):.4f}"
                        for k, v in s["redis_breakdown"].most_common(6))
        print(f"ours {mode.name}: Redis {fmt(s['redis_calls'], '.4f')} commands/image "
              f"(commandstats, max {fmt(s['redis_calls_max'], '.4f')}; "
              f"total_commands_processed {fmt(s['redis_top'], '.4f')}), Redis CPU "
              f"{fmt(s['redis_cpu'], '.3f')} ms/img, peak Redis memory "
              f"{fmt(s['redis_peak'] and s['redis_peak'] / mb, ',.1f')} MB; worker RSS "
              f"{s['idle_proc'] / mb:,.0f} MB idle -> {s['peak_proc'] / mb:,.0f} MB peak, "
              f"supervisor {s['peak_other'] / mb:,.0f} MB; top commands/img: {top}")
    for mode in modes:
        kinds = summary.get((mode.name, "run"), {}).get("cpu_kinds")
        if kinds:
            print(f"run {mode.name}: CPU ms/img by process: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in kinds.most_common()))
    if enqueue:
        print(f"enqueue: {enqueue['rate']:,.0f} rows/s median for a {enqueue['rows']:,}-row "
              f"part (rounds: {', '.join(f'{r:,.0f}' for r in enqueue['rates'])}), "
              f"{enqueue['commands']:.4f} Redis commands/row, "
              f"{enqueue['memory'] / enqueue['rows']:.0f} bytes of Redis memory per row")

    # ratios and targets
    def ratio(mode: str, other: str, key: str = "rate") -> float | None:
        ours = summary.get((mode, "ours"), {}).get(key)
        theirs = summary.get((mode, other), {}).get(key)
        if other == "bare" and theirs is None and mode == "resized":
            theirs = summary.get(("http", "bare"), {}).get(key)
        return ours / theirs if ours and theirs else None

    print()
    print("ratios ours/other (cold; warm in brackets where both have it):")
    for mode in modes:
        parts_ = []
        for other in ("img2dataset", "bare"):
            cold, warm = ratio(mode.name, other), ratio(mode.name, other, "warm")
            label = "bare http download" if other == "bare" and mode.resize else other
            if cold is not None:
                parts_.append(f"/{label} {cold:.2f}x"
                              + (f" [{warm:.2f}x]" if warm is not None else ""))
        print(f"  {mode.name:<14}" + "   ".join(parts_))
    print("client CPU per image, other/ours (>1: ours uses less CPU per image):")
    for mode in modes:
        ours_cpu = summary.get((mode.name, "ours"), {}).get("cpu")
        parts_ = []
        for other in ("img2dataset", "bare"):
            theirs = summary.get((mode.name, other), {}).get("cpu")
            if ours_cpu and theirs:
                parts_.append(f"{other} {theirs:.3f} / ours {ours_cpu:.3f} ms = "
                              f"{theirs / ours_cpu:.2f}x")
        if parts_:
            print(f"  {mode.name:<14}" + "   ".join(parts_))
    print("server-bound ceilings:")
    for mode in modes:
        server = summary.get((mode.name, "ours"), {}).get("server")
        i2d = summary.get((mode.name, "img2dataset"), {}).get("rate")
        if server and i2d and not mode.resize:
            ceiling = 1000 / server
            print(f"  {mode.name}: nginx (1 worker process) needs {server:.3f} ms CPU per image, "
                  f"so no client can exceed ~{ceiling:,.0f} img/s here = "
                  f"{ceiling / i2d:.1f}x img2dataset's median")

    targets = Targets()
    target = targets.check

    target("https new conn/image: ours / img2dataset", ratio("https-newconn", "img2dataset"),
           10, True)
    target("https new conn/image: ours / bare", ratio("https-newconn", "bare"), 0.8, True)

    def end_to_end(other: str, key: str) -> float | None:
        run = summary.get(("https-newconn", "run"), {}).get("rate")
        theirs = summary.get(("https-newconn", other), {}).get(key)
        return run / theirs if run and theirs else None

    target("run end to end, defaults / workers' steady (https new conn)",
           end_to_end("ours", "warm"), 0.8, True)
    target("run end to end, defaults / img2dataset (https new conn)",
           end_to_end("img2dataset", "rate"), 10, True)
    target("http raw: ours / img2dataset", ratio("http", "img2dataset"), 2, True)
    target("http raw: ours / bare", ratio("http", "bare"), 0.75, True)
    target("resized keep_ratio 256 jpg: ours / img2dataset", ratio("resized", "img2dataset"),
           2.5, True)
    target(f"enqueue rows/s ({enqueue['rows']:,}-row part)" if enqueue else "enqueue rows/s",
           enqueue and enqueue["rate"], 250_000, True, "", ",.0f")
    worst_calls = max((summary[(m.name, "ours")]["redis_calls"] for m in ours_modes
                       if summary[(m.name, "ours")]["redis_calls"] is not None), default=None)
    target("Redis commands per image (worst mode median)", worst_calls, 0.05, False, "", ".4f")
    peak = max((summary[(m.name, "ours")]["peak_proc"] for m in ours_modes), default=None)
    target("peak RSS per worker process (MB)", peak and peak / mb, 250, False, " MB", ",.0f")
    complete = all(s["complete"] for s in summary.values())
    targets.add("every run downloaded every URL, bytes intact",
                "yes" if complete else "NO (see table)", complete)
    return targets.report()


# ---------------------------------------------------------------- main

def ensure_img2dataset() -> None:
    if (I2D_VENV / "bin" / "img2dataset").exists():
        return
    log(f"creating {I2D_VENV} with img2dataset (once)")
    subprocess.run(["python3", "-m", "venv", str(I2D_VENV)], check=True)
    subprocess.run([str(I2D_VENV / "bin" / "pip"), "install", "-q", "img2dataset"],
                   check=True, env=child_env(Path("/dev/null")))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20_000, help="URLs per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES),
                        help=f"comma-separated, of {', '.join(ALL_MODES)}")
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2,000 images, 1 round, a 200,000-row enqueue")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=64,
                        help="ours: concurrency; img2dataset: thread_count; bare: per process")
    parser.add_argument("--shard-size", type=int, default=None,
                        help="rows per shard, ours and img2dataset (default: images / 10)")
    parser.add_argument("--pool", type=int, default=300, help="distinct images in the corpus")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--enqueue-rows", type=int, default=1_000_000,
                        help="rows of the enqueue benchmark's part (0: no enqueue benchmark)")
    parser.add_argument("--enqueue-rounds", type=int, default=3,
                        help="0: no enqueue benchmark")
    parser.add_argument("--bare-loop", choices=("uvloop", "asyncio"), default=None,
                        help="default: uvloop if installed (as our workers use it)")
    parser.add_argument("--run-timeout", type=float, default=600.0)
    parser.add_argument("--stall-timeout", type=float, default=60.0,
                        help="ours: give a run up when no shard completes for this long")
    parser.add_argument("--profile", type=Path, default=None,
                        help="after the rounds, one more run of ours per mode under py-spy "
                             "(raw collapsed stacks in this folder; not counted)")
    parser.add_argument("--tmp", type=Path, default=None, help="parent of the work directory")
    parser.add_argument("--json", help="also write the medians per mode and tool to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    # the bare loop's worker processes
    parser.add_argument("--bare-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--urls", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--nproc", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--cafile", help=argparse.SUPPRESS)
    parser.add_argument("--loop", default="asyncio", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.rounds = 2_000, 1
        args.enqueue_rows, args.enqueue_rounds = min(args.enqueue_rows, 200_000), 1
    if args.shard_size is None:
        args.shard_size = max(100, args.images // 10)
    if args.bare_loop is None:
        args.bare_loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    return args


def main() -> int:
    args = parse_args()
    if args.bare_worker:
        return bare_worker(args)
    modes = [MODES[m.strip()] for m in args.modes.split(",") if m.strip()]
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = set(tools) - set(TOOLS)
    if unknown:
        raise SystemExit(f"unknown tools: {', '.join(sorted(unknown))}")
    owned = Owned()

    def on_signal(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    # Even when started in the background by a shell that ignores SIGINT.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    root = Path(tempfile.mkdtemp(prefix="laion-compare-", dir=args.tmp))
    nginx: Nginx | None = None
    try:
        if "img2dataset" in tools:
            ensure_img2dataset()
        log(f"work directory {root}; load average {os.getloadavg()[0]:.2f}")
        started = time.perf_counter()
        corpus = build_corpus(root, args.images, args.pool, args.seed)
        sizes = corpus.pool_sizes
        log(f"corpus: {len(sizes)} distinct images ({', '.join(f'{k} {v}' for k, v in corpus.pool_types.most_common())}), "  # noqa: E501
            f"{min(sizes) / 1e3:.0f}-{max(sizes) / 1e3:.0f} KB, mean "
            f"{statistics.mean(sizes) / 1e3:.0f} KB; {len(corpus.files):,} URLs, "
            f"{corpus.total_bytes / 1e6:,.0f} MB, mean {corpus.total_bytes / 1e3 / len(corpus.files):.0f} KB "  # noqa: E501
            f"({time.perf_counter() - started:.1f}s)")
        cert, key = make_cert(root)
        ports = dict(zip(("http", "https", "https-noka"), free_ports(3), strict=True))
        lists = write_lists(root, corpus, ports)
        nginx = Nginx(owned, root, corpus.www, root / "server.pem", key, ports)
        nginx.start()
        check_served(lists, corpus, cert)
        log(f"nginx serving {', '.join(f'{k} :{v}' for k, v in ports.items())} on "
            f"{ADDRESSES[0]}-{ADDRESSES[-1]}; every transport checked")

        enqueue = None
        if args.enqueue_rows > 0 and args.enqueue_rounds > 0:
            enqueue = enqueue_bench(owned, root, args.enqueue_rows, args.enqueue_rounds)

        bench = Bench(args, owned, root, corpus, lists, cert, nginx)
        results: list[Result] = []
        for round_ in range(args.rounds):
            for mode_index, mode in enumerate(modes):
                # `run` end to end is measured where its target is: https, a new connection
                # per image.
                order = [t for t in tools if not (t == "bare" and mode.resize)
                         and not (t == "run" and mode.name != "https-newconn")]
                shift = (round_ + mode_index) % max(1, len(order))
                order = order[shift:] + order[:shift]
                for tool in order:
                    result = bench.run(tool, mode, round_)
                    results.append(result)
                    extra = (f", warm {result.warm_rate:,.0f}/s (start-up {result.startup:.2f}s)"
                             if result.warm_rate else "")
                    redis_note = (f", Redis {result.redis_calls:.4f} cmd/img"
                                  if result.redis_calls is not None else "")
                    log(f"round {round_ + 1} {mode.name:<13} {tool:<11} "
                        f"{result.rate:8,.0f} img/s{extra}; client CPU "
                        f"{result.client_cpu * 1000 / result.urls:.3f} ms/img, nginx "
                        f"{result.server_cpu * 1000 / result.urls:.3f} ms/img; ok "
                        f"{result.ok:,}/{result.urls:,}, on disk {result.on_disk:,}; peak RSS "
                        f"{result.peak_proc / 1e6:,.0f} MB{redis_note}"
                        + ("" if result.complete else "  INCOMPLETE"))
        if args.profile:
            for mode in modes:
                if "ours" in tools:
                    profiled = bench.run("ours", mode, -1, profile=args.profile)
                    log(f"profiled ours {mode.name}: {profiled.rate:,.0f} img/s under py-spy; "
                        f"stacks in {args.profile}")
        good = report(args, modes, results, enqueue, corpus)
        if args.json:
            write_json(Path(args.json), summarize(results))
        return 0 if good else 1
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        return 130
    finally:
        if nginx is not None:
            nginx.stop()
        owned.stop_all()
        if args.keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
