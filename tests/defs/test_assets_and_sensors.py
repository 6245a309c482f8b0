"""The Dagster layer on a real test instance: definitions, assets, sensors, the worker job."""

import os
import re
import signal
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster import (
    DagsterEventType,
    Definitions,
    RunRequest,
    SensorResult,
    SkipReason,
    build_sensor_context,
    instance_for_test,
    materialize,
)

from laion_dagster.core.control.policy import ENQUEUES_AT_ONCE
from laion_dagster.core.input import parts
from laion_dagster.core.outcomes import ERROR_CLASSES
from laion_dagster.definitions import defs
from laion_dagster.defs.assets import enqueued_part, part_images
from laion_dagster.defs.partitions import PARTS
from laion_dagster.defs.resources import LaionResource
from laion_dagster.defs.sensors import (
    discover_parts,
    finalize_parts,
    launch_or_hold,
    watch_downloads,
)
from laion_dagster.instance import failure_message
from tests.outputs import all_done, wait_until
from tests.pool import start_worker, stop_worker


@pytest.fixture
def instance():
    with instance_for_test() as inst:
        yield inst


@pytest.fixture
def laion(settings):
    return LaionResource(data_dir=str(settings.data_dir), parquet_dir=str(settings.parts_root),
                         store_dir=str(settings.store_root), redis_url=settings.redis_url,
                         prefix=settings.prefix, shard_size=settings.shard_size)


def metadata_of(instance, run_id, asset="enqueued_part"):
    records = instance.get_records_for_run(
        run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION).records
    for record in records:
        materialization = record.event_log_entry.dagster_event.event_specific_data.materialization
        if materialization.asset_key.path[-1] == asset:
            return {k: v.value for k, v in materialization.metadata.items()}
    raise AssertionError(f"no materialization of {asset}")


def add_parts(instance, settings) -> list[str]:
    keys = [p.key for p in parts.discover(settings.parts_root)]
    instance.add_dynamic_partitions(PARTS, keys)
    return keys


def test_definitions_load_and_sensors_are_on_by_default():
    Definitions.validate_loadable(defs)
    for sensor in (discover_parts, launch_or_hold, finalize_parts, watch_downloads):
        assert sensor.default_status.value == "RUNNING"
    # What the launch sensor decides by is upstream of what it launches, in the lineage.
    assert {d.asset_key.path[0] for d in enqueued_part.specs_by_key[enqueued_part.key].deps} == {
        "queue", "worker_hosts"}
    assert {j.name for j in defs.jobs} >= {"enqueue_job", "finalize_job", "local_workers"}


def test_materializing_a_partition_enqueues_it(instance, laion, settings, dataset, queue):
    keys = add_parts(instance, settings)
    result = materialize([enqueued_part], partition_key=keys[0], instance=instance,
                         resources={"laion": laion})
    assert result.success
    meta = metadata_of(instance, result.run_id)
    expected_invalid = sum(1 for (name, _), cls in dataset.expected_by_row.items()
                           if name == dataset.parts[0].name and cls == "invalid_url")
    assert meta["rows"] == 120 and meta["invalid_rows"] == expected_invalid
    assert meta["shards"] == 3 and meta["rows_per_second"] > 0
    state = queue.part(keys[0])
    assert state.enqueued and state.rows == 120
    assert queue.queued_rows() == 120 - expected_invalid


def test_a_bad_part_fails_its_own_run_with_a_clear_message(instance, laion, settings, dataset):
    bad = settings.parts_root / "broken" / "part-00000-x-c000.snappy.parquet"
    bad.parent.mkdir(parents=True)
    pq.write_table(pa.table({"link": ["http://a.test/1.jpg"], "TEXT": ["x"]}), bad)
    keys = add_parts(instance, settings)
    failed = materialize([enqueued_part], partition_key="broken/00000",
                         instance=instance, resources={"laion": laion}, raise_on_error=False)
    assert not failed.success
    message = failure_message(instance, failed.run_id)
    assert str(bad) in message and "no URL column" in message and "link" in message
    good = materialize([enqueued_part], partition_key=keys[-1], instance=instance,
                       resources={"laion": laion})
    assert good.success


def test_a_signal_during_an_in_process_run_is_left_to_the_command(instance, settings, dataset,
                                                                   queue, monkeypatch):
    """`run` enqueues small parts and finalizes parts as Dagster runs in its own process. A
    Ctrl-C or `kill` during one must reach `run`'s own handler, which stops everything in
    order, and not fail that run: Dagster turned it into a failed run, `run` reported the part
    FAILED with a stack trace and exited 1."""
    from laion_dagster import run as run_command
    from laion_dagster.defs import assets

    for name, value in settings.to_env().items():  # the job's resource reads the environment
        monkeypatch.setenv(name, value)
    keys = add_parts(instance, settings)
    original = assets.enqueue_part

    def interrupted_enqueue(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C mid-run
        time.sleep(0.2)  # (the handler runs in the main thread meanwhile)
        return original(*args, **kwargs)

    monkeypatch.setattr(assets, "enqueue_part", interrupted_enqueue)
    seen: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: seen.append(signum))
    try:
        failure = run_command._run_here(instance, "enqueue_job", keys[0])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert failure is None
    assert seen == [signal.SIGINT]
    assert queue.part(keys[0]).enqueued


def test_discover_parts_adds_new_files_as_partitions(instance, laion, settings, dataset):
    context = build_sensor_context(instance=instance, resources={"laion": laion})
    result = discover_parts(context)
    assert isinstance(result, SensorResult)
    (request,) = result.dynamic_partitions_requests
    assert sorted(request.partition_keys) == sorted(p.key for p in
                                                    parts.discover(settings.parts_root))
    # Short keys that stay readable where the UI cuts long ones: subset and part number.
    assert sorted(request.partition_keys) == ["laion2B-en/00000", "laion2B-en/00001",
                                              "laion2B-multi/00000", "laion2B-multi/00001"]
    instance.add_dynamic_partitions(PARTS, list(request.partition_keys))
    again = discover_parts(build_sensor_context(instance=instance, resources={"laion": laion}))
    assert "no new parts" in again.skip_reason.skip_message


def _tick(sensor, instance, laion):
    return sensor(build_sensor_context(instance=instance, resources={"laion": laion}))


def _requests(result) -> list[RunRequest]:
    """The run requests of a sensor tick (none for a skip)."""
    if isinstance(result, SkipReason):
        return []
    assert all(isinstance(r, RunRequest) for r in result), result
    return result


def test_launch_or_hold_launches_in_order_and_holds_on_queue_depth(instance, laion, settings,
                                                                   dataset, queue):
    assert "no parts yet" in _tick(launch_or_hold, instance, laion).skip_message
    keys = sorted(add_parts(instance, settings))
    # The first parts, in order, as many as may be enqueued at once (policy.py).
    requests = _requests(_tick(launch_or_hold, instance, laion))
    assert [r.partition_key for r in requests] == keys[:ENQUEUES_AT_ONCE]
    assert requests[0].run_key.startswith(f"enqueue:{keys[0]}:g1:")
    queue.r.set(queue.keys.queued_rows, 5_200_000)
    held = _tick(launch_or_hold, instance, laion)
    assert isinstance(held, SkipReason)
    assert held.skip_message == "holding 4 parts: queue 5,200,000 rows ≥ 5,000,000"


def test_launch_or_hold_holds_on_a_full_worker_disk(instance, laion, settings, dataset, queue,
                                                    monkeypatch):
    import json

    monkeypatch.setenv("LAION_DISK_STOP_USED_GB", "4900")
    add_parts(instance, settings)
    now = time.time()
    queue.r.hset(queue.keys.hosts, "a", json.dumps(
        {"disk_used_gb": 4980, "disk_free_gb": 120, "paused": True, "seen_at": now}))
    queue.r.hset(queue.keys.hosts, "b", json.dumps(
        {"disk_used_gb": 100, "disk_free_gb": 900, "paused": False, "seen_at": now}))
    queue.r.hset(queue.keys.hosts, "gone", json.dumps(
        {"disk_used_gb": 9999, "disk_free_gb": 0, "paused": True, "seen_at": now - 3600}))
    held = _tick(launch_or_hold, instance, laion)
    assert held.skip_message == "holding 4 parts: host a: 4,980 GB used ≥ 4,900 GB"
    queue.r.hdel(queue.keys.hosts, "a")
    assert _requests(_tick(launch_or_hold, instance, laion))


def test_a_failed_enqueue_is_not_relaunched_until_its_file_changes(instance, laion, settings,
                                                                   dataset):
    bad = settings.parts_root / "aaa" / "part-00000-x-c000.snappy.parquet"
    bad.parent.mkdir(parents=True)
    pq.write_table(pa.table({"link": ["http://a.test/1.jpg"]}), bad)
    add_parts(instance, settings)
    request = _requests(_tick(launch_or_hold, instance, laion))[0]
    assert request.partition_key == "aaa/00000"
    failed = materialize([enqueued_part], partition_key=request.partition_key, instance=instance,
                         resources={"laion": laion}, raise_on_error=False,
                         tags={"dagster/run_key": request.run_key})
    assert not failed.success
    nxt = _requests(_tick(launch_or_hold, instance, laion))
    assert nxt and "aaa/00000" not in [r.partition_key for r in nxt]
    # The user fixes the file: it gets a new run key, so it runs again.
    time.sleep(0.01)
    pq.write_table(pa.table({"URL": ["http://a.test/1.jpg"]}), bad)
    fixed = _requests(_tick(launch_or_hold, instance, laion))[0]
    assert fixed.partition_key == "aaa/00000" and fixed.run_key != request.run_key


def test_finalize_fires_only_when_complete_and_records_everything(instance, laion, settings,
                                                                  dataset, queue):
    keys = sorted(add_parts(instance, settings))
    key = keys[0]
    assert materialize([enqueued_part], partition_key=key, instance=instance,
                       resources={"laion": laion}).success
    waiting = _tick(finalize_parts, instance, laion)
    assert isinstance(waiting, SkipReason) and "downloading" in waiting.skip_message
    not_done = materialize([part_images], partition_key=key, instance=instance,
                           resources={"laion": laion}, raise_on_error=False)
    assert not not_done.success
    assert "shards complete" in failure_message(instance, not_done.run_id)

    worker = start_worker(settings)
    try:
        wait_until(lambda: all_done(queue, [key]), 60, what="part done")
    finally:
        stop_worker(worker)
    requests = _tick(finalize_parts, instance, laion)
    assert [r.partition_key for r in requests] == [key]

    result = materialize([part_images], partition_key=key, instance=instance,
                         resources={"laion": laion})
    assert result.success
    meta = metadata_of(instance, result.run_id, "part_images")
    part = parts.find(settings.parts_root, key)
    name = part.path.name
    expected = {i: cls for (n, i), cls in dataset.expected_by_row.items() if n == name}
    failed_rows = {i for i, cls in expected.items() if cls not in ("success", "invalid_url")}
    invalid_rows = {i for i, cls in expected.items() if cls == "invalid_url"}
    assert meta["rows"] == 120
    assert meta["ok"] == 120 - len(failed_rows) - len(invalid_rows)
    assert meta["failed"] == len(failed_rows) and meta["invalid_rows"] == len(invalid_rows)
    assert meta["success_rate"] == pytest.approx(meta["ok"] / (meta["ok"] + meta["failed"]),
                                                 abs=1e-4)
    assert "| http_4xx |" in meta["error_classes"]
    # Rows whose first try failed in a way that may pass were tried again later; the rows
    # the server dropped at first (/flaky/) recovered, the others failed as served.
    transient = {i for i, cls in expected.items() if cls in ("connection", "dns", "http_5xx")}
    flaky = {i for i, url in enumerate(pq.read_table(parts.find(settings.parts_root, key).path)
                                       .column("URL").to_pylist()) if url and "/flaky/" in url}
    assert meta["retried_rows"] == len(transient | flaky) and transient and flaky
    assert meta["recovered_rows"] == len(flaky)
    assert meta["to_fix"] == ""  # http_4xx dominates: nothing a setting can fix
    assert meta["output_dir"].endswith(str(parts.relative_dir(key)))
    assert meta["part_file"] == str(part.path)  # the key is short; the file name is here
    # Sizes in units people read (and a number for the plots), not a raw byte count.
    assert re.fullmatch(r"[\d,.]+ (kB|MB|GB)", meta["size"]) and meta["size_mb"] > 0
    assert "bytes" not in meta
    # Every error class has its key, zeros included: all partitions share one set of keys.
    assert {k for k in meta if k.startswith("failed_")} == {f"failed_{c}" for c in ERROR_CLASSES}
    assert sum(meta[f"failed_{c}"] for c in ERROR_CLASSES) == meta["failed"] + len(invalid_rows)
    errors = pq.read_table(meta["error_file"])
    assert set(errors.column("row").to_pylist()) == failed_rows | invalid_rows
    assert {r["row"]: r["error_class"] for r in errors.to_pylist()} == {
        i: expected[i] for i in failed_rows | invalid_rows}
    # The error file joins back to the input: the sample key and LAION's SAMPLE_ID.
    sample_ids = pq.read_table(part.path, columns=["SAMPLE_ID"]).column("SAMPLE_ID").to_pylist()
    prefix = parts.sample_prefix(key)
    for record in errors.to_pylist():
        assert record["key"] == f"{prefix}_{record['row']:010d}"
        assert record["SAMPLE_ID"] == sample_ids[record["row"]]
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"rows_accounted_for": True, "success_rate_floor": True}
    assert _tick(finalize_parts, instance, laion).skip_message.startswith(
        "nothing to finalize: 1 of 4 parts final, 3 not enqueued yet")
    # Finalizing again (a retried run) gives the same file and totals.
    again = materialize([part_images], partition_key=key, instance=instance,
                        resources={"laion": laion})
    assert metadata_of(instance, again.run_id, "part_images")["error_rows"] == meta["error_rows"]


def test_local_workers_job_downloads_until_the_queue_is_idle(instance, laion, settings, dataset,
                                                             queue, monkeypatch):
    for name, value in settings.to_env().items():  # the op reads host_map etc. from the env
        monkeypatch.setenv(name, value)
    keys = add_parts(instance, settings)
    for key in keys:
        assert materialize([enqueued_part], partition_key=key, instance=instance,
                           resources={"laion": laion}).success
    job = defs.resolve_job_def("local_workers")
    result = job.execute_in_process(instance=instance, run_config={"ops": {"run_worker_pool": {
        "config": {"processes": 1, "concurrency": 8, "idle_seconds": 1.0}}}})
    assert result.success
    assert all_done(queue, keys)
