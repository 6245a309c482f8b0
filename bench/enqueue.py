"""Enqueue throughput and Redis footprint for one LAION-shaped part (prints figures).

    python -m bench.enqueue --rows 1000000

Builds a part with the original release's columns, enqueues it into an embedded Redis (a fresh
data directory), and prints rows/s, Redis commands per row and Redis memory per queued row.
bench/compare.py measures the same, over rounds, with enqueue_once.
"""

import argparse
import random
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from laion_dagster.core.control.enqueue import enqueue_part
from laion_dagster.core.input import parts
from laion_dagster.core.queue import embedded
from laion_dagster.core.queue.connection import connect
from laion_dagster.core.queue.protocol import Queue
from laion_dagster.core.settings import Settings


def make_part(path: Path, rows: int) -> None:
    rnd = random.Random(0)
    words = ["photo", "vintage", "red", "dress", "mountain", "sunset", "logo", "cat", "city"]
    batch = 100_000
    writer = None
    for start in range(0, rows, batch):
        n = min(batch, rows - start)
        table = pa.table({
            "SAMPLE_ID": pa.array(range(start, start + n), pa.int64()),
            "URL": [f"https://cdn{rnd.randrange(5000)}.example.com/images/{rnd.getrandbits(64):x}"
                    f"/{rnd.choice(words)}-{i}.jpg" for i in range(n)],
            "TEXT": [" ".join(rnd.choices(words, k=rnd.randrange(3, 14))) for _ in range(n)],
            "HEIGHT": pa.array([rnd.randrange(64, 2048) for _ in range(n)], pa.int32()),
            "WIDTH": pa.array([rnd.randrange(64, 2048) for _ in range(n)], pa.int32()),
            "LICENSE": ["?"] * n,
            "NSFW": [rnd.choice(["UNLIKELY", "UNSURE", "NSFW"]) for _ in range(n)],
            "similarity": [rnd.random() for _ in range(n)],
        })
        writer = writer or pq.ParquetWriter(path, table.schema, compression="snappy")
        writer.write_table(table)
    writer.close()


def enqueue_once(client, settings: Settings) -> dict:
    """Enqueue the one part under settings.parts_root into `client`'s Redis: rows, shards,
    seconds, Redis commands per row and the Redis memory it took."""
    client.config_resetstat()
    used_before = int(client.info("memory")["used_memory"])
    part = parts.discover(settings.parts_root)[0]
    started = time.perf_counter()
    report = enqueue_part(Queue(client, settings.prefix), part, settings)
    seconds = time.perf_counter() - started
    commands = int(client.info("stats")["total_commands_processed"])
    return {"rows": report.rows, "shards": report.shards, "seconds": seconds,
            "rate": report.rows / seconds, "commands": commands / report.rows,
            "memory": int(client.info("memory")["used_memory"]) - used_before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--shard-size", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="laion-bench-") as root:
        settings = Settings(data_dir=Path(root), shard_size=args.shard_size,
                            queue_high_watermark=args.rows * 2)
        folder = settings.parts_root / "laion2B-en"
        folder.mkdir(parents=True)
        make_part(folder / "part-00000-bench-c000.snappy.parquet", args.rows)
        client = connect(settings)
        try:
            done = enqueue_once(client, settings)
        finally:
            client.close()
            embedded.stop(settings.redis_dir)
    rows, memory = done["rows"], done["memory"]
    print(f"rows {rows:,} in {done['shards']} shards of {args.shard_size:,}")
    print(f"enqueue: {done['rate']:,.0f} rows/s ({done['seconds']:.2f}s)")
    print(f"redis commands per row: {done['commands']:.4f}")
    print(f"redis memory per queued row: {memory / rows:.1f} bytes "
          f"({memory / 1e6:,.1f} MB for this part)")


if __name__ == "__main__":
    main()
