"""Retrying only the failed rows of a part, from the CLI and from Dagster; nothing counted twice."""

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster import instance_for_test, materialize

from laion_dagster.core.control.accounting import finalize_part
from laion_dagster.core.control.enqueue import enqueue_part
from laion_dagster.core.control.retry import RetryRefused, retry_failed
from laion_dagster.core.input import parts
from laion_dagster.core.queue.connection import connect
from laion_dagster.core.queue.protocol import Queue
from laion_dagster.defs.assets import enqueued_part
from laion_dagster.defs.partitions import PARTS
from laion_dagster.defs.resources import LaionResource
from laion_dagster.demo.server import ImageServer
from tests.conftest import worker_env
from tests.outputs import all_done, tar_members, wait_until
from tests.pool import start_worker, stop_worker


@pytest.fixture
def own_server(images):
    """A server of this test's own: it gains images half way through."""
    with ImageServer({image.path: image for image in images[:20]}) as server:
        yield server


def download(queue, settings, key):
    worker = start_worker(settings)
    try:
        wait_until(lambda: all_done(queue, [key]), 60, what="the part")
    finally:
        stop_worker(worker)
    return finalize_part(queue, key, settings)


def test_retry_replaces_old_failures_with_new_outcomes(settings, own_server, images):
    base = own_server.url("img-a.test")
    late = images[20:30]  # not on the server yet: 404 at first
    urls = ([base + i.path for i in images[:20]] + [base + i.path for i in late]
            + [f"{base}/status/503/{n}.jpg" for n in range(5)] + [None, "ftp://x.test/a.jpg"])
    folder = settings.parts_root / "laion2B-en"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"URL": urls, "TEXT": [f"c{n}" for n in range(len(urls))],
                             "SAMPLE_ID": list(range(len(urls)))}),
                   folder / "part-00000-r-c000.snappy.parquet")
    part = parts.discover(settings.parts_root)[0]
    client = connect(settings)
    queue = Queue(client, settings.prefix)
    enqueue_part(queue, part, settings)
    with pytest.raises(RetryRefused, match="still downloading"):
        retry_failed(queue, part, settings, ("http_4xx",))

    first = download(queue, settings, part.key)
    assert (first.ok, first.failed, first.invalid) == (20, 15, 2)
    assert first.classes == {"http_4xx": 10, "http_5xx": 5, "invalid_url": 2}

    own_server.images.update({i.path: i for i in late})  # the 404s come back to life
    env = worker_env(settings)
    result = subprocess.run([sys.executable, "-m", "laion_dagster.cli", "errors", "retry",
                             part.key, "--classes", "http_4xx"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "retry round 1: 10 rows (http_4xx 10) queued again in 1 shards" in result.stdout
    # Nobody downloads them yet: the command says how to.
    assert "No worker is running to download them. Run\n  laion-dagster run " in result.stdout
    state = queue.part(part.key)
    assert not state.done and state.finalized_at is None and state.failed == 5

    second = download(queue, settings, part.key)
    assert (second.ok, second.failed, second.invalid, second.rows) == (30, 5, 2, 37)
    assert second.classes == {"http_5xx": 5, "invalid_url": 2}
    errors = pq.read_table(second.error_file)
    assert sorted(errors.column("error_class").to_pylist()) == ["http_5xx"] * 5 + [
        "invalid_url"] * 2
    # The new outcomes are merged into the part's shard: every row is in exactly one shard
    # parquet, with its latest outcome, and the tar has the new images beside the old ones.
    part_dir = settings.store_root / part.relative_dir
    shard = pq.read_table(part_dir / "00000.parquet")
    assert sorted(p.name for p in part_dir.iterdir()) == ["00000.parquet", "00000.tar",
                                                          "00000_stats.json"]
    assert shard.column("row").to_pylist() == list(range(len(urls)))
    assert shard.column("SAMPLE_ID").to_pylist() == list(range(len(urls)))
    records = shard.to_pylist()
    members = tar_members(part_dir)
    assert len(members) == 3 * 30
    for record in records[:30]:
        assert record["status"] == "success", record
        image = (images[:20] + late)[record["row"]]
        assert members[f"{record['key']}.{record['format']}"] == image.body
    assert [r["error_class"] for r in records[30:]] == ["http_5xx"] * 5 + ["invalid_url"] * 2
    stats = json.loads((part_dir / "00000_stats.json").read_text())
    assert (stats["count"], stats["successes"]) == (37, 30)

    # Rows that fail again stay failed once, not twice; from Dagster this time.
    resource = LaionResource(data_dir=str(settings.data_dir),
                             parquet_dir=str(settings.parts_root),
                             store_dir=str(settings.store_root), redis_url=settings.redis_url,
                             prefix=settings.prefix, shard_size=settings.shard_size)
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(PARTS, [part.key])
        run = materialize([enqueued_part], partition_key=part.key, instance=instance,
                          resources={"laion": resource},
                          run_config={"ops": {"enqueued_part": {"config": {
                              "retry_classes": ["http_5xx"]}}}})
        assert run.success
        meta = run.asset_materializations_for_node("enqueued_part")[0].metadata
        assert meta["retried_rows"].value == 5 and meta["retry_round"].value == 2
    third = download(queue, settings, part.key)
    assert (third.ok, third.failed, third.invalid) == (30, 5, 2)
    assert third.classes == {"http_5xx": 5, "invalid_url": 2}
    # Two downloads of the row, each a try and its later try (retry_rounds), each asking
    # 1 + retries times.
    assert own_server.requests["/status/503/0.jpg"] == \
        2 * (1 + settings.retry_rounds) * (1 + settings.retries)
    client.close()
