"""The simulated internet's plan for bench/field.py: host names, addresses, and what every row
meets, all from the seed (bench/field_serve.py serves by it, bench/field_net.py builds the
network its failures need below HTTP).

Hosts are Zipf-distributed over the rows, the largest CDN-like; the rest share addresses or
have their own, each with a round trip and a transfer rate; whole hosts fail in DNS, TLS or
below (blackholed, refused, unreachable), rows fail as a 10,000-row shard of LAION's does, and
two hosts are only half dead. bench/field.py's docstring tells the whole of it.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import math
import random
import statistics
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench import corpus
from bench import field_net as net
from bench.report import log, tally

SUBSET = "laion2B-field"

# Per-row shares of what the servers do (the rest is a plain image), after a 10,000-row
# shard of LAION's: 404 dominates, then 403, decoding errors, pages instead of images.
ROW_KINDS = {"s404": 0.08, "s403": 0.025, "s400": 0.003, "s401": 0.001, "s500": 0.0015,
             "s503": 0.003, "html": 0.01, "corrupt": 0.008, "noai": 0.003, "close": 0.001,
             "hang": 0.0025, "trickle": 0.0015}
# Per-row shares of failures that belong to a whole host (chosen among the smaller hosts).
HOST_KINDS = {"nxdomain": 0.012, "dns_unanswered": 0.003, "blackhole": 0.004,
              "refused": 0.0015, "unreachable": 0.001, "tls_wrongname": 0.003,
              "tls_untrusted": 0.002}
EXPECTED = {"ok": "ok", "noai": "opted_out", "html": "not_image", "corrupt": "decode_error",
            "close": "connection", "hang": "timeout", "trickle": "timeout",
            "nxdomain": "dns", "dns_unanswered": "dns", "blackhole": "timeout",
            "refused": "connection", "unreachable": "connection", "tls_wrongname": "tls",
            "tls_untrusted": "tls"}
SERVER_VISIBLE = set(ROW_KINDS) | {"ok"}
STEMS = ("img", "cdn", "static", "media", "shop", "photos", "blog", "news", "store", "pics",
         "assets", "images", "i", "s", "content", "upload", "files", "art", "home", "web")
DIRS = ("/images/", "/wp-content/uploads/2019/07/", "/i/", "/media/catalog/product/",
        "/photos/", "/uploads/", "/content/", "/", "/img/products/", "/files/large/")
WORDS = (*corpus.WORDS, "gold", "ring")


def expected_class(kind: str) -> str:
    if kind.startswith("s") and kind[1:].isdigit():
        return "http_4xx" if kind[1] == "4" else "http_5xx"
    return EXPECTED[kind]


@dataclass
class Host:
    name: str
    address: int
    scheme: str
    dns: str = "ok"  # ok, nx, drop
    dns_delay: float = 0.01
    tls: str = ""  # "", wrongname, untrusted
    rows: int = 0


@dataclass
class Address:
    ip: str
    rtt: float
    rate: float
    net: str = "ok"  # ok, blackhole, refused, unreachable, closed_http
    cdn: bool = False
    flap: bool = False  # resets every connection for a few seconds of each run


@dataclass
class Sim:
    hosts: list[Host]
    addresses: list[Address]
    row_host: list[int]
    row_kind: list[str]  # what the web server does for the row
    row_pool: list[int]
    urls: list[str]
    served: list[str]  # what the row meets, host failures first
    pool: list[tuple[str, str, int, int, int]]  # file, content type, bytes, width, height
    parts: list[Path] = field(default_factory=list)
    flap_rows: list[int] = field(default_factory=list)  # rows of the flapping host
    split_rows: dict[str, list[int]] = field(default_factory=dict)  # http/https rows of the
    # host whose port 80 refuses

    @property
    def flap_ip(self) -> str | None:
        return next((a.ip for a in self.addresses if a.flap), None)

    @property
    def expected(self) -> list[str]:
        return [expected_class(k) for k in self.served]


def address_ip(index: int) -> str:
    return f"198.18.{1 + index // 250}.{1 + index % 250}"


def lognormal(rnd: random.Random, median: float, sigma: float, low: float, high: float):
    return min(high, max(low, median * math.exp(rnd.gauss(0.0, sigma))))


def make_pool(root: Path, size: int, seed: int) -> list[tuple[str, str, int, int, int]]:
    """bench/corpus.py's images as files under `root`: (file, content type, bytes, width,
    height) each."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    pool = []
    for index, image in enumerate(corpus.image_pool(size, seed)):
        name = f"{index:04d}{Path(image.path).suffix}"
        (root / name).write_bytes(image.body)
        with Image.open(io.BytesIO(image.body)) as opened:
            width, height = opened.size
        pool.append((name, image.content_type, len(image.body), width, height))
    return pool


def build_sim(args: argparse.Namespace, pool) -> Sim:
    """The whole simulation from the seed: hosts, addresses, and what every row meets."""
    rnd = random.Random(f"field:{args.seed}")
    n = args.hosts
    if n > 60_000:
        raise SystemExit("--hosts: at most 60,000 (one /16 of addresses)")
    weights = list(itertools.accumulate(1.0 / (r + 1) ** args.zipf for r in range(n)))
    row_host = rnd.choices(range(n), cum_weights=weights, k=args.rows)
    counts = Counter(row_host)
    ids = list(range(n))
    rnd.shuffle(ids)  # names say nothing about rank
    hosts = []
    for rank in range(n):
        cdn = rank < args.cdn_hosts
        scheme = "https" if cdn or rnd.random() < 0.9 else "http"
        hosts.append(Host(name=f"{rnd.choice(STEMS)}{ids[rank]}.{net.DOMAIN}", address=-1,
                          scheme=scheme, rows=counts.get(rank, 0)))
    # Whole-host failures, among the smaller hosts with rows, until each kind's row share.
    tail = [h for h in range(args.cdn_hosts, n) if hosts[h].rows]
    rnd.shuffle(tail)
    kind_of: dict[int, str] = {}
    for kind, share in HOST_KINDS.items():
        budget, used = round(share * args.rows), 0
        for h in tail:
            if used >= budget:
                break
            if h in kind_of or used + hosts[h].rows > budget:
                continue
            if kind.startswith("tls") and hosts[h].scheme != "https":
                continue
            kind_of[h] = kind
            used += hosts[h].rows
    addresses: list[Address] = []

    def new_address(cdn: bool, net_kind: str = "ok") -> int:
        if cdn:
            rtt = lognormal(rnd, args.cdn_rtt, 0.4, 0.008, 0.15)
            rate = lognormal(rnd, args.rate_median * 4, 0.5, 1e6, 100e6)
        else:
            rtt = lognormal(rnd, args.rtt_median, 0.6, 0.015, 0.6)
            rate = lognormal(rnd, args.rate_median, 0.8, 100e3, 50e6)
        addresses.append(Address(address_ip(len(addresses)), round(rtt, 4), round(rate),
                                 net_kind, cdn))
        return len(addresses) - 1

    shared = [new_address(False) for _ in range(max(1, (n - args.cdn_hosts) // 24))]
    # A host whose port 80 refuses while 443 serves: the largest https host below the CDNs
    # that fails no other way (its own address).
    split = next((h for h in range(args.cdn_hosts, n) if h not in kind_of
                  and hosts[h].scheme == "https" and hosts[h].rows >= 20), None)
    for rank, host in enumerate(hosts):
        kind = kind_of.get(rank, "")
        if rank < args.cdn_hosts:
            host.address = new_address(True)
            host.dns_delay = round(lognormal(rnd, 0.01, 0.6, 0.002, 0.1), 4)
            continue
        if kind in ("blackhole", "refused", "unreachable"):
            host.address = new_address(False, kind)
        elif rank == split:
            host.address = new_address(False, "closed_http")
        elif rnd.random() < 0.5:
            host.address = rnd.choice(shared)
        else:
            host.address = new_address(False)
        u = rnd.random()
        if u < 0.005:
            host.dns_delay = round(rnd.uniform(3.0, 4.5), 3)
        elif u < 0.035:
            host.dns_delay = round(rnd.uniform(0.5, 2.5), 3)
        else:
            host.dns_delay = round(lognormal(rnd, 0.02, 0.8, 0.002, 0.3), 4)
        host.dns = {"nxdomain": "nx", "dns_unanswered": "drop"}.get(kind, "ok")
        host.tls = kind[4:] if kind.startswith("tls_") else ""
    if args.cdn_hosts > args.flap_rank >= 0:
        addresses[hosts[args.flap_rank].address].flap = True
    mix = random.Random(f"field-mix:{args.seed}")  # the rest of the plan stays as it was
    # Rows: what the server does, which image, which URL.
    cumulative = list(itertools.accumulate(ROW_KINDS.values()))
    kinds = list(ROW_KINDS)
    row_kind, row_pool, urls, served = [], [], [], []
    for row in range(args.rows):
        u = rnd.random()
        index = next((i for i, c in enumerate(cumulative) if u < c), None)
        kind = "ok" if index is None else kinds[index]
        image = rnd.randrange(len(pool))
        host = hosts[row_host[row]]
        ext = Path(pool[image][0]).suffix if rnd.random() >= 0.1 else ""
        slug = "-".join(rnd.choice(WORDS) for _ in range(rnd.randint(1, 3)))
        scheme = host.scheme
        if row_host[row] == split and mix.random() < 1 / 3:
            scheme = "http"  # its port 80 refuses
        urls.append(f"{scheme}://{host.name}{rnd.choice(DIRS)}{row}-{slug}{ext}")
        row_kind.append(kind)
        row_pool.append(image)
        meets = kind_of.get(row_host[row], "")
        if meets.startswith("tls_") and host.scheme != "https":
            meets = ""
        if row_host[row] == split and scheme == "http":
            meets = "refused"
        served.append(meets or kind)
    assert len(set(urls)) == len(urls)
    sim = Sim(hosts, addresses, row_host, row_kind, row_pool, urls, served, pool)
    sim.flap_rows = [r for r in range(args.rows)
                     if addresses[hosts[row_host[r]].address].flap]
    sim.split_rows = {scheme: [r for r in range(args.rows) if row_host[r] == split
                               and urls[r].startswith(scheme + "://")]
                      for scheme in ("http", "https")}
    return sim


def write_inputs(sim: Sim, root: Path, args: argparse.Namespace) -> None:
    """Spark-named parquet parts, the servers' plan, expected.csv and the bare loop's list."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rnd = random.Random(f"field-rows:{args.seed}")
    folder = root / "parquet" / SUBSET
    folder.mkdir(parents=True)
    job = uuid.UUID(int=rnd.getrandbits(128), version=4)
    per_part = math.ceil(args.rows / args.parts)
    for part in range(args.parts):
        rows = range(part * per_part, min(args.rows, (part + 1) * per_part))
        if not rows:
            break
        table = pa.table({
            "SAMPLE_ID": pa.array([3_000_000_000 + args.seed * 10_000_000 + r for r in rows],
                                  pa.int64()),
            "URL": [sim.urls[r] for r in rows],
            "TEXT": [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(3, 12)))
                     for _ in rows],
            "HEIGHT": pa.array([sim.pool[sim.row_pool[r]][4] for r in rows], pa.int32()),
            "WIDTH": pa.array([sim.pool[sim.row_pool[r]][3] for r in rows], pa.int32()),
            "LICENSE": ["?"] * len(rows),
            "NSFW": ["UNLIKELY"] * len(rows),
            "similarity": [round(rnd.uniform(0.28, 0.45), 6) for _ in rows],
        })
        path = folder / f"part-{part:05d}-{job}-c000.snappy.parquet"
        pq.write_table(table, path, compression="snappy")
        sim.parts.append(path)
    plan = {
        "names": {h.name: [h.address, h.dns, h.dns_delay, h.tls] for h in sim.hosts},
        "addresses": [[a.ip, a.rtt, a.rate] for a in sim.addresses],
        "rows": [[h, k, p] for h, k, p in zip(sim.row_host, sim.row_kind, sim.row_pool,
                                               strict=True)],
        "pool": [[p[0], p[1]] for p in sim.pool],
        "pool_dir": str(root / "pool"),
        "hold": args.hold,
        "idle": 60.0,
    }
    (root / "plan.json").write_text(json.dumps(plan))
    with open(root / "expected.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", "url", "host", "address", "rtt_ms", "served", "expected"])
        for row, url in enumerate(sim.urls):
            host = sim.hosts[sim.row_host[row]]
            address = sim.addresses[host.address]
            writer.writerow([row, url, host.name, address.ip, round(address.rtt * 1000),
                             sim.served[row], expected_class(sim.served[row])])
    (root / "urls.tsv").write_text("".join(f"{r}\t{u}\n" for r, u in enumerate(sim.urls)))


def describe(sim: Sim, args: argparse.Namespace) -> None:
    rows = len(sim.urls)
    per_host = sorted((h.rows for h in sim.hosts), reverse=True)
    used = sum(1 for c in per_host if c)
    top = ", ".join(f"{c / rows:.1%}" for c in per_host[:5])
    rtts = sorted(sim.addresses[sim.hosts[h].address].rtt * 1000 for h in sim.row_host)
    delays = [sim.hosts[h].dns_delay for h in range(len(sim.hosts)) if sim.hosts[h].rows]
    shared = Counter(h.address for h in sim.hosts)
    log(f"simulation: {len(sim.hosts):,} names ({used:,} with rows; top 5 carry {top} = "
        f"{sum(per_host[:5]) / rows:.0%}), {len(sim.addresses):,} addresses "
        f"({sum(1 for c in shared.values() if c > 1):,} shared by several names), "
        f"{sum(1 for h in sim.hosts if h.scheme == 'https') / len(sim.hosts):.0%} of names "
        "https")
    log(f"  round trip per row (ms): p10 {rtts[len(rtts) // 10]:.0f}, median "
        f"{rtts[len(rtts) // 2]:.0f}, p90 {rtts[len(rtts) * 9 // 10]:.0f}, max {rtts[-1]:.0f}; "
        f"DNS delay of names with rows: median {statistics.median(delays) * 1000:.0f} ms, "
        f"{sum(d >= 0.5 for d in delays)} names >= 0.5 s, {sum(d >= 3 for d in delays)} >= 3 s")
    served = Counter(sim.served)
    ok = served.pop("ok", 0)
    log(f"  rows: {rows:,}, served correctly {ok:,} ({ok / rows:.1%}); {tally(served)}")
    if sim.flap_ip:
        log(f"  {len(sim.flap_rows):,} rows on {sim.flap_ip}, which resets every connection "
            f"{args.flap_at:g}-{args.flap_at + args.flap_seconds:g}s after each launch")
    if sim.split_rows.get("https"):
        host = sim.hosts[sim.row_host[sim.split_rows["https"][0]]]
        log(f"  {host.name}: port 80 resets, 443 serves; {len(sim.split_rows['http'])} http "
            f"rows, {len(sim.split_rows['https'])} https rows")
