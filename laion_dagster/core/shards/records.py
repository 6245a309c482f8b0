"""A shard's rows and records: what travels on the queue, what is written, what is counted.

A shard is cut from a part as one Arrow table (its payload: row, url, caption, the extra input
columns, and why a row is not fetched), travels through Redis compressed, and comes back as one
`SampleRecord` per row, whose table is the shard's parquet and whose counts are its `Outcome`.
Everything that gives a shard's columns their names and meaning lives here, so the enqueue, the
worker and the files agree by construction.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from laion_dagster.core.queue.protocol import Outcome, encode_table
from laion_dagster.core.shards.recipe import Recipe

# Names our shard rows use; input columns with these names are kept as "input_<name>".
RESERVED = {"row", "key", "url", "caption", "status", "error_class", "error_message",
            "http_status", "width", "height", "original_width", "original_height", "sha256",
            "bytes", "format", "shard", "partition", "reject"}


# Why a row is not fetched (null when it is); travels in the shard so workers can record it.
REJECT = "reject"


# Payload schema metadata: which extra columns identify a row (for the error records).
KEY_COLUMNS_META = b"laion.key_columns"


@dataclass(frozen=True)
class Shard:
    """One shard of a part: every one of its rows, with why a row is not fetched (`reject`,
    null for the rows that are)."""

    index: int
    first_row: int
    rows: int
    table: pa.Table  # row, url, caption, extra columns..., reject

    @property
    def rejected(self) -> pa.Table:
        return self.table.filter(pc.is_valid(self.table.column(REJECT)))

    @property
    def valid(self) -> pa.Table:
        """The rows to fetch, without the reject column."""
        return self.table.filter(pc.is_null(self.table.column(REJECT))).drop_columns([REJECT])

    @property
    def invalid_rows(self) -> int:
        return self.rows - self.table.column(REJECT).null_count


def extra_name(name: str) -> str:
    """What an input column is called in a shard (ours keep their names, clashes get input_)."""
    return f"input_{name}" if name in RESERVED else name


def key_columns_of(table: pa.Table) -> list[str]:
    """The columns of a shard's payload that identify a row (see resolve_columns)."""
    raw = (table.schema.metadata or {}).get(KEY_COLUMNS_META)
    return [c for c in json.loads(raw) if c in table.column_names] if raw else []


SAMPLE_SCHEMA = pa.schema([
    ("key", pa.string()), ("row", pa.int64()), ("url", pa.string()), ("caption", pa.string()),
    ("status", pa.string()), ("error_class", pa.string()), ("error_message", pa.string()),
    ("http_status", pa.int32()), ("width", pa.int32()), ("height", pa.int32()),
    ("original_width", pa.int32()), ("original_height", pa.int32()), ("sha256", pa.string()),
    ("bytes", pa.int64()), ("format", pa.string()),
])


# A part's error file: these columns, then the input columns that identify a row.
ERROR_SCHEMA = pa.schema([
    ("row", pa.int64()), ("key", pa.string()), ("url", pa.string()), ("caption", pa.string()),
    ("error_class", pa.string()), ("error_message", pa.string()), ("http_status", pa.int32()),
])


def sample_key(prefix: str, row: int) -> str:
    """`<subset>_<part>_<row>`: unique across the dataset, sorted in input order within a part,
    and never derived from the URL (which is hostile). `prefix`: parts.sample_prefix."""
    return f"{prefix}_{row:010d}"


@dataclass(slots=True)
class SampleRecord:
    row: int
    key: str
    url: str
    caption: str | None
    status: str = "success"
    error_class: str | None = None
    error_message: str | None = None
    http_status: int | None = None
    width: int | None = None  # as stored (after any resize)
    height: int | None = None
    original_width: int | None = None  # as downloaded
    original_height: int | None = None
    sha256: str | None = None  # of the downloaded bytes
    bytes: int | None = None
    format: str | None = None
    extra: dict = field(default_factory=dict)
    # Rejected at enqueue (no usable URL): already counted there, written here only so that
    # every input row is in its shard parquet.
    rejected: bool = False

    def meta(self) -> dict:
        """The sample's JSON sidecar, in img2dataset's field names."""
        meta = {"key": self.key, "row": self.row, "url": self.url,
                "caption": self.caption, "status": self.status,
                "error_message": self.error_message, "width": self.width,
                "height": self.height, "original_width": self.original_width,
                "original_height": self.original_height, "sha256": self.sha256, "bytes": self.bytes,
                "format": self.format}
        meta.update(self.extra)
        return meta


def json_default(value):
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def records_table(records: list[SampleRecord]) -> pa.Table:
    columns = {name: [] for name in SAMPLE_SCHEMA.names}
    for r in records:
        columns["key"].append(r.key)
        columns["row"].append(r.row)
        columns["url"].append(r.url)
        columns["caption"].append(r.caption)
        columns["status"].append(r.status)
        columns["error_class"].append(r.error_class)
        columns["error_message"].append(r.error_message)
        columns["http_status"].append(r.http_status)
        columns["width"].append(r.width)
        columns["height"].append(r.height)
        columns["original_width"].append(r.original_width)
        columns["original_height"].append(r.original_height)
        columns["sha256"].append(r.sha256)
        columns["bytes"].append(r.bytes)
        columns["format"].append(r.format)
    return pa.table(columns, schema=SAMPLE_SCHEMA)


def error_table(records: list[SampleRecord], key_columns: list[str] = ()) -> pa.Table:
    table = records_table(records)
    for name in key_columns:
        table = table.append_column(name, pa.array([r.extra.get(name) for r in records]))
    return failed_rows(table, key_columns)


def failed_rows(samples: pa.Table, key_columns: list[str] = ()) -> pa.Table:
    """The error records of a shard's sample table, with the input columns that identify a row:
    what goes to the part's error file."""
    failed = samples.filter(pc.not_equal(samples.column("status"), "success"))
    ours = failed.select(ERROR_SCHEMA.names).cast(ERROR_SCHEMA)
    for name in key_columns:
        if name in failed.column_names:
            ours = ours.append_column(name, failed.column(name))
    return ours


OUR_COLUMNS = ("row", "url", "caption", REJECT)


def made_with(recipe: Recipe, source: str | None) -> dict:
    """What a shard's content depends on (kept in its _stats.json): the part's recipe and the
    fingerprint of the file its rows came from, so incremental mode never takes a shard made
    from an older version of the part for this one."""
    return {**recipe.made_with, "source": source} if source else recipe.made_with


def with_earlier_tries(message: str | None, earlier: list[str] | None) -> str | None:
    """A row's last failure, followed by what its earlier tries met: a row that failed twice
    keeps both messages."""
    if not earlier:
        return message
    tries = "; ".join(f"try {n}: {text}" for n, text in enumerate(earlier, 1))
    return f"{message} (earlier {tries})"


def rejected_rows(table: pa.Table) -> dict[int, str]:
    """Rows of a shard payload that are not fetched (no usable URL), with the reason."""
    if REJECT not in table.column_names:
        return {}
    rejected = table.filter(pc.is_valid(table.column(REJECT)))
    return dict(zip(rejected.column("row").to_pylist(),
                    rejected.column(REJECT).to_pylist(), strict=True))


def outcome_of(samples: pa.Table, rejected: dict[int, str] | None = None,
               key_columns: list[str] = ()) -> Outcome:
    """A shard's counts, error classes and error records, from its sample table. Rows rejected
    at enqueue are left out: the enqueue counted them and recorded their errors."""
    if rejected:
        samples = samples.filter(pc.invert(pc.is_in(
            samples.column("row"), pa.array(list(rejected), pa.int64()))))
    status = samples.column("status").to_pylist()
    sizes = samples.column("bytes").to_pylist()
    classes = Counter(c or "unknown" for c, st in
                      zip(samples.column("error_class").to_pylist(), status, strict=True)
                      if st != "success")
    ok = status.count("success")
    errors = failed_rows(samples, key_columns)
    return Outcome(ok=ok, failed=len(status) - ok,
                   bytes=sum(b or 0 for b, st in zip(sizes, status, strict=True)
                             if st == "success"),
                   classes=dict(classes),
                   errors=encode_table(errors) if errors.num_rows else b"")
