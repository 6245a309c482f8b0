"""What users load: our shards through the webdataset library and pyarrow, as img2dataset's."""

import json

import pytest
import webdataset as wds

from laion_dagster.demo.dataset import served_path
from tests.outputs import shard_rows
from tests.pool import download


@pytest.fixture
def downloaded(settings, dataset):
    return download(settings).part_dir


def test_webdataset_loads_every_successful_sample(downloaded, dataset):
    table = shard_rows(downloaded)
    successes = {r["key"]: r for r in table.to_pylist() if r["status"] == "success"}
    urls = [str(p) for p in sorted(downloaded.glob("*.tar"))]
    seen = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        seen[sample["__key__"]] = sample
    assert set(seen) == set(successes)
    for key, sample in seen.items():
        record = successes[key]
        image = sample[record["format"]]
        assert image == dataset.images[served_path(record["url"])].body
        assert sample["txt"].decode() == (record["caption"] or "")
        meta = json.loads(sample["json"])
        assert meta["url"] == record["url"] and meta["sha256"] == record["sha256"]
        assert meta["width"] == record["width"] and "SAMPLE_ID" in meta


def test_webdataset_decodes_images_and_stats_match(downloaded):
    decoded = wds.WebDataset([str(p) for p in sorted(downloaded.glob("*.tar"))],
                             shardshuffle=False, empty_check=False).decode("pil")
    sizes = [s[k].size for s in decoded for k in ("jpg", "png", "webp") if k in s]
    assert sizes and all(w > 0 and h > 0 for w, h in sizes)
    stats = [json.loads(p.read_text()) for p in sorted(downloaded.glob("*_stats.json"))]
    assert sum(s["successes"] for s in stats) == len(sizes)
    for s in stats:
        assert s["count"] == s["successes"] + s["failed_to_download"] + s["failed_to_resize"]
        assert sum(s["status_dict"].values()) == s["count"]


def test_parquet_output_holds_every_image_in_its_row(settings, dataset):
    """output_format=parquet: one file per shard, the image bytes in an `image` column (null
    for failures), read back with pyarrow alone; no tar, no spool left behind."""
    as_parquet = settings.with_overrides(output_format="parquet")
    done = download(as_parquet)
    state = done.queue.part(done.part.key)
    part_dir = done.part_dir
    assert not list(part_dir.glob("*.tar")) and not list(part_dir.glob("*.arrow*"))
    import pyarrow.parquet as pq

    files = sorted(part_dir.glob("[0-9]*.parquet"))
    assert all(pq.ParquetFile(f).metadata.row_group(0).num_rows <= 256 for f in files)
    table = shard_rows(part_dir)
    assert table.column_names[-1] == "image"
    ok = 0
    for record in table.to_pylist():
        if record["status"] == "success":
            ok += 1
            assert record["image"] == dataset.images[served_path(record["url"])].body
            assert len(record["image"]) == record["bytes"]
        else:
            assert record["image"] is None
    assert ok == state.ok


def test_the_readmes_loading_snippet_works_as_written(settings, dataset):
    """The README's Python block, run on a real download with only the store path changed."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    after = readme.split("Loading them", 1)[1]
    code = re.search(r"```python\n(.*?)```", after, re.S).group(1)
    done = download(settings)
    code = code.replace("/data/laion/images", str(settings.store_root))
    code = code.replace("laion2B-en/part-00000-", f"{done.part.subset}/{done.part.stem[:11]}")
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    successes = done.queue.part(done.part.key).ok
    assert namespace["rows"].num_rows == successes
    assert namespace["image"].size[0] > 0 and isinstance(namespace["caption"], str)
    assert namespace["meta"]["url"].startswith("http")
