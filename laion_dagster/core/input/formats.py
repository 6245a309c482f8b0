"""Reading a part file in record batches, whatever its format.

img2dataset's input formats: parquet, csv, tsv, txt (one URL per line), json (an array of
objects) and jsonl (an object per line), each but parquet optionally gzip-compressed
(`.csv.gz`). Every reader yields record batches of bounded size, so a part of any size and
format costs about a batch of memory, and `parts.iter_shards` cuts them into shards the same
way for all of them.

Text has no types: csv, tsv and txt columns are read as strings, so a column never changes
type half way through a file (which would fail a part after hours). JSON keeps its values'
types, taken from the first records (JSON_SCHEMA_ROWS); a later value that does not fit them
fails the part with the row named.
"""

from __future__ import annotations

import codecs
import contextlib
import gzip
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from laion_dagster.core.storage import BucketPath, Where, arrow_file

FORMATS = ("parquet", "csv", "tsv", "txt", "json", "jsonl")
GZIP = ".gz"
# Rows per batch of the readers that parse in Python (txt, json, jsonl); pyarrow's csv reader
# cuts by bytes (CSV_BLOCK) instead.
BATCH_ROWS = 20_000
CSV_BLOCK = 4 << 20
JSON_SCHEMA_ROWS = 1_000
FINGERPRINT_SPAN = 64 << 10
# A header line with a URL in it is no header: a file of rows only (CC3M's TSV is one).
_URL_PREFIXES = ("http://", "https://")
TXT_COLUMN = "url"


class PartError(ValueError):
    """A part cannot be read or enqueued; the message names the file and the problem."""


# What reading a file that is not what its name says raises (gzip's errors are OSErrors).
READ_ERRORS = (pa.ArrowException, OSError, EOFError, json.JSONDecodeError)


def format_of(name: str) -> str | None:
    """The format a file name says (`train.tsv.gz` → tsv), or None for one we do not read."""
    lowered = name.lower()
    compressed = lowered.endswith(GZIP)
    if compressed:
        lowered = lowered[: -len(GZIP)]
    for kind in FORMATS:
        if lowered.endswith("." + kind):
            return None if compressed and kind == "parquet" else kind
    return None


def accepted() -> str:
    """The formats, in words, for messages."""
    return ", ".join(FORMATS) + " (all but parquet also as .gz)"


def stem_of(name: str) -> str:
    """The file name without its format's extensions: `part-00000-<uuid>-c000.snappy.parquet`
    → `part-00000-<uuid>-c000`, `train-0.tsv.gz` → `train-0`."""
    stem = name[: -len(GZIP)] if name.lower().endswith(GZIP) else name
    kind = format_of(name)
    if kind is not None:
        stem = stem[: -len(kind) - 1]
    if kind == "parquet":
        for codec in (".snappy", ".zstd", ".gz", ".lz4", ".brotli"):
            if stem.endswith(codec):
                return stem[: -len(codec)]
    return stem


@dataclass(frozen=True)
class PartFile:
    """One input file: its columns, its rows in batches, its row count and its fingerprint."""

    path: Where  # on disk or in a bucket: read through the same file objects
    kind: str

    @property
    def compressed(self) -> bool:
        return self.path.name.lower().endswith(GZIP)

    def schema(self) -> pa.Schema:
        with self._reading():
            if self.kind == "parquet":
                return self._parquet().schema_arrow
            if self.kind == "txt":
                return pa.schema([(TXT_COLUMN, pa.string())])
            if self.kind in ("csv", "tsv"):
                return pa.schema([(name, pa.string()) for name in self._csv_names()[0]])
            first = next(self._json_batches(), None)
            return first.schema if first is not None else pa.schema([])

    def batches(self, columns: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
        """The rows, `columns` only, in batches of about `batch_rows` (csv: of CSV_BLOCK).
        Errors of the data itself (READ_ERRORS) are the caller's to report, with the row it
        had reached."""
        if self.kind == "parquet":
            yield from self._parquet().iter_batches(batch_size=batch_rows, columns=columns)
        elif self.kind in ("csv", "tsv"):
            for batch in self._csv_reader():
                yield _as_text(batch.select(columns))
        elif self.kind == "txt":
            yield from self._txt_batches(min(batch_rows, BATCH_ROWS))
        else:
            for batch in self._json_batches(min(batch_rows, BATCH_ROWS)):
                yield batch.select(columns)

    def count_rows(self) -> int:
        """Rows in the file: parquet from its footer, the others by reading it through."""
        if self.kind == "parquet":
            return self._parquet().metadata.num_rows
        if self.kind in ("txt", "jsonl"):
            with self._reading(), self._text() as handle:
                return sum(1 for line in handle if line.strip())
        columns = self.schema().names[:1]
        with self._reading():
            return sum(batch.num_rows for batch in self.batches(columns, BATCH_ROWS))

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """A file that is not what its name says fails with its name and why."""
        try:
            yield
        except READ_ERRORS as error:
            raise PartError(f"{self.path}: not a readable {self.kind} file ({error})") \
                from error

    def fingerprint(self) -> str:
        """What identifies the file's content: its size and a digest of its parquet footer,
        or, for the others, of its first and last FINGERPRINT_SPAN bytes. A copy or a touch
        keeps it; a file regenerated with other rows gets another one (without reading it
        all)."""
        try:
            with self._raw() as handle:
                size = (handle.size() if isinstance(handle, pa.NativeFile)
                        else os.fstat(handle.fileno()).st_size)
                if self.kind == "parquet":
                    return f"{size}:{_footer_digest(handle, size, self.path)}"
                digest = hashlib.sha256(handle.read(FINGERPRINT_SPAN))
                handle.seek(max(size - FINGERPRINT_SPAN, 0))
                digest.update(handle.read(FINGERPRINT_SPAN))
                return f"{size}:{digest.hexdigest()[:16]}"
        except OSError as error:
            raise PartError(f"{self.path}: cannot read ({error})") from error

    # -- per format
    def _parquet(self) -> pq.ParquetFile:
        try:
            # pre_buffer=False: the default reads the whole compressed file up front, which
            # would make memory grow with the part instead of with the shard.
            return pq.ParquetFile(arrow_file(self.path), pre_buffer=False)
        except (pa.ArrowException, OSError) as error:
            raise PartError(f"{self.path}: not a readable parquet file ({error})") from error

    def _raw(self) -> IO[bytes]:
        """The file's bytes as stored (a bucket's object is read by ranges as needed)."""
        if isinstance(self.path, BucketPath):
            return self.path.open_input()
        return open(self.path, "rb")  # noqa: SIM115

    def _binary(self) -> IO[bytes]:
        return gzip.open(self._raw(), "rb") if self.compressed else self._raw()

    def _text(self) -> IO[str]:
        # Scraped text holds invalid UTF-8 now and then: one bad byte must not cost a part.
        # A byte-order mark (Excel's CSV) is not part of the first column's name.
        return codecs.getreader("utf-8-sig")(self._binary(), errors="replace")

    def _csv_names(self) -> tuple[list[str], bool]:
        """The column names, and whether the first line is a header (no cell is a URL)."""
        import csv

        with self._text() as handle:
            first = next(csv.reader(handle, delimiter=self._delimiter), None)
        if not first:
            raise PartError(f"{self.path}: no header line (an empty {self.kind} file)")
        urls = [i for i, cell in enumerate(first) if cell.strip().lower().startswith(
            _URL_PREFIXES)]
        if not urls:
            return first, True
        if len(first) == 2:  # url and caption, in either order (CC3M: caption, url)
            return ["url" if i == urls[0] else "caption" for i in range(2)], False
        return ["url" if i == urls[0] else f"column_{i}" for i in range(len(first))], False

    @property
    def _delimiter(self) -> str:
        return "\t" if self.kind == "tsv" else ","

    def _csv_reader(self) -> pacsv.CSVStreamingReader:
        names, header = self._csv_names()
        stream = pa.input_stream(arrow_file(self.path),
                                 compression="gzip" if self.compressed else None)
        return pacsv.open_csv(
            stream,
            read_options=pacsv.ReadOptions(block_size=CSV_BLOCK, column_names=names,
                                           skip_rows=1 if header else 0),
            parse_options=pacsv.ParseOptions(delimiter=self._delimiter,
                                             newlines_in_values=True),
            # Bytes, decoded per column afterwards (_as_text): invalid UTF-8 in one caption
            # must not fail the whole file.
            convert_options=pacsv.ConvertOptions(
                column_types={name: pa.binary() for name in names},
                strings_can_be_null=False, quoted_strings_can_be_null=False))

    def _txt_batches(self, rows: int) -> Iterator[pa.RecordBatch]:
        with self._text() as handle:
            urls: list[str] = []
            for line in handle:
                url = line.strip()
                if not url:
                    continue
                urls.append(url)
                if len(urls) >= rows:
                    yield pa.record_batch([pa.array(urls, pa.string())], names=[TXT_COLUMN])
                    urls = []
            if urls:
                yield pa.record_batch([pa.array(urls, pa.string())], names=[TXT_COLUMN])

    def _json_batches(self, rows: int = JSON_SCHEMA_ROWS) -> Iterator[pa.RecordBatch]:
        schema: pa.Schema | None = None
        records: list[dict] = []
        done = 0
        for record in self._json_records():
            if not isinstance(record, dict):
                raise PartError(f"{self.path}: record {done + len(records)} is not an object "
                                  f"({type(record).__name__})")
            records.append(record)
            if len(records) >= (JSON_SCHEMA_ROWS if schema is None else rows):
                schema, batch = _json_batch(records, schema, self.path, done)
                done += len(records)
                records = []
                yield batch
        if records:
            yield _json_batch(records, schema, self.path, done)[1]

    def _json_records(self) -> Iterator[object]:
        """Objects of a jsonl file, or of a json file holding an array of them (read piece
        by piece, never whole; a .json file of one object per line is read as jsonl)."""
        with self._text() as handle:
            head = handle.read(1)
            while head and head.isspace():
                head = handle.read(1)
            if self.kind == "json" and head == "[":
                yield from _array_items(handle, self.path)
                return
            if head:
                yield from (json.loads(line) for line in _lines(head, handle) if line.strip())


def _lines(head: str, handle: IO[str]) -> Iterator[str]:
    first = head + handle.readline()
    yield first
    yield from handle


def _array_items(handle: IO[str], path: Path) -> Iterator[object]:
    """The items of a JSON array whose `[` was read already, each parsed as it comes."""
    decoder = json.JSONDecoder()
    buffer = ""
    position = 0
    while True:
        while True:  # between items: white space and one comma
            while position < len(buffer) and (buffer[position].isspace()
                                               or buffer[position] == ","):
                position += 1
            if position < len(buffer):
                break
            more = handle.read(1 << 20)
            if not more:
                raise PartError(f"{path}: the JSON array is not closed (no ']')")
            buffer, position = buffer[position:] + more, 0
        if buffer[position] == "]":
            return
        while True:
            try:
                item, end = decoder.raw_decode(buffer, position)
                break
            except json.JSONDecodeError:
                more = handle.read(1 << 20)
                if not more:
                    raise
                buffer, position = buffer[position:] + more, 0
        yield item
        position = end
        if position > 1 << 20:
            buffer, position = buffer[position:], 0


def _json_batch(records: list[dict], schema: pa.Schema | None, path: Path,
                first_row: int) -> tuple[pa.Schema, pa.RecordBatch]:
    try:
        if schema is None:
            table = pa.Table.from_pylist(records)
            schema = pa.schema([f.with_type(pa.string()) if pa.types.is_null(f.type) else f
                                for f in table.schema])
        return schema, pa.Table.from_pylist(records, schema=schema).to_batches(
            max_chunksize=len(records))[0]
    except (pa.ArrowException, TypeError, ValueError) as error:
        raise PartError(f"{path}: the records from row {first_row} do not fit the columns "
                          f"of the first {JSON_SCHEMA_ROWS:,} ({error})") from error


def _as_text(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Binary columns (a text file's cells) as strings, bad UTF-8 replaced with U+FFFD."""
    columns = []
    for column in batch.columns:
        try:
            columns.append(column.cast(pa.string()))
        except pa.ArrowInvalid:
            columns.append(pa.array([None if v is None else v.decode("utf-8", "replace")
                                     for v in column.to_pylist()], pa.string()))
    return pa.record_batch(columns, names=batch.schema.names)


def _footer_digest(handle: IO[bytes], size: int, path: Path) -> str:
    if size < 12:
        raise PartError(f"{path}: not a readable parquet file ({size} bytes)")
    handle.seek(size - 8)
    tail = handle.read(8)
    length = int.from_bytes(tail[:4], "little")
    if tail[4:] != b"PAR1" or length > size - 12:
        raise PartError(f"{path}: not a readable parquet file (no parquet footer)")
    handle.seek(size - 8 - length)
    return hashlib.sha256(handle.read(length)).hexdigest()[:16]


def open_part_file(path: Where) -> PartFile:
    """The file as a part: PartError when it is missing or of a format we do not read."""
    if not path.is_file():
        raise PartError(f"{path}: file not found")
    kind = format_of(path.name)
    if kind is None:
        raise PartError(f"{path}: not a format we read (accepted: {accepted()})")
    return PartFile(path, kind)
