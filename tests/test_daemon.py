"""Unattended: the Dagster daemon's sensors discover, enqueue and finalize parts by themselves."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from dagster import DagsterInstance

from laion_dagster.core.connection import connect
from laion_dagster.core.queue import Queue
from laion_dagster.defs.partitions import PARTS
from laion_dagster.demo.dataset import write_dataset
from tests.conftest import TEST_HOSTS, worker_env
from tests.outputs import check_part, wait_until

ROOT = Path(__file__).resolve().parents[1]


def test_daemon_runs_a_folder_unattended(settings, image_server, images, tmp_path):
    dataset = write_dataset(settings.parts_root, [image_server.url(h) for h in TEST_HOSTS],
                            subsets=("laion2B-en",), parts_per_subset=2, rows_per_part=100,
                            images=images, seed=5)
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    env = worker_env(settings)
    env["DAGSTER_HOME"] = str(home)
    daemon_bin = Path(sys.executable).with_name("dagster-daemon")
    daemon = subprocess.Popen([str(daemon_bin), "run", "-m", "laion_dagster.definitions"],
                              env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, start_new_session=True)
    worker = subprocess.Popen([sys.executable, "-m", "laion_dagster.cli", "worker"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    client = connect(settings)
    queue = Queue(client, settings.prefix)
    try:
        keys = wait_until(lambda: queue.partitions() if len(queue.partitions()) == 2 else None,
                          180, interval=1, what="both parts enqueued by the sensors")

        def finalized():
            states = queue.parts_states(keys)
            return all(s.finalized_at for s in states.values())

        wait_until(finalized, 180, interval=1, what="both parts finalized by the sensors")
    finally:
        for proc in (worker, daemon):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in (worker, daemon):
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        client.close()
    from laion_dagster.core import parts

    for part in parts.discover(settings.parts_root):
        check_part(settings, part, dataset)
    os.environ["DAGSTER_HOME"] = str(home)
    try:
        instance = DagsterInstance.get()
        assert sorted(instance.get_dynamic_partitions(PARTS)) == sorted(keys)
        from dagster import AssetKey

        for key in keys:
            for asset in ("part_tasks", "part_images"):
                record = instance.get_latest_materialization_event(AssetKey(asset))
                assert record is not None
            assert (settings.errors_root / f"{key}.parquet").exists()
        instance.dispose()
    finally:
        del os.environ["DAGSTER_HOME"]
