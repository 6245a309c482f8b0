"""The watch_downloads sensor on a real Dagster instance, a real Redis and a real worker pool
downloading from a deliberately slow loopback server: what the UI is told while a part
downloads, and that a Redis outage costs a skip reason, not a traceback."""

import time

import pytest
from dagster import (
    AssetKey,
    AssetRecordsFilter,
    SensorResult,
    build_sensor_context,
    instance_for_test,
    materialize,
)

from laion_dagster.core.control.progress import Watch
from laion_dagster.defs.assets import enqueued_part, part_images
from laion_dagster.defs.partitions import PARTS
from laion_dagster.defs.resources import LaionResource
from laion_dagster.defs.sensors import watch_downloads
from laion_dagster.demo.dataset import write_dataset
from laion_dagster.demo.server import ImageServer
from tests.conftest import TEST_HOSTS
from tests.outputs import all_done, wait_until
from tests.pool import start_worker, stop_worker


@pytest.fixture
def slow_server(images):
    """Every image after 0.2 s: two fetches at a time take a 120-row part ~10 s."""
    with ImageServer({image.path: image for image in images}, delay=0.2) as server:
        yield server


def tick(instance, laion, cursor=None) -> SensorResult:
    """One tick, and what the daemon does with it: the events go into the instance."""
    context = build_sensor_context(instance=instance, cursor=cursor,
                                   resources={"laion": laion})
    result = watch_downloads(context)
    for event in result.asset_events:
        instance.report_runless_asset_event(event)
    return result


def observations(instance, key: str, partition: str | None = None) -> list[dict]:
    records = instance.fetch_observations(
        AssetRecordsFilter(asset_key=AssetKey(key),
                           asset_partitions=[partition] if partition else None), limit=100)
    return [{k: v.value for k, v in r.asset_observation.metadata.items()}
            for r in reversed(records.records)]


def test_a_downloading_part_its_hosts_and_the_queue_are_reported(settings, slow_server,
                                                                 images, queue):
    dataset = write_dataset(settings.parts_root, [slow_server.url(h) for h in TEST_HOSTS],
                            subsets=("laion2B-en",), parts_per_subset=2, rows_per_part=120,
                            images=images, seed=3)
    keys = sorted(f"laion2B-en/{p.name[5:10]}" for p in dataset.parts)
    slow = settings.with_overrides(processes=1, concurrency=2, shard_size=20)
    laion = LaionResource(data_dir=str(slow.data_dir), parquet_dir=str(slow.parts_root),
                          store_dir=str(slow.store_root), redis_url=slow.redis_url,
                          prefix=slow.prefix, shard_size=slow.shard_size, processes=1)
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(PARTS, keys)
        key = keys[0]
        assert materialize([enqueued_part], partition_key=key, instance=instance,
                           resources={"laion": laion}).success
        worker = start_worker(slow)
        try:
            first = wait_until(lambda: _moved(instance, laion, key, None), 60,
                               what="a first report of the part with rows done")
            cursor = first.cursor
            # Reported again once it moved: its counts grow; the other part, not enqueued, is
            # not reported (the queue's table lists it).
            later = wait_until(lambda: _moved(instance, laion, key, cursor), 60,
                               what="a second report with more rows done")
            wait_until(lambda: all_done(queue, [key]), 120, what="the part downloaded")
        finally:
            stop_worker(worker)
        seen = [o for o in observations(instance, "enqueued_part", key) if o["ok"] + o["failed"]]
        assert len(seen) >= 2
        assert seen[-1]["rows_done"] > seen[0]["rows_done"] > 0
        assert seen[0]["state"] == "downloading" and seen[0]["rows"] == 120
        assert seen[0]["images_per_second"] > 0 and seen[0]["eta_s"] > 0
        assert observations(instance, "enqueued_part", keys[1]) == []
        assert later.skip_reason.skip_message.startswith("reported 1 parts")

        hosts = observations(instance, "worker_hosts")[-1]
        assert hosts["hosts"] == 1 and hosts["processes"] == 1
        [row] = hosts["table"].records
        assert row.data["state"] == "running" and row.data["disk_free_gb"] > 0
        assert row.data["last_heartbeat"].endswith("UTC")
        queue_seen = observations(instance, "queue")
        assert queue_seen[0]["queue_threshold"] == slow.queue_threshold
        assert queue_seen[0]["parts_downloading"] == 1 and queue_seen[0]["parts_queued"] == 1
        assert [r.data["state"] for r in queue_seen[0]["parts"].records] == [
            "queued", "downloading"]

        # Finalized: its last report carries its final figures, under the same keys as
        # part_images' materialization.
        assert materialize([part_images], partition_key=key, instance=instance,
                           resources={"laion": laion}).success
        tick(instance, laion, later.cursor)
        final = observations(instance, "enqueued_part", key)[-1]
        assert final["state"] == "final" and final["rows_done"] == 120 and final["eta_s"] == 0
        [record] = instance.fetch_materializations(AssetRecordsFilter(
            asset_key=part_images.key, asset_partitions=[key]), limit=1).records
        assert set(final) <= set(record.asset_materialization.metadata)


def _moved(instance, laion, key, cursor) -> SensorResult | None:
    """A tick whose report of `key` has more rows done than the cursor says, some of them
    fetched (not only those without a URL, done at once), else None."""
    before = Watch.from_json(cursor).parts.get(key, [0])[0]
    result = tick(instance, laion, cursor)
    reported = [{k: v.value for k, v in e.metadata.items()} for e in result.asset_events
                if e.partition == key]
    if reported and reported[0]["rows_done"] > before and \
            reported[0]["ok"] + reported[0]["failed"] > 0:
        return result
    return None


def test_redis_down_is_a_skip_reason_not_a_traceback(settings):
    """Nothing answers at the Redis URL: the tick says so in its skip reason, within seconds,
    and reports nothing (the other sensors are not held up: they run in threads of their
    own, dagster.yaml)."""
    down = LaionResource(redis_url="redis://:pw@127.0.0.1:9/0", prefix=settings.prefix,
                         data_dir=str(settings.data_dir))
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(PARTS, ["laion2B-en/00000"])
        started = time.monotonic()
        result = tick(instance, down)
        assert time.monotonic() - started < 10
        assert result.asset_events == []
        assert result.skip_reason.skip_message.startswith(
            "Redis unavailable: cannot reach Redis at redis://***@127.0.0.1:9/0")
        assert all(observations(instance, key) == [] for key in ("queue", "worker_hosts"))
        assert observations(instance, "enqueued_part", "laion2B-en/00000") == []
