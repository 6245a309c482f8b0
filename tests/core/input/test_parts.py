"""Parquet parts: finding them, reading LAION's column variants, and cutting them into shards."""

import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laion_dagster.core.input import parts
from laion_dagster.core.input.parts import PartError
from laion_dagster.core.queue.protocol import decode_table, encode_table
from laion_dagster.core.shards import records

SPARK_NAME = "part-00007-0c3b9a4e-5f2d-4c1e-9d7a-3b2f1e0a9c8d-c000.snappy.parquet"


def write(path, columns, row_group_size=None, schema=None):
    """Write `columns` (a dict or a table) as a real parquet file and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = columns if isinstance(columns, pa.Table) else pa.table(columns, schema=schema)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def laion_rows(n, start=0):
    """Columns shaped like the original release (upper-case names, int32 sizes)."""
    return {
        "SAMPLE_ID": pa.array(range(1_000_000 + start, 1_000_000 + start + n), pa.int64()),
        "URL": [f"https://cdn{i % 7}.example.com/p/{i:06d}.jpg?w=640" for i in range(start,
                                                                                     start + n)],
        "TEXT": [f"caption {i} vintage red dress" for i in range(start, start + n)],
        "WIDTH": pa.array([100 + i % 900 for i in range(start, start + n)], pa.int32()),
        "HEIGHT": pa.array([80 + i % 700 for i in range(start, start + n)], pa.int32()),
    }


def all_shards(path, shard_size, **kwargs):
    return list(parts.iter_shards(path, shard_size, **kwargs))


# ---------------------------------------------------------------- discovery

def test_discover_names_parts_by_subset_and_number(tmp_path):
    """Parts under <subset>/ get short keys that stay readable where the UI cuts long ones:
    `<subset>/<number>` for Spark's part-<number>-<uuid>-c000 names, `<subset>/<stem>` else."""
    write(tmp_path / "laion2B-en" / SPARK_NAME, laion_rows(3))
    write(tmp_path / "laion2B-en" / "part-00008-x-c000.zstd.parquet", laion_rows(3))
    write(tmp_path / "laion2B-multi" / "plain.parquet", laion_rows(3))

    found = parts.discover(tmp_path)

    assert [p.key for p in found] == ["laion2B-en/00007", "laion2B-en/00008",
                                      "laion2B-multi/plain"]
    assert found[0].path == tmp_path / "laion2B-en" / SPARK_NAME
    assert found[0].subset == "laion2B-en" and found[0].stem == SPARK_NAME[:-15]
    assert found[0].relative_dir.as_posix() == "laion2B-en/00007"
    assert found[2].relative_dir.as_posix() == "laion2B-multi/plain"


def test_files_that_cannot_be_parts_are_reported_not_dropped(tmp_path):
    """Two files that would share a key (the same part number from two releases), or a name
    our keys cannot hold, are skipped with a sentence saying why; the others are parts."""
    write(tmp_path / "laion2B-en" / "part-00001-aaaa-c000.snappy.parquet", laion_rows(3))
    write(tmp_path / "laion2B-en" / "part-00001-bbbb-c000.snappy.parquet", laion_rows(3))
    write(tmp_path / "laion2B-en" / "part-00002-aaaa-c000.snappy.parquet", laion_rows(3))
    write(tmp_path / "laion 2B" / "part-00003-aaaa-c000.snappy.parquet", laion_rows(3))
    # "a.b/c" and "a-b/c" are two parts, but their sample keys would collide.
    write(tmp_path / "a.b" / "c.parquet", laion_rows(3))
    write(tmp_path / "a-b" / "c.parquet", laion_rows(3))

    found = parts.survey(tmp_path)

    assert [p.key for p in found.parts] == ["laion2B-en/00002"]
    text = "\n".join(found.problems)
    assert "part-00001-aaaa-c000.snappy.parquet" in text and "part-00001-bbbb" in text
    assert "share the part key laion2B-en/00001" in text
    assert "laion 2B" in text and "letters, digits" in text
    assert "a.b/c.parquet" in text and "share sample keys" in text


def test_sample_key_prefixes_are_unique_short_and_webdataset_safe():
    assert parts.sample_prefix("laion2B-en/00042") == "laion2B-en_00042"
    assert parts.sample_prefix("cc3m.v2/train.0") == "cc3m-v2_train-0"  # a dot ends a key
    long = parts.sample_prefix("subset/" + "x" * 200)
    assert len(long) <= 80 and long != parts.sample_prefix("subset/" + "x" * 199 + "y")
    with pytest.raises(PartError, match="not a part key"):
        parts.relative_dir("laion2B-en__part-00000-old-style")
    with pytest.raises(PartError, match="not a part key"):
        parts.relative_dir("../../etc/passwd")


def test_fingerprint_follows_the_content_not_the_file_times(tmp_path):
    """A copy or a touch keeps a part's fingerprint; a file regenerated with other rows does
    not: it is what tells a run that its queue state was made from another file."""
    import os
    import shutil

    path = write(tmp_path / "s" / "p.parquet", laion_rows(50))
    before = parts.fingerprint(path)
    copy = tmp_path / "copy.parquet"
    shutil.copy(path, copy)
    os.utime(path, (1, 1))
    assert parts.fingerprint(copy) == before == parts.fingerprint(path)
    write(path, laion_rows(50, start=7))
    assert parts.fingerprint(path) != before
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(PartError, match="not a readable parquet file"):
        parts.fingerprint(tmp_path / "junk.parquet")


def test_discover_ignores_spark_side_files_hidden_files_and_top_level_files(tmp_path):
    """_SUCCESS, .crc, hidden files and `_temporary` folders are skipped without a word; a
    loose file beside subset folders is skipped with one."""
    subset = tmp_path / "laion2B-en"
    write(subset / SPARK_NAME, laion_rows(3))
    (subset / "_SUCCESS").write_bytes(b"")
    (subset / "._SUCCESS.crc").write_bytes(b"crc")
    (subset / f".{SPARK_NAME}.crc").write_bytes(b"crc\x00\x01")
    write(subset / ".hidden.parquet", laion_rows(3))
    write(subset / "_started.parquet", laion_rows(3))
    write(subset / "_temporary" / "0" / "part-00009.parquet", laion_rows(3))
    write(tmp_path / "_temporary" / "part-00010.parquet", laion_rows(3))
    write(tmp_path / ".cache" / "part-00011.parquet", laion_rows(3))
    write(tmp_path / "loose.parquet", laion_rows(3))

    found = parts.survey(tmp_path)

    assert [(p.subset, p.path.name) for p in found.parts] == [("laion2B-en", SPARK_NAME)]
    assert found.problems == [f"{tmp_path / 'loose.parquet'}: skipped; a file beside subset "
                              "folders (move it into one)"]


def test_discover_of_a_missing_folder_finds_nothing(tmp_path):
    """A parquet folder that does not exist yet is an empty set of parts, not a crash."""
    assert parts.discover(tmp_path / "nope") == []


def test_find_by_key_and_missing_part_names_the_folder(tmp_path):
    """find() returns the part for a key; an unknown key is a PartError naming where it looked."""
    write(tmp_path / "laion2B-en" / SPARK_NAME, laion_rows(3))

    assert parts.find(tmp_path, "laion2B-en/00007").path == tmp_path / "laion2B-en" / SPARK_NAME
    with pytest.raises(PartError) as error:
        parts.find(tmp_path, "laion2B-en/00099")
    assert str(error.value) == (f"part 'laion2B-en/00099' not found at {tmp_path}; it has 1: "
                                "laion2B-en/00007")


# ---------------------------------------------------------------- columns

@pytest.mark.parametrize("url_name, caption_name, kwargs", [
    ("URL", "TEXT", {}),  # the original release
    ("url", "caption", {}),  # OpenDataLab style
    ("Url", "Text", {}),  # case-insensitive
    ("image_link", "alt_text", {"url_column": "image_link", "caption_column": "alt_text"}),
    ("Image_Link", "ALT_TEXT", {"url_column": "image_link", "caption_column": "alt_text"}),
])
def test_url_and_caption_columns_are_found(tmp_path, url_name, caption_name, kwargs):
    """URL and caption come from whichever naming the part uses, matched case-insensitively."""
    urls = ["http://a.test/1.jpg", "https://b.test/2.png"]
    path = write(tmp_path / "s" / "p.parquet",
                 {url_name: urls, caption_name: ["one", "two"], "hash": [11, 12]})

    [shard] = all_shards(path, 10, **kwargs)

    assert shard.valid.column("url").to_pylist() == urls
    assert shard.valid.column("caption").to_pylist() == ["one", "two"]
    assert shard.valid.column("hash").to_pylist() == [11, 12]
    # The source columns become our url/caption; they are not repeated as extra columns.
    assert shard.valid.column_names == ["row", "url", "caption", "hash"]


def test_missing_url_column_names_the_file_and_lists_the_columns(tmp_path):
    """Without a URL column the error says which file and which columns it has."""
    path = write(tmp_path / "s" / "p.parquet", {"link": ["http://a.test/x.jpg"], "TEXT": ["t"]})

    with pytest.raises(PartError) as error:
        all_shards(path, 10)

    message = str(error.value)
    assert str(path) in message
    assert "link" in message and "TEXT" in message


def test_configured_url_column_missing_is_an_error(tmp_path):
    """A configured URL column that is not there is not silently replaced by `URL`."""
    path = write(tmp_path / "s" / "p.parquet", {"URL": ["http://a.test/x.jpg"], "TEXT": ["t"]})

    with pytest.raises(PartError, match="image_link"):
        all_shards(path, 10, url_column="image_link")


def test_url_column_of_the_wrong_type_names_the_type(tmp_path):
    """A URL column holding numbers is refused with its type in the message."""
    path = write(tmp_path / "s" / "p.parquet", {"URL": pa.array([1, 2], pa.int64()),
                                                "TEXT": ["a", "b"]})

    with pytest.raises(PartError) as error:
        all_shards(path, 10)

    assert "int64" in str(error.value)
    assert str(path) in str(error.value)


def test_configured_caption_column_missing_is_an_error(tmp_path):
    """Asking for a caption column the part does not have fails instead of yielding no captions."""
    path = write(tmp_path / "s" / "p.parquet", {"URL": ["http://a.test/x.jpg"], "TEXT": ["t"]})

    with pytest.raises(PartError) as error:
        all_shards(path, 10, caption_column="alt_text")

    assert "alt_text" in str(error.value) and "TEXT" in str(error.value)


def test_part_without_any_caption_column_still_works(tmp_path):
    """A URL-only part is fine; its captions are null."""
    path = write(tmp_path / "s" / "p.parquet",
                 {"url": ["http://a.test/1.jpg", "http://a.test/2.jpg"], "hash": [1, 2]})

    [shard] = all_shards(path, 10)

    assert shard.valid.column("caption").to_pylist() == [None, None]
    assert shard.valid.column("hash").to_pylist() == [1, 2]


# ---------------------------------------------------------------- shards

def test_shards_have_exact_sizes_whatever_the_row_groups(tmp_path):
    """53 rows in row groups of 7, shards of 10: 10,10,10,10,10,3, every row exactly once."""
    path = write(tmp_path / "s" / "p.parquet", laion_rows(53), row_group_size=7)
    assert pq.ParquetFile(path).metadata.num_row_groups == 8

    shards = all_shards(path, 10)

    assert [s.index for s in shards] == [0, 1, 2, 3, 4, 5]
    assert [s.rows for s in shards] == [10, 10, 10, 10, 10, 3]
    assert [s.first_row for s in shards] == [0, 10, 20, 30, 40, 50]
    rows = [r for s in shards for r in s.valid.column("row").to_pylist()]
    assert rows == list(range(53))
    for s in shards:
        assert s.valid.column("row").to_pylist() == list(range(s.first_row, s.first_row + s.rows))
    expected = laion_rows(53)
    assert [u for s in shards for u in s.valid.column("url").to_pylist()] == expected["URL"]
    assert [c for s in shards for c in s.valid.column("caption").to_pylist()] == expected["TEXT"]
    assert (pa.concat_tables(s.valid for s in shards).column("SAMPLE_ID").to_pylist()
            == expected["SAMPLE_ID"].to_pylist())


def test_shards_are_deterministic_and_independent_of_row_groups(tmp_path):
    """Reading a part twice, or the same rows with other row groups, gives identical shards."""
    small_groups = write(tmp_path / "s" / "a.parquet", laion_rows(95), row_group_size=7)
    one_group = write(tmp_path / "s" / "b.parquet", laion_rows(95))

    first = all_shards(small_groups, 20)
    second = all_shards(small_groups, 20)
    other = all_shards(one_group, 20)

    assert len(first) == 5
    for a, b, c in zip(first, second, other, strict=True):
        assert (a.index, a.first_row, a.rows) == (b.index, b.first_row, b.rows)
        assert (a.index, a.first_row, a.rows) == (c.index, c.first_row, c.rows)
        assert a.valid.equals(b.valid) and a.valid.equals(c.valid)
        assert a.table.equals(b.table) and a.table.equals(c.table)


def test_shard_size_larger_than_the_part_gives_one_shard(tmp_path):
    """A part smaller than one shard is a single shard with all its rows."""
    path = write(tmp_path / "s" / "p.parquet", laion_rows(4), row_group_size=3)

    [shard] = all_shards(path, 1000)

    assert (shard.index, shard.first_row, shard.rows) == (0, 0, 4)


def test_extra_columns_travel_with_the_row_with_their_types(tmp_path):
    """Unknown columns keep their values and types; names clashing with ours get `input_`."""
    n = 12
    columns = {
        "SAMPLE_ID": pa.array(range(500, 500 + n), pa.int64()),
        "URL": [f"http://a.test/{i}.jpg" for i in range(n)],
        "TEXT": [f"t{i}" for i in range(n)],
        "WIDTH": pa.array(range(10, 10 + n), pa.int32()),
        "HEIGHT": pa.array([float(i) + 0.5 for i in range(n)], pa.float64()),
        "LANGUAGE": ["de", "fr", "ja", ""] * 3,
        "key": [f"k{i}" for i in range(n)],
        "status": ["x"] * n,
        "punsafe": pa.array([0.25] * n, pa.float32()),
    }
    path = write(tmp_path / "s" / "p.parquet", columns, row_group_size=5)

    shards = all_shards(path, 5)
    table = pa.concat_tables(s.valid for s in shards)

    schema = table.schema
    assert schema.field("SAMPLE_ID").type == pa.int64()
    assert schema.field("WIDTH").type == pa.int32()
    assert schema.field("HEIGHT").type == pa.float64()
    assert schema.field("punsafe").type == pa.float32()
    assert schema.field("LANGUAGE").type == pa.string()
    assert "key" not in table.column_names and "status" not in table.column_names
    assert table.column("input_key").to_pylist() == columns["key"]
    assert table.column("input_status").to_pylist() == columns["status"]
    # Values stay on their own row across shard boundaries.
    for record in table.to_pylist():
        i = record["row"]
        assert record["SAMPLE_ID"] == 500 + i
        assert record["WIDTH"] == 10 + i
        assert record["HEIGHT"] == i + 0.5
        assert record["LANGUAGE"] == columns["LANGUAGE"][i]
        assert record["url"] == f"http://a.test/{i}.jpg"


def test_float_sizes_variant_is_kept_as_float(tmp_path):
    """Derived sets store WIDTH/HEIGHT as float64; they are carried as they are."""
    path = write(tmp_path / "s" / "p.parquet", {
        "URL": ["http://a.test/1.jpg"], "TEXT": ["x"],
        "WIDTH": pa.array([640.0], pa.float64()), "HEIGHT": pa.array([480.0], pa.float64()),
    })

    [shard] = all_shards(path, 10)

    assert shard.valid.schema.field("WIDTH").type == pa.float64()
    assert shard.valid.column("WIDTH").to_pylist() == [640.0]


# ---------------------------------------------------------------- invalid URLs

def test_invalid_urls_are_kept_aside_with_a_reason(tmp_path):
    """Rows without a usable http(s) URL are not queued but listed with class and reason."""
    long_url = "http://a.test/" + "x" * (5000 - len("http://a.test/"))
    urls = [
        "http://a.test/ok.jpg",  # 0
        None,  # 1
        "",  # 2
        "ftp://files.invalid/a.jpg",  # 3
        "data:image/gif;base64,R0lGODlhAQABAAAAACw=",  # 4
        long_url,  # 5
        "https://例え.テスト/写真/猫.jpg",  # 6
        "https://a.test/caf%C3%A9%20au%20lait.jpg?q=%E6%9D%B1%E4%BA%AC",  # 7
        "HTTPS://A.TEST/UPPER.JPG",  # 8
    ]
    path = write(tmp_path / "s" / "p.parquet",
                 {"URL": urls, "TEXT": [f"c{i}" for i in range(len(urls))]}, row_group_size=4)

    shards = all_shards(path, 4)
    valid = pa.concat_tables(s.valid for s in shards)
    invalid = pa.concat_tables(s.rejected for s in shards)

    assert valid.column("row").to_pylist() == [0, 6, 7, 8]
    assert valid.column("url").to_pylist() == [urls[0], urls[6], urls[7], urls[8]]
    assert invalid.column("row").to_pylist() == [1, 2, 3, 4, 5]
    assert invalid.column("url").to_pylist() == urls[1:6]
    assert invalid.column("caption").to_pylist() == ["c1", "c2", "c3", "c4", "c5"]
    reasons = invalid.column(records.REJECT).to_pylist()
    assert all(isinstance(r, str) and r for r in reasons)
    assert "missing" in reasons[0]
    assert "http" in reasons[2] and "http" in reasons[3]
    assert "longer" in reasons[4]
    for s in shards:
        # Every row of the shard travels, the rejected ones with their reason.
        assert s.table.num_rows == s.rows == s.valid.num_rows + s.invalid_rows
        assert s.table.column("row").to_pylist() == list(range(s.first_row,
                                                               s.first_row + s.rows))


def test_all_invalid_shard_has_no_valid_rows(tmp_path):
    """A shard where nothing is fetchable still counts its rows (all invalid)."""
    path = write(tmp_path / "s" / "p.parquet", {"URL": pa.array([None, None, ""], pa.string())})

    [shard] = all_shards(path, 10)

    assert shard.rows == 3 and shard.valid.num_rows == 0 and shard.invalid_rows == 3


# ---------------------------------------------------------------- broken parts

def test_empty_part_is_an_error(tmp_path):
    """A part with no rows is refused with a message saying it is empty."""
    path = write(tmp_path / "s" / "p.parquet",
                 pa.table({"URL": pa.array([], pa.string()), "TEXT": pa.array([], pa.string())}))

    with pytest.raises(PartError, match="empty") as error:
        all_shards(path, 10)
    assert str(path) in str(error.value)


def test_non_parquet_file_is_a_part_error_naming_the_file(tmp_path):
    """Random bytes named .parquet give a PartError with the file name, for reading and counting."""
    path = tmp_path / "s" / "p.parquet"
    path.parent.mkdir()
    path.write_bytes(random.Random(5).randbytes(4096))

    with pytest.raises(PartError) as error:
        all_shards(path, 10)
    assert str(path) in str(error.value)
    with pytest.raises(PartError, match="p.parquet"):
        parts.count_rows(path)


def test_truncated_part_is_a_part_error(tmp_path):
    """A parquet file cut in half (an interrupted copy) is a PartError, not a pyarrow traceback."""
    path = write(tmp_path / "s" / "p.parquet", laion_rows(500), row_group_size=100)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(PartError) as error:
        all_shards(path, 50)
    assert str(path) in str(error.value)


def test_corrupt_data_pages_are_a_part_error(tmp_path):
    """Garbage inside the data (footer intact) surfaces as a PartError naming the file."""
    rnd = random.Random(9)
    n = 2000
    path = write(tmp_path / "s" / "p.parquet",
                 {"URL": [f"http://a.test/{rnd.randbytes(8).hex()}.jpg" for _ in range(n)],
                  "TEXT": [f"c{i}" for i in range(n)]}, row_group_size=500)
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 4, len(data) // 2):
        data[i] = (data[i] * 7 + 13) % 256
    path.write_bytes(bytes(data))

    with pytest.raises(PartError) as error:
        all_shards(path, 100)
    assert str(path) in str(error.value)


def test_missing_file_is_a_part_error(tmp_path):
    """A part that vanished between discovery and reading is a PartError."""
    with pytest.raises(PartError, match="not found"):
        all_shards(tmp_path / "s" / "gone.parquet", 10)


def test_count_rows_reads_the_footer(tmp_path):
    """count_rows gives the number of rows of a part."""
    path = write(tmp_path / "s" / "p.parquet", laion_rows(37), row_group_size=10)
    assert parts.count_rows(path) == 37


# ---------------------------------------------------------------- memory

def test_reading_a_part_uses_bounded_memory(tmp_path):
    """Iterating a 300,000-row part costs far less than the part in memory, and does not grow
    with the part: a part three times larger peaks at about the same allocation."""
    rnd = random.Random(0)
    n = 300_000
    tokens = [rnd.randbytes(16).hex() for _ in range(n)]
    table = pa.table({
        "URL": [f"https://cdn{i % 97}.example.com/images/{tokens[i]}/photo-{i}.jpg"
                for i in range(n)],
        "TEXT": [f"Caption {tokens[i][:12]} vintage red dress summer beach {i}" for i in range(n)],
        "SAMPLE_ID": pa.array(range(n), pa.int64()),
    })
    in_memory = table.nbytes
    big = write(tmp_path / "s" / "big.parquet", table, row_group_size=50_000)
    small = write(tmp_path / "s" / "small.parquet", table.slice(0, n // 3), row_group_size=50_000)
    del table, tokens

    def peak_while_reading(path):
        base = pa.total_allocated_bytes()
        peak = 0
        rows = 0
        for shard in parts.iter_shards(path, 1_000):
            peak = max(peak, pa.total_allocated_bytes() - base)
            rows += shard.rows
        return peak, rows

    small_peak, small_rows = peak_while_reading(small)
    big_peak, big_rows = peak_while_reading(big)

    assert (small_rows, big_rows) == (n // 3, n)
    assert big_peak < in_memory / 4, (big_peak, in_memory)
    assert big_peak < 1.5 * small_peak, (big_peak, small_peak)


# ---------------------------------------------------------------- encoding

def test_encode_decode_round_trip(tmp_path):
    """A shard's table survives the trip through Redis bytes exactly, types and nulls included."""
    columns = laion_rows(30)
    columns["TEXT"] = [None, "", "東京 café 😍"] * 10
    columns["LANGUAGE"] = ["de", None, "ja"] * 10
    path = write(tmp_path / "s" / "p.parquet", columns, row_group_size=7)

    for shard in all_shards(path, 12):
        for table in (shard.table, shard.valid, shard.rejected):
            data = encode_table(table)
            assert isinstance(data, bytes)
            decoded = decode_table(data)
            assert decoded.equals(table)
            assert decoded.schema == table.schema


def test_encode_decode_of_an_empty_table():
    """A shard with no valid rows encodes and decodes to an empty table of the same schema."""
    table = pa.table({"row": pa.array([], pa.int64()), "url": pa.array([], pa.string())})
    assert decode_table(encode_table(table)).equals(table)


def test_save_additional_columns_chooses_what_travels(tmp_path):
    """Like img2dataset's save_additional_columns: only the named input columns travel with
    each row (plus a column a setting needs, such as the hash to verify)."""
    path = write(tmp_path / "s" / "p.parquet", laion_rows(30))
    kept = list(parts.iter_shards(path, 10, keep=["WIDTH"], required=("HEIGHT",)))
    # SAMPLE_ID identifies a row: it travels whatever `keep` says (the error file needs it).
    assert kept[0].valid.column_names == ["row", "url", "caption", "SAMPLE_ID", "WIDTH",
                                          "HEIGHT"]
    assert records.key_columns_of(kept[0].table) == ["SAMPLE_ID"]
    everything = list(parts.iter_shards(path, 10))
    assert {"SAMPLE_ID", "WIDTH", "HEIGHT"} <= set(everything[0].valid.column_names)
    none = list(parts.iter_shards(path, 10, keep=[], key_columns=[]))
    assert none[0].valid.column_names == ["row", "url", "caption"]
    assert records.key_columns_of(none[0].table) == []
    with pytest.raises(parts.PartError, match="no column 'md5'"):
        list(parts.iter_shards(path, 10, keep=["md5"]))
    with pytest.raises(parts.PartError, match="no column 'uid'"):
        list(parts.iter_shards(path, 10, key_columns=["uid"]))
