"""Parquet parts: finding them, naming them, and cutting them into shards with bounded memory.

A part is one parquet file under `parquet_dir/<subset>/`; its partition key is
`<subset>__<stem>`. Reading goes through record batches, so a part of any size costs about one
shard of memory. Rows without a usable URL are not queued but are kept, with the reason, so the
part's counts still add up and the error file can list them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SEPARATOR = "__"
URL_CANDIDATES = ("URL", "url")
CAPTION_CANDIDATES = ("TEXT", "caption", "text")
MAX_URL_LENGTH = 4096
# Names our shard rows use; input columns with these names are kept as "input_<name>".
RESERVED = {"row", "key", "url", "caption", "status", "error_class", "error_message",
            "http_status", "width", "height", "original_width", "original_height", "sha256",
            "bytes", "format", "shard", "partition"}
_KEY_SAFE = re.compile(r"[^A-Za-z0-9_.\-]")


class PartError(ValueError):
    """A part cannot be enqueued; the message names the file and the problem."""


@dataclass(frozen=True)
class Part:
    path: Path
    subset: str
    stem: str

    @property
    def key(self) -> str:
        return f"{self.subset}{SEPARATOR}{self.stem}"

    @property
    def relative_dir(self) -> Path:
        """Where the part's shards go, relative to the store: `<subset>/<stem>`."""
        return Path(self.subset) / self.stem


def stem_of(name: str) -> str:
    """`part-00000-<uuid>-c000.snappy.parquet` → `part-00000-<uuid>-c000`."""
    stem = name[: -len(".parquet")] if name.endswith(".parquet") else name
    for codec in (".snappy", ".zstd", ".gz", ".lz4", ".brotli"):
        if stem.endswith(codec):
            return stem[: -len(codec)]
    return stem


def relative_dir(partition: str) -> Path:
    """The store folder of a partition key, without touching the parquet folder."""
    subset, _, stem = partition.partition(SEPARATOR)
    if not stem:
        raise PartError(f"not a part key: {partition!r} (expected <subset>{SEPARATOR}<part>)")
    return Path(subset) / stem


def discover(root: Path) -> list[Part]:
    """Every part under `root/<subset>/`, skipping Spark's _SUCCESS, .crc and hidden files."""
    found: list[Part] = []
    if not root.is_dir():
        return found
    for subset_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        if subset_dir.name.startswith((".", "_")):
            continue
        for path in sorted(subset_dir.glob("*.parquet")):
            if path.name.startswith((".", "_")) or not path.is_file():
                continue
            part = Part(path=path, subset=subset_dir.name, stem=stem_of(path.name))
            if SEPARATOR in part.subset or _KEY_SAFE.search(part.key):
                # Dagster partition keys and our store paths need plain names.
                continue
            found.append(part)
    return found


def find(root: Path, partition: str) -> Part:
    for part in discover(root):
        if part.key == partition:
            return part
    raise PartError(f"part {partition!r} not found under {root} "
                    f"(expected {root}/{relative_dir(partition).parent}/<file>.parquet)")


@dataclass(frozen=True)
class Columns:
    url: str
    caption: str | None
    extra: tuple[str, ...]


def _pick(names: list[str], wanted: str | None, candidates: tuple[str, ...]) -> str | None:
    options = (wanted,) if wanted else candidates
    for option in options:
        if option in names:
            return option
    lowered = {}
    for name in names:
        lowered.setdefault(name.lower(), []).append(name)
    for option in options:
        match = lowered.get(option.lower(), [])
        if len(match) == 1:
            return match[0]
    return None


def resolve_columns(path: Path, schema: pa.Schema, url_column: str | None,
                    caption_column: str | None, required: tuple[str, ...] = (),
                    keep: list[str] | None = None) -> Columns:
    """Which columns are the URL, the caption, and the extras that travel with each row.

    `keep` limits the extras (img2dataset's save_additional_columns); `required` columns are
    kept whatever `keep` says, because a setting needs them downstream.
    """
    names = list(schema.names)
    for name in list(required) + list(keep or []):
        if name not in names:
            raise PartError(f"{path}: no column {name!r} (named in the settings); "
                            f"columns are: {', '.join(names)}")
    url = _pick(names, url_column, URL_CANDIDATES)
    if url is None:
        looked = url_column or "/".join(URL_CANDIDATES)
        raise PartError(f"{path}: no URL column (looked for {looked}, case-insensitive); "
                        f"columns are: {', '.join(names) or 'none'}")
    url_type = schema.field(url).type
    if not (pa.types.is_string(url_type) or pa.types.is_large_string(url_type)):
        raise PartError(f"{path}: URL column {url!r} has type {url_type}, expected string")
    caption = _pick(names, caption_column, CAPTION_CANDIDATES)
    if caption_column and caption is None:
        raise PartError(f"{path}: no caption column {caption_column!r}; "
                        f"columns are: {', '.join(names)}")
    extra = tuple(n for n in names if n not in (url, caption)
                  and (keep is None or n in keep or n in required))
    return Columns(url=url, caption=caption, extra=extra)


def open_part(path: Path) -> pq.ParquetFile:
    if not path.is_file():
        raise PartError(f"{path}: file not found")
    try:
        # pre_buffer=False: the default reads the whole compressed file up front, which would
        # make enqueue memory grow with the part instead of with the shard.
        return pq.ParquetFile(path, pre_buffer=False)
    except (pa.ArrowException, OSError) as error:
        raise PartError(f"{path}: not a readable parquet file ({error})") from error


def count_rows(path: Path) -> int:
    """Rows in a part, from its footer alone (no data read)."""
    return open_part(path).metadata.num_rows


def rows_if_readable(part: Part) -> int:
    """count_rows for progress and ETAs: 0 for a broken part, whose own run names the file."""
    try:
        return count_rows(part.path)
    except PartError:
        return 0


@dataclass(frozen=True)
class Shard:
    """One shard of a part: its queued rows and the rows that could not be queued."""

    index: int
    first_row: int
    rows: int
    valid: pa.Table  # row, url, caption, extra columns...
    invalid: pa.Table  # row, url, caption, error_class, error_message


def _valid_mask(urls: pa.Array) -> tuple[pa.Array, pa.Array]:
    """(is valid, reason) for each URL; the check is vectorised because parts are huge."""
    lowered = pc.utf8_lower(pc.utf8_trim_whitespace(urls))
    http = pc.or_(pc.starts_with(lowered, "http://"), pc.starts_with(lowered, "https://"))
    # After the scheme: optional user info, then at least one character of a host.
    has_host = pc.match_substring_regex(lowered, r"^https?://([^/?#@]*@)?[^/?#:@\s]")
    length = pc.utf8_length(urls)
    too_long = pc.greater(length, MAX_URL_LENGTH)
    too_short = pc.less_equal(length, len("https://"))
    missing = pc.is_null(urls)
    reason = pc.case_when(
        pc.make_struct(missing, pc.fill_null(pc.invert(http), True),
                       pc.fill_null(too_long, False), pc.fill_null(too_short, True),
                       pc.fill_null(pc.invert(has_host), True)),
        "missing URL", "not an http(s) URL", f"URL longer than {MAX_URL_LENGTH} characters",
        "URL too short", "URL has no host",
    )
    # Valid exactly when no reason applies (case_when gives null then).
    valid = pc.is_null(reason)
    return valid, reason


def extra_name(name: str) -> str:
    """What an input column is called in a shard (ours keep their names, clashes get input_)."""
    return f"input_{name}" if name in RESERVED else name


def _text(values: pa.Array) -> pa.Array:
    """Captions as strings. A binary caption column may hold invalid UTF-8 (scraped alt text
    often does): those values are decoded with U+FFFD, since one bad byte must not cost a
    row, let alone a part."""
    try:
        return values.cast(pa.string())
    except pa.ArrowInvalid:
        return pa.array([None if v is None else v.decode("utf-8", errors="replace")
                         for v in values.to_pylist()], pa.string())


def _shard(index: int, first_row: int, batch: pa.RecordBatch, columns: Columns) -> Shard:
    n = batch.num_rows
    row = pa.array(range(first_row, first_row + n), pa.int64())
    url = batch.column(columns.url).cast(pa.string())
    caption = (_text(batch.column(columns.caption)) if columns.caption
               else pa.nulls(n, pa.string()))
    valid, reason = _valid_mask(url)
    arrays = [row, url, caption] + [batch.column(c) for c in columns.extra]
    names = ["row", "url", "caption"] + [extra_name(c) for c in columns.extra]
    table = pa.Table.from_arrays(arrays, names=names)
    invalid_mask = pc.invert(valid)
    invalid = pa.table({
        "row": row.filter(invalid_mask),
        "url": url.filter(invalid_mask),
        "caption": caption.filter(invalid_mask),
        "error_class": pa.array(["invalid_url"] * pc.sum(invalid_mask.cast(pa.int64())).as_py(),
                                pa.string()),
        "error_message": reason.filter(invalid_mask),
    })
    return Shard(index=index, first_row=first_row, rows=n, valid=table.filter(valid),
                 invalid=invalid)


def iter_shards(path: Path, shard_size: int, url_column: str | None = None,
                caption_column: str | None = None, required: tuple[str, ...] = (),
                keep: list[str] | None = None) -> Iterator[Shard]:
    """Cut a part into shards of exactly `shard_size` rows (the last one may be shorter).

    Shard boundaries depend only on the file and the shard size, so re-reading a part yields
    the same shard ids: that is what makes re-enqueuing a part idempotent.
    """
    parquet = open_part(path)
    if parquet.metadata.num_rows == 0:
        raise PartError(f"{path}: empty part (0 rows)")
    columns = resolve_columns(path, parquet.schema_arrow, url_column, caption_column, required,
                              keep)
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    index = 0
    first = 0
    # Only the columns that travel are read: a dropped column costs no I/O and no memory.
    wanted = [c for c in parquet.schema_arrow.names
              if c in (columns.url, columns.caption) or c in columns.extra]
    try:
        for batch in parquet.iter_batches(batch_size=shard_size, columns=wanted):
            pending.append(batch)
            pending_rows += batch.num_rows
            while pending_rows >= shard_size:
                table = pa.Table.from_batches(pending).combine_chunks()
                head, tail = table.slice(0, shard_size), table.slice(shard_size)
                yield _shard(index, first, head.to_batches()[0], columns)
                index += 1
                first += shard_size
                pending = tail.to_batches() if tail.num_rows else []
                pending_rows = tail.num_rows
        if pending_rows:
            table = pa.Table.from_batches(pending).combine_chunks()
            yield _shard(index, first, table.to_batches()[0], columns)
    except (pa.ArrowException, OSError) as error:
        raise PartError(f"{path}: cannot read rows after row {first} ({error})") from error


def encode_table(table: pa.Table) -> bytes:
    """Arrow IPC with zstd: compact in Redis, and decoded without a per-row parser."""
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def decode_table(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()
