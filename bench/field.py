"""Downloaders on a simulated internet: ours, img2dataset and a bare aiohttp loop (prints figures).

    .venv/bin/python -m bench.field           # 20,000 rows, 2 rounds (img2dataset: the first)
    .venv/bin/python -m bench.field --quick   # 2,000 rows, 1 round
    .venv/bin/python -m bench.field --rows 5000 --tools ours,bare --ours-args "--concurrency 256"

Needs root (network namespaces), iproute2, nftables (`apt-get install -y nftables`) and
openssl; bench/img2dataset.py says which Python runs img2dataset.

What is simulated (bench/field_sim.py plans it, bench/field_net.py builds the network,
bench/field_serve.py the servers):
- Two network namespaces joined by a veth pair: `fieldclient`, where every tool runs, and
  `fieldweb`, where our DNS and web servers run. No route leads out of them and an nftables
  output rule drops anything not for 198.18.0.0/15 or loopback; only addresses of
  198.18.0.0/15 (reserved for benchmarks) and names under `sim.test` are used, resolved only by
  our DNS server through /etc/netns/fieldclient/resolv.conf. Nothing is resolved or contacted
  outside the namespaces and 127.0.0.0/8. Everything is removed at exit, and a crashed run's
  leftovers at the next start.
- `--hosts` names (10,000), Zipf-distributed over the rows (exponent `--zipf`, 1.0: the top 5
  carry about a quarter of the URLs). The `--cdn-hosts` biggest (50) are CDN-like: https, a
  short round trip (`--cdn-rtt`, 30 ms median), a fast rate, never failing whole. Half of the
  other names share an address with about a dozen others (shared hosting); each address has a
  round trip (lognormal, median `--rtt-median` 80 ms, 15-600 ms) and a transfer rate
  (lognormal, median `--rate-median` 2 MB/s). 90% of the other names are https.
- DNS (our asyncio UDP server, playing a recursive resolver with a cache that is flushed
  before every run): per name a delay (most a few ms to 0.3 s, 3% 0.5-2.5 s, 0.5% 3-4.5 s),
  NXDOMAIN for some names, no answer ever for others.
- Web (our asyncio servers, `--web-procs` processes on one SO_REUSEPORT socket per port, HTTP/1.1
  with keep-alive, TLS 1.3 with ECDSA P-256 certificates from a test CA): a request waits one
  round trip before its answer, a new connection two more (TCP, then TLS; one for http; taken
  after the real handshake, before the first request is read, as uvloop cannot delay a
  server-side handshake), and bodies are sent in 16 KB chunks paced to the address's rate.
  Bodies are real JPEG/PNG/WebP images (bench/corpus.py, 10-300 KB, mean ~60 KB) held in
  memory, each URL its own path.
- The failure mix of a LAION shard, per row (the row number is in the URL's path; what each row
  gets is fixed by --seed and written to `expected.csv`): HTTP 404, 403, 400, 401, 500, 503;
  HTML pages with 200; bodies that start like a JPEG and do not decode; `X-Robots-Tag: noai`;
  remote closes without a response; no answer ever, and bodies that trickle a byte every 2 s
  (both give up after `--hold` 60 s); and per host: NXDOMAIN, DNS never answered, a
  certificate for another name, a self-signed certificate, connection refused (TCP reset),
  no route to host (ICMP), and blackholed addresses (nftables drops their packets, so
  connects time out).
- Two hosts that are only half dead, whose rows must each get what their own server does: a
  CDN-like host (the `--flap-rank`-th largest) that resets every connection for
  `--flap-seconds` (8) from `--flap-at` (10 s) after each tool's launch, as during a deploy
  (its rows are served correctly: a later try gets them); and a host whose port 80 resets
  while 443 serves, with a third of its URLs http (those fail as connection, the https ones
  are served).
- Clients trust the test CA through a copy of the machine's whole CA bundle with the CA
  appended (SSL_CERT_FILE, REQUESTS_CA_BUNDLE), so an SSL context costs what it costs on the
  real web.

What is not simulated: packet loss, TCP slow start and congestion, a shared bottleneck (the
veth has no bandwidth limit; only each answer is paced), the kernel's own handshake timing
(connect() returns at once; the round trips are the server's sleeps, so a connect timeout
only ever fires on a blackholed host), IPv6, HTTP/2, redirects, compression, 429 and rate
limits, TLS session resumption, OCSP, DNS over TCP, DNS TTLs expiring within a run, and
anything in the servers' way (their CPU is reported: they share the machine's cores with the
tool under test).

The tools, on the same rows, one at a time, their order rotated each round:
- ours: `laion-dagster run --data-dir D --parquet-dir P --store-dir S` in fieldclient, its
  defaults except LAION_ALLOWED_NETWORKS=["198.18.0.0/15"] (the address guard would refuse
  198.18/15), plus `--ours-args`; resolving through the namespace's resolv.conf. Its per-row
  outcome comes from the shard parquet files (S/**/[0-9]*.parquet).
- img2dataset 1.47.0: 2 processes x 64 threads, resize_mode no, disable_all_reencoding,
  timeout 10, webdataset output; per-row status and error_message from its shard parquet.
- bare: 2 processes x 256 fetches in flight (bench/bare.py): aiohttp with AsyncResolver
  (aiodns) and its DNS cache, one SSL context per process, connect timeout 10 s, 30 s per
  URL; writes each body to a file and classifies each URL itself.
- ours-once: ours with its later tries off (`--retry-rounds 0`): the same run as before
  they existed, so their cost (the wall time) and gain (successes) show side by side.
- ours-lab: ours again, with the servers switched to the lab (SIGUSR1): no round trips, no
  DNS delays, no transfer rates; the same names, TLS, failures and blackholes: the field's
  twin at zero latency, on the same rows.
- loopback: the loopback benchmark, `bench.compare --modes https-newconn --tools run` on
  as many images as there are rows (nginx on 127.0.0.2-9, a new TLS connection per image,
  `laion-dagster run` with its defaults, 4 parts), run from here in its turn. Its CPU per
  image is the figure the field's is held to (issue 12: "no worse than on loopback"); needs
  nginx.

Figures: rows/s over the whole run (rows / wall time, launch to exit), steady rows/s (from the
servers' record of when each row they saw was finished, between 10% and 90% of those rows,
scaled to all rows), the tail (99% of those rows done -> exit), CPU ms per row (user+sys of the
tool's process tree), server CPU, peak RSS per worker process, successes and failures by class,
in-flight connections at the servers each second; then per-row comparisons, ratios and
targets with PASS/FAIL (exit 1 when one fails). CPU per image: the tool's CPU over the whole
run divided by its successes (failed rows cost CPU too), the loopback benchmark's over its
images (all succeed there).
"""

from __future__ import annotations

import argparse
import atexit
import bisect
import contextlib
import itertools
import json
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from bench import field_net as net
from bench import img2dataset, measure
from bench.bare import looks_like_image
from bench.field_sim import (
    SERVER_VISIBLE,
    SUBSET,
    Sim,
    build_sim,
    describe,
    expected_class,
    make_pool,
    write_inputs,
)
from bench.loopback import nginx_binary
from bench.measure import Owned, Sampler, bench_command
from bench.report import Targets, fmt, log, median, table_head, tally

OURS_BIN = Path(sys.executable).with_name("laion-dagster")
TOOLS = ("ours", "ours-once", "img2dataset", "bare", "ours-lab", "loopback")
CHECK_TIMEOUT = 3.0  # the self-check's per fetch: a blackhole's connect times out then


# ---------------------------------------------------------------- the servers

class Servers:
    """The DNS server and the web server processes in fieldweb, and what they report."""

    def __init__(self, owned: Owned, root: Path, certs: Path, web_procs: int):
        self.owned = owned
        self.root = root
        self.certs = certs
        self.web_procs = web_procs
        self.lock = threading.Lock()
        self.events: list[tuple[int, float, str]] = []  # (row, time, how)
        # Per web server process, (time, open connections, fetches in flight, requests
        # and connections so far) each second; the DNS server's (time, queries, pending).
        self.samples: dict[int, list[tuple]] = defaultdict(list)
        self.dns_samples: list[tuple[float, int, int]] = []
        self.procs: list[subprocess.Popen] = []
        self.dns: subprocess.Popen | None = None

    def start(self) -> None:
        plan = str(self.root / "plan.json")
        errors = open(self.root / "servers.log", "ab")  # noqa: SIM115

        def serve(*args: str) -> subprocess.Popen:
            return self.owned.popen(
                net.in_ns(net.WEB_NS, bench_command("field_serve", *args, "--plan", plan)),
                stdout=subprocess.PIPE, stderr=errors, stdin=subprocess.DEVNULL)

        self.dns = serve("dns", "--listen", net.DNS_IP)
        self.procs = [serve("web", "--certs", str(self.certs), "--index", str(i))
                      for i in range(self.web_procs)]
        ready = threading.Barrier(self.web_procs + 2)
        for index, proc in enumerate([self.dns, *self.procs]):
            threading.Thread(target=self._reader, args=(index - 1, proc, ready),
                             daemon=True).start()
        try:
            ready.wait(timeout=60)
        except threading.BrokenBarrierError:
            raise RuntimeError("the servers did not start; see "
                               f"{self.root / 'servers.log'}") from None

    def _reader(self, index: int, proc: subprocess.Popen, ready: threading.Barrier) -> None:
        first = True
        for raw in proc.stdout:
            try:
                message = json.loads(raw)
            except ValueError:
                continue
            if first:
                first = False
                with contextlib.suppress(threading.BrokenBarrierError):
                    ready.wait(timeout=60)
                continue
            with self.lock:
                if index < 0:
                    self.dns_samples.append((message["t"], message["queries"],
                                             message["pending"]))
                    continue
                done = message["done"]
                self.events.extend(zip(done[0::3], done[1::3], done[2::3], strict=True))
                self.samples[index].append((message["t"], message["conns"], message["reqs"],
                                            message["requests"], message["accepted"]))
        if first:
            ready.abort()

    def alive(self) -> bool:
        return all(p.poll() is None for p in [self.dns, *self.procs])

    def pids(self) -> list[int]:
        return [p.pid for p in [self.dns, *self.procs]]

    def cpu(self) -> float:
        return measure.cpu_of(self.pids())

    def flush_dns(self) -> None:
        os.kill(self.dns.pid, signal.SIGHUP)

    def lab(self, on: bool) -> None:
        """Switch every server to the lab (no delays) or back to the field."""
        for pid in self.pids():
            os.kill(pid, signal.SIGUSR1 if on else signal.SIGUSR2)

    def open_connections(self) -> int:
        with self.lock:
            return sum(s[-1][1] for s in self.samples.values() if s)

    def quiet(self, timeout: float = 15.0) -> None:
        """Wait until no connection is open (the last run's have closed), up to `timeout`."""
        deadline = time.monotonic() + timeout
        time.sleep(1.1)
        while self.open_connections() and time.monotonic() < deadline:
            time.sleep(0.5)

    def window(self, t0: float, t1: float) -> dict:
        """What the servers saw between t0 and t1 (+1 s for connections closed at exit)."""
        with self.lock:
            events = [e for e in self.events if t0 <= e[1] <= t1 + 1.0]
            samples = {i: list(s) for i, s in self.samples.items()}
            dns = list(self.dns_samples)
        def last(seq: list[tuple], when: float) -> tuple | None:
            """The latest sample taken at or before `when` (samples come in time order)."""
            index = bisect.bisect_right(seq, when, key=lambda x: x[0])
            return seq[index - 1] if index else None

        series = []
        for second in range(int(t1 - t0) + 1):
            taken = [last(s, t0 + second + 1) for s in samples.values()]
            series.append((sum(x[1] for x in taken if x), sum(x[2] for x in taken if x)))

        def counter(seq: list[tuple], when: float, column: int) -> int:
            sample = last(seq, when)
            return sample[column] if sample else 0

        def grown(seq: list[tuple], column: int) -> int:
            return counter(seq, t1 + 1.5, column) - counter(seq, t0, column)

        return {"events": events, "series": series,
                "requests": sum(grown(s, 3) for s in samples.values()),
                "connections": sum(grown(s, 4) for s in samples.values()),
                "dns_queries": grown(dns, 1),
                "dns_pending": max((x[2] for x in dns if t0 <= x[0] <= t1 + 1.0), default=0)}


# ---------------------------------------------------------------- one run of one tool

@dataclass
class Run:
    tool: str
    round: int
    rows: int
    seconds: float = 0.0
    cpu: float = 0.0
    server_cpu: float = 0.0
    cpu_workers: float = 0.0  # the worker processes' share of `cpu`
    rss_worker: int = 0  # largest worker process
    rss_other: int = 0  # largest other process of the tree
    cpu_others: dict[str, float] = field(default_factory=dict)  # seconds by kind of process
    outcome: list[str] = field(default_factory=list)  # per row: common class
    detail: list[str] = field(default_factory=list)
    done_at: dict[int, float] = field(default_factory=dict)  # server side, per row
    series: list[tuple[int, int]] = field(default_factory=list)
    requests: int = 0
    connections: int = 0  # made to the web servers (TLS handshakes, for https)
    dns_queries: int = 0
    dns_pending: int = 0  # most DNS answers waiting on their delay at once
    steady: float | None = None
    tail: float | None = None
    error: str | None = None  # no usable result (crashed, timed out, no outputs)
    warning: str | None = None  # finished, outputs read, but exited non-zero
    note: str = ""

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0

    def count(self) -> Counter:
        return Counter(self.outcome)


def is_worker(tool: str, pid: int, roots: list[int], cmdline: str) -> bool:
    if "resource_tracker" in cmdline or "redis" in cmdline or "valkey" in cmdline:
        return False
    if tool == "bare":
        return pid in roots
    if tool == "img2dataset":
        return pid not in roots
    return "spawn_main" in cmdline


def method_name(tool: str) -> str:
    return tool.replace("2", "_to_").replace("-", "_")


def ours_class(status: str | None, error_class: str | None) -> str:
    return "ok" if status == "success" else error_class or "other"


class Bench:
    def __init__(self, args: argparse.Namespace, owned: Owned, root: Path, sim: Sim,
                 servers: Servers, bundle: Path, i2d_python: str | None):
        self.args = args
        self.owned = owned
        self.root = root
        self.sim = sim
        self.servers = servers
        self.env = measure.client_env(bundle)
        self.i2d_python = i2d_python
        self.index = {url: row for row, url in enumerate(sim.urls)}
        self.runs = 0

    def run(self, tool: str, round_: int) -> Run:
        self.runs += 1
        run_dir = self.root / "runs" / f"{self.runs:02d}-{tool}"
        run_dir.mkdir(parents=True)
        result = Run(tool, round_, len(self.sim.urls))
        result.outcome = ["missing"] * result.rows
        result.detail = [""] * result.rows
        self.servers.quiet()
        self.servers.flush_dns()
        self.servers.lab(tool == "ours-lab")
        server0, ru0 = self.servers.cpu(), measure.children_cpu()
        t0 = time.time()
        sampler = None
        flaps = self._schedule_flap()
        try:
            procs = getattr(self, f"_launch_{method_name(tool)}")(run_dir)
            roots = [p.pid for p in procs]
            sampler = Sampler(lambda: roots).start()
            deadline = time.monotonic() + self.args.run_timeout
            codes = []
            for proc in procs:
                try:
                    codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
                except subprocess.TimeoutExpired:
                    raise RuntimeError(f"not done within {self.args.run_timeout:g}s") from None
            t1 = time.time()
            result.seconds = t1 - t0
            sampler.stop()
            if any(codes):
                result.warning = f"exited with code {max(codes)}"
            getattr(self, f"_collect_{method_name(tool)}")(run_dir, result)
        except Exception as error:  # reported; the benchmark goes on
            t1 = time.time()
            result.error = f"{type(error).__name__}: {error}"
        finally:
            for timer in flaps:
                timer.cancel()
            if self.sim.flap_ip:
                net.flap(self.sim.flap_ip, False)
            if sampler is not None:
                sampler.stop()
            for proc in list(self.owned.procs):
                if proc not in self.servers.procs and proc is not self.servers.dns:
                    self.owned.stop(proc)
            self.servers.lab(False)
        left = net.ns_pids(net.CLIENT_NS)
        if left:
            lines = []
            for pid in left:
                with contextlib.suppress(OSError):
                    lines.append(Path(f"/proc/{pid}/cmdline").read_bytes()
                                 .replace(b"\0", b" ").decode()[:120])
            result.note += f"left {len(left)} processes running after exit: {lines}; "
            net.kill_ns_processes(net.CLIENT_NS)
        time.sleep(1.6)  # the servers' last reports of this run
        result.cpu = measure.children_cpu() - ru0
        if sampler is not None:
            result.cpu = max(result.cpu, sum(sampler.cpu.values()))
            for pid, rss in sampler.peak.items():
                if is_worker(tool, pid, roots, sampler.cmdline.get(pid, "")):
                    result.rss_worker = max(result.rss_worker, rss)
                    result.cpu_workers += sampler.cpu.get(pid, 0.0)
                else:
                    result.rss_other = max(result.rss_other, rss)
                    kind = measure.process_kind(sampler.cmdline.get(pid, ""))
                    result.cpu_others[kind] = (result.cpu_others.get(kind, 0.0)
                                               + sampler.cpu.get(pid, 0.0))
        result.server_cpu = self.servers.cpu() - server0
        seen = self.servers.window(t0, t1)
        for key in ("series", "requests", "connections", "dns_queries", "dns_pending"):
            setattr(result, key, seen[key])
        for row, when, _how in seen["events"]:
            if 0 <= row < result.rows:
                result.done_at[row] = max(when, result.done_at.get(row, 0.0))
        self._progress(result, t0, t1)
        if result.error or result.warning:
            self.args.keep = True
            log(f"  {tool} FAILED: {result.error or result.warning} (logs in {run_dir})")
            for name in ("ours.log", "data/logs/workers.log", "img2dataset.log", "bare.log"):
                path = run_dir / name
                if path.exists():
                    tail = path.read_text(errors="replace").splitlines()[-15:]
                    log(f"  last lines of {path}:\n    " + "\n    ".join(tail))
        elif not self.args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
        return result

    def _schedule_flap(self) -> list[threading.Timer]:
        """The flapping host resets every connection from flap_at for flap_seconds."""
        ip = self.sim.flap_ip
        if ip is None or self.args.flap_seconds <= 0:
            return []
        timers = [threading.Timer(self.args.flap_at, net.flap, (ip, True)),
                  threading.Timer(self.args.flap_at + self.args.flap_seconds, net.flap,
                                  (ip, False))]
        for timer in timers:
            timer.daemon = True
            timer.start()
        return timers

    def _progress(self, result: Run, t0: float, t1: float) -> None:
        visible = [r for r, kind in enumerate(self.sim.served) if kind in SERVER_VISIBLE]
        times = sorted(result.done_at[r] for r in visible if r in result.done_at)
        n = len(visible)
        if not n or len(times) < 0.9 * n:
            return
        t10, t90 = times[math.ceil(0.1 * n) - 1], times[math.ceil(0.9 * n) - 1]
        if t90 > t10:
            result.steady = 0.8 * result.rows / (t90 - t10)
        if len(times) >= 0.99 * n:
            result.tail = max(0.0, t1 - times[math.ceil(0.99 * n) - 1])

    # -- ours
    def _launch_ours(self, run_dir: Path, *extra: str) -> list[subprocess.Popen]:
        env = dict(self.env)
        env["LAION_ALLOWED_NETWORKS"] = json.dumps([net.BENCH_NET])
        command = [str(OURS_BIN), "run", "--data-dir", str(run_dir / "data"),
                   "--parquet-dir", str(self.root / "parquet"),
                   "--store-dir", str(run_dir / "store"), *shlex.split(self.args.ours_args),
                   *extra]
        out = open(run_dir / "ours.log", "ab")  # noqa: SIM115 - closed with the process
        return [self.owned.popen(net.in_ns(net.CLIENT_NS, command), cwd=run_dir, env=env,
                                 stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL)]

    def _collect_ours(self, run_dir: Path, result: Run) -> None:
        import pyarrow.parquet as pq

        files = sorted(p for p in (run_dir / "store").glob("**/[0-9]*.parquet")
                       if "_errors" not in p.parts)
        for path in files:
            table = pq.read_table(path, columns=["url", "status", "error_class",
                                                 "error_message", "http_status"]).to_pylist()
            for rec in table:
                row = self.index.get(rec["url"])
                if row is None:
                    continue
                result.outcome[row] = ours_class(rec["status"], rec["error_class"])
                status = rec["http_status"]
                result.detail[row] = (f"{status} " if status else "") + \
                    (rec["error_message"] or "")[:200]
        if not files:
            result.error = f"no shard parquet under {run_dir}/store"

    _launch_ours_lab = _launch_ours
    _collect_ours_lab = _collect_ours

    def _launch_ours_once(self, run_dir: Path) -> list[subprocess.Popen]:
        return self._launch_ours(run_dir, "--retry-rounds", "0")

    _collect_ours_once = _collect_ours

    # -- img2dataset
    def _launch_img_to_dataset(self, run_dir: Path) -> list[subprocess.Popen]:
        command = img2dataset.command(self.i2d_python, self.root / "parquet" / SUBSET,
                                      run_dir / "out", 2, 64, *img2dataset.RAW)
        out = open(run_dir / "img2dataset.log", "ab")  # noqa: SIM115
        return [self.owned.popen(net.in_ns(net.CLIENT_NS, command), cwd=run_dir, env=self.env,
                                 stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL)]

    def _collect_img_to_dataset(self, run_dir: Path, result: Run) -> None:
        for url, status, message in img2dataset.rows(run_dir / "out"):
            row = self.index.get(url)
            if row is not None:
                result.outcome[row] = img2dataset.classify(status, message)
                result.detail[row] = (message or "")[:200]
        if not any((run_dir / "out").glob("*.parquet")):
            result.error = f"no shard parquet under {run_dir}/out"

    # -- the bare loop
    def _launch_bare(self, run_dir: Path) -> list[subprocess.Popen]:
        out = open(run_dir / "bare.log", "ab")  # noqa: SIM115
        a = self.args
        return [self.owned.popen(
            net.in_ns(net.CLIENT_NS, bench_command(
                "bare", "field", "--urls", str(self.root / "urls.tsv"), "--out",
                str(run_dir / "out"), "--index", str(i), "--nproc", str(a.bare_procs),
                "--concurrency", str(a.bare_concurrency), "--dns-tries",
                str(a.bare_dns_tries or 0))),
            env=self.env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL) for i in range(a.bare_procs)]

    def _collect_bare(self, run_dir: Path, result: Run) -> None:
        client_done = []
        for path in sorted((run_dir / "out").glob("results-*.jsonl")):
            for line in path.read_text().splitlines():
                row, kind, detail, when = json.loads(line)
                result.outcome[row] = kind
                result.detail[row] = detail
                client_done.append(when)
        client_done.sort()
        n = len(client_done)
        if n >= 10:
            span = client_done[math.ceil(0.9 * n) - 1] - client_done[math.ceil(0.1 * n) - 1]
            if span > 0:
                result.note += f"client-side steady {0.8 * n / span:,.0f} rows/s; "


# ---------------------------------------------------------------- the report

def compact_series(values: list[int], width: int = 40) -> str:
    if not values:
        return "-"
    step = max(1, math.ceil(len(values) / width))
    values = [max(values[i:i + step]) for i in range(0, len(values), step)]
    return f"(max of each {step} s) " + " ".join(str(v) for v in values)


def report(args: argparse.Namespace, sim: Sim, runs: list[Run], loopback: list[dict]) -> bool:
    mb = 1e6
    rows = len(sim.urls)
    expected = sim.expected
    served_ok = [r for r in range(rows) if expected[r] == "ok"]
    by_tool: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_tool[run.tool].append(run)
    print()
    print(f"field: {rows:,} rows ({len(served_ok):,} served correctly), {args.rounds} "
          f"round(s), {len(sim.hosts):,} names, seed {args.seed}; {os.cpu_count()} cores, "
          f"load average now {os.getloadavg()[0]:.2f}; ours args: {args.ours_args or '-'}")
    header = (f"{'tool':<12}{'rows/s':>8}{'steady':>8}{'wall s':>8}{'tail s':>8}"
              f"{'cpu ms/row':>11}{'srv ms/row':>11}{'ok':>8}{'ok/served':>10}"
              f"{'RSS/worker MB':>14}{'other MB':>9}{'req/row':>8}{'conn/row':>9}{'dns q':>7}")
    rule = table_head(header)
    summary: dict[str, dict] = {}
    for tool in TOOLS:
        group = by_tool.get(tool)
        if not group:
            continue
        good = [r for r in group if r.error is None]
        s = summary[tool] = {
            "rate": median([r.rate for r in good]),
            "steady": median([r.steady for r in good]),
            "seconds": median([r.seconds for r in good]),
            "tail": median([r.tail for r in good]),
            "cpu": median([r.cpu * 1000 / r.rows for r in good]),
            "cpu_workers": median([r.cpu_workers * 1000 / r.rows for r in good]),
            "cpu_image": median([r.cpu * 1000 / r.count()["ok"] for r in good
                                 if r.count()["ok"]]),
            "server": median([r.server_cpu * 1000 / r.rows for r in good]),
            "ok": median([r.count()["ok"] for r in good]),
            "ok_served": median([sum(r.outcome[i] == "ok" for i in served_ok) for r in good]),
            "rss_worker": max((r.rss_worker for r in group), default=0),
            "rss_other": max((r.rss_other for r in group), default=0),
            "requests": median([r.requests / r.rows for r in good]),
            "connections": median([r.connections / r.rows for r in good]),
            "dns": median([r.dns_queries for r in good]),
            "errors": [r.error or r.warning for r in group if r.error or r.warning],
        }
        print(f"{tool:<12}{fmt(s['rate']):>8}{fmt(s['steady']):>8}{fmt(s['seconds'], '.1f'):>8}"
              f"{fmt(s['tail'], '.1f'):>8}{fmt(s['cpu'], '.2f'):>11}{fmt(s['server'], '.2f'):>11}"
              f"{fmt(s['ok']):>8}{fmt(s['ok_served']):>10}{s['rss_worker'] / mb:>14,.0f}"
              f"{s['rss_other'] / mb:>9,.0f}{fmt(s['requests'], '.2f'):>8}"
              f"{fmt(s['connections'], '.2f'):>9}{fmt(s['dns']):>7}")
    print(rule)
    print("CPU ms/row in the worker processes alone (the rest is start-up, Dagster, enqueue, "
          "Redis): " + ", ".join(f"{tool} {fmt(s['cpu_workers'], '.2f')}"
                                 for tool, s in summary.items()))
    for run in runs:
        if run.cpu_others:
            print(f"  {run.tool}, round {run.round + 1}: CPU outside the worker processes, ms/row: "
                  + ", ".join(f"{kind} {seconds * 1000 / run.rows:.2f}" for kind, seconds
                              in sorted(run.cpu_others.items(), key=lambda kv: -kv[1])
                              if seconds * 1000 / run.rows >= 0.005))
    for index, result in enumerate(loopback):
        print(f"loopback benchmark, run {index + 1} (bench/compare.py, https with a new TLS "
              "connection per image, `run` with its defaults): " + loopback_line(result))
    print("rows/s: rows / wall time (launch to exit); steady: rows/s while 10%..90% of the rows "
          "the servers see were finished (scaled to all rows); tail: 99% of those rows -> "
          "exit; cpu: user+sys of the tool's process tree; srv: the DNS and web servers; "
          "ok/served: successes among rows served correctly; medians over rounds, RSS max")
    print()
    print("outcomes by class (each run):")
    for run in runs:
        counts = run.count()
        text = tally(counts, spec=",")
        print(f"  round {run.round + 1} {run.tool:<12} {text}"
              + (f"  ERROR {run.error or run.warning}" if run.error or run.warning else ""))
    exp = Counter(expected)
    print(f"  served       {tally(exp, spec=',')}")
    print()
    print("in flight at the web servers, sampled each second: fetches (connections in their "
          "handshake round trips + requests being answered; DNS waits and connects to "
          "blackholed hosts are not seen) and open connections (idle keep-alive ones too)")
    for run in runs:
        fetches = [r for _, r in run.series]
        conns = [c for c, _ in run.series]
        label = f"round {run.round + 1} {run.tool:<12}"
        print(f"  {label} fetches     peak {max(fetches, default=0):>4}; "
              f"{compact_series(fetches)}")
        print(f"  {' ' * len(label)} connections peak {max(conns, default=0):>4}; "
              f"{compact_series(conns)}; DNS answers pending at most {run.dns_pending}")
    notes = [(run, run.note) for run in runs if run.note]
    for run, note in notes:
        print(f"  note: round {run.round + 1} {run.tool}: {note.rstrip('; ')}")
    # per-row comparisons
    print()
    print("per row (summed over rounds; each tool against the others of its round, on the "
          "rows served correctly):")
    rounds = sorted({r.round for r in runs})
    pairs: dict[tuple[str, str], Counter] = defaultdict(Counter)
    missed: dict[str, Counter] = defaultdict(Counter)
    false_ok: dict[str, Counter] = defaultdict(Counter)
    mismatch: dict[str, Counter] = defaultdict(Counter)
    examples: dict[tuple[str, str], list[str]] = defaultdict(list)
    for round_ in rounds:
        these = {r.tool: r for r in runs if r.round == round_ and r.error is None}
        for a, b in itertools.permutations(these, 2):
            ra, rb = these[a], these[b]
            for i in served_ok:
                if ra.outcome[i] == "ok" and rb.outcome[i] != "ok":
                    pairs[(a, b)][rb.outcome[i]] += 1
        for tool, run in these.items():
            for i in range(rows):
                got, want = run.outcome[i], expected[i]
                if want == "ok" and got != "ok":
                    missed[tool][got] += 1
                    key = (tool, got)
                    if len(examples[key]) < 2:
                        examples[key].append(f"{sim.urls[i]} [{sim.served[i]}]: "
                                             f"{run.detail[i][:140]}")
                elif want != "ok" and got == "ok":
                    false_ok[tool][sim.served[i]] += 1
                elif got != want:
                    mismatch[tool][f"{sim.served[i]}->{got}"] += 1
    for (a, b), counter in sorted(pairs.items()):
        if counter:
            print(f"  ok with {a}, failed with {b}: {sum(counter.values()):,} "
                  f"({tally(counter)})")
    for tool in TOOLS:
        if tool not in by_tool:
            continue
        counter = missed.get(tool, Counter())
        print(f"  {tool}: served correctly but failed: {sum(counter.values()):,}"
              + (f" ({tally(counter)})" if counter else ""))
        for kind in counter:
            for example in examples[(tool, kind)]:
                print(f"      e.g. {example}")
        if false_ok.get(tool):
            print(f"  {tool}: served as a failure but counted ok: {tally(false_ok[tool])}")
        if mismatch.get(tool):
            print(f"  {tool}: failed with another class than served (served->got): "
                  + tally(mismatch[tool], 8))
    halves = half_dead(sim, runs)
    # ratios and targets
    ours, bare, i2d = summary.get("ours", {}), summary.get("bare", {}), \
        summary.get("img2dataset", {})
    lab = summary.get("ours-lab", {})

    def ratio(a: dict, b: dict, key: str) -> float | None:
        return a[key] / b[key] if a.get(key) and b.get(key) else None

    steady = ratio(ours, bare, "steady")
    wall = ratio(ours, bare, "seconds")
    vs_i2d = ratio(ours, i2d, "rate")
    print()
    print(f"ratios: ours/bare steady rows/s {fmt(steady, '.2f')}x, ours/bare wall time "
          f"{fmt(wall, '.2f')}x, ours/img2dataset rows/s {fmt(vs_i2d, '.2f')}x, "
          f"ours/bare CPU per row {fmt(ratio(ours, bare, 'cpu'), '.2f')}x (workers "
          f"{fmt(ratio(ours, bare, 'cpu_workers'), '.2f')}x), ours field/lab CPU per row "
          f"{fmt(ratio(ours, lab, 'cpu'), '.2f')}x")
    targets = Targets()
    target = targets.check

    target("steady rows/s: ours / bare", steady, 0.8, True)
    target("wall time: ours / bare", wall, 1.5, False)
    target("rows/s: ours / img2dataset", vs_i2d, 10, True)
    # "No worse than on loopback": CPU per image against the loopback benchmark run in this
    # invocation (its `run`, https, a new connection per image). The twin at zero latency
    # (ours-lab) is printed above as a ratio: where the field's CPU goes, not a target.
    looped = [r["cpu"] for r in loopback if not r.get("error")]
    for result in loopback:
        if result.get("error"):
            targets.add("loopback: every run completed", result["error"][:200], False)
    target("CPU per image: ours in the field / on loopback (compare.py)",
           ours.get("cpu_image") / median(looped) if ours.get("cpu_image") and looped
           else None, 1.0, False)
    if ours.get("ok_served") is not None and bare.get("ok_served") is not None:
        good = ours["ok_served"] >= bare["ok_served"]
        targets.add("successes on rows served correctly: ours >= bare",
                    f"{ours['ok_served']:,.0f} vs {bare['ok_served']:,.0f} of "
                    f"{len(served_ok):,}", good)
    else:
        targets.add("successes on rows served correctly: ours >= bare", "n/a", None)
    target("peak RSS per worker process (MB)", ours.get("rss_worker") and
           ours["rss_worker"] / mb, 250, False, " MB", ",.0f")
    for label, got in halves.get("ours", {}).items():
        targets.add(f"ours: {label}", f"{got[0]:,} of {got[1]:,}", got[0] == got[1])
    once = summary.get("ours-once")
    if once and ours:
        later_tries(targets, sim, runs, ours, once)
    for tool, s in summary.items():
        if s["errors"]:
            targets.add(f"{tool}: every run completed", "; ".join(s["errors"])[:200], False)
    return targets.report()


def half_dead(sim: Sim, runs: list[Run]) -> dict[str, dict[str, tuple[int, int]]]:
    """Per tool, the rows of the half-dead hosts that got what their own server did (the
    fewest over its rounds); printed per run."""
    groups = [("rows of the host that reset connections for a while", sim.flap_rows),
              ("https rows of the host whose port 80 refuses", sim.split_rows.get("https", [])),
              ("http rows of that host (connection)", sim.split_rows.get("http", []))]
    groups = [g for g in groups if g[1]]
    if not groups:
        return {}
    expected = sim.expected
    print()
    print("hosts half dead: rows that got what their own server does (served outside the "
          "window)")
    worst: dict[str, dict[str, tuple[int, int]]] = defaultdict(dict)
    for run in runs:
        if run.error:
            continue
        shown = []
        for label, rows in groups:
            got = sum(run.outcome[i] == expected[i] for i in rows)
            shown.append(f"{got:,}/{len(rows):,}")
            if label not in worst[run.tool] or got < worst[run.tool][label][0]:
                worst[run.tool][label] = (got, len(rows))
        print(f"  round {run.round + 1} {run.tool:<12} " + ", ".join(
            f"{label}: {text}" for (label, _), text in zip(groups, shown, strict=True)))
    return worst


def later_tries(targets: Targets, sim: Sim, runs: list[Run], ours: dict, once: dict) -> None:
    """What the later tries (ours) cost and gave against the same run without them
    (ours-once): the wall time, the successes, and the class of every row whose servers
    answered both alike (every row but the flapping host's)."""
    from laion_dagster.core.settings import Settings

    delay = Settings.model_fields["retry_delay"].default
    extra = ours["seconds"] - once["seconds"] if ours.get("seconds") and once.get("seconds") \
        else None
    targets.check(f"later tries: wall time ours - ours-once (s; the delay is {delay:g})",
                  extra, delay, False, " s", ".1f")
    if ours.get("ok") is not None and once.get("ok") is not None:
        targets.add("later tries: successes ours >= ours-once",
                    f"{ours['ok']:,.0f} vs {once['ok']:,.0f}", ours["ok"] >= once["ok"])
    alike = set(range(len(sim.urls))) - set(sim.flap_rows)
    differ: Counter = Counter()
    compared = 0
    for round_ in sorted({r.round for r in runs}):
        these = {r.tool: r for r in runs if r.round == round_ and r.error is None}
        if "ours" in these and "ours-once" in these:
            compared += 1
            a, b = these["ours"].outcome, these["ours-once"].outcome
            differ.update(f"{b[i]}->{a[i]}" for i in alike if a[i] != b[i])
    if compared:
        targets.add("later tries: rows answered alike have one class in ours and ours-once",
                    f"{sum(differ.values()):,} differ over {compared} round(s)"
                    + (f" ({tally(differ, 5)})" if differ else ""), not differ)


# ---------------------------------------------------------------- the loopback benchmark

def run_loopback(owned: Owned, root: Path, images: int, index: int) -> dict:
    """bench/compare.py's `run` on https with a new connection per image, as many images as
    the field has rows: the loopback figure, in this invocation. Its medians, or an error.
    It runs in a session of its own, as our other processes: Ctrl-C here stops it with
    SIGTERM (cleanup), on which it stops its nginx and its run in order."""
    out = root / f"loopback-{index}.json"
    command = bench_command("compare", "--images", str(images), "--rounds", "1", "--modes",
                            "https-newconn", "--tools", "run", "--enqueue-rounds", "0",
                            "--json", str(out), "--tmp", str(root))
    with open(root / f"loopback-{index}.log", "wb") as log_file:
        done = owned.popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL)
        done.wait()
        owned.forget(done)
    try:
        result = json.loads(out.read_text())["https-newconn/run"]
    except (OSError, ValueError, KeyError):
        return {"error": f"bench/compare.py exited {done.returncode} without figures; see "
                         f"{root / f'loopback-{index}.log'}"}
    if result["errors"] or not result["complete"] or result["cpu"] is None:
        return {"error": f"the loopback run did not complete: {result['errors']}"}
    return result


def loopback_line(result: dict) -> str:
    if result.get("error"):
        return f"ERROR {result['error']}"
    return f"{result['rate']:,.0f} images/s, CPU {result['cpu']:.2f} ms/image"


# ---------------------------------------------------------------- self-check

def self_check(rows: list) -> int:
    """Run inside fieldclient: one row of each kind the simulation serves, fetched with urllib
    (as img2dataset does), must fail or succeed as planned; also proves the trust bundle and
    the resolver work. Prints one JSON line."""
    import concurrent.futures
    import urllib.request

    def fetch(item):
        row, url, want = item
        try:
            with urllib.request.urlopen(url, timeout=CHECK_TIMEOUT) as response:
                if "noai" in ",".join(response.headers.get_all("X-Robots-Tag") or []):
                    got, status, message = "opted_out", "failed", ""
                else:
                    body = response.read()
                    got = "ok" if looks_like_image(body) else "not_image"
                    if body.startswith(b"\xff\xd8\xff") and body[3:6] == bytes([7, 10, 13]):
                        got = "decode_error"
                    status, message = "success", ""
        except Exception as error:  # what img2dataset would record
            status, message = "failed_to_download", str(error)
            got = img2dataset.classify(status, message)
        return row, want, got, message[:120]

    with concurrent.futures.ThreadPoolExecutor(len(rows)) as pool:
        results = list(pool.map(fetch, rows))
    print(json.dumps(results))
    return 0


def run_self_check(sim: Sim, bundle: Path, root: Path) -> None:
    """One row per served kind (the quick ones), fetched from fieldclient; raise if off plan."""
    slow = {"hang", "trickle", "dns_unanswered"}
    chosen, seen = [], set()
    for row, kind in enumerate(sim.served):
        host = sim.hosts[sim.row_host[row]]
        if kind in seen or kind in slow or host.dns_delay > 0.5:
            continue
        seen.add(kind)
        chosen.append([row, sim.urls[row], expected_class(kind)])
    started = time.monotonic()
    command = net.in_ns(net.CLIENT_NS, bench_command("field", "--self-check",
                                                     json.dumps(chosen)))
    out = subprocess.run(command, env=measure.client_env(bundle), capture_output=True, text=True,
                         timeout=120, cwd=measure.REPO)
    if out.returncode != 0:
        raise RuntimeError(f"self-check failed: {out.stderr[-2000:]}")
    wrong = []
    for row, want, got, message in json.loads(out.stdout.strip().splitlines()[-1]):
        kind = sim.served[row]
        # urllib cannot tell a blackhole's connect timeout (3 s here) from others; fine.
        if got != want:
            wrong.append(f"row {row} ({kind}): expected {want}, urllib got {got} {message}")
    if wrong:
        raise RuntimeError("the simulation does not serve as planned:\n  " + "\n  ".join(wrong))
    log(f"self-check: {len(chosen)} kinds ({', '.join(sorted(seen))}) behave as planned, "
        f"fetched from {net.CLIENT_NS} through its resolver and the CA bundle "
        f"({time.monotonic() - started:.1f}s)")


# ---------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--parts", type=int, default=4, help="parquet parts (one subset)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--img2dataset-rounds", type=int, default=1, help=(
        "rounds img2dataset takes part in (the first ones): a run of it takes many times "
        "the others', and its figures vary less than theirs"))
    parser.add_argument("--tools", default=",".join(TOOLS),
                        help=f"comma-separated, of {', '.join(TOOLS)} (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ours-args", default="",
                        help='extra flags for `laion-dagster run`, e.g. "--concurrency 256"')
    parser.add_argument("--quick", action="store_true", help="2,000 rows, 1 round")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--hosts", type=int, default=10_000, help="host names")
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of rows/host")
    parser.add_argument("--cdn-hosts", type=int, default=50,
                        help="the largest hosts: CDN-like, never failing whole")
    parser.add_argument("--rtt-median", type=float, default=0.080, help="seconds")
    parser.add_argument("--cdn-rtt", type=float, default=0.030, help="seconds")
    parser.add_argument("--rate-median", type=float, default=2e6, help="bytes/s per answer")
    parser.add_argument("--hold", type=float, default=60.0,
                        help="seconds a hanging or trickling row holds its connection")
    parser.add_argument("--flap-rank", type=int, default=4, help=(
        "the host (by rows, 0 the largest; a CDN-like one) that resets every connection for "
        "a few seconds of each run; -1: none"))
    parser.add_argument("--flap-at", type=float, default=10.0,
                        help="seconds after a tool's launch when its connections reset")
    parser.add_argument("--flap-seconds", type=float, default=8.0,
                        help="how long they do; 0: never")
    parser.add_argument("--pool", type=int, default=300, help="distinct images")
    parser.add_argument("--web-procs", type=int, default=2, help="web server processes")
    parser.add_argument("--bare-procs", type=int, default=2)
    parser.add_argument("--bare-concurrency", type=int, default=256)
    parser.add_argument("--bare-dns-tries", type=int, default=None,
                        help="c-ares tries for the bare loop (default: c-ares's own, 3)")
    parser.add_argument("--run-timeout", type=float, default=3600.0)
    parser.add_argument("--tmp", type=Path, default=None, help="parent of the work directory")
    img2dataset.add_option(parser)
    # a child: the self-check, run inside the client namespace
    parser.add_argument("--self-check", metavar="ROWS", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.rounds = 2_000, 1
    return args


def main() -> int:
    args = parse_args()
    if args.self_check:
        return self_check(json.loads(args.self_check))
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    if set(tools) - set(TOOLS):
        raise SystemExit(f"unknown tools: {', '.join(sorted(set(tools) - set(TOOLS)))}")
    problems = net.preflight()
    if "loopback" in tools and not nginx_binary():
        problems.append("nginx not found, which the loopback tool needs (apt-get install -y "
                        "nginx), or leave it out: --tools ours,img2dataset,bare,ours-lab")
    if "ours" in tools and not OURS_BIN.exists():
        problems.append(f"{OURS_BIN} not found (pip install -e . in {measure.REPO}/.venv)")
    try:
        import aiodns  # noqa: F401
    except ImportError:
        if "bare" in tools:
            problems.append(f"aiodns missing: {sys.executable} -m pip install aiodns")
    if problems:
        raise SystemExit("cannot run:\n  " + "\n  ".join(problems))
    lock = net.Lock()  # noqa: F841 - held until exit
    measure.clean_environ()
    owned = Owned()
    parent = Path(args.tmp or tempfile.gettempdir())
    for stale in parent.glob("laion-field-*/.running"):  # a crashed run's (we hold the lock)
        shutil.rmtree(stale.parent, ignore_errors=True)
    root = Path(tempfile.mkdtemp(prefix="laion-field-", dir=parent))
    (root / ".running").touch()
    cleaned = []

    def cleanup() -> None:
        if cleaned:
            return
        cleaned.append(True)
        owned.stop_all()
        net.teardown()
        if args.keep:
            (root / ".running").unlink(missing_ok=True)
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    atexit.register(cleanup)
    measure.stop_on_signals()
    try:
        if net.ns_exists(net.WEB_NS) or net.ns_exists(net.CLIENT_NS):
            log("removing the namespaces a previous run left")
        net.teardown()
        i2d = img2dataset.find_python(args.img2dataset_python) if "img2dataset" in tools \
            else None
        log(f"work directory {root}; load average {os.getloadavg()[0]:.2f}")
        started = time.perf_counter()
        pool = make_pool(root / "pool", args.pool, args.seed)
        sim = build_sim(args, pool)
        write_inputs(sim, root, args)
        sizes = [p[2] for p in pool]
        log(f"pool: {len(pool)} images, {min(sizes) / 1e3:.0f}-{max(sizes) / 1e3:.0f} KB, mean "
            f"{statistics.mean(sizes) / 1e3:.0f} KB; {args.parts} parts in "
            f"{root / 'parquet' / SUBSET} ({time.perf_counter() - started:.1f}s)")
        describe(sim, args)
        bundle = net.make_certs(root / "certs")
        by_net = defaultdict(list)
        for address in sim.addresses:
            by_net[address.net].append(address.ip)
        net.setup(by_net["blackhole"], by_net["refused"], by_net["unreachable"],
                  by_net["closed_http"])
        servers = Servers(owned, root, root / "certs", args.web_procs)
        servers.start()
        log(f"namespaces {net.WEB_NS} and {net.CLIENT_NS} up; DNS on {net.DNS_IP}, "
            f"{args.web_procs} web server processes on {net.HOST_NET} :80 and :443; "
            f"nftables drops {len(by_net['blackhole'])} blackholed addresses")
        run_self_check(sim, bundle, root)
        bench = Bench(args, owned, root, sim, servers, bundle, i2d)
        runs: list[Run] = []
        loopback: list[dict] = []
        for round_ in range(args.rounds):
            shift = round_ % len(tools)
            for tool in tools[shift:] + tools[:shift]:
                if tool == "img2dataset" and round_ >= args.img2dataset_rounds:
                    continue
                if not servers.alive():
                    raise RuntimeError("a server process died; see "
                                       f"{root / 'servers.log'}")
                log(f"round {round_ + 1}: {tool} ...")
                if tool == "loopback":
                    loopback.append(run_loopback(owned, root, len(sim.urls), len(loopback)))
                    log(f"round {round_ + 1}: loopback    {loopback_line(loopback[-1])}")
                    continue
                run = bench.run(tool, round_)
                runs.append(run)
                counts = run.count()
                log(f"round {round_ + 1}: {tool:<11} {run.rate:7,.0f} rows/s, steady "
                    f"{fmt(run.steady)}, {run.seconds:6.1f}s, tail {fmt(run.tail, '.1f')}s; "
                    f"CPU {run.cpu * 1000 / run.rows:.2f} ms/row (workers "
                    f"{run.cpu_workers * 1000 / run.rows:.2f}), servers "
                    f"{run.server_cpu * 1000 / run.rows:.2f} ms/row ("
                    f"{run.server_cpu / max(run.seconds, 1e-9):.0%} of a core); ok "
                    f"{counts['ok']:,}/"
                    f"{run.rows:,}; RSS/worker {run.rss_worker / 1e6:,.0f} MB"
                    + (f"; ERROR {run.error or run.warning}"
                       if run.error or run.warning else ""))
        good = report(args, sim, runs, loopback)
        return 0 if good else 1
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        return 130
    finally:
        cleanup()


if __name__ == "__main__":
    sys.exit(main())
