"""Unattended: the Dagster daemon's sensors discover, enqueue and finalize parts by themselves."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from dagster import (
    AssetKey,
    AssetRecordsFilter,
    DagsterInstance,
    DagsterRunStatus,
    RunsFilter,
)

from laion_dagster.core.input import parts
from laion_dagster.core.queue.connection import connect
from laion_dagster.core.queue.protocol import Queue
from laion_dagster.defs.partitions import PARTS
from laion_dagster.demo.dataset import write_dataset
from tests.conftest import TEST_HOSTS, worker_env
from tests.outputs import check_part, wait_until

ROOT = Path(__file__).resolve().parents[2]


def _home(tmp_path, settings) -> dict:
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    env = worker_env(settings)
    env["DAGSTER_HOME"] = str(home)
    return env


def _start(env, cwd, *command: str) -> subprocess.Popen:
    return subprocess.Popen(list(command), env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _stop(*procs: subprocess.Popen) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def _instance_at(home: Path):
    """The instance the daemon wrote, opened as a user would (DAGSTER_HOME)."""
    os.environ["DAGSTER_HOME"] = str(home)
    try:
        instance = DagsterInstance.get()
        yield instance
        instance.dispose()
    finally:
        del os.environ["DAGSTER_HOME"]


def _wait_final(queue: Queue, keys: list[str], home: Path) -> None:
    """Every part finalized, and every run over: a part is marked final in Redis a moment
    before its finalize run ends, and stopping the daemon in between interrupts that run."""
    def finalized():
        states = queue.parts_states(keys)
        return all(s.finalized_at for s in states.values())

    wait_until(finalized, 180, interval=1, what="the parts finalized by the sensors")
    running = RunsFilter(statuses=[DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED,
                                   DagsterRunStatus.STARTING, DagsterRunStatus.STARTED])
    with _instance_at(home) as instance:
        wait_until(lambda: not instance.get_runs(running), 120, interval=0.5,
                   what="every run over")


def _dataset(settings, image_server, images, parts_per_subset=2):
    return write_dataset(settings.parts_root, [image_server.url(h) for h in TEST_HOSTS],
                         subsets=("laion2B-en",), parts_per_subset=parts_per_subset,
                         rows_per_part=100, images=images, seed=5)


def _observed_final(instance: DagsterInstance, keys: list[str]) -> bool:
    for key in keys:
        records = instance.fetch_observations(AssetRecordsFilter(
            asset_key=AssetKey("enqueued_part"), asset_partitions=[key]), limit=1).records
        if not records or records[0].asset_observation.metadata["state"].value != "final":
            return False
    return True


DAEMON = (str(Path(sys.executable).with_name("dagster-daemon")), "run", "-m",
          "laion_dagster.definitions")
WORKER = (sys.executable, "-m", "laion_dagster.cli", "worker")


def test_daemon_runs_a_folder_unattended(settings, image_server, images, tmp_path):
    """...and its watch_downloads sensor tells the UI what `run` tells it: each part's end on
    enqueued_part, the worker hosts and the queue."""
    dataset = _dataset(settings, image_server, images)
    env = _home(tmp_path, settings) | {"LAION_OBSERVE_INTERVAL": "5"}
    home = Path(env["DAGSTER_HOME"])
    daemon = _start(env, tmp_path, *DAEMON)
    worker = _start(env, tmp_path, *WORKER)
    client = connect(settings)
    queue = Queue(client, settings.prefix)
    try:
        keys = wait_until(lambda: queue.partitions() if len(queue.partitions()) == 2 else None,
                          180, interval=1, what="both parts enqueued by the sensors")
        _wait_final(queue, keys, home)
        with _instance_at(home) as instance:
            wait_until(lambda: _observed_final(instance, keys), 120, interval=1,
                       what="each part's end observed by watch_downloads")
            for asset in ("worker_hosts", "queue"):
                assert instance.fetch_observations(AssetKey(asset), limit=1).records, asset
    finally:
        _stop(worker, daemon)
        client.close()
    for part in parts.discover(settings.parts_root):
        check_part(settings, part, dataset)
    with _instance_at(home) as instance:
        assert sorted(instance.get_dynamic_partitions(PARTS)) == sorted(keys)
        for key in keys:
            for asset in ("enqueued_part", "part_images"):
                record = instance.get_latest_materialization_event(AssetKey(asset))
                assert record is not None
            assert (settings.errors_root / f"{key}.parquet").exists()


def test_a_cli_backfill_is_picked_up_and_completed_by_running_workers(settings, image_server,
                                                                     images, tmp_path):
    dataset = _dataset(settings, image_server, images, parts_per_subset=3)
    env = _home(tmp_path, settings)
    dagster = str(Path(sys.executable).with_name("dagster"))
    # The operator drives this one by hand: launch_or_hold stays off.
    stop = subprocess.run([dagster, "sensor", "stop", "-m", "laion_dagster.definitions",
                           "launch_or_hold"], env=env, cwd=tmp_path, capture_output=True,
                          text=True)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    found = subprocess.run([sys.executable, "-m", "laion_dagster.cli", "discover"], env=env,
                           cwd=tmp_path, capture_output=True, text=True)
    assert "3 new, 3 parts" in found.stdout, found.stdout + found.stderr
    keys = sorted(p.key for p in parts.discover(settings.parts_root))[:2]
    daemon = _start(env, tmp_path, *DAEMON)
    worker = _start(env, tmp_path, *WORKER)
    client = connect(settings)
    queue = Queue(client, settings.prefix)
    try:
        backfill = subprocess.run(
            [dagster, "job", "backfill", "-m", "laion_dagster.definitions", "-j", "enqueue_job",
             "--partitions", ",".join(keys), "--noprompt"], env=env, cwd=tmp_path,
            capture_output=True, text=True, timeout=120)
        assert backfill.returncode == 0, backfill.stdout + backfill.stderr
        _wait_final(queue, keys, Path(env["DAGSTER_HOME"]))
        assert sorted(queue.partitions()) == keys  # the third part was not touched
    finally:
        _stop(worker, daemon)
        client.close()
    for part in parts.discover(settings.parts_root):
        if part.key in keys:
            check_part(settings, part, dataset)


def test_a_daemon_killed_mid_run_and_started_again_launches_nothing_twice(settings,
                                                                         image_server, images,
                                                                         tmp_path):
    """The daemon dies without warning (SIGKILL) once the first part is queued; a new daemon
    picks up from the sensors' cursors and run keys: every part is enqueued and finalized by
    exactly one run each, and the outputs are complete."""
    dataset = _dataset(settings, image_server, images, parts_per_subset=3)
    env = _home(tmp_path, settings)
    home = Path(env["DAGSTER_HOME"])
    first = _start(env, tmp_path, *DAEMON)
    worker = _start(env, tmp_path, *WORKER)
    client = connect(settings)
    queue = Queue(client, settings.prefix)
    second = None
    try:
        wait_until(lambda: queue.partitions(), 180, interval=0.5, what="a first part enqueued")
        os.kill(first.pid, signal.SIGKILL)  # the daemon only: runs it launched carry on
        first.wait(10)
        second = _start(env, tmp_path, *DAEMON)
        keys = sorted(p.key for p in parts.discover(settings.parts_root))
        wait_until(lambda: len(queue.partitions()) == 3, 180, interval=1,
                   what="every part enqueued")
        _wait_final(queue, keys, home)
    finally:
        _stop(*(p for p in (worker, second, first) if p is not None))
        client.close()
    for part in parts.discover(settings.parts_root):
        check_part(settings, part, dataset)
    with _instance_at(home) as instance:
        runs = instance.get_runs()
    for key in keys:
        mine = [r for r in runs if r.tags.get("dagster/partition") == key]
        by_job = sorted(r.job_name for r in mine)
        assert by_job == ["enqueue_job", "finalize_job"], (key, by_job)
        assert all(r.is_success for r in mine), [(r.job_name, r.status) for r in mine]


def test_an_enqueue_run_whose_process_died_is_launched_again(settings, image_server, images,
                                                             tmp_path):
    """An enqueue run killed without a word (SIGKILL, a reboot) stays STARTED in Dagster
    forever. launch_or_hold sees that its process is gone, marks the run failed, and launches
    the part again under a new run key instead of holding it for good."""
    from dagster import RunRequest, build_sensor_context

    from laion_dagster.defs.resources import LaionResource
    from laion_dagster.defs.sensors import LOST_TAG, launch_or_hold

    _dataset(settings, image_server, images, parts_per_subset=1)
    env = _home(tmp_path, settings)
    env["LAION_QUEUE_HIGH_WATERMARK"] = "10"  # the enqueue waits after its first shard
    home = Path(env["DAGSTER_HOME"])
    cli = [sys.executable, "-m", "laion_dagster.cli"]
    found = subprocess.run([*cli, "discover"], env=env, cwd=tmp_path, capture_output=True,
                           text=True, timeout=120)
    assert found.returncode == 0, found.stderr
    key = parts.discover(settings.parts_root)[0].key
    dagster = str(Path(sys.executable).with_name("dagster"))
    enqueue = _start(env, tmp_path, dagster, "asset", "materialize", "-m",
                     "laion_dagster.definitions", "--select", "enqueued_part", "--partition", key)
    client = connect(settings)
    queue = Queue(client, settings.prefix)
    try:
        enqueuer = wait_until(lambda: queue.part(key).enqueuer, 120, what="the enqueue to start")
        os.killpg(enqueue.pid, signal.SIGKILL)
        enqueue.wait(10)
    finally:
        _stop(enqueue)
    host, pid, run_id = enqueuer.split(":", 2)
    laion = LaionResource(data_dir=str(settings.data_dir), parquet_dir=str(settings.parts_root),
                          store_dir=str(settings.store_root), redis_url=settings.redis_url,
                          prefix=settings.prefix)
    with _instance_at(home) as instance:
        [dead] = instance.get_runs()
        assert dead.run_id == run_id
        assert dead.status.value == "STARTED"  # what Dagster believes, forever
        requests = launch_or_hold(build_sensor_context(instance=instance,
                                                       resources={"laion": laion}))
        assert isinstance(requests, list), requests
        [request] = [r for r in requests if r.partition_key == key]
        assert isinstance(request, RunRequest) and request.run_key.endswith(":l1")
        dead = instance.get_run_by_id(dead.run_id)
        assert dead.status.value == "FAILURE" and dead.tags[LOST_TAG] == "true"
    client.close()
