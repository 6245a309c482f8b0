"""Every input layout and format a user brings: a file, a flat folder, subset folders; parquet,
csv, tsv, txt, json and jsonl, gzip-compressed or not, read in bounded batches."""

from __future__ import annotations

import csv
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laion_dagster.core.input import formats, parts
from laion_dagster.core.input.formats import PartError
from tests.conftest import shell_env

ROWS = [{"url": f"https://img.test/{i}.jpg", "caption": f"a photo, \"number\" {i}\twith tab"
         if i % 7 == 0 else f"caption {i}", "SAMPLE_ID": 1000 + i} for i in range(45)]
ROWS[3]["url"] = ""  # a row without a usable URL travels too (invalid_url)


def write(path: Path, kind: str, rows: list[dict] = ROWS) -> Path:
    """`rows` as a `kind` file (with .gz: compressed), the way other tools write them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    compressed = path.name.endswith(".gz")
    opener = gzip.open if compressed else open
    if kind == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif kind in ("csv", "tsv"):
        with opener(path, "wt", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]),
                                    delimiter="\t" if kind == "tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    elif kind == "txt":
        with opener(path, "wt") as handle:
            handle.write("".join(f"{r['url']}\n" for r in rows if r["url"]) + "\n")
    elif kind == "json":
        with opener(path, "wt") as handle:
            json.dump(rows, handle, indent=1)
    elif kind == "jsonl":
        with opener(path, "wt") as handle:
            handle.write("".join(json.dumps(r) + "\n" for r in rows))
    return path


def shard_rows(path: Path, **columns) -> list[dict]:
    shards = list(parts.iter_shards(path, 10, **columns))
    return [row for shard in shards for row in shard.table.to_pylist()]


@pytest.mark.parametrize("name,kind", [
    ("train.parquet", "parquet"), ("train.csv", "csv"), ("train.csv.gz", "csv"),
    ("train.tsv", "tsv"), ("train.tsv.gz", "tsv"), ("train.json", "json"),
    ("train.json.gz", "json"), ("train.jsonl", "jsonl"), ("train.jsonl.gz", "jsonl")])
def test_every_format_gives_the_same_rows(tmp_path, name, kind):
    """The same rows written as each format reach the shards alike: URL, caption (quotes and
    tabs in it), the extra column, and the row without a URL, in order; the key, the count
    and the fingerprint work without a parquet footer."""
    path = write(tmp_path / "cc" / name, kind)
    rows = shard_rows(path)
    assert [r["url"] for r in rows] == [r["url"] for r in ROWS]
    assert [r["caption"] for r in rows] == [r["caption"] for r in ROWS]
    assert [str(r["SAMPLE_ID"]) for r in rows] == [str(r["SAMPLE_ID"]) for r in ROWS]
    assert [r["reject"] is not None for r in rows] == [i == 3 for i in range(len(ROWS))]
    assert parts.count_rows(path) == len(ROWS)
    [part] = parts.discover(path)
    assert part.key == "cc/train"
    before = parts.fingerprint(path)
    path.touch()
    assert parts.fingerprint(path) == before


@pytest.mark.parametrize("name", ["urls.txt", "urls.txt.gz"])
def test_a_txt_file_is_one_url_per_line(tmp_path, name):
    path = write(tmp_path / "list" / name, "txt")
    rows = shard_rows(path)
    assert [r["url"] for r in rows] == [r["url"] for r in ROWS if r["url"]]
    assert all(r["caption"] is None for r in rows)
    assert parts.count_rows(path) == len(ROWS) - 1  # the blank lines are no rows


def test_a_tsv_without_a_header_is_read_as_rows(tmp_path):
    """CC3M's TSV is caption<TAB>url lines with no header: the cell holding a URL names the
    url column, the other the caption."""
    path = tmp_path / "cc3m" / "Train_GCC-training.tsv"
    path.parent.mkdir()
    path.write_text("a dog on a beach\thttps://img.test/1.jpg\n"
                    "the sky\thttps://img.test/2.jpg\n")
    rows = shard_rows(path)
    assert [(r["url"], r["caption"]) for r in rows] == [
        ("https://img.test/1.jpg", "a dog on a beach"), ("https://img.test/2.jpg", "the sky")]


def test_a_byte_order_mark_and_bad_utf8_cost_nothing(tmp_path):
    """Excel writes a byte-order mark before the header; scraped captions hold invalid UTF-8.
    The first column keeps its name, the bad bytes become U+FFFD, no row is lost."""
    path = tmp_path / "x" / "excel.csv"
    path.parent.mkdir()
    path.write_bytes(b"\xef\xbb\xbfurl,caption\r\nhttps://img.test/1.jpg,caf\xe9\r\n"
                     b"https://img.test/2.jpg,ok\r\n")
    rows = shard_rows(path)
    assert [(r["url"], r["caption"]) for r in rows] == [
        ("https://img.test/1.jpg", "caf\ufffd"), ("https://img.test/2.jpg", "ok")]
    lines = tmp_path / "x" / "urls.jsonl"
    lines.write_bytes(b'\xef\xbb\xbf{"url": "https://img.test/1.jpg"}\n')
    assert [r["url"] for r in shard_rows(lines)] == ["https://img.test/1.jpg"]


def test_the_column_flags_work_for_every_format(tmp_path):
    """url_column / caption_column name other columns in csv and jsonl as in parquet; a
    missing one names the columns there are."""
    rows = [{"link": f"https://img.test/{i}.jpg", "alt": f"alt {i}", "other": i}
            for i in range(5)]
    for name, kind in (("a.csv", "csv"), ("b.jsonl", "jsonl"), ("c.parquet", "parquet")):
        path = write(tmp_path / "x" / name, kind, rows)
        got = shard_rows(path, url_column="link", caption_column="alt")
        assert [(r["url"], r["caption"]) for r in got] == [(r["link"], r["alt"]) for r in rows]
        with pytest.raises(PartError, match="no URL column .* columns are: link, alt, other; "
                                             "name it with the setting url_column"):
            shard_rows(path)


def test_text_is_read_in_bounded_batches(tmp_path, monkeypatch):
    """A text part is never read whole: each reader yields batches of at most BATCH_ROWS
    rows (csv: of CSV_BLOCK bytes)."""
    monkeypatch.setattr(formats, "BATCH_ROWS", 100)
    monkeypatch.setattr(formats, "JSON_SCHEMA_ROWS", 100)  # (its first batch's size)
    monkeypatch.setattr(formats, "CSV_BLOCK", 4096)
    many = [{"url": f"https://img.test/{i}.jpg", "caption": f"c{i}"} for i in range(1_000)]
    for name, kind in (("a.txt", "txt"), ("b.jsonl", "jsonl"), ("c.json", "json"),
                       ("d.csv.gz", "csv")):
        source = formats.open_part_file(write(tmp_path / "x" / name, kind, many))
        sizes = [b.num_rows for b in source.batches(source.schema().names, 10_000)]
        assert sum(sizes) == 1_000 and len(sizes) >= 5 and max(sizes) <= 1_000 // 2, (name,
                                                                                      sizes)


def test_a_broken_file_is_a_clear_error_naming_it(tmp_path):
    bad_gz = tmp_path / "x" / "a.csv.gz"
    bad_gz.parent.mkdir()
    bad_gz.write_bytes(b"not gzip at all")
    with pytest.raises(PartError, match=r"a\.csv\.gz: not a readable csv file"):
        shard_rows(bad_gz)
    bad_json = tmp_path / "x" / "b.json"
    bad_json.write_text('[{"url": "https://img.test/1.jpg"}, {"url": ')
    with pytest.raises(PartError, match=r"b\.json: not a readable json file"):
        shard_rows(bad_json)
    ragged = tmp_path / "x" / "c.tsv"
    ragged.write_text("url\tcaption\nhttps://img.test/1.jpg\ta\tb\n")
    with pytest.raises(PartError, match=r"c\.tsv"):
        shard_rows(ragged)


# ---------------------------------------------------------------- layouts

def test_the_three_layouts(tmp_path):
    """A file is one part; a flat folder's files are its parts, its name the subset; a folder
    of subset folders as the LAION releases come."""
    flat = tmp_path / "cc12m"
    write(flat / "part-0.parquet", "parquet")
    write(flat / "part-1.tsv", "tsv")
    nested = tmp_path / "laion"
    write(nested / "laion2B-en" / "part-00000-u-c000.snappy.parquet", "parquet")
    write(nested / "laion2B-multi" / "part-00000-u-c000.snappy.parquet", "parquet")
    assert [p.key for p in parts.discover(flat / "part-1.tsv")] == ["cc12m/part-1"]
    assert [p.key for p in parts.discover(flat)] == ["cc12m/part-0", "cc12m/part-1"]
    assert [p.key for p in parts.discover(nested)] == ["laion2B-en/00000", "laion2B-multi/00000"]


def test_files_that_are_not_parts_are_named_with_why(tmp_path):
    """A csv beside parquet parts is a part now; a file we cannot read, two files with one
    key, and a folder too deep are each named with the reason."""
    folder = tmp_path / "mixed"
    write(folder / "a.parquet", "parquet")
    write(folder / "b.csv", "csv")
    write(folder / "b.jsonl", "jsonl")
    (folder / "README.md").write_text("# my data\n")
    (folder / "deep" / "deeper").mkdir(parents=True)
    found = parts.survey(folder)
    assert [p.path.name for p in found.parts] == ["a.parquet"]
    problems = "\n".join(found.problems)
    assert f"{folder / 'README.md'}: skipped; not a format we read (accepted: parquet, csv, " \
           "tsv, txt, json, jsonl" in problems
    assert "b.csv, " in problems and "b.jsonl: skipped; these files would share the part key " \
           "mixed/b" in problems
    assert f"{folder / 'deep' / 'deeper'}: not read" in problems


@pytest.mark.parametrize("layout", ["missing", "empty", "readme"])
def test_run_with_nothing_to_read_says_what_it_found_and_what_it_takes(tmp_path, layout):
    target = tmp_path / "in"
    if layout != "missing":
        target.mkdir()
    if layout == "readme":
        (target / "README.md").write_text("hi")
    result = subprocess.run([sys.executable, "-m", "laion_dagster.cli", "run", "--parquet-dir",
                             str(target), "--store-dir", str(tmp_path / "store")],
                            env=shell_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    message = result.stderr.strip()
    assert message.count("\n") == 0 and message.startswith(f"laion-dagster: no parts at {target}: ")
    found = {"missing": "it does not exist", "empty": "it is an empty folder",
             "readme": "it holds 1 files and 0 folders, none of them a part (e.g. "}[layout]
    assert found in message
    assert "Accepted: a file (one part); a folder of files (its name is the subset); or a " \
           "folder of subset folders" in message and "--parquet-dir" in message
