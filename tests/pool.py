"""Running a real worker pool from a test: `laion-dagster worker` as its own process."""

import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from laion_dagster.core.control.enqueue import enqueue_part
from laion_dagster.core.input import parts
from laion_dagster.core.queue.connection import connect
from laion_dagster.core.queue.protocol import Queue
from tests.conftest import worker_env
from tests.outputs import all_done, wait_until


def start_worker(settings, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "laion_dagster.cli", "worker", *extra],
                            env=worker_env(settings), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)


def stop_worker(proc: subprocess.Popen, timeout: float = 30) -> str:
    """SIGTERM, as systemd or Ctrl-C would; returns the pool's log."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=timeout)
    return out.decode(errors="replace")


@dataclass
class Downloaded:
    part: parts.Part
    queue: Queue
    part_dir: Path
    log: str


def download(settings, part: parts.Part | None = None, timeout: float = 60) -> Downloaded:
    """Queue a part (the first one by default) and run a pool until every shard is done."""
    queue = Queue(connect(settings), settings.prefix)
    part = part or parts.discover(settings.parts_root)[0]
    enqueue_part(queue, part, settings)
    worker = start_worker(settings)
    try:
        wait_until(lambda: all_done(queue, [part.key]), timeout, what=f"{part.key} done")
    finally:
        log = stop_worker(worker)
    return Downloaded(part=part, queue=queue, part_dir=settings.store_root / part.relative_dir,
                      log=log)
