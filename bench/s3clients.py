"""The S3 clients we could upload shards with, side by side: MB/s and client CPU per MB.

    python -m bench.s3clients [--files 12] [--mb 8] [--rounds 3]

Each client uploads the same files (a shard-sized tar of random bytes, read from disk as a
worker does) to bench/s3sink.py on loopback, in rotated order over rounds; CPU is this
process's (every thread's) user+sys time during the uploads. The candidates are pyarrow's
S3FileSystem (a dependency already), boto3, obstore and s3fs; a client that is not installed
in the running Python is skipped (install them in a scratch venv to compare all four).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.measure import Owned, clean_environ, free_ports
from bench.s3sink import KEY, SECRET, S3Server


def _pyarrow(endpoint: str):
    import pyarrow.fs as pafs

    os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
    fs = pafs.S3FileSystem(endpoint_override=endpoint.removeprefix("http://"), scheme="http",
                           region="us-east-1", access_key=KEY, secret_key=SECRET,
                           allow_delayed_open=True, background_writes=False)

    def put(path: Path, key: str) -> None:
        stream = fs.open_output_stream(f"bench/{key}")
        with open(path, "rb") as source:
            while chunk := source.read(1 << 20):
                stream.write(chunk)
        stream.close()
    return put


def _boto3(endpoint: str):
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                          config=Config(request_checksum_calculation="when_required"))
    return lambda path, key: client.upload_file(str(path), "bench", key)


def _obstore(endpoint: str):
    import obstore
    from obstore.store import S3Store

    store = S3Store("bench", endpoint=endpoint, region="us-east-1", access_key_id=KEY,
                    secret_access_key=SECRET, client_options={"allow_http": True})
    return lambda path, key: obstore.put(store, key, path)


def _s3fs(endpoint: str):
    import s3fs

    fs = s3fs.S3FileSystem(key=KEY, secret=SECRET, client_kwargs={"endpoint_url": endpoint})
    return lambda path, key: fs.put_file(str(path), f"bench/{key}")


CLIENTS = {"pyarrow": ("pyarrow", _pyarrow), "boto3": ("boto3", _boto3),
           "obstore": ("obstore", _obstore), "s3fs": ("s3fs", _s3fs)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=12)
    parser.add_argument("--mb", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    clean_environ()
    owned = Owned()
    root = Path(tempfile.mkdtemp(prefix="laion-s3clients-"))
    try:
        endpoint = S3Server(owned, "sink", root / "sink", free_ports(1)[0], root / "sink.log").url
        files = []
        for n in range(args.files):
            path = root / f"{n:05d}.tar"
            path.write_bytes(os.urandom(args.mb << 20))
            files.append(path)
        present = {name: make for name, (module, make) in CLIENTS.items()
                   if importlib.util.find_spec(module)}
        skipped = sorted(set(CLIENTS) - set(present))
        uploads = {name: make(endpoint) for name, make in present.items()}
        seen: dict[str, list[tuple[float, float]]] = {name: [] for name in uploads}
        names = list(uploads)
        for round_ in range(args.rounds):
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                cpu0, wall0 = time.process_time(), time.perf_counter()
                for path in files:
                    uploads[name](path, f"{name}/{round_}/{path.name}")
                seen[name].append((time.perf_counter() - wall0, time.process_time() - cpu0))
        megabytes = args.files * args.mb
        print(f"{args.files} uploads of {args.mb} MB to bench/s3sink.py on loopback, "
              f"{args.rounds} rounds (medians)")
        print(f"{'client':<10}{'MB/s':>8}{'CPU ms/MB':>11}")
        for name, runs in seen.items():
            wall = statistics.median(w for w, _ in runs)
            cpu = statistics.median(c for _, c in runs)
            print(f"{name:<10}{megabytes / wall:>8.0f}{1000 * cpu / megabytes:>11.2f}")
        if skipped:
            print(f"not installed here: {', '.join(skipped)}")
        return 0
    finally:
        owned.stop_all()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
