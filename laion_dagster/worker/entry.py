"""Where a spawned worker process starts.

Kept apart from process.py on purpose: the supervisor imports only this and shared_memory.py,
so it starts its processes within moments of its own start, and each process pays for the
heavy imports (aiohttp, pyarrow, Pillow) in parallel with the others instead of after the
supervisor has paid for them too.
"""

from __future__ import annotations

import os

from laion_dagster.worker.shared_memory import Shared


def run_process(settings_json: str, index: int, shared: Shared) -> None:
    """Entry point of a spawned worker process."""
    # Arrow's buffers (parts read, shard tables and parquet written) from glibc's malloc, whose
    # free pages the process hands back every few seconds (health.return_free_memory), rather
    # than from jemalloc, which keeps freed pages for a while and so holds a higher peak
    # (bench/README.md). Set before pyarrow picks its default pool (on first use), and only
    # here, in the process.
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    from laion_dagster.worker import process

    process.main(settings_json, index, shared)
