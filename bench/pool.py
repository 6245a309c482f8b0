"""Our worker pool on one enqueued part, as bench/compare.py and bench/bucket.py time it:
`laion-dagster worker` on a fresh embedded Redis, ready when every process has asked the queue
for work, done when the part's last shard is."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from bench.loopback import HOST_MAP
from bench.measure import Owned, Sampler


def settings(run_dir: Path, parquet_dir: Path, redis_url: str, prefix: str,
             args: argparse.Namespace, **more):
    """The pool's settings: the loopback web's names mapped (none resolved), webdataset
    shards; `args` gives shard_size, processes and concurrency."""
    from laion_dagster.core.settings import Settings

    return Settings(data_dir=run_dir, parquet_dir=parquet_dir, redis_url=redis_url,
                    prefix=prefix, shard_size=args.shard_size, processes=args.processes,
                    concurrency=args.concurrency, allow_private_addresses=True,
                    host_map=HOST_MAP, shutdown_grace=5.0, disk_min_free_gb=0.5,
                    output_format="webdataset", **more)


class Stalled(RuntimeError):
    """No shard completed for the stall timeout."""


class Pool:
    def __init__(self, owned: Owned, settings, env: dict[str, str], log: Path):
        import redis

        from laion_dagster.core.queue.protocol import Keys

        self.owned = owned
        self.settings = settings
        self.env = {**env, **settings.to_env()}
        self.log = log
        self.keys = Keys(settings.prefix)
        self.watch = redis.Redis.from_url(settings.redis_url)
        self.polls: Counter[str] = Counter()  # this watching's own Redis commands, by name
        self.proc: subprocess.Popen | None = None
        self.sampler: Sampler | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = self.owned.popen([sys.executable, "-m", "laion_dagster.cli", "worker"],
                                         env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.sampler = Sampler(lambda: [self.proc.pid]).start()

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Until every process has asked the queue for work."""
        import redis

        from laion_dagster.core.queue.protocol import GROUP

        deadline = time.monotonic() + timeout
        while True:
            try:
                self.polls["xinfo|consumers"] += 1
                if len(self.watch.xinfo_consumers(self.keys.shards, GROUP)) \
                        >= self.settings.processes:
                    return
            except redis.ResponseError:
                pass  # no group before the first process makes it
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the pool did not start (exit {self.proc.poll()})")
            time.sleep(0.02)

    def wait_done(self, part_key: str, timeout: float, stall: float | None = None) -> None:
        """Until the part's last shard is done; Stalled when no shard completes for `stall`
        seconds."""
        deadline = time.monotonic() + timeout
        progress, moved = None, time.monotonic()
        while True:
            self.polls["hmget"] += 1
            done_at, ok, failed = self.watch.hmget(self.keys.part(part_key),
                                                   ["done_at", "ok", "failed"])
            if done_at is not None:
                return
            if (ok, failed) != progress:
                progress, moved = (ok, failed), time.monotonic()
            if self.proc.poll() is not None:
                raise RuntimeError(f"the pool exited with {self.proc.returncode}")
            if stall is not None and time.monotonic() - moved > stall:
                raise Stalled(f"no shard completed for {stall:g}s (ok {ok}, failed {failed})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"not done within {timeout:g}s")
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM, as a user stops it; the sampler stops with it."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        self.owned.forget(self.proc)
        self.sampler.stop()

    def close(self) -> None:
        """After a run, whatever became of it: nothing of it left running."""
        if self.proc is not None and self.proc.poll() is None:
            self.owned.stop(self.proc)
        if self.sampler is not None:
            self.sampler.stop()
        self.watch.close()
