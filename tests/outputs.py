"""Reading what the workers wrote, the way a user's loader would, to check it against the input."""

import io
import json
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from laion_dagster.core.input import parts
from laion_dagster.core.queue.protocol import Queue
from laion_dagster.core.shards.files import leftovers
from laion_dagster.demo.dataset import DemoDataset, served_path


def shard_rows(part_dir: Path) -> pa.Table:
    """Every shard parquet of a part, concatenated."""
    tables = [pq.read_table(p) for p in sorted(part_dir.glob("[0-9]*.parquet"))]
    return pa.concat_tables(tables, promote_options="default")


def tar_members(part_dir: Path) -> dict[str, bytes]:
    members: dict[str, bytes] = {}
    for path in sorted(part_dir.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                assert member.name not in members, f"{member.name} twice"
                members[member.name] = tar.extractfile(member).read()
    return members


def wait_until(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def all_done(queue: Queue, keys: list[str]) -> bool:
    states = queue.parts_states(keys)
    return all(s.done for s in states.values())


def check_part(settings, part: parts.Part, dataset: DemoDataset) -> pa.Table:
    """Every input row (rejected ones included) is in the shard parquet exactly once, with the
    expected outcome, and every successful image on disk is byte for byte what the server
    served."""
    part_dir = settings.store_root / part.relative_dir
    rows = shard_rows(part_dir)
    input_rows = pq.read_metadata(part.path).num_rows
    got = rows.column("row").to_pylist()
    assert len(got) == len(set(got)), "a row appears twice in the shard parquet"
    assert set(got) == set(range(input_rows))
    members = tar_members(part_dir)
    by_path = dataset.images
    for record in rows.to_pylist():
        expected = dataset.expected_by_row[(part.path.name, record["row"])]
        actual = "success" if record["status"] == "success" else record["error_class"]
        assert actual == expected, (record["url"], actual, expected)
        if actual == "success":
            key = record["key"]
            body = members[f"{key}.{record['format']}"]
            assert body == by_path[served_path(record["url"])].body
            assert members[f"{key}.txt"].decode() == (record["caption"] or "")
            assert json.loads(members[f"{key}.json"])["url"] == record["url"]
        else:
            assert not any(name.startswith(record["key"] + ".") for name in members)
    assert not leftovers(settings.store_root)
    return rows


def image_in(member: bytes) -> bool:
    from PIL import Image

    with Image.open(io.BytesIO(member)) as image:
        return image.size[0] > 0
