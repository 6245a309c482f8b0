"""Writing one shard's outputs so that each is either whole or absent.

Images stream into a temporary tar (or folder) as they arrive, so a worker never holds a whole
shard of images in memory. On close the per-shard parquet and `_stats.json` are written, and
everything is put in place, the stats file last: a `_stats.json` means the shard is complete.
On disk that is a rename of each temporary; in a bucket (core/storage.py), the temporaries are
built in a local spool folder and each is uploaded as one object, which appears whole or not
at all. Rewriting a shard (after a reclaim) replaces it whole.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import tarfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from laion_dagster.core.shards.records import (
    SAMPLE_SCHEMA,
    SampleRecord,
    json_default,
    records_table,
)
from laion_dagster.core.storage import BucketPath, Where, arrow_file

# img2dataset's stats split failures into these two buckets; users' tools read them.
RESIZE_CLASSES = {"not_image", "decode_error", "filtered"}


# Every name a shard writes, and only those: what cleanup may remove.
_MEMBER = re.compile(r"[A-Za-z0-9_\-]+_\d{10}\.[A-Za-z0-9]+")
_TEMP_TAG = r"\.tmp-\d+-[0-9a-f]{8}"


# output_format="parquet" spools images here while the shard downloads (uncompressed Arrow,
# read back memory-mapped), so a worker never holds a shard's images in memory.
IMAGE_SPOOL = pa.schema([("row", pa.int64()), ("image", pa.binary())])
SPOOL_BATCH = 32
ROW_GROUP = 256


def shard_paths(part_dir: Where, shard: int, output_format: str) -> dict[str, Where]:
    """A shard's files. With output_format "parquet" the images live in the shard parquet's
    `image` column, and "data" names only the spool used while downloading."""
    name = f"{shard:05d}"
    data = {"webdataset": f"{name}.tar", "files": name,
            "parquet": f"{name}.images.arrow"}[output_format]
    return {"data": part_dir / data, "parquet": part_dir / f"{name}.parquet",
            "stats": part_dir / f"{name}_stats.json"}


def clear_stale_temporaries(part_dir: Path, shard: int) -> None:
    """Remove temporaries that earlier owners of this shard left when they died.

    Whoever holds the claim is the shard's only rightful writer, so any other temporary for it
    belongs to a killed worker (or one that lost its claim and will fail to publish, which is
    harmless: the shard is counted once, by its current owner). Called when a new writer starts
    and when a shard is dead-lettered, so no killed attempt leaves files behind. Only the exact
    names a writer makes match (`00012.tar.tmp-<pid>-<8 hex>`, `00012.old-<8 hex>`, ...):
    anything else in the folder is not ours to remove.
    """
    name = f"{shard:05d}"
    ours = re.compile(rf"{name}(?:\.tar|\.parquet|_stats\.json|\.images\.arrow)?{_TEMP_TAG}"
                      rf"|{name}\.old-[0-9a-f]{{8}}")
    if not part_dir.is_dir():
        return
    for entry in os.scandir(part_dir):
        if not ours.fullmatch(entry.name):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            Path(entry.path).unlink(missing_ok=True)


_DEAD_TAG = re.compile(r".+\.tmp-(\d+)-[0-9a-f]{8}")


def clear_dead_temporaries(spool: Path, alive: Callable[[int], bool]) -> int:
    """Remove the temporaries of writers whose process is gone from a spool folder (a bucket
    store's): a killed worker's shard is finished by another host, which never looks in this
    one's spool. Only the exact names a writer makes match. Returns how many were removed."""
    removed = 0
    if not spool.is_dir():
        return 0
    for folder, dirs, files in os.walk(spool):
        for name in [*files, *dirs]:
            found = _DEAD_TAG.fullmatch(name)
            if found and not alive(int(found.group(1))):
                path = Path(folder) / name
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed += 1
    return removed


def is_shard_folder(path: Where) -> bool:
    """Whether a folder (or a bucket prefix) holds only what output_format "files" writes
    (sample members): the only kind of folder a writer may replace or remove."""
    try:
        return path.is_dir() and all(_MEMBER.fullmatch(entry.name) and entry.is_file()
                                     for entry in path.iterdir())
    except OSError:
        return False


def _remove_shard_folder(path: Where) -> None:
    """Remove a folder that is_shard_folder said holds only sample members."""
    if isinstance(path, BucketPath):
        for entry in path.iterdir():
            entry.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


class ForeignFiles(OSError):
    """A shard's place in the store holds something we did not write; we leave it alone."""


def leftovers(store: Path) -> list[Path]:
    """Temporary (`.tmp-`) or half-replaced (`.old-`) files under a store: none may remain
    once its workers have stopped (tests and bench/soak.py check this)."""
    return [p for p in store.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


def shard_complete(part_dir: Where, shard: int) -> bool:
    return (part_dir / f"{shard:05d}_stats.json").exists()


_STATS = re.compile(r"(\d{5,})_stats\.json")


def complete_shards(part_dir: Where) -> set[int]:
    """The shards of a part folder that are complete: one listing, however many shards (in a
    bucket, one request per 1,000 objects instead of one per shard)."""
    try:
        names = [entry.name for entry in part_dir.iterdir()]
    except FileNotFoundError:
        return set()
    return {int(found.group(1)) for found in map(_STATS.fullmatch, names) if found}


_ZEROS = bytes(512)


def tar_member(name: str, data: bytes, mtime: int) -> tuple[bytes, bytes, bytes]:
    """One regular file in POSIX ustar form: (header, data, padding to 512 bytes), for the
    caller to join with its other members in one copy.

    tarfile.addfile builds the same header through many Python-level steps; for three small
    members per image that was a large share of a worker's CPU beyond the fetch. Names are
    ours (`<row:010d>.<ext>`), short and ASCII, so the plain ustar fields always suffice.
    """
    header = bytearray(512)
    header[0:len(name)] = name.encode("ascii")
    header[100:108] = b"0000644\0"
    header[108:116] = b"0000000\0"
    header[116:124] = b"0000000\0"
    header[124:136] = b"%011o\0" % len(data)
    header[136:148] = b"%011o\0" % mtime
    header[148:156] = b"        "
    header[156:157] = b"0"
    header[257:265] = b"ustar\x0000"
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header), data, _ZEROS[:-len(data) % 512]


TAR_BUFFER = 128 * 1024
FILES_UPLOADS = 16  # member objects of a "files" shard uploaded at once to a bucket
# Two zero blocks end an archive; tarfile pads the file to a multiple of 10 KiB, as we do.
TAR_END = b"\0" * 1024
TAR_RECORD = 10240


class ShardWriter:
    """Collects one shard's samples into temporary files and publishes them atomically."""

    def __init__(self, part_dir: Where, shard: int, output_format: str,
                 made_with: dict | None = None, spool: Path | None = None):
        """`spool`: the local folder where a shard for a bucket is built (required then)."""
        self.part_dir = part_dir
        self.shard = shard
        self.output_format = output_format
        self.made_with = made_with  # the part's recipe, kept in _stats.json
        self.paths = shard_paths(part_dir, shard, output_format)
        self.in_bucket = isinstance(part_dir, BucketPath)
        if self.in_bucket and spool is None:
            raise ValueError("a shard for a bucket needs a local spool folder")
        # Where the temporaries are built: beside the shard on disk (a rename publishes
        # them), in the spool for a bucket (an upload does).
        self.work_dir: Path = spool if self.in_bucket else part_dir
        self.tag = f".tmp-{os.getpid()}-{secrets.token_hex(4)}"
        self.start_time = time.time()
        self._lock = threading.Lock()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        clear_stale_temporaries(self.work_dir, shard)
        data = shard_paths(self.work_dir, shard, output_format)["data"]
        self._tmp_data = data.with_name(data.name + self.tag)
        self._tar: BinaryIO | None = None
        self._spool: pa.ipc.RecordBatchFileWriter | None = None
        self._spooled: list[tuple[int, bytes]] = []
        if output_format == "webdataset":
            # A larger buffer than the 8 KB default: a sample goes out in one or two writes.
            self._tar = open(self._tmp_data, "wb", buffering=TAR_BUFFER)  # noqa: SIM115
        elif output_format == "parquet":
            self._spool = pa.ipc.new_file(str(self._tmp_data), IMAGE_SPOOL)
        else:
            self._tmp_data.mkdir()

    def add(self, record: SampleRecord, body: bytes) -> None:
        """Store a successful sample (called from worker threads)."""
        if self._spool is not None:
            with self._lock:
                self._spooled.append((record.row, body))
                if len(self._spooled) >= SPOOL_BATCH:
                    self._flush_spool()
            return
        key = record.key
        members = {
            f"{key}.{record.format}": body,
            f"{key}.txt": (record.caption or "").encode(),
            f"{key}.json": json.dumps(record.meta(), default=json_default).encode(),
        }
        if self._tar is not None:
            mtime = int(self.start_time)
            # The pieces go out as they are (no joined copy of the image): large transient
            # copies fragment a worker's heap over a long run.
            pieces = [piece for name, data in members.items()
                      for piece in tar_member(name, data, mtime)]
            with self._lock:
                self._tar.writelines(pieces)
            return
        for name, data in members.items():
            (self._tmp_data / name).write_bytes(data)

    def _flush_spool(self) -> None:
        if self._spooled and self._spool is not None:
            rows, bodies = zip(*self._spooled, strict=True)
            self._spool.write_batch(pa.record_batch(
                [pa.array(rows, pa.int64()), pa.array(bodies, pa.binary())], schema=IMAGE_SPOOL))
            self._spooled = []

    def _write_with_images(self, table: pa.Table, path: Path) -> None:
        """The shard parquet with an `image` column, one row group at a time."""
        with self._lock:
            self._flush_spool()
            self._spool.close()
        spool = pa.ipc.open_file(pa.memory_map(str(self._tmp_data))).read_all()
        position = {row: i for i, row in enumerate(spool.column("row").to_pylist())}
        schema = table.schema.append(pa.field("image", pa.binary()))
        with pq.ParquetWriter(path, schema, compression="zstd") as writer:
            for start in range(0, table.num_rows, ROW_GROUP):
                chunk = table.slice(start, ROW_GROUP)
                where = pa.array([position.get(r) for r in chunk.column("row").to_pylist()],
                                 pa.int64())
                images = spool.column("image").take(where)
                writer.write_table(chunk.append_column("image", images))

    def close(self, records: list[SampleRecord], extra_columns: pa.Table | None,
              merge: bool = False, notes: dict | None = None) -> dict:
        """Write the parquet and stats, publish everything; returns the stats.

        `merge`: the records are some rows of this shard done again (a retry of its failed
        rows); the shard's other rows, and their images, are kept from its current copy, so
        the shard still holds each of its rows exactly once. `notes`: more fields for the
        stats (how many rows were tried again later).
        """
        table = records_table(records)
        if extra_columns is not None:
            for name in extra_columns.column_names:
                table = table.append_column(name, extra_columns.column(name))
        if merge:
            kept = self._carry_over({r.row for r in records}, {r.key for r in records})
            table = pa.concat_tables([kept, table], promote_options="default").sort_by("row")
        if self._tar is not None:
            self._tar.write(TAR_END)
            self._tar.write(b"\0" * (-self._tar.tell() % TAR_RECORD))
            self._tar.close()
        end = time.time()
        stats = shard_stats(table, self.start_time, end)
        stats.update({"shard": self.shard, "output_format": self.output_format, **(notes or {})})
        if self.made_with is not None:
            stats["recipe"] = self.made_with
        tmp_parquet = self.work_dir / (self.paths["parquet"].name + self.tag)
        tmp_stats = self.work_dir / (self.paths["stats"].name + self.tag)
        if self._spool is not None:
            self._write_with_images(table, tmp_parquet)
        else:
            pq.write_table(table, tmp_parquet, compression="zstd")
        tmp_stats.write_text(json.dumps(stats, indent=2))
        if not self.in_bucket:
            data = [] if self._spool is not None else [self._tmp_data]
            for tmp in [*data, tmp_parquet, tmp_stats]:
                _fsync(tmp)
        final = self.paths["data"]
        if self.output_format == "files" and final.exists() and not is_shard_folder(final):
            raise ForeignFiles(f"{final} exists and holds files this program did not write; "
                               "move it away to let the shard be written")
        previous = _stats_format(self.paths["stats"])
        # An older copy of this shard stops counting as complete before any of it is replaced;
        # then the images, the shard parquet, and `_stats.json` last. In a bucket each upload
        # appears whole or not at all, as each rename does on disk.
        self.paths["stats"].unlink(missing_ok=True)
        self._put_data()
        self._put(tmp_parquet, self.paths["parquet"])
        if previous not in (None, self.output_format):
            self._remove_old_format(previous)
        self._put(tmp_stats, self.paths["stats"])
        if self.in_bucket:
            self.abort()  # the spool's copies
        else:
            _fsync_dir(self.part_dir)
        return stats

    def _put(self, tmp: Path, final: Where) -> None:
        if isinstance(final, BucketPath):
            final.upload(tmp)
        else:
            os.replace(tmp, final)

    def _put_data(self) -> None:
        """The images: a tar or a folder of members (none apart for output_format parquet)."""
        final = self.paths["data"]
        if self._spool is not None:
            self._tmp_data.unlink()
        elif not isinstance(final, BucketPath):
            _publish(self._tmp_data, final)
        elif self.output_format == "webdataset":
            final.upload(self._tmp_data)
        else:
            # Three small objects per image: sent many at a time, or one shard would take
            # thousands of round trips in a row.
            members = sorted(os.listdir(self._tmp_data))
            with ThreadPoolExecutor(FILES_UPLOADS, thread_name_prefix="member-upload") as pool:
                list(pool.map(lambda name: (final / name).upload(self._tmp_data / name),
                              members))
            # A rewrite leaves no member of the old copy behind (a row failed this time).
            for entry in final.iterdir():
                if entry.name not in members and _MEMBER.fullmatch(entry.name):
                    entry.unlink(missing_ok=True)

    def _carry_over(self, redone_rows: set[int], redone_keys: set[str]) -> pa.Table:
        """Copy this shard's current samples, but for the rows done again, into the new copy;
        returns their sample rows (the shard parquet's, without any image column)."""
        current = pq.read_table(arrow_file(self.paths["parquet"]))
        keep = pc.invert(pc.is_in(current.column("row"), pa.array(sorted(redone_rows),
                                                                  pa.int64())))
        current = current.filter(keep)
        data = self.paths["data"]
        if self._spool is not None and "image" in current.column_names:
            with self._lock:
                for row, image in zip(current.column("row").to_pylist(),
                                      current.column("image").to_pylist(), strict=True):
                    if image is not None:
                        self._spooled.append((row, image))
                        if len(self._spooled) >= SPOOL_BATCH:
                            self._flush_spool()
        elif self._tar is not None and data.is_file():
            source = ({"fileobj": data.open_input()} if isinstance(data, BucketPath)
                      else {"name": data})
            with tarfile.open(**source) as old, self._lock:
                for member in old:
                    if member.isfile() and member.name.split(".", 1)[0] not in redone_keys:
                        content = old.extractfile(member).read()
                        self._tar.write(b"".join(tar_member(member.name, content,
                                                            int(member.mtime))))
        elif self._tar is None and self._spool is None and is_shard_folder(data):
            for entry in data.iterdir():
                if entry.name.split(".", 1)[0] in redone_keys:
                    continue
                if isinstance(entry, BucketPath):
                    (self._tmp_data / entry.name).write_bytes(entry.read_bytes())
                else:
                    os.link(entry, self._tmp_data / entry.name)
        return current.drop_columns([c for c in ("image",) if c in current.column_names])

    def _remove_old_format(self, previous: str) -> None:
        """A part started over in another format leaves no stale copy of this shard behind;
        only what the previous copy's stats say it wrote is removed, and a folder only when it
        holds nothing but sample files."""
        if previous == "parquet":
            return  # its images were in the shard parquet, which is replaced already
        stale = shard_paths(self.part_dir, self.shard, previous)["data"]
        if previous == "files" and is_shard_folder(stale):
            _remove_shard_folder(stale)
        elif previous == "webdataset" and stale.is_file():
            stale.unlink()

    def abort(self) -> None:
        """Remove the temporary files: nothing partial is left behind."""
        try:
            if self._tar is not None:
                self._tar.close()
            if self._spool is not None:
                self._spool.close()
        except (OSError, pa.ArrowException):
            pass
        for path in self.work_dir.glob(f"*{self.tag}"):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    if path.is_dir():
        for child in path.iterdir():
            _fsync(child)
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _stats_format(path: Where) -> str | None:
    """The output format a shard's existing _stats.json says it was written in, if any."""
    try:
        return json.loads(path.read_text()).get("output_format")
    except (OSError, ValueError, AttributeError):
        return None


def _publish(tmp: Path, final: Path) -> None:
    """Rename into place; a shard folder that exists already is swapped out, then removed
    (close() has checked that it holds only sample files)."""
    if tmp.is_dir() and final.exists():
        old = final.with_name(final.name + f".old-{secrets.token_hex(4)}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def read_complete_shard(part_dir: Where, shard: int, rows: list[int],
                        made_with: dict | None = None, extra: list[str] = (),
                        complete: set[int] | None = None) -> pa.Table | None:
    """The sample table of a shard already complete on disk for exactly these rows, or None.

    Incremental mode: a shard written by an earlier run (or another Redis) need not be
    downloaded again. The row check guards against a different shard_size since then; the
    recipe check against a part started over with another format, size or filter, or a part
    file that changed since. `extra` input columns are read too, where the shard has them.
    `complete`: the part's complete shards if listed already (complete_shards), which spares
    a request per shard in a bucket.
    """
    if not (shard in complete if complete is not None else shard_complete(part_dir, shard)):
        return None
    paths = shard_paths(part_dir, shard, "files")
    if made_with is not None:
        try:
            recorded = json.loads(paths["stats"].read_text()).get("recipe")
        except (OSError, ValueError):
            return None
        if recorded is not None and recorded != made_with:
            return None
    try:
        source = pq.ParquetFile(arrow_file(paths["parquet"]))
        names = source.schema_arrow.names
        wanted = [*SAMPLE_SCHEMA.names, *extra]
        samples = source.read(columns=[n for n in wanted if n in names])
    except (OSError, pa.ArrowException):
        return None
    if sorted(samples.column("row").to_pylist()) != sorted(rows):
        return None
    return samples


def shard_stats(samples: pa.Table, start: float, end: float) -> dict:
    """img2dataset's stats fields, with the same names and meaning, from the sample table."""
    status: dict[str, int] = {}
    for state, error_class in zip(samples.column("status").to_pylist(),
                                  samples.column("error_class").to_pylist(), strict=True):
        name = "success" if state == "success" else error_class or "unknown"
        status[name] = status.get(name, 0) + 1
    successes = status.get("success", 0)
    to_resize = sum(n for name, n in status.items() if name in RESIZE_CLASSES)
    return {
        "count": samples.num_rows,
        "successes": successes,
        "failed_to_download": samples.num_rows - successes - to_resize,
        "failed_to_resize": to_resize,
        "duration": round(end - start, 3),
        "start_time": start,
        "end_time": end,
        "status_dict": status,
    }
