"""Parts: finding them, naming them, and cutting them into shards with bounded memory.

A part is one input file (parquet, csv, tsv, txt, json or jsonl, see formats.py). Where they
are, `parquet_dir` names one of three layouts: a single file (one part), a flat folder of
files (its name is the subset), or a folder of subset folders (LAION's releases). Its
partition key is `<subset>/<number>` for Spark's `part-<number>-<uuid>-c000` names
(`laion2B-en/00042`), else `<subset>/<stem>` (`cc3m/train-0`): short, and readable even where
the Dagster UI cuts long keys in the middle; the full file name is in the metadata. Reading
goes through record batches, so a part of any size costs about one shard of memory. Rows
without a usable URL are not fetched but are kept, with the reason, so every input row still
reaches a shard parquet and the error file.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from laion_dagster.core.input.formats import (
    READ_ERRORS,
    PartError,
    accepted,
    format_of,
    open_part_file,
    stem_of,
)
from laion_dagster.core.shards.records import KEY_COLUMNS_META, REJECT, Shard, extra_name
from laion_dagster.core.storage import StoreError, Where, location

SEPARATOR = "/"
URL_CANDIDATES = ("URL", "url")
CAPTION_CANDIDATES = ("TEXT", "caption", "text")
# Input columns that identify a row (LAION's SAMPLE_ID, the joined releases' hash, ...).
KEY_CANDIDATES = ("SAMPLE_ID", "hash", "uid", "id")
MAX_URL_LENGTH = 4096
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
_SPARK_PART = re.compile(r"part-(\d+)-")
# A tar member name has room for 100 bytes: prefix, "_", 10 digits, ".json".
_MAX_PREFIX = 80


@dataclass(frozen=True)
class Part:
    path: Path
    subset: str
    stem: str

    @property
    def name(self) -> str:
        """The part within its subset: Spark's number (`00042`), else the file's stem."""
        match = _SPARK_PART.match(self.stem)
        return match.group(1) if match else self.stem

    @property
    def key(self) -> str:
        return f"{self.subset}{SEPARATOR}{self.name}"

    @property
    def relative_dir(self) -> Path:
        """Where the part's shards go, relative to the store: `<subset>/<name>`."""
        return relative_dir(self.key)


def split_key(partition: str) -> tuple[str, str]:
    subset, separator, name = partition.partition(SEPARATOR)
    if not (separator and _NAME.fullmatch(subset) and _NAME.fullmatch(name)):
        raise PartError(f"not a part key: {partition!r} (expected <subset>{SEPARATOR}<part>, "
                        "e.g. laion2B-en/00042)")
    return subset, name


def relative_dir(partition: str) -> Path:
    """The store folder of a partition key, without touching the parquet folder."""
    subset, name = split_key(partition)
    return Path(subset) / name


def sample_prefix(partition: str) -> str:
    """What every sample key of a part starts with: unique across the dataset (discover checks
    it), free of '.' and '/' (a webdataset key ends at the first dot), short enough for a tar
    member name."""
    prefix = partition.replace(SEPARATOR, "_").replace(".", "-")
    if len(prefix) > _MAX_PREFIX:
        digest = hashlib.sha256(prefix.encode()).hexdigest()[:10]
        prefix = f"{prefix[:_MAX_PREFIX - 11]}-{digest}"
    return prefix


LAYOUTS = ("a file (one part); a folder of files (its name is the subset); or a folder of "
           "subset folders of files (LAION's releases)")


@dataclass
class Survey:
    """What an input path holds: its parts, and the files that are not parts, with why."""

    parts: list[Part] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _ignored(path: Path) -> bool:
    """Spark's _SUCCESS and .crc files, and hidden ones: never parts, never worth a word."""
    return path.name.startswith((".", "_"))


def _files(folder: Path, subset: str, found: Survey) -> list[Part]:
    """The parts among `folder`'s files; the others are listed in `found.problems`."""
    candidates = []
    for path in sorted(folder.iterdir()):
        if _ignored(path) or path.is_dir():
            continue
        if format_of(path.name) is None:
            found.problems.append(f"{path}: skipped; not a format we read (accepted: "
                                  f"{accepted()})")
            continue
        candidates.append(Part(path=path, subset=subset, stem=stem_of(path.name)))
    return candidates


def survey(root: Where) -> Survey:
    """Every part at `root` (a folder or a bucket prefix), in any of the LAYOUTS.

    A file that cannot be a part (a format we do not read, a name our keys and folders cannot
    hold, two files that would share a key or a sample-key prefix) is listed in `problems`,
    never silently dropped; so is a folder below the subset folders, which is not read. A
    bucket that cannot be listed (credentials, endpoint) is a PartError saying why.
    """
    try:
        return _survey(root)
    except StoreError as error:
        raise PartError(f"cannot read the parts at {root}: {error}") from error


def _survey(root: Where) -> Survey:
    found = Survey()
    candidates: list[Part] = []
    if root.is_file():
        if format_of(root.name) is None:
            found.problems.append(f"{root}: not a format we read (accepted: {accepted()})")
        else:
            candidates.append(Part(path=root, subset=root.parent.name, stem=stem_of(root.name)))
    elif root.is_dir():
        nested: list[Part] = []
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not _ignored(p)):
            nested += _files(folder, folder.name, found)
            deeper = [p for p in folder.iterdir() if p.is_dir() and not _ignored(p)]
            if deeper:
                found.problems.append(f"{deeper[0]}{' and others' if len(deeper) > 1 else ''}:"
                                      f" not read; parts are files in {root} or in its "
                                      "subset folders, one level down")
        flat = _files(root, root.name, found)
        if nested and flat:  # subset folders: files beside them are strays, not a subset
            found.problems += [f"{p.path}: skipped; a file beside subset folders (move it into "
                               "one)" for p in flat]
            flat = []
        candidates = flat + nested
    named = []
    for part in candidates:
        if _NAME.fullmatch(part.subset) and _NAME.fullmatch(part.name) and "..." not in part.key:
            named.append(part)
        else:
            found.problems.append(
                f"{part.path}: skipped; subset ({part.subset!r}) and file names may hold only "
                "letters, digits, '_', '-' and '.'")
    by_key: dict[str, list[Part]] = defaultdict(list)
    by_prefix: dict[str, list[Part]] = defaultdict(list)
    for part in named:
        by_key[part.key].append(part)
        by_prefix[sample_prefix(part.key)].append(part)
    clashes = [(f"the part key {key}", group) for key, group in by_key.items() if len(group) > 1]
    clashes += [("sample keys", group) for group in by_prefix.values()
                if len({p.key for p in group}) > 1]
    for what, group in clashes:
        found.problems.append(f"{', '.join(str(p.path) for p in group)}: skipped; these files "
                              f"would share {what}; keep one of them in the folder")
    clashing = {id(p) for _, group in clashes for p in group}
    found.parts = [p for p in named if id(p) not in clashing]
    return found


def nothing_found(root: Path, found: Survey) -> str:
    """One sentence: what is at `root`, and what would have been read."""
    if not root.exists():
        seen = "it does not exist"
    elif root.is_file():
        seen = "it is a file of a format we do not read"
    else:
        entries = [p for p in root.iterdir() if not _ignored(p)]
        folders = sum(p.is_dir() for p in entries)
        seen = ("it is an empty folder" if not entries else
                f"it holds {len(entries) - folders} files and {folders} folders, none of them "
                "a part")
        if found.problems:
            seen += f" (e.g. {found.problems[0]})"
    return (f"no parts at {root}: {seen}. Accepted: {LAYOUTS}; formats {accepted()}; give "
            "the path with --parquet-dir (LAION_PARQUET_DIR)")


def discover(root: Path) -> list[Part]:
    """The parts at `root` (see `survey` for the files that are not parts)."""
    return survey(root).parts


def find(root: Path, partition: str) -> Part:
    found = survey(root)
    for part in found.parts:
        if part.key == partition:
            return part
    split_key(partition)  # a malformed key gets its own message
    keys = [p.key for p in found.parts]
    listed = (f"it has {len(keys)}: {', '.join(keys[:5])}{' …' if len(keys) > 5 else ''}"
              if keys else nothing_found(root, found))
    raise PartError(f"part {partition!r} not found at {root}; {listed}")


def locate(root: Path, partition: str, recorded: str | None) -> Part:
    """The part at `root`, else the file its queue state recorded (`PartState.path`) if it is
    still there with this key: a command that names only the store still finds it."""
    try:
        return find(root, partition)
    except PartError:
        if recorded:
            for part in survey(location(recorded)).parts:
                if part.key == partition:
                    return part
        raise


@dataclass(frozen=True)
class Columns:
    url: str
    caption: str | None
    extra: tuple[str, ...]
    keys: tuple[str, ...] = ()  # extra columns that identify a row: the error file has them


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
                    keep: list[str] | None = None,
                    key_columns: list[str] | None = None) -> Columns:
    """Which columns are the URL, the caption, and the extras that travel with each row.

    `keep` limits the extras (img2dataset's save_additional_columns); `required` columns are
    kept whatever `keep` says, because a setting needs them downstream, and so are the
    columns that identify a row (`key_columns`, default: those of KEY_CANDIDATES present).
    """
    names = list(schema.names)
    for name in list(required) + list(keep or []) + list(key_columns or []):
        if name not in names:
            raise PartError(f"{path}: no column {name!r} (named in the settings); "
                            f"columns are: {', '.join(names)}")
    url = _pick(names, url_column, URL_CANDIDATES)
    if url is None:
        looked = url_column or "/".join(URL_CANDIDATES)
        raise PartError(f"{path}: no URL column (looked for {looked}, case-insensitive); "
                        f"columns are: {', '.join(names) or 'none'}; name it with the setting "
                        "url_column (--url-column)")
    url_type = schema.field(url).type
    if not (pa.types.is_string(url_type) or pa.types.is_large_string(url_type)):
        raise PartError(f"{path}: URL column {url!r} has type {url_type}, expected string")
    caption = _pick(names, caption_column, CAPTION_CANDIDATES)
    if caption_column and caption is None:
        raise PartError(f"{path}: no caption column {caption_column!r}; "
                        f"columns are: {', '.join(names)}")
    if key_columns is None:
        found = (_pick(names, None, (candidate,)) for candidate in KEY_CANDIDATES)
        keys = tuple(dict.fromkeys(k for k in found if k and k not in (url, caption)))
    else:
        keys = tuple(key_columns)
    extra = tuple(n for n in names if n not in (url, caption)
                  and (keep is None or n in keep or n in required or n in keys))
    return Columns(url=url, caption=caption, extra=extra, keys=keys)


def fingerprint(path: Path) -> str:
    """What identifies a part's content (formats.PartFile.fingerprint): a regenerated file
    with other rows gets another fingerprint, while a copy (or a touch) keeps it."""
    return open_part_file(path).fingerprint()


def count_rows(path: Path) -> int:
    """Rows in a part: a parquet file's footer, any other file read through."""
    return open_part_file(path).count_rows()


def rows_if_readable(part: Part) -> int:
    """count_rows for progress and ETAs: 0 for a broken part, whose own run names the file."""
    try:
        return count_rows(part.path)
    except PartError:
        return 0


def _reject_reasons(urls: pa.Array) -> pa.Array:
    """Why each URL cannot be fetched, null where it can; vectorised because parts are huge."""
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
    # A URL is valid exactly when no reason applies (case_when gives null then).
    return reason


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
    reason = _reject_reasons(url)
    arrays = [row, url, caption] + [batch.column(c) for c in columns.extra] + [reason]
    names = ["row", "url", "caption"] + [extra_name(c) for c in columns.extra] + [REJECT]
    table = pa.Table.from_arrays(arrays, names=names)
    keys = json.dumps([extra_name(c) for c in columns.keys]).encode()
    return Shard(index=index, first_row=first_row, rows=n,
                 table=table.replace_schema_metadata({KEY_COLUMNS_META: keys}))


def iter_shards(path: Path, shard_size: int, url_column: str | None = None,
                caption_column: str | None = None, required: tuple[str, ...] = (),
                keep: list[str] | None = None,
                key_columns: list[str] | None = None) -> Iterator[Shard]:
    """Cut a part into shards of exactly `shard_size` rows (the last one may be shorter).

    Shard boundaries depend only on the file and the shard size, so re-reading a part yields
    the same shard ids: that is what makes re-enqueuing a part idempotent.
    """
    source = open_part_file(path)
    schema = source.schema()
    columns = resolve_columns(path, schema, url_column, caption_column, required, keep,
                              key_columns)
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    index = 0
    first = 0
    # Only the columns that travel are read: a dropped column costs no I/O and no memory.
    wanted = [c for c in schema.names
              if c in (columns.url, columns.caption) or c in columns.extra]
    try:
        for batch in source.batches(wanted, shard_size):
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
        elif not index:
            raise PartError(f"{path}: empty part (0 rows)")
    except READ_ERRORS as error:
        raise PartError(f"{path}: cannot read rows after row {first} ({error})") from error


