"""Shard outputs: webdataset tars, file folders, per-shard parquet and stats, atomic publishing."""

import hashlib
import io
import json
import tarfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from laion_dagster.core.shards import files, records
from laion_dagster.core.shards.files import ShardWriter, shard_complete
from laion_dagster.core.shards.records import SampleRecord, sample_key

HOSTILE_URL = "http://x.test/../../etc/passwd?a=/b"
PREFIX = "laion2B-en_00042"  # parts.sample_prefix("laion2B-en/00042")


def key(row, prefix=PREFIX):
    return sample_key(prefix, row)


def success(row, image, url=None, caption=None, extra=None, prefix=PREFIX):
    """A SampleRecord as the worker makes it for a fetched, identified image."""
    with Image.open(io.BytesIO(image.body)) as opened:
        fmt, (width, height) = opened.format, opened.size
    ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
    return SampleRecord(row=row, key=key(row, prefix), url=url or f"http://img-a.test{image.path}",
                        caption=caption if caption is not None else f"caption of row {row}",
                        width=width, height=height,
                        sha256=hashlib.sha256(image.body).hexdigest(), bytes=len(image.body),
                        format=ext, extra=extra or {})


def failure(row, error_class, http_status=None, extra=None):
    return SampleRecord(row=row, key=key(row), url=f"http://img-a.test/status/{row}.jpg",
                        caption=f"c{row}",
                        status="failed", error_class=error_class,
                        error_message=f"{error_class} for row {row}", http_status=http_status,
                        extra=extra or {})


def extras_for(rows):
    """Extra input columns, one value per record, in record order, with LAION's types."""
    return pa.table({
        "SAMPLE_ID": pa.array([7_000_000 + r for r in rows], pa.int64()),
        "WIDTH": pa.array([100 + r for r in rows], pa.int32()),
        "similarity": pa.array([0.25 + r / 100 for r in rows], pa.float64()),
        "LANGUAGE": pa.array(["de" if r % 2 else "ja" for r in rows], pa.string()),
    })


def build_shard(part_dir, images, output_format, shard=3):
    """Write shard `shard` with three successes (rows 0, 2, 5) and three failures; return
    (records, bodies by row, stats)."""
    rows = [0, 1, 2, 3, 4, 5]
    extra = extras_for(rows)
    extra_rows = extra.to_pylist()
    picked = {0: images[0], 2: images[1], 5: images[2]}
    writer = ShardWriter(part_dir, shard, output_format)
    samples = []
    for i, row in enumerate(rows):
        if row in picked:
            url = HOSTILE_URL if row == 2 else None
            record = success(row, picked[row], url=url, extra=extra_rows[i])
            writer.add(record, picked[row].body)
        elif row == 1:
            record = failure(row, "http_4xx", 404, extra_rows[i])
        elif row == 3:
            record = failure(row, "dns", None, extra_rows[i])
        else:
            record = failure(row, "decode_error", None, extra_rows[i])
        samples.append(record)
    stats = writer.close(samples, extra)
    return samples, {row: image.body for row, image in picked.items()}, stats


def every_path(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


# ---------------------------------------------------------------- webdataset

def test_webdataset_shard_holds_one_sample_per_success(tmp_path, images):
    """`00003.tar` has `<key>.<ext>`, `.txt`, `.json` per success, grouped by key, bytes intact."""
    part_dir = tmp_path / "store" / "laion2B-en" / "part-00000"

    records, bodies, _ = build_shard(part_dir, images, "webdataset")

    assert sorted(p.name for p in part_dir.iterdir()) == [
        "00003.parquet", "00003.tar", "00003_stats.json"]
    with tarfile.open(part_dir / "00003.tar") as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        contents = {m.name: tar.extractfile(m).read() for m in members}
    by_row = {r.row: r for r in records}
    expected = []
    for row in (0, 2, 5):
        name = key(row)
        expected += [f"{name}.{by_row[row].format}", f"{name}.txt", f"{name}.json"]
    assert names == expected  # successes only, each sample's files next to each other
    for row, body in bodies.items():
        name = key(row)
        assert contents[f"{name}.{by_row[row].format}"] == body
        assert contents[f"{name}.txt"].decode() == by_row[row].caption
    assert all(m.isfile() for m in members)


def test_webdataset_json_sidecar_has_the_sample_metadata(tmp_path, images):
    """Each `.json` carries url, caption, size, sha256 and the part's extra columns."""
    part_dir = tmp_path / "p"

    records, bodies, _ = build_shard(part_dir, images, "webdataset")

    with tarfile.open(part_dir / "00003.tar") as tar:
        meta = json.loads(tar.extractfile(f"{key(5)}.json").read())
    record = next(r for r in records if r.row == 5)
    assert meta["key"] == "laion2B-en_00042_0000000005" and meta["row"] == 5
    assert meta["url"] == record.url and meta["caption"] == record.caption
    assert meta["status"] == "success"
    assert (meta["width"], meta["height"]) == (record.width, record.height)
    with Image.open(io.BytesIO(bodies[5])) as opened:
        assert (meta["width"], meta["height"]) == opened.size
    assert meta["sha256"] == hashlib.sha256(bodies[5]).hexdigest()
    assert meta["bytes"] == len(bodies[5])
    assert meta["SAMPLE_ID"] == 7_000_005
    assert meta["WIDTH"] == 105
    assert meta["similarity"] == pytest.approx(0.30)
    assert meta["LANGUAGE"] == "de"


def test_keys_come_from_the_row_never_from_a_hostile_url(tmp_path, images):
    """A URL with `../` and slashes cannot steer where files go: names are the row key only."""
    store = tmp_path / "store"

    records, _, _ = build_shard(store / "subset" / "tar-part", images, "webdataset")
    build_shard(store / "subset" / "files-part", images, "files")

    assert key(2) == "laion2B-en_00042_0000000002"
    assert key(12_345_678_901) == "laion2B-en_00042_12345678901"
    members = [f"{key(r.row)}.{x}" for r in records if r.status == "success"
               for x in (r.format, "txt", "json")]
    shard_files = ["00003.parquet", "00003_stats.json"]
    assert every_path(tmp_path) == sorted([
        "store", "store/subset", "store/subset/tar-part", "store/subset/files-part",
        *(f"store/subset/tar-part/{n}" for n in ["00003.tar", *shard_files]),
        *(f"store/subset/files-part/{n}" for n in ["00003", *shard_files]),
        *(f"store/subset/files-part/00003/{n}" for n in members),
    ])
    with tarfile.open(store / "subset" / "tar-part" / "00003.tar") as tar:
        assert sorted(tar.getnames()) == sorted(members)
    assert not (tmp_path / "etc").exists()


# ---------------------------------------------------------------- files

def test_files_format_writes_a_folder_with_the_same_members(tmp_path, images):
    """The `files` format puts the same `<key>.<ext>/.txt/.json` files in `00003/`."""
    tar_dir, files_dir = tmp_path / "tar", tmp_path / "files"
    build_shard(tar_dir, images, "webdataset")

    records, bodies, _ = build_shard(files_dir, images, "files")

    assert sorted(p.name for p in files_dir.iterdir()) == [
        "00003", "00003.parquet", "00003_stats.json"]
    folder = files_dir / "00003"
    assert folder.is_dir()
    with tarfile.open(tar_dir / "00003.tar") as tar:
        in_tar = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    in_folder = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert set(in_folder) == set(in_tar)
    for name, data in in_folder.items():
        if name.endswith(".json"):
            assert json.loads(data) == json.loads(in_tar[name])
        else:
            assert data == in_tar[name]
    by_row = {r.row: r for r in records}
    for row, body in bodies.items():
        assert (folder / f"{key(row)}.{by_row[row].format}").read_bytes() == body


# ---------------------------------------------------------------- parquet

def test_shard_parquet_has_every_row_with_outcome_and_extra_columns(tmp_path, images):
    """One parquet row per input row, failures included, with their class, message and status."""
    part_dir = tmp_path / "p"

    records, _, _ = build_shard(part_dir, images, "webdataset")

    table = pq.read_table(part_dir / "00003.parquet")
    assert table.num_rows == len(records) == 6
    rows = table.to_pylist()
    assert [r["row"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert [r["key"] for r in rows] == [key(i) for i in range(6)]
    assert [r["status"] for r in rows] == ["success", "failed", "success", "failed", "failed",
                                           "success"]
    assert [r["error_class"] for r in rows] == [None, "http_4xx", None, "dns", "decode_error",
                                                None]
    assert [r["http_status"] for r in rows] == [None, 404, None, None, None, None]
    assert rows[1]["error_message"] == "http_4xx for row 1"
    assert rows[2]["url"] == HOSTILE_URL
    by_row = {r.row: r for r in records}
    for row in (0, 2, 5):
        assert rows[row]["width"] == by_row[row].width
        assert rows[row]["sha256"] == by_row[row].sha256
        assert rows[row]["format"] == by_row[row].format
    schema = table.schema
    assert schema.field("SAMPLE_ID").type == pa.int64()
    assert schema.field("WIDTH").type == pa.int32()
    assert schema.field("similarity").type == pa.float64()
    assert schema.field("LANGUAGE").type == pa.string()
    assert schema.field("http_status").type == pa.int32()
    assert table.column("SAMPLE_ID").to_pylist() == [7_000_000 + i for i in range(6)]
    assert table.column("LANGUAGE").to_pylist() == ["ja", "de", "ja", "de", "ja", "de"]


def test_error_table_lists_only_failures():
    """The error file has the failed rows with their class and status, none of the successes."""
    samples = [failure(1, "http_4xx", 403), failure(4, "timeout"),
               SampleRecord(row=2, key=key(2), url="http://a.test/ok.jpg", caption="ok")]

    table = records.error_table(samples)

    assert table.column("row").to_pylist() == [1, 4]
    assert table.column("error_class").to_pylist() == ["http_4xx", "timeout"]
    assert table.column("http_status").to_pylist() == [403, None]


# ---------------------------------------------------------------- stats

def test_stats_use_img2dataset_names_and_meanings(tmp_path, images):
    """count/successes/failed_to_download/failed_to_resize/duration/times/status_dict, as
    img2dataset writes them; not_image and decode_error count as failed_to_resize."""
    before = time.time()
    writer = ShardWriter(tmp_path, 0, "webdataset")
    records = [success(0, images[0]), success(1, images[1]), failure(2, "http_4xx", 404),
               failure(3, "http_4xx", 403), failure(4, "dns"), failure(5, "timeout"),
               failure(6, "not_image"), failure(7, "decode_error"), failure(8, "decode_error")]
    for record in records[:2]:
        writer.add(record, images[record.row].body)
    time.sleep(0.05)

    returned = writer.close(records, None)
    after = time.time()

    stats = json.loads((tmp_path / "00000_stats.json").read_text())
    assert stats == returned
    assert stats["count"] == 9
    assert stats["successes"] == 2
    assert stats["failed_to_download"] == 4
    assert stats["failed_to_resize"] == 3
    assert stats["count"] == (stats["successes"] + stats["failed_to_download"]
                              + stats["failed_to_resize"])
    assert stats["status_dict"] == {"success": 2, "http_4xx": 2, "dns": 1, "timeout": 1,
                                    "not_image": 1, "decode_error": 2}
    assert before <= stats["start_time"] <= stats["end_time"] <= after
    assert stats["duration"] == pytest.approx(stats["end_time"] - stats["start_time"], abs=0.01)
    assert stats["duration"] >= 0.04


# ---------------------------------------------------------------- atomicity

def test_nothing_final_exists_before_close(tmp_path, images):
    """While a shard is being written only `.tmp-` names exist, and it is not complete."""
    for output_format in ("webdataset", "files"):
        part_dir = tmp_path / output_format
        writer = ShardWriter(part_dir, 3, output_format)
        record = success(0, images[0])
        writer.add(record, images[0].body)

        names = [p.name for p in part_dir.iterdir()]
        assert names and all(".tmp-" in n for n in names), names
        assert not shard_complete(part_dir, 3)

        writer.close([record], None)
        assert shard_complete(part_dir, 3)
        assert not any(".tmp-" in p for p in every_path(part_dir))


def test_abort_leaves_nothing_behind(tmp_path, images):
    """abort() removes every temporary file and publishes nothing."""
    for output_format in ("webdataset", "files"):
        part_dir = tmp_path / output_format
        writer = ShardWriter(part_dir, 3, output_format)
        writer.add(success(0, images[0]), images[0].body)
        writer.add(success(1, images[1]), images[1].body)

        writer.abort()

        assert list(part_dir.iterdir()) == []
        assert not shard_complete(part_dir, 3)


def test_abort_keeps_a_previously_completed_shard(tmp_path, images):
    """Aborting a rewrite leaves the earlier complete shard untouched."""
    build_shard(tmp_path, images, "webdataset")
    before = {p: (tmp_path / p).read_bytes() for p in every_path(tmp_path)}

    writer = ShardWriter(tmp_path, 3, "webdataset")
    writer.add(success(9, images[9]), images[9].body)
    writer.abort()

    assert {p: (tmp_path / p).read_bytes() for p in every_path(tmp_path)} == before


def test_failure_during_close_leaves_the_shard_incomplete(tmp_path, images, monkeypatch):
    """If writing the parquet fails (disk full), no stats file appears and abort cleans up."""
    writer = ShardWriter(tmp_path, 3, "webdataset")
    record = success(0, images[0])
    writer.add(record, images[0].body)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.pq, "write_table", disk_full)
    with pytest.raises(OSError):
        writer.close([record], None)
    monkeypatch.undo()

    assert not shard_complete(tmp_path, 3)
    assert not (tmp_path / "00003.tar").exists()
    writer.abort()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("output_format", ["webdataset", "files"])
def test_rewriting_a_shard_replaces_it_whole(tmp_path, images, output_format):
    """A second writer for the same shard (after a reclaim) replaces data, parquet and stats;
    nothing of the first remains and no `.old-`/`.tmp-` leftovers stay."""
    first = ShardWriter(tmp_path, 3, output_format)
    first_records = [success(r, images[r]) for r in (0, 1, 2)]
    for record in first_records:
        first.add(record, images[record.row].body)
    first.close(first_records, None)
    assert shard_complete(tmp_path, 3)

    second = ShardWriter(tmp_path, 3, output_format)
    second_records = [success(7, images[7]), failure(8, "dns")]
    second.add(second_records[0], images[7].body)
    second.close(second_records, None)

    seven = key(7)
    expected_members = sorted([f"{seven}.{second_records[0].format}", f"{seven}.json",
                               f"{seven}.txt"])
    if output_format == "webdataset":
        with tarfile.open(tmp_path / "00003.tar") as tar:
            assert sorted(tar.getnames()) == expected_members
            image_name = f"{seven}.{second_records[0].format}"
            assert tar.extractfile(image_name).read() == images[7].body
        data_name = "00003.tar"
    else:
        assert sorted(p.name for p in (tmp_path / "00003").iterdir()) == expected_members
        data_name = "00003"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [data_name, "00003.parquet", "00003_stats.json"])
    assert not any(".old-" in p or ".tmp-" in p for p in every_path(tmp_path))
    assert pq.read_table(tmp_path / "00003.parquet").column("row").to_pylist() == [7, 8]
    assert json.loads((tmp_path / "00003_stats.json").read_text())["count"] == 2


def test_shard_complete_only_after_close(tmp_path, images):
    """shard_complete() is false for a new, an open and an aborted shard; true once closed."""
    assert not shard_complete(tmp_path, 0)
    writer = ShardWriter(tmp_path, 0, "webdataset")
    assert not shard_complete(tmp_path, 0)
    writer.close([failure(0, "dns")], None)
    assert shard_complete(tmp_path, 0)
    assert not shard_complete(tmp_path, 1)


# ---------------------------------------------------------------- keys across parts

def test_keys_are_unique_across_parts_and_sorted_within_a_shard(tmp_path, images):
    """Shards of two parts (numbered from row 0 each) combine into one webdataset without a
    repeated key, and each tar lists its samples in input order."""
    from laion_dagster.core.input import parts

    names = []
    for partition in ("laion2B-en/00000", "laion2B-multi/00000"):
        prefix = parts.sample_prefix(partition)
        writer = ShardWriter(tmp_path / partition, 0, "webdataset")
        records = [success(r, images[r], prefix=prefix) for r in (0, 1, 2, 10)]
        for record in records:
            writer.add(record, images[record.row].body)
        writer.close(records, None)
        with tarfile.open(tmp_path / partition / "00000.tar") as tar:
            keys = [m.name.split(".", 1)[0] for m in tar.getmembers()]
        assert keys == sorted(keys)  # input order within the shard
        names += keys[::3]
    assert len(names) == len(set(names)) == 8


# ---------------------------------------------------------------- only what we made

def test_cleanup_removes_only_the_names_a_writer_makes(tmp_path, images):
    """Stale temporaries of a killed writer go; a user's files beside them, even with
    similar names, stay."""
    part_dir = tmp_path / "p"
    part_dir.mkdir()
    ours = ["00003.tar.tmp-123-deadbeef", "00003.parquet.tmp-9-0123abcd",
            "00003_stats.json.tmp-9-0123abcd", "00003.old-cafebabe"]
    theirs = ["00003.tar.tmp-mine", "00003.notes.txt", "notes.txt", "00003.tar.tmp-1-XYZ12345",
              "000031.tar.tmp-1-deadbeef", "00003.backup"]
    for name in ours + theirs:
        (part_dir / name).write_text("x")
    (part_dir / "00003.tmp-5-aaaabbbb").mkdir()  # a files-format temporary folder
    (part_dir / "00003.tmp-5-aaaabbbb" / f"{key(1)}.jpg").write_bytes(b"x")

    files.clear_stale_temporaries(part_dir, 3)

    assert sorted(p.name for p in part_dir.iterdir()) == sorted(theirs)


def test_a_shard_folder_that_is_not_ours_is_never_replaced(tmp_path, images):
    """output_format=files: a `00003/` folder holding anything but sample files refuses the
    shard instead of being swapped out and deleted."""
    folder = tmp_path / "00003"
    folder.mkdir()
    (folder / "my notes.txt").write_text("mine")
    writer = ShardWriter(tmp_path, 3, "files")
    record = success(0, images[0])
    writer.add(record, images[0].body)

    with pytest.raises(files.ForeignFiles, match="did not write"):
        writer.close([record], None)
    writer.abort()

    assert (folder / "my notes.txt").read_text() == "mine"
    assert not shard_complete(tmp_path, 3)


def test_a_format_change_removes_only_the_old_copy_the_stats_vouch_for(tmp_path, images):
    """Starting a part over in another format removes the shard's old tar, which its stats
    say we wrote; a tar nobody's stats mention (a user's) stays."""
    build_shard(tmp_path / "ours", images, "webdataset")
    build_shard(tmp_path / "ours", images, "files")
    assert not (tmp_path / "ours" / "00003.tar").exists()
    assert (tmp_path / "ours" / "00003").is_dir()

    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "00003.tar").write_bytes(b"a user's archive")
    build_shard(tmp_path / "theirs", images, "files")
    assert (tmp_path / "theirs" / "00003.tar").read_bytes() == b"a user's archive"
