"""The loopback web bench/compare.py and bench/bucket.py download from: a corpus served by an
nginx of ours on 127.0.0.2 to 127.0.0.9.

nginx is the machine's (Debian's), with its own config in the work directory, one worker
process and the access log off, in three variants: http with keep-alive, https with keep-alive,
and https with keep-alive off and no TLS session reuse (every image a new TCP connection and a
full handshake, as on the real web). The certificate is self-signed (RSA 2048) for the
addresses and img1.test ... img8.test; clients trust it through the machine's CA bundle with it
appended (bench/measure.py's trust_bundle).

The corpus is deterministic and LAION-like: a pool of distinct images (bench/corpus.py), each
URL a distinct file name (hard links into the pool), spread evenly over the eight addresses.
URLs carry IP addresses (no tool resolves anything); per transport there is one parquet part
with URL and TEXT columns, the same rows cut in END_TO_END_PARTS parts, and a text list.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import shutil
import signal
import ssl
import statistics
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from bench.corpus import WORDS, image_pool
from bench.measure import Owned, cpu_of, free_ports, trust_bundle, wait_for_port
from bench.report import log, tally

HOSTS = 8
ADDRESSES = [f"127.0.0.{i + 2}" for i in range(HOSTS)]
HOST_MAP = {f"img{i + 1}.test": address for i, address in enumerate(ADDRESSES)}
TRANSPORTS = ("http", "https", "https-noka")  # https-noka: keep-alive off
SUBSET = "bench"
PART_FILE = "part-00000-compare-c000.snappy.parquet"
END_TO_END_PARTS = 4  # `laion-dagster run` end to end gets the rows as this many parts


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


@dataclass
class Web:
    corpus: Corpus
    lists: dict[str, Path]  # per transport: a folder of parquet parts (see write_lists)
    cert: Path  # the CA file clients trust
    nginx: Nginx


def start(owned: Owned, root: Path, images: int, pool: int, seed: int) -> Web:
    """The corpus, its lists and the certificate under `root`, and nginx serving them, each
    transport checked on every address."""
    started = time.perf_counter()
    corpus = build_corpus(root, images, pool, seed)
    sizes = corpus.pool_sizes
    types = tally(corpus.pool_types)
    log(f"corpus: {len(sizes)} distinct images ({types}), {min(sizes) / 1e3:.0f}-"
        f"{max(sizes) / 1e3:.0f} KB, mean {statistics.mean(sizes) / 1e3:.0f} KB; "
        f"{len(corpus.files):,} URLs, {corpus.total_bytes / 1e6:,.0f} MB, mean "
        f"{corpus.total_bytes / 1e3 / len(corpus.files):.0f} KB "
        f"({time.perf_counter() - started:.1f}s)")
    cert, key = make_cert(root)
    ports = dict(zip(TRANSPORTS, free_ports(len(TRANSPORTS), ADDRESSES), strict=True))
    lists = write_lists(root, corpus, ports)
    nginx = Nginx(owned, root, corpus.www, root / "server.pem", key, ports)
    nginx.start()
    check_served(lists, corpus, cert)
    log(f"nginx serving {', '.join(f'{k} :{v}' for k, v in ports.items())} on "
        f"{ADDRESSES[0]}-{ADDRESSES[-1]}; every transport checked")
    return Web(corpus, lists, cert, nginx)


def build_corpus(root: Path, images: int, pool_size: int, seed: int) -> Corpus:
    pool = image_pool(pool_size, seed)
    www = root / "www"
    (www / "pool").mkdir(parents=True)
    (www / "i").mkdir()
    names = []
    for index, image in enumerate(pool):
        ext = Path(image.path).suffix
        name = f"{index:04d}{ext}"
        (www / "pool" / name).write_bytes(image.body)
        names.append((name, ext, len(image.body)))
    rnd = random.Random(f"compare:{seed}")
    files, hosts, captions, sizes = [], [], [], []
    for row in range(images):
        name, ext, size = names[rnd.randrange(len(names))]
        file = f"{row:07d}{ext}"
        os.link(www / "pool" / name, www / "i" / file)
        files.append(file)
        hosts.append(row % HOSTS if rnd.random() < 0.5 else rnd.randrange(HOSTS))
        captions.append(" ".join(rnd.choices(WORDS, k=rnd.randint(2, 14))))
        sizes.append(size)
    types = Counter(image.content_type for image in pool)
    return Corpus(www, files, hosts, captions, sizes, [n[2] for n in names], types)


def write_lists(root: Path, corpus: Corpus, ports: dict[str, int]) -> dict[str, Path]:
    """Per transport: a folder with the rows as one parquet part (`transport`), the same rows
    as END_TO_END_PARTS parts (`transport`-parts) and a text list beside it (`transport`.txt,
    for the bare loop)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = root / "lists"
    lists: dict[str, Path] = {}
    for transport, port in ports.items():
        scheme = "http" if transport == "http" else "https"
        urls = [f"{scheme}://{ADDRESSES[h]}:{port}/i/{f}"
                for h, f in zip(corpus.hosts, corpus.files, strict=True)]
        for url in urls:  # no tool may ever need a resolver
            assert ipaddress.ip_address(urlsplit(url).hostname).is_loopback, url
        whole, cut = base / transport, base / f"{transport}-parts"
        (whole / SUBSET).mkdir(parents=True)
        (cut / SUBSET).mkdir(parents=True)
        (base / f"{transport}.txt").write_text("\n".join(urls) + "\n")
        size = -(-len(urls) // END_TO_END_PARTS)
        for path, rows in [(whole / SUBSET / PART_FILE, slice(None))] + [
                (cut / SUBSET / f"part-{i:05d}-compare-c000.snappy.parquet",
                 slice(i * size, (i + 1) * size)) for i in range(END_TO_END_PARTS)]:
            pq.write_table(pa.table({"URL": urls[rows], "TEXT": corpus.captions[rows]}), path,
                           compression="snappy")
        lists[transport], lists[f"{transport}-parts"] = whole, cut
    return lists


def make_cert(root: Path) -> tuple[Path, Path]:
    """A self-signed certificate (root/server.pem) and its key; returns the CA file every
    client trusts (the machine's bundle with it appended) and the key."""
    key = root / "key.pem"
    names = ",".join([f"DNS:{h}" for h in HOST_MAP] + [f"IP:{a}" for a in ADDRESSES])
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(root / "server.pem"), "-days", "2",
                    "-subj", "/CN=img1.test", "-addext", f"subjectAltName={names}"],
                   check=True, capture_output=True)
    return trust_bundle(root / "server.pem", root / "cert.pem"), key


def nginx_binary() -> str | None:
    """Debian installs nginx in /usr/sbin, which is on root's PATH but not always a user's."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


class Nginx:
    def __init__(self, owned: Owned, root: Path, www: Path, cert: Path, key: Path,
                 ports: dict[str, int]):
        self.owned = owned
        self.prefix = root / "nginx"
        self.ports = ports
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.prefix / "tmp" / sub).mkdir(parents=True, exist_ok=True)
        self.conf = self.prefix / "nginx.conf"
        self.conf.write_text(self._config(www, cert, key))
        self.proc: subprocess.Popen | None = None

    def _config(self, www: Path, cert: Path, key: Path) -> str:
        p = self.prefix

        def server(transport: str, extra: str = "") -> str:
            tls = " ssl" if transport != "http" else ""
            lines = [f"listen {a}:{self.ports[transport]}{tls};" for a in ADDRESSES]
            lines += [extra] if extra else []
            lines += [f"root {www};", "location / { }"]
            return "    server {\n" + "".join(f"        {line}\n" for line in lines) + "    }\n"

        user = "user root;\n" if os.geteuid() == 0 else ""
        temp = "".join(f"    {sub}_temp_path {p}/tmp/{sub};\n"
                       for sub in ("proxy", "fastcgi", "uwsgi", "scgi"))
        servers = (server("http") + server("https")
                   + server("https-noka", "keepalive_timeout 0;"))
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
{temp}    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_session_cache off;
    ssl_session_tickets off;
{servers}}}
"""

    def start(self) -> None:
        if nginx_binary() is None:
            raise RuntimeError("nginx not found: apt-get install -y nginx")
        with open(self.prefix / "stdout.log", "ab") as out:
            self.proc = self.owned.popen(
                [nginx_binary(), "-p", str(self.prefix), "-c", str(self.conf), "-e",
                 str(self.prefix / "error.log"), "-g", "daemon off;"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        try:
            for address in ADDRESSES:
                for port in self.ports.values():
                    wait_for_port(port, self.proc, "nginx", deadline - time.monotonic(),
                                  address)
        except RuntimeError as error:
            raise RuntimeError(f"{error}: {self.errors_since(0)[-5:]}") from None

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
        return cpu_of([self.proc.pid], children=True) if self.proc is not None else 0.0

    def stop(self) -> None:
        """SIGQUIT: nginx's graceful stop."""
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
    for transport in TRANSPORTS:
        if transport not in lists:
            continue
        urls = (lists[transport].parent / f"{transport}.txt").read_text().split()
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
