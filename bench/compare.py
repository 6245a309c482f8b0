"""Our pipeline against img2dataset and a bare aiohttp loop, on one corpus (prints figures).

    python -m bench.compare                      # 20,000 images, 3 alternating rounds
    python -m bench.compare --quick              # smoke run: 2,000 images, 1 round
    python -m bench.compare --modes http,resized --rounds 5 --profile PROFILE_DIR

Everything is served on loopback by an nginx this script starts itself, on 127.0.0.2 to
127.0.0.9, over http, https with keep-alive, and https with a new TCP connection and a full
handshake per image, as on the real web (bench/loopback.py). Every client trusts the test
certificate through the machine's CA bundle with it appended: our workers and img2dataset
through SSL_CERT_FILE (both build their SSL context with ssl.create_default_context(), which
reads it), the bare loop through cafile=. Every tool gets the same URL list, with IP addresses
in it (no tool resolves anything; ours also has host_map set, so a name could not reach DNS).

Tools: ours (the worker pool on an enqueued part: the workers' rate, start-up apart), run
(`laion-dagster run` with its defaults on the same rows cut in four parts, from launch to exit:
what a user times; https-newconn only), img2dataset (bench/img2dataset.py: which Python runs
it), bare (bench/bare.py).

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
Lua scripts count) and peak Redis memory (a fresh embedded Redis per run). Before the rounds,
bench/enqueue.py's measurement over --enqueue-rounds.

Prints a table, the ratios and each target with PASS/FAIL; exits 1 when a target fails or a run
is incomplete. Nothing but loopback is ever contacted; no name is resolved; the machine's Redis
is not used (each run of ours starts the project's embedded server in a temporary directory).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench import img2dataset, loopback, measure, pool
from bench.enqueue import enqueue_once, make_part
from bench.loopback import HOSTS, PART_FILE, SUBSET, Corpus, Web
from bench.measure import Owned, Sampler, children_cpu
from bench.report import Targets, fmt, log, median, table_head, tally

ALL_MODES = ("http", "https", "https-newconn", "resized")
DEFAULT_MODES = ("http", "https-newconn", "resized")
TOOLS = ("ours", "run", "img2dataset", "bare")
IMAGE_EXTS = {"jpg", "jpeg", "png", "webp", "gif", "bmp", "tiff", "avif", "heic", "ico"}


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


def py_spy() -> str:
    return shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")


# ---------------------------------------------------------------- one run of one tool

@dataclass
class Result:
    tool: str
    mode: str
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
    def __init__(self, args: argparse.Namespace, owned: Owned, root: Path, web: Web,
                 i2d_python: str | None):
        self.args = args
        self.owned = owned
        self.root = root
        self.web = web
        self.corpus = web.corpus
        self.nginx = web.nginx
        self.i2d_python = i2d_python
        self.env = measure.client_env(web.cert)
        self.runs = 0

    def run(self, tool: str, mode: Mode, profile: Path | None = None) -> Result:
        self.runs += 1
        run_dir = self.root / "runs" / f"{self.runs:03d}-{tool}-{mode.name}"
        run_dir.mkdir(parents=True)
        result = Result(tool, mode.name, len(self.corpus.files))
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
        from laion_dagster.core.control.enqueue import enqueue_part
        from laion_dagster.core.input import parts
        from laion_dagster.core.queue.connection import connect
        from laion_dagster.core.queue.protocol import Queue

        a = self.args
        state = self.owned.redis(run_dir / "redis")
        resize = ({"resize_mode": "keep_ratio", "image_size": 256, "encode_format": "jpg"}
                  if mode.resize else {"resize_mode": "no"})
        settings = pool.settings(run_dir, self.web.lists[mode.transport], state.url, "cmp", a,
                                 store_dir=run_dir / "store", **resize)
        part = parts.discover(settings.parts_root)[0]
        workers = pool.Pool(self.owned, settings, self.env, run_dir / "worker.log")
        watch = workers.watch
        queue = Queue(connect(settings, name="compare-enqueue"), settings.prefix)
        try:
            stats0 = watch.info("commandstats")
            total0 = int(watch.info("stats")["total_commands_processed"])
            cpu0 = watch.info("cpu")
            ru0, srv0 = children_cpu(), self.nginx.cpu()
            launched = time.perf_counter()
            workers.start()
            sampler = workers.sampler
            workers.wait_ready()
            ready = time.perf_counter()
            sampler.take()
            result.idle_proc = sampler.peak_of("child")
            spies = self._profile(profile, sampler, workers.proc.pid, mode) if profile else []
            thread0 = time.thread_time()
            enqueue_part(queue, part, settings)
            enqueue_cpu = time.thread_time() - thread0
            try:
                workers.wait_done(part.key, a.run_timeout, a.stall_timeout)
            except pool.Stalled as stalled:
                self._dump(sampler, run_dir)
                raise RuntimeError(f"{stalled}; py-spy dumps in {run_dir}") from None
            done = time.perf_counter()
            srv1 = self.nginx.cpu()
            stats1 = watch.info("commandstats")
            total1 = int(watch.info("stats")["total_commands_processed"])
            cpu1 = watch.info("cpu")
            memory = watch.info("memory")
            sampler.take()
            workers.stop()
            for spy in spies:
                spy.wait(timeout=60)
                self.owned.forget(spy)
            ru1 = children_cpu()
        finally:
            workers.close()
        result.seconds = done - launched
        result.warm = done - ready
        result.startup = ready - launched
        result.client_cpu = max(ru1 - ru0, sum(sampler.cpu.values())) + enqueue_cpu
        result.server_cpu = srv1 - srv0
        result.peak_proc = sampler.peak_of("child")
        result.peak_other = sampler.peak_of("root")
        result.peak_tree = sampler.peak_tree
        # Our own commands: the three INFO before the run (the last three, after it, come
        # after total1 was read but count in commandstats) and the pool's polling.
        mine = workers.polls + Counter(info=3)
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
        for pid in sampler.role:
            with open(run_dir / f"py-spy-dump-{pid}.txt", "wb") as out:
                subprocess.run([py_spy(), "dump", "--pid", str(pid)], stdout=out,
                               stderr=subprocess.STDOUT, timeout=30, check=False)

    def _profile(self, profile: Path, sampler: Sampler, root: int, mode: Mode):
        sampler.take()
        spies = []
        profile.mkdir(parents=True, exist_ok=True)
        for pid, role in sampler.role.items():
            if role == "child" and pid != root:
                out = profile / f"ours-{mode.name}-{pid}.txt"
                spies.append(self.owned.popen(
                    [py_spy(), "record", "--pid", str(pid), "--rate", "200", "--format", "raw",
                     "--nonblocking", "--subprocesses", "-o", str(out)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1.0)  # py-spy attaches
        return spies

    # -- a tool that runs to its end: `laion-dagster run`, img2dataset
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
        result.peak_tree = sampler.peak_tree
        return sampler

    def _run_run(self, mode: Mode, run_dir: Path, result: Result, _profile):
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        store = run_dir / "store"
        command = [str(Path(sys.executable).with_name("laion-dagster")), "run",
                   "--parquet-dir", str(self.web.lists[f"{mode.transport}-parts"]),
                   "--store-dir", str(store), "--data-dir", str(run_dir / "data")]
        env = dict(self.env)
        env["LAION_ALLOWED_NETWORKS"] = json.dumps(["127.0.0.0/8"])  # the IP-literal URLs
        if mode.resize:
            env.update(LAION_RESIZE_MODE="keep_ratio", LAION_IMAGE_SIZE="256",
                       LAION_ENCODE_FORMAT="jpg")
        sampler = self._launch(command, run_dir, env, run_dir / "run.log", result,
                               "laion-dagster run")
        first = re.search(r"first image stored ([\d.]+)s", (run_dir / "run.log").read_text())
        result.startup = float(first.group(1)) if first else None
        result.peak_proc = sampler.peak_of("child")
        for pid, cpu in sampler.cpu.items():
            line = sampler.cmdline.get(pid, "")
            kind = "workers" if "spawn_main" in line else measure.process_kind(line)
            result.cpu_kinds[kind] += cpu
        for path in sorted(store.rglob("[0-9]*.parquet")):
            if "_errors" in path.parts:
                continue  # the parts' error files
            status = pq.read_table(path, columns=["status", "error_class"])
            ok = pc.sum(pc.equal(status.column("status"), "success")).as_py() or 0
            result.ok += ok
            result.failed += status.num_rows - ok
            result.failures.update(c for c in status.column("error_class").to_pylist() if c)
        result.on_disk, result.bytes_on_disk = count_tars(store)

    def _run_img_to_dataset(self, mode: Mode, run_dir: Path, result: Result, _profile):
        a = self.args
        out = run_dir / "out"
        command = img2dataset.command(
            self.i2d_python, self.web.lists[mode.transport] / SUBSET / PART_FILE, out,
            a.processes, a.concurrency, "--number_sample_per_shard", str(a.shard_size),
            "--retries", "0", "--extract_exif", "False", "--compute_hash", "sha256",
            *(img2dataset.RESIZED if mode.resize else img2dataset.RAW))
        sampler = self._launch(command, run_dir, self.env, run_dir / "img2dataset.log",
                               result, "img2dataset")
        result.peak_proc = sampler.peak_of()
        result.ok, result.failed, result.failures = img2dataset.stats(out)
        result.on_disk, result.bytes_on_disk = count_tars(out)

    # -- the bare loop
    def _run_bare(self, mode: Mode, run_dir: Path, result: Result, _profile):
        a = self.args
        urls = self.web.lists[mode.transport].parent / f"{mode.transport}.txt"
        out = run_dir / "out"
        ru0, srv0 = children_cpu(), self.nginx.cpu()
        launched = time.perf_counter()
        procs = []
        with open(run_dir / "bare.log", "ab") as log_file:
            for index in range(a.processes):
                procs.append(self.owned.popen(
                    measure.bench_command(
                        "bare", "loopback", "--urls", str(urls), "--out", str(out), "--index",
                        str(index), "--nproc", str(a.processes), "--cafile", str(self.web.cert),
                        "--concurrency", str(a.concurrency), "--loop", a.bare_loop),
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
    from laion_dagster.core.queue.connection import connect
    from laion_dagster.core.settings import Settings

    base = root / "enqueue"
    folder = base / "parquet" / "laion2B-en"
    folder.mkdir(parents=True)
    started = time.perf_counter()
    make_part(folder / "part-00000-bench-c000.snappy.parquet", rows)
    log(f"enqueue: wrote a {rows:,}-row part in {time.perf_counter() - started:.1f}s")
    redis_dir = base / "redis"
    state = owned.redis(redis_dir)
    rounds_ = []
    try:
        for index in range(rounds):
            settings = Settings(data_dir=base, redis_url=state.url, shard_size=10_000,
                                queue_high_watermark=rows * 2, prefix=f"enq{index}")
            client = connect(settings, name="compare-enqueue")
            client.flushall()
            rounds_.append(enqueue_once(client, settings))
            log(f"enqueue round {index + 1}: {rounds_[-1]['rows']:,} rows in "
                f"{rounds_[-1]['seconds']:.2f}s = {rounds_[-1]['rate']:,.0f} rows/s")
            client.flushall()
            client.close()
    finally:
        owned.stop_redis(redis_dir)
        shutil.rmtree(base, ignore_errors=True)
    rates = [r["rate"] for r in rounds_]
    return {"rows": rows, "rate": statistics.median(rates), "rates": rates,
            "commands": statistics.median(r["commands"] for r in rounds_),
            "memory": statistics.median(r["memory"] for r in rounds_)}


# ---------------------------------------------------------------- the report

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
    rule = table_head(header)
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
                print(f"{'':<26}failures: {tally(s['failures'], 5) or '-'}; errors: "
                      f"{'; '.join(s['errors']) or '-'}")
    print(rule)
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
                  + tally(kinds, spec=".3f"))
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
    img2dataset.add_option(parser)
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
    modes = [MODES[m.strip()] for m in args.modes.split(",") if m.strip()]
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = set(tools) - set(TOOLS)
    if unknown:
        raise SystemExit(f"unknown tools: {', '.join(sorted(unknown))}")
    measure.clean_environ()
    measure.stop_on_signals()
    owned = Owned()
    root = Path(tempfile.mkdtemp(prefix="laion-compare-", dir=args.tmp))
    web: Web | None = None
    try:
        i2d = img2dataset.find_python(args.img2dataset_python) if "img2dataset" in tools \
            else None
        log(f"work directory {root}; load average {os.getloadavg()[0]:.2f}")
        web = loopback.start(owned, root, args.images, args.pool, args.seed)
        enqueue = None
        if args.enqueue_rows > 0 and args.enqueue_rounds > 0:
            enqueue = enqueue_bench(owned, root, args.enqueue_rows, args.enqueue_rounds)

        bench = Bench(args, owned, root, web, i2d)
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
                    result = bench.run(tool, mode)
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
        if args.profile and "ours" in tools:
            for mode in modes:
                profiled = bench.run("ours", mode, profile=args.profile)
                log(f"profiled ours {mode.name}: {profiled.rate:,.0f} img/s under py-spy; "
                    f"stacks in {args.profile}")
        good = report(args, modes, results, enqueue, web.corpus)
        if args.json:
            write_json(Path(args.json), summarize(results))
        return 0 if good else 1
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        return 130
    finally:
        if web is not None:
            web.nginx.stop()
        owned.stop_all()
        if args.keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
