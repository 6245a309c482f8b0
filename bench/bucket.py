"""The same loopback download into a local folder and into S3 API servers, alternating.

    python -m bench.bucket                  # 12,000 images, 3 rounds
    python -m bench.bucket --images 20000   # the figures in bench/README.md
    python -m bench.bucket --quick          # smoke run: 2,000 images, 1 round

Images come from bench/compare.py's corpus (bench/loopback.py: 10-300 KB, mean about 60 KB),
served by its nginx over http on loopback. Our worker pool (`laion-dagster worker`, a fresh
embedded Redis per run) downloads one enqueued part into each sink in turn, the order rotated
every round:

  local  a folder on this disk
  moto   moto's S3 server (what the tests use): faithful, but heavy per byte
  sink   bench/s3sink.py: a minimal S3 API server that streams objects to files on this disk
         (aiohttp: much lighter than moto per byte, still not free on the cores it shares)
  sink-crc  the same, with the SDK's default checksums (a CRC32 trailer, as against AWS
         itself) instead of a SHA-256 of each body (what we send to other servers)

Printed per sink: images/s from enqueue to the part's last shard, client CPU per image (the
pool's processes), peak RSS of a worker process, and the server's CPU (moto or the sink;
nginx's is the same for all); medians over rounds, and ratios paired with the same round's
local run. Targets: into the bucket at >= 0.9x the images/s into the local folder, and a
worker's peak RSS <= 250 MB. The S3 servers run on the same cores as the workers and take
their CPU from them, so images/s here understates what a remote store gives; "x local (CPU)"
(images per CPU second of the pool, against local) is the ratio a host whose cores are all the
workers' would see.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path

from bench import loopback, pool
from bench.measure import Owned, clean_environ, free_ports
from bench.report import Targets
from bench.s3sink import AWS, S3Server

SINKS = ("local", "moto", "sink", "sink-crc")
# What each sink sends: with a server other than AWS we ask for checksums only where S3
# requires them (a SHA-256 of each body); "sink-crc" is the SDK's default (a CRC32 trailer),
# which is what we leave on against AWS itself.
CHECKSUMS = {"moto": "when_required", "sink": "when_required", "sink-crc": "when_supported"}


@dataclass
class Run:
    sink: str
    round: int
    seconds: float = 0.0
    images: int = 0
    client_cpu: float = 0.0
    server_cpu: float = 0.0
    peak_worker: int = 0
    error: str | None = None

    @property
    def rate(self) -> float:
        return self.images / self.seconds

    @property
    def per_cpu_second(self) -> float:  # the inverse of CPU per image
        return self.images / self.client_cpu


def run_once(args, owned: Owned, root: Path, parts_dir: Path, sink: str, round_: int,
             servers: dict[str, S3Server], index: int) -> Run:
    from laion_dagster.core.control.enqueue import enqueue_part
    from laion_dagster.core.input import parts
    from laion_dagster.core.queue.connection import connect
    from laion_dagster.core.queue.protocol import Queue

    result = Run(sink, round_)
    run_dir = root / "runs" / f"{index:03d}-{sink}"
    run_dir.mkdir(parents=True)
    state = owned.redis(run_dir / "redis")
    store: dict = {"store_dir": run_dir / "store"}
    server = servers.get(sink.split("-")[0])
    if server is not None:
        bucket = f"bench-{index:03d}"
        server.make_bucket(bucket)
        store = {"store_dir": f"s3://{bucket}/laion", "s3_endpoint_url": server.url}
    settings = pool.settings(run_dir, parts_dir, state.url, "bkt", args, **store)
    part = parts.discover(settings.parts_root)[0]
    queue = Queue(connect(settings, name="bucket-bench"), settings.prefix)
    env = {**os.environ, **AWS, "PYTHONUNBUFFERED": "1"}
    if sink in CHECKSUMS:
        env["AWS_REQUEST_CHECKSUM_CALCULATION"] = CHECKSUMS[sink]
    workers = pool.Pool(owned, settings, env, run_dir / "worker.log")
    try:
        workers.start()
        workers.wait_ready()
        sampler = workers.sampler
        sampler.take()
        cpu0 = sum(sampler.cpu.values())
        server0 = server.cpu() if server else 0.0
        started = time.perf_counter()
        enqueue_part(queue, part, settings)
        workers.wait_done(part.key, args.run_timeout)
        result.seconds = time.perf_counter() - started
        sampler.take()
        result.client_cpu = sum(sampler.cpu.values()) - cpu0
        result.server_cpu = (server.cpu() - server0) if server else 0.0
        workers.stop()
        result.peak_worker = max((rss for pid, rss in sampler.peak.items()
                                  if sampler.role.get(pid) == "child"
                                  and "multiprocessing" in sampler.cmdline.get(pid, "")),
                                 default=sampler.peak_of("child"))
        done = queue.part(part.key)
        result.images = done.ok
        if done.ok + done.failed + done.invalid != done.rows or done.failed:
            raise RuntimeError(f"rows {done.rows}: ok {done.ok}, failed {done.failed}, "
                               f"invalid {done.invalid}")
    except Exception as error:  # one failed run is reported, the benchmark goes on
        result.error = f"{type(error).__name__}: {error}"
        print(f"  {sink} FAILED: {result.error} (logs in {run_dir})", flush=True)
    finally:
        workers.close()
        queue.r.close()
        owned.stop_redis(run_dir / "redis")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=12_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=250, help=(
        "rows per shard: small enough that shards end (and upload) all through the run, as "
        "on a LAION part of 1,800 shards, not all at its end"))
    parser.add_argument("--run-timeout", type=float, default=900)
    parser.add_argument("--quick", action="store_true", help="2,000 images, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.images, args.rounds = 2_000, 1
    clean_environ()
    owned = Owned()
    root = Path(tempfile.mkdtemp(prefix="laion-bucket-bench-"))
    web = None
    try:
        web = loopback.start(owned, root, args.images, pool=400, seed=7)
        ports = free_ports(2)
        servers = {kind: S3Server(owned, kind, root / kind, port, root / f"{kind}.log")
                   for kind, port in zip(("moto", "sink"), ports, strict=True)}
        print(f"{args.images:,} images ({web.corpus.total_bytes / 1e6:,.0f} MB) from nginx on "
              f"{len(loopback.ADDRESSES)} loopback addresses; {args.processes} worker "
              f"processes x {args.concurrency} fetches; {args.rounds} rounds", flush=True)
        runs: list[Run] = []
        for round_ in range(args.rounds):
            order = SINKS[round_ % len(SINKS):] + SINKS[:round_ % len(SINKS)]
            for sink in order:
                run = run_once(args, owned, root, web.lists["http"], sink, round_, servers,
                               len(runs))
                runs.append(run)
                if run.error is None:
                    print(f"  round {round_ + 1} {sink:<8} {run.rate:7,.0f} "
                          f"images/s  client {1000 * run.client_cpu / run.images:5.2f} ms "
                          f"CPU/image  server {run.server_cpu:6.1f} s CPU  worker peak "
                          f"{run.peak_worker / 2**20:4.0f} MB", flush=True)
        return report(runs)
    finally:
        if web is not None:
            web.nginx.stop()
        owned.stop_all()
        shutil.rmtree(root, ignore_errors=True)


def report(runs: list[Run]) -> int:
    """Medians over rounds; ratios are paired (each run against the same round's local run,
    then the median), so that a shared machine's drift between rounds cancels out."""
    done = [r for r in runs if r.error is None]

    def median(sink: str, figure) -> float | None:
        values = [figure(r) for r in done if r.sink == sink]
        return statistics.median(values) if values else None

    def paired(sink: str, figure) -> float | None:
        local = {r.round: figure(r) for r in done if r.sink == "local"}
        values = [figure(r) / local[r.round] for r in done
                  if r.sink == sink and r.round in local]
        return statistics.median(values) if values else None

    rate, per_image = attrgetter("rate"), attrgetter("per_cpu_second")
    print()
    print(f"{'sink':<10}{'images/s':>10}{'x local':>9}{'CPU ms/img':>12}{'x local (CPU)':>15}"
          f"{'server CPU s':>14}{'worker peak MB':>16}")
    for sink in SINKS:
        if median(sink, rate) is None:
            print(f"{sink:<10}{'failed':>10}")
            continue
        print(f"{sink:<10}{median(sink, rate):>10,.0f}{paired(sink, rate):>9.2f}"
              f"{median(sink, lambda r: 1000 * r.client_cpu / r.images):>12.2f}"
              f"{paired(sink, per_image):>15.2f}"
              f"{median(sink, lambda r: r.server_cpu):>14.1f}"
              f"{median(sink, lambda r: r.peak_worker / 2**20):>16.0f}")
    targets = Targets()
    for sink in ("sink", "sink-crc"):
        targets.check(f"into the bucket ({sink}) vs local, images/s", paired(sink, rate), 0.9,
                      True)
        targets.check(f"into the bucket ({sink}) vs local, images per CPU second",
                      paired(sink, per_image), 0.9, True)
    value = paired("moto", rate)
    targets.add("into moto vs local, images/s (informational: moto's CPU is the limit)",
                "n/a" if value is None else f"{value:.2f}x", None if value is None else True)
    peak = max((r.peak_worker for r in runs if r.error is None and r.sink != "local"),
               default=None)
    targets.check("worker peak RSS into a bucket", None if peak is None else peak / 2**20,
                  250, False, unit=" MB", spec=".0f")
    good = targets.report()
    return 0 if good and not any(r.error for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
