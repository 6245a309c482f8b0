"""Soak run: a worker pool downloads a LAION-like dataset while it is being knocked over.

    python -m bench.soak                 # 200,000 rows
    python -m bench.soak --rows 20000 --kill-interval 5

Everything runs on loopback: its own embedded Redis (a fresh data directory, append-only
file) and its own image server, with host names mapped straight to 127.0.0.1 (no DNS). The
parts are enqueued in a background thread against a high watermark while a worker pool
downloads them; meanwhile one worker process is SIGKILLed every --kill-interval seconds (its
supervisor restarts it), the whole pool is killed and started again a few times, and Redis is
SIGKILLed once and restarted on the same directory (it replays its append-only file). When
every part is done the parts are finalized and the outputs are checked from disk: every input
row must be in exactly one shard parquet (invalid URLs too, as failed), no sample may be in two
tars, and Redis's counters must agree with the files. Prints one table; exits 1 if anything was
lost or duplicated or the counters disagree.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import redis

from bench.measure import REPO, clean_environ, stop_on_signals, stop_redis
from bench.report import log, tally
from laion_dagster.core.control.accounting import finalize_part
from laion_dagster.core.control.enqueue import enqueue_part
from laion_dagster.core.input import parts
from laion_dagster.core.queue import embedded
from laion_dagster.core.queue.connection import connect
from laion_dagster.core.queue.protocol import Queue
from laion_dagster.core.settings import Settings
from laion_dagster.core.shards.files import leftovers
from laion_dagster.demo.dataset import DemoDataset, make_images, write_dataset
from laion_dagster.demo.server import ImageServer

HOSTS = tuple(f"img-{c}.test" for c in "abcdefgh")
SHARD_FILE = re.compile(r"^(\d+)\.parquet$")
TAR_FILE = re.compile(r"^(\d+)\.tar$")


# ---------------------------------------------------------------- the worker pool

class Pool:
    """One `laion-dagster worker` at a time, in its own process group, logging to a file."""

    def __init__(self, settings: Settings, log_path: Path):
        # main() has cleaned the environment already (bench/measure.py's clean_environ).
        self.env = {**os.environ, **settings.to_env()}
        self.grace = settings.shutdown_grace
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.seen: dict[int, psutil.Process] = {}  # every process of ours, for the cleanup
        self.lock = threading.Lock()  # the sampler thread looks at the processes too
        self.started = 0

    def start(self) -> None:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "laion_dagster.cli", "worker"], cwd=REPO, env=self.env,
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        self.started += 1
        with contextlib.suppress(psutil.Error), self.lock:
            self.seen[self.proc.pid] = psutil.Process(self.proc.pid)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def workers(self) -> list[psutil.Process]:
        """The supervisor's worker processes (multiprocessing spawn children)."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return []
        try:
            children = psutil.Process(proc.pid).children()
        except psutil.Error:
            return []
        found = []
        for child in children:
            try:
                cmdline = " ".join(child.cmdline())
            except psutil.Error:
                continue
            if "resource_tracker" in cmdline:
                continue
            with self.lock:
                self.seen.setdefault(child.pid, child)
            found.append(child)
        return found

    def stop(self, hard: bool) -> None:
        """SIGKILL the whole process group, or SIGTERM the supervisor (a clean stop)."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        group = [p for p in self.ours() if _running(p)]
        if proc.poll() is None:
            if hard:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5 if hard else self.grace + 30)
        except subprocess.TimeoutExpired:
            log("pool did not stop in time; killing its process group")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        # Worker processes notice a dead supervisor within a second; make sure of it.
        _, survivors = psutil.wait_procs([p for p in group if _running(p)], timeout=10)
        for p in survivors:
            with contextlib.suppress(psutil.Error):
                p.kill()
        with self.lock:
            self.seen = {pid: p for pid, p in self.seen.items() if _running(p)}

    def ours(self) -> list[psutil.Process]:
        with self.lock:
            return list(self.seen.values())

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# ---------------------------------------------------------------- sampling

@dataclass
class Samples:
    redis_memory: int = 0  # bytes, INFO memory used_memory
    queued_rows: int = 0
    worker_rss: dict[int, int] = field(default_factory=dict)  # pid -> peak bytes
    supervisor_rss: int = 0

    def take(self, client: redis.Redis, queue_key: str, pool: Pool) -> None:
        try:
            self.redis_memory = max(self.redis_memory, int(client.info("memory")["used_memory"]))
            self.queued_rows = max(self.queued_rows, int(client.get(queue_key) or 0))
        except redis.RedisError:
            pass  # Redis is being restarted
        proc = pool.proc
        if proc is not None:
            with contextlib.suppress(psutil.Error):
                rss = psutil.Process(proc.pid).memory_info().rss
                self.supervisor_rss = max(self.supervisor_rss, rss)
        for worker in pool.workers():
            with contextlib.suppress(psutil.Error):
                rss = worker.memory_info().rss
                self.worker_rss[worker.pid] = max(self.worker_rss.get(worker.pid, 0), rss)


def sampler(url: str, queue_key: str, pool: Pool, samples: Samples, stop: threading.Event,
            interval: float) -> None:
    # No retries: a sample missed while Redis restarts is better than a sampler that stalls.
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
    try:
        while not stop.wait(interval):
            try:
                samples.take(client, queue_key, pool)
            except Exception as error:  # a sample lost, never the sampler
                log(f"sampling failed: {error!r}")
    finally:
        client.close()


# ---------------------------------------------------------------- enqueue

@dataclass
class Enqueuer:
    settings: Settings
    part_list: list[parts.Part]
    peak_after_enqueue: int = 0  # queued rows right after each shard was added
    waited: float = 0.0
    shards: int = 0
    done: bool = False
    error: BaseException | None = None

    def run(self) -> None:
        try:
            queue = Queue(connect(self.settings, name="soak-enqueue"), self.settings.prefix)
            for part in self.part_list:
                report = enqueue_part(queue, part, self.settings, progress=lambda *_: self._note(
                    queue), poll=0.25)
                self.waited += report.waited_seconds
                self.shards += report.shards
                log(f"enqueued {part.key}: {report.rows:,} rows in {report.shards} shards "
                    f"({report.waited_seconds:.0f}s waiting on the watermark)")
            self.done = True
        except BaseException as error:  # reported by the main thread
            self.error = error

    def _note(self, queue: Queue) -> None:
        with contextlib.suppress(redis.RedisError):
            self.peak_after_enqueue = max(self.peak_after_enqueue, queue.queued_rows())


# ---------------------------------------------------------------- Redis restart

@dataclass
class RedisRestart:
    downtime: float = 0.0  # it always comes back at the same address, or restart_redis raises
    done_before: int = 0
    done_after: int = 0


def shards_done(queue: Queue, keys: list[str]) -> int:
    return sum(s.shards_done for s in queue.parts_states(keys).values())


def restart_redis(directory: Path, queue: Queue, keys: list[str]) -> RedisRestart:
    """SIGKILL the embedded server, then bring it back on the same directory."""
    result = RedisRestart()
    before = embedded.read_state(directory)
    assert before is not None, f"no embedded server state in {directory}"
    result.done_before = shards_done(queue, keys)
    started = time.monotonic()
    os.kill(before.pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(before.pid, 0)  # it is our child: reap it
    after = embedded.ensure_running(directory)
    if after.url != before.url:  # every client holds the old URL: it must come back there
        raise RuntimeError(f"Redis came back at another address ({_port(after.url)} instead "
                           f"of {_port(before.url)}, or with a new password)")
    result.downtime = time.monotonic() - started
    result.done_after = shards_done(queue, keys)
    return result


def _port(url: str) -> int:
    return int(redis.connection.parse_url(url)["port"])


# ---------------------------------------------------------------- checking the outputs

@dataclass
class PartCheck:
    key: str
    rows: int = 0
    ok: int = 0
    failed: int = 0
    invalid: int = 0
    dead: int = 0  # dead-lettered: in the error file, never written to a shard
    lost: int = 0
    duplicated: int = 0
    missing_images: int = 0  # success rows without their image in the tar
    invalid_downloaded: int = 0  # invalid rows with another outcome than invalid_url
    error_file_mismatch: int = 0
    outcome_mismatch: Counter = field(default_factory=Counter)
    counters: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (redis, files)

    @property
    def counters_agree(self) -> bool:
        return all(a == b for a, b in self.counters.values())


def check_part(settings: Settings, queue: Queue, part: parts.Part,
               dataset: DemoDataset) -> PartCheck:
    check = PartCheck(part.key)
    part_dir = settings.store_root / part.relative_dir
    check.rows = pq.read_metadata(part.path).num_rows
    invalid = {row for (name, row), outcome in dataset.expected_by_row.items()
               if name == part.path.name and outcome == "invalid_url"}
    seen: Counter[int] = Counter()
    status: dict[int, str] = {}
    wanted_images: dict[str, int] = {}  # "<key>.<format>" of success rows -> row
    for path in sorted(part_dir.iterdir()):
        if not SHARD_FILE.match(path.name):
            continue
        table = pq.read_table(path, columns=["row", "key", "status", "error_class", "format"])
        for row, key, state, error_class, fmt in zip(*(c.to_pylist() for c in table.columns),
                                                     strict=True):
            seen[row] += 1
            status[row] = "success" if state == "success" else (error_class or "unknown")
            if state == "success":
                wanted_images[f"{key}.{fmt}"] = row
    members: Counter[str] = Counter()
    for path in sorted(part_dir.iterdir()):
        if TAR_FILE.match(path.name):
            with tarfile.open(path) as tar:
                members.update(tar.getnames())
    duplicated = {row for row, n in seen.items() if n > 1}
    for name, n in members.items():
        if n > 1:
            stem = name.split(".", 1)[0]
            if stem.isdigit():
                duplicated.add(int(stem))
    check.duplicated = len(duplicated)
    check.missing_images = sum(1 for name in wanted_images if name not in members)
    # A row rejected at enqueue is in its shard parquet too, failed as invalid_url; the
    # queue counts it as invalid, not failed.
    check.ok = sum(1 for s in status.values() if s == "success")
    check.invalid = sum(1 for r in invalid if status.get(r) == "invalid_url")
    check.invalid_downloaded = sum(1 for r in invalid if status.get(r, "invalid_url")
                                   != "invalid_url")
    check.failed = len(status) - check.ok - check.invalid
    for row, actual in status.items():
        expected = dataset.expected_by_row[(part.path.name, row)]
        if actual != expected:
            check.outcome_mismatch[f"{expected}->{actual}"] += 1

    # The error file (written by finalize_part) lists every failed or invalid row once.
    summary = finalize_part(queue, part.key, settings)
    errors = pq.read_table(summary.error_file, columns=["row", "error_class"])
    error_rows = errors.column("row").to_pylist()
    error_classes = errors.column("error_class").to_pylist()
    dead = {r for r, c in zip(error_rows, error_classes, strict=True) if c == "dead_letter"}
    check.dead = len(dead - status.keys())
    expected_errors = {r for r, s in status.items() if s != "success"} | dead
    check.error_file_mismatch = (len(set(error_rows) ^ expected_errors)
                                 + len(error_rows) - len(set(error_rows)))
    check.lost = len(set(range(check.rows)) - status.keys() - dead)

    state = queue.part(part.key)
    check.counters = {
        "rows": (state.rows, check.rows),
        "ok": (state.ok, check.ok),
        "failed": (state.failed, check.failed + check.dead),
        "invalid": (state.invalid, check.invalid),
        "error rows": (summary.error_rows, check.failed + check.dead + check.invalid),
    }
    return check


# ---------------------------------------------------------------- the run

@dataclass
class Events:
    worker_kills: int = 0
    pool_restarts: int = 0
    pool_crashes: int = 0
    redis: RedisRestart | None = None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000, help="input rows (4 parts)")
    parser.add_argument("--parts", type=int, default=4, help="parts, over two subsets")
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--watermark", type=int, default=None,
                        help="queue_high_watermark (default: 30%% of the rows)")
    parser.add_argument("--visibility-timeout", type=float, default=20.0)
    parser.add_argument("--kill-interval", type=float, default=15.0,
                        help="seconds between SIGKILLs of one worker process")
    parser.add_argument("--pool-restarts", type=int, default=3,
                        help="whole-pool kills (SIGKILL and SIGTERM in turn), spread over the run")
    parser.add_argument("--disruption-gap", type=float, default=5.0,
                        help="least seconds between a pool restart and the Redis restart")
    parser.add_argument("--redis-restart-at", type=float, default=0.6,
                        help="fraction of rows done when Redis is SIGKILLed and restarted "
                             "(negative: never)")
    parser.add_argument("--images", type=int, default=200, help="distinct images served")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample-interval", type=float, default=0.5)
    parser.add_argument("--stall-timeout", type=float, default=300.0,
                        help="give up (a hang) after this many seconds without progress")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    clean_environ()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="laion-soak-"))
    rows_per_part = args.rows // args.parts
    watermark = args.watermark or max(args.shard_size * 5, args.rows * 3 // 10)
    settings = Settings(
        data_dir=root / "data", parquet_dir=root / "parquet", store_dir=root / "store",
        prefix="soak", shard_size=args.shard_size, processes=args.processes,
        concurrency=args.concurrency, visibility_timeout=args.visibility_timeout,
        heartbeat_interval=1.0, timeout=5.0, connect_timeout=2.0, retries=0,
        shutdown_grace=10.0, allow_private_addresses=True, disk_min_free_gb=1.0,
        host_map={host: "127.0.0.1" for host in HOSTS}, queue_high_watermark=watermark)
    redis_dir = settings.redis_dir
    server = ImageServer({})
    pool: Pool | None = None
    stop_sampling = threading.Event()
    sampling: threading.Thread | None = None
    failed = True

    stop_on_signals()
    wall = time.monotonic()
    try:
        log(f"soak in {root}: {args.rows:,} rows, watermark {watermark:,}, "
            f"{args.processes} processes x {args.concurrency}")
        pool_images = make_images(args.images, seed=args.seed)
        server.images = {image.path: image for image in pool_images}
        server.start()
        started = time.monotonic()
        subsets = ("laion2B-en", "laion2B-multi")
        dataset = write_dataset(settings.parts_root, [server.url(h) for h in HOSTS],
                                subsets=subsets[: min(2, args.parts)],
                                parts_per_subset=max(1, args.parts // 2),
                                rows_per_part=rows_per_part, seed=args.seed,
                                images=pool_images)
        part_list = parts.discover(settings.parts_root)
        total_rows = sum(pq.read_metadata(p.path).num_rows for p in part_list)
        keys = [p.key for p in part_list]
        log(f"dataset: {len(part_list)} parts, {total_rows:,} rows "
            f"({time.monotonic() - started:.1f}s)")
        check_loopback_only(dataset, settings)

        server_state = embedded.ensure_running(redis_dir)
        settings = settings.with_overrides(redis_url=server_state.url)
        queue = Queue(connect(settings, name="soak"), settings.prefix)
        queue.ensure_group()

        pool = Pool(settings, root / "worker.log")
        samples = Samples()
        sampling = threading.Thread(
            target=sampler, args=(server_state.url, queue.keys.queued_rows, pool, samples,
                                  stop_sampling, args.sample_interval),
            name="soak-sampler", daemon=True)
        sampling.start()
        enqueuer = Enqueuer(settings, part_list)
        threading.Thread(target=enqueuer.run, name="soak-enqueue", daemon=True).start()

        events = Events()
        pool.start()
        download_started = time.monotonic()
        pool_at = [(i + 1) / (args.pool_restarts + 1) for i in range(args.pool_restarts)]
        next_kill = download_started + args.kill_interval
        next_report = download_started + 10
        last_progress, last_change = -1, time.monotonic()
        last_disruption = download_started
        while True:
            time.sleep(0.5)
            if enqueuer.error is not None:
                raise RuntimeError(f"enqueue failed: {enqueuer.error!r}") from enqueuer.error
            states = queue.parts_states(keys)
            finished = sum(s.ok + s.failed + s.invalid for s in states.values())
            progress = finished / total_rows
            now = time.monotonic()
            if finished != last_progress:
                last_progress, last_change = finished, now
            elif now - last_change > args.stall_timeout:
                raise Hang(f"no progress for {args.stall_timeout:.0f}s at {finished:,} of "
                           f"{total_rows:,} rows: " + "; ".join(
                               f"{s.partition}: {s.shards_done}/{s.shards_total} shards, "
                               f"{s.pending:,} pending" for s in states.values()))
            if enqueuer.done and all(s.done for s in states.values()):
                break
            if not pool.alive():
                assert pool.proc is not None
                code = pool.proc.returncode
                events.pool_crashes += 1
                log(f"worker pool exited by itself with code {code}; log tail:\n"
                            f"{pool.tail()}")
                pool.proc = None
                pool.start()
                continue
            if now >= next_report:
                next_report = now + 10
                rate = finished / max(now - download_started, 1e-9)
                log(f"{finished:,}/{total_rows:,} rows ({progress:.0%}), "
                    f"{queue.queued_rows():,} queued, {rate:,.0f} rows/s, "
                    f"{events.worker_kills} kills, {events.pool_restarts} pool restarts")
            # Disruptions (Redis, whole pool) a few seconds apart, not stacked.
            calm = now - last_disruption >= args.disruption_gap
            redis_due = (events.redis is None and 0 <= args.redis_restart_at <= progress)
            if redis_due and calm:
                last_disruption = now
                log(f"SIGKILL Redis at {progress:.0%}")
                events.redis = restart_redis(redis_dir, queue, keys)
                r = events.redis
                log(f"Redis back at the same address after {r.downtime:.1f}s; shards done "
                    f"{r.done_before} before, {r.done_after} after")
                continue
            if pool_at and progress >= pool_at[0] and calm:
                last_disruption = now
                pool_at.pop(0)
                hard = events.pool_restarts % 2 == 0
                log(f"{'SIGKILL' if hard else 'SIGTERM'} the whole pool at "
                            f"{progress:.0%}")
                pool.stop(hard=hard)
                pool.start()
                events.pool_restarts += 1
                continue
            if now >= next_kill:
                next_kill = now + args.kill_interval
                workers = pool.workers()
                if workers:
                    victim = rng.choice(workers)
                    with contextlib.suppress(psutil.Error):
                        victim.kill()
                        events.worker_kills += 1
                        log(f"SIGKILL worker pid {victim.pid} at {progress:.0%}")
        download_time = time.monotonic() - download_started
        log(f"every part is done after {download_time:.0f}s; stopping the pool")
        pool.stop(hard=False)
        stop_sampling.set()
        sampling.join(5)
        samples.queued_rows = max(samples.queued_rows, enqueuer.peak_after_enqueue)

        checks = [check_part(settings, queue, part, dataset) for part in part_list]
        dead_stream = queue.dead_letters()
        left = leftovers(settings.store_root)
        ok = report(args, settings, checks, events, samples, watermark, total_rows,
                    download_time, time.monotonic() - wall, dead_stream, left, enqueuer)
        failed = not ok
        return 0 if ok else 1
    except Hang as hang:
        log(f"HANG: {hang}")
        if pool is not None:
            print(pool.tail(), flush=True)
        return 1
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        return 130
    finally:
        stop_sampling.set()
        if pool is not None:
            pool.stop(hard=False)
            for process in pool.ours():
                if _running(process):
                    with contextlib.suppress(psutil.Error):
                        process.kill()
        if sampling is not None:
            sampling.join(5)
        server.stop()
        stop_redis(redis_dir)
        if failed or args.keep:
            log(f"kept {root} (worker log: {root / 'worker.log'})")
        else:
            shutil.rmtree(root, ignore_errors=True)


class Hang(RuntimeError):
    """No progress for --stall-timeout seconds."""


def check_loopback_only(dataset: DemoDataset, settings: Settings) -> None:
    """Every URL a worker may fetch names a mapped host or one the static resolver refuses."""
    import asyncio
    from urllib.parse import urlsplit

    from laion_dagster.core.fetch.fetcher import StaticResolver, UnknownHost

    hosts = Counter()
    for part in dataset.parts:
        for url in pq.read_table(part, columns=["URL"]).column("URL").to_pylist():
            if url and url.lower().startswith(("http://", "https://")):
                hosts[urlsplit(url).hostname] += 1
    unmapped = [h for h in hosts if h not in settings.host_map]
    resolver = StaticResolver(settings.host_map)

    async def refused(host: str) -> bool:
        try:
            await resolver.resolve(host, 80)
        except UnknownHost:
            return True
        return False

    assert all(asyncio.run(refused(h)) for h in unmapped), "a host would reach DNS"
    assert all(settings.host_map[h] == "127.0.0.1" for h in hosts if h not in unmapped)
    log(f"hosts: {len(hosts) - len(unmapped)} mapped to 127.0.0.1, {len(unmapped)} unmapped "
        f"({', '.join(sorted(unmapped)[:3])}, ...) refused by StaticResolver without DNS")


def report(args, settings: Settings, checks: list[PartCheck], events: Events,
           samples: Samples, watermark: int, total_rows: int, download_time: float,
           wall_time: float, dead_stream: int, left: list[Path], enqueuer: Enqueuer) -> bool:
    def total(name: str) -> int:
        return sum(getattr(c, name) for c in checks)

    counters: dict[str, list[int]] = {}
    for check in checks:
        for name, (in_redis, on_disk) in check.counters.items():
            pair = counters.setdefault(name, [0, 0])
            pair[0] += in_redis
            pair[1] += on_disk
    agree = all(c.counters_agree for c in checks)
    mismatches = sum((c.outcome_mismatch for c in checks), Counter())
    peaks = sorted(samples.worker_rss.values()) or [0]
    peak_rss, median_rss = peaks[-1], peaks[len(peaks) // 2]
    supervisor_mb = samples.supervisor_rss / 1e6
    attempted = total("ok") + total("failed") + total("dead")
    r = events.redis
    bound = watermark + settings.shard_size
    rows = [
        ("rows (input)", f"{total('rows'):,}"),
        ("ok", f"{total('ok'):,}"),
        ("failed", f"{total('failed'):,}"),
        ("invalid", f"{total('invalid'):,}"),
        ("dead-lettered", f"{total('dead'):,} (dead stream: {dead_stream})"),
        ("lost", f"{total('lost'):,}"),
        ("duplicated", f"{total('duplicated'):,}"),
        ("ok rows without image", f"{total('missing_images'):,}"),
        ("invalid rows downloaded", f"{total('invalid_downloaded'):,}"),
        ("error file mismatches", f"{total('error_file_mismatch'):,}"),
        ("temp files left", f"{len(left):,}"),
        ("counters redis/files", "agree" if agree else "DISAGREE"),
        *[(f"  {name}", f"{a:,} / {b:,}" + ("" if a == b else "  <-- differs"))
          for name, (a, b) in counters.items()],
        ("outcome != expected", tally(mismatches, 6) or "none"),
        ("worker kills", f"{events.worker_kills}"),
        ("pool restarts", f"{events.pool_restarts} of {args.pool_restarts} planned "
                          f"(pool crashes: {events.pool_crashes})"),
        ("Redis restarts", "0" if r is None else
         f"1 ({r.downtime:.1f}s down, same address: yes, "
         f"shards done {r.done_before:,} -> {r.done_after:,})"),
        ("peak Redis memory", f"{samples.redis_memory / 1e6:,.1f} MB"),
        ("peak worker RSS", f"{peak_rss / 1e6:,.1f} MB max, {median_rss / 1e6:,.1f} MB median "
                            f"over {len(peaks)} worker processes (supervisor "
                            f"{supervisor_mb:,.0f} MB)"),
        ("peak queued rows", f"{samples.queued_rows:,} vs watermark {watermark:,} "
                             f"({'within' if samples.queued_rows <= bound else 'ABOVE'} "
                             f"watermark + 1 shard; enqueue waited {enqueuer.waited:.0f}s)"),
        ("download time", f"{download_time:,.1f} s"),
        ("wall time", f"{wall_time:,.1f} s"),
        ("images/s", f"{attempted / download_time:,.0f} attempted "
                     f"({total('ok') / download_time:,.0f} ok)"),
    ]
    width = max(len(name) for name, _ in rows)
    print()
    print(f"soak: {total_rows:,} rows, {len(checks)} parts, shard {settings.shard_size:,}, "
          f"{settings.processes} x {settings.concurrency}, visibility "
          f"{settings.visibility_timeout:g}s, kill every {args.kill_interval:g}s")
    print("-" * (width + 50))
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print("-" * (width + 50))
    problems = []
    if total("lost"):
        problems.append(f"{total('lost')} rows lost")
    if total("duplicated"):
        problems.append(f"{total('duplicated')} rows duplicated")
    if not agree:
        problems.append("Redis counters disagree with the files")
    if total("missing_images") or total("invalid_downloaded") or total("error_file_mismatch"):
        problems.append("outputs inconsistent (images, invalid rows or error file)")
    for check in checks:
        if check.lost or check.duplicated or not check.counters_agree:
            print(f"  {check.key}: lost {check.lost}, duplicated {check.duplicated}, "
                  f"counters {check.counters}")
    print("RESULT: " + ("; ".join(problems) if problems else "ok"), flush=True)
    return not problems


if __name__ == "__main__":
    sys.exit(main())
