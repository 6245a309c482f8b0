"""Where a download's files live: a local folder, or a prefix in an object store (a bucket).

A bucket is named by URL (`s3://bucket/prefix`, `gs://bucket/prefix`) and reached through
pyarrow's own filesystem layer, a dependency already, which speaks S3 (and every server that
speaks its API: MinIO, Ceph, R2) and Google Cloud Storage with the same calls. `BucketPath`
gives a bucket the few pathlib operations this code uses (`/`, name, exists, iterdir, read and
write bytes, unlink), so that reading parts and writing shards, error files and stats do not
need two versions; what differs (there is no rename in a bucket) lives in shards/files.py.

What an object store guarantees, and what we rely on: an object appears whole when its upload
completes, or not at all. A shard is therefore written as objects uploaded from a finished
local spool file, its `_stats.json` last, exactly as on disk (where renames give the same).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.fs as pafs

# Schemes written and read with the same code; `gcs` is pyarrow's name for `gs`.
SCHEMES = ("s3", "gs", "gcs")
URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)")
# Bytes a shard's upload reads from its spool file at a time (pyarrow gathers them into parts
# of several MB, each sent before the next is gathered).
UPLOAD_CHUNK = 1 << 20


class StoreError(OSError):
    """An object store refused or failed an operation; the message names the URL."""


@dataclass(frozen=True)
class ObjectStore:
    """How to reach object storage: read from where the AWS SDKs read it, unless settings
    say otherwise (`s3_endpoint_url`, `s3_region`, `s3_profile`, `s3_virtual_addressing`)."""

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    virtual_addressing: bool = False

    def filesystem(self, scheme: str) -> pafs.FileSystem:
        """One filesystem per process and configuration: its client keeps its connections."""
        key = (os.getpid(), scheme, self)
        with _LOCK:
            if key not in _FILESYSTEMS:
                _FILESYSTEMS[key] = self._make(scheme)
            return _FILESYSTEMS[key]

    def _make(self, scheme: str) -> pafs.FileSystem:
        if scheme in ("gs", "gcs"):
            return pafs.GcsFileSystem()
        if self.profile:
            os.environ["AWS_PROFILE"] = self.profile
        endpoint = (self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
                    or os.environ.get("AWS_ENDPOINT_URL"))
        if endpoint:
            # Newer AWS SDKs send a CRC checksum in an aws-chunked body by default, which
            # several S3-compatible servers reject: with a server other than AWS, checksums
            # only where the operation requires them (a SHA-256 of the body instead, which
            # costs more CPU), unless the user chose in the SDK's own variables.
            os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
            os.environ.setdefault("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required")
        options: dict = {
            # Without a region the SDK asks the network (instance metadata) for one.
            "region": (self.region or os.environ.get("AWS_REGION")
                       or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"),
            # Small objects (stats, the shard parquet) in one PUT, not a multipart upload.
            "allow_delayed_open": True,
            # A part is sent before the next is read: with background writes, a network
            # slower than the spool's disk would gather a whole shard's parts in memory.
            "background_writes": False,
            "force_virtual_addressing": self.virtual_addressing,
        }
        if endpoint:
            found = URL.fullmatch(endpoint)
            options["scheme"] = found.group(1) if found else "https"
            options["endpoint_override"] = (found.group(2) if found else endpoint).rstrip("/")
        return pafs.S3FileSystem(**options)


_FILESYSTEMS: dict[tuple, pafs.FileSystem] = {}
_LOCK = threading.Lock()


def is_url(value: object) -> bool:
    return isinstance(value, str) and URL.match(value) is not None


def check_url(value: str) -> str:
    """A store or input URL we can write and read, normalized; else ValueError saying why."""
    scheme, rest = URL.fullmatch(value.strip()).groups()
    scheme = scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(
            f"{value}: cannot read or write {scheme}:// (object stores: "
            f"{', '.join(s + '://' for s in SCHEMES)}); give one of those or a local folder")
    bucket, _, prefix = rest.strip("/").partition("/")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.\-_]{1,254}", bucket):
        raise ValueError(f"{value}: {bucket!r} is not a bucket name")
    if any(piece in ("", ".", "..") for piece in prefix.split("/")) and prefix:
        raise ValueError(f"{value}: empty, '.' or '..' pieces in the prefix")
    return f"{scheme}://{bucket}" + (f"/{prefix}" if prefix else "")


class BucketPath:
    """An object or a prefix in a bucket, with the pathlib operations the rest of the code
    uses. A prefix is a "folder" when some object lies under it."""

    __slots__ = ("scheme", "key", "store", "_kind")

    def __init__(self, url: str, store: ObjectStore | None = None,
                 _kind: pafs.FileType | None = None):
        scheme, key = URL.fullmatch(url).groups()
        self.scheme = scheme.lower()
        self.key = key.strip("/")
        self.store = store or ObjectStore()
        self._kind = _kind  # known from the listing that found it

    # -- naming
    def __str__(self) -> str:
        return f"{self.scheme}://{self.key}"

    def __repr__(self) -> str:
        return f"BucketPath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BucketPath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __lt__(self, other: BucketPath) -> bool:
        return str(self) < str(other)

    def __truediv__(self, other: str | os.PathLike) -> BucketPath:
        return BucketPath(f"{self}/{PurePosixPath(other)}", self.store)

    @property
    def name(self) -> str:
        return PurePosixPath(self.key).name

    @property
    def parent(self) -> BucketPath:
        return BucketPath(f"{self.scheme}://{PurePosixPath(self.key).parent}", self.store)

    def with_name(self, name: str) -> BucketPath:
        return self.parent / name

    @property
    def fs(self) -> pafs.FileSystem:
        return self.store.filesystem(self.scheme)

    # -- looking
    def _info(self) -> pafs.FileInfo:
        return self._call("look at", lambda: self.fs.get_file_info(self.key))

    def _type(self) -> pafs.FileType:
        return self._kind if self._kind is not None else self._info().type

    def exists(self) -> bool:
        return self._type() != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._type() == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._type() == pafs.FileType.Directory

    def stat(self) -> os.stat_result:
        """Size and modification time, as os.stat gives them (the rest is zero)."""
        info = self._info()
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(f"{self}: no such object")
        mtime_ns = info.mtime_ns or 0
        return os.stat_result((0, 0, 0, 0, 0, 0, info.size, mtime_ns // 10**9,
                               mtime_ns // 10**9, mtime_ns // 10**9, 0, 0, 0, 0, mtime_ns,
                               mtime_ns))

    def iterdir(self) -> Iterator[BucketPath]:
        """What lies directly under this prefix: one listing request (a page per 1,000)."""
        infos = self._call("list", lambda: self.fs.get_file_info(
            pafs.FileSelector(self.key, allow_not_found=True, recursive=False)))
        for info in infos:
            yield BucketPath(f"{self.scheme}://{info.path}", self.store, info.type)

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: a bucket's prefixes exist by having objects under them."""

    # -- reading and writing
    def open_input(self) -> pa.NativeFile:
        """A seekable reader (footers, tar members, ranges) that fetches what is read."""
        return self._call("read", lambda: self.fs.open_input_file(self.key))

    def read_bytes(self) -> bytes:
        with self.open_input() as handle:
            return handle.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        """One object, whole or not at all (a single PUT below the multipart size)."""
        def put() -> None:
            stream = self.fs.open_output_stream(self.key)
            stream.write(data)
            stream.close()
        self._call("write", put)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def upload(self, local: Path) -> None:
        """Upload a finished local file as this object.

        The upload (multipart above a few MB) becomes visible only when it completes.
        pyarrow's stream completes whatever it was given when it is dropped, so a local read
        failing half way could leave a short object: the size is checked after, and a short
        object removed, never left as a shard.
        """
        expected = local.stat().st_size

        def put() -> None:
            stream = self.fs.open_output_stream(self.key)
            with open(local, "rb") as source:
                while chunk := source.read(UPLOAD_CHUNK):
                    stream.write(chunk)
            stream.close()
        try:
            self._call("upload to", put)
        finally:
            info = self._call("look at", lambda: self.fs.get_file_info(self.key))
            if info.type == pafs.FileType.File and info.size != expected:
                self.unlink(missing_ok=True)
        if info.size != expected:
            raise StoreError(f"{self}: uploaded {info.size} of {expected} bytes")

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self._call("delete", lambda: self.fs.delete_file(self.key))
        except FileNotFoundError:
            if not missing_ok:
                raise

    def _call(self, what: str, action):
        try:
            return action()
        except FileNotFoundError:
            raise
        except (OSError, pa.ArrowException) as error:
            if "NOT_FOUND" in str(error) or "does not exist" in str(error):
                raise FileNotFoundError(f"{self}: no such object or bucket ({error})") from error
            raise StoreError(f"cannot {what} {self}: {error}") from error


Where = Path | BucketPath


def location(value: str | Path, store: ObjectStore | None = None) -> Where:
    """A local path or a bucket path, from a setting's value."""
    if isinstance(value, BucketPath):
        return value
    text = str(value)
    return BucketPath(text, store) if is_url(text) else Path(text)


def is_bucket(where: object) -> bool:
    return isinstance(where, BucketPath)


def arrow_file(where: Where) -> str | pa.NativeFile:
    """What pyarrow's readers (parquet, csv, ipc) take for a path: the path itself on disk, a
    seekable reader in a bucket."""
    return where.open_input() if isinstance(where, BucketPath) else str(where)


def write_parquet(table: pa.Table, where: Where, **options) -> None:
    """A parquet file written whole: on disk through a temporary name, in a bucket as one
    upload (which is whole by itself)."""
    import pyarrow.parquet as pq

    if isinstance(where, BucketPath):
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, **options)
        where.write_bytes(sink.getvalue().to_pybytes())
        return
    where.parent.mkdir(parents=True, exist_ok=True)
    tmp = where.with_name(where.name + f".tmp-{os.getpid()}")
    pq.write_table(table, tmp, **options)
    os.replace(tmp, where)
