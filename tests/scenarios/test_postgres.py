"""The Postgres deployment variant: laion_dagster/dagster.postgres.yaml on a real Postgres.

Needs a Postgres on 127.0.0.1:5432 that lets DAGSTER_PG_USERNAME (default: postgres) in
without a password or with DAGSTER_PG_PASSWORD, and dagster-postgres installed; skips
otherwise. Each test run gets a fresh database of its own, dropped at the end.
"""

import os
import shutil
import socket
import uuid
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance, materialize
from dagster._config import process_config
from dagster._core.instance.config import dagster_instance_config
from dagster._core.run_coordinator import QueuedRunCoordinator
from dagster._core.storage.config import pg_config

from laion_dagster.core.input import parts
from laion_dagster.defs.assets import enqueued_part
from laion_dagster.defs.partitions import PARTS
from laion_dagster.defs.resources import LaionResource

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "laion_dagster" / "dagster.postgres.yaml"
HOST, PORT = "127.0.0.1", 5432
USER = os.environ.get("DAGSTER_PG_USERNAME") or "postgres"
PASSWORD = os.environ.get("DAGSTER_PG_PASSWORD") or ""
ENQUEUE_LIMIT = {"key": "dagster/job_name", "value": "enqueue_job", "limit": 2}


def _pg_env(db_name: str) -> dict[str, str]:
    return {"DAGSTER_PG_USERNAME": USER, "DAGSTER_PG_PASSWORD": PASSWORD,
            "DAGSTER_PG_HOST": HOST, "DAGSTER_PG_DB": db_name, "DAGSTER_PG_PORT": str(PORT)}


def _listening() -> bool:
    try:
        with socket.create_connection((HOST, PORT), timeout=2):
            return True
    except OSError:
        return False


def test_the_postgres_config_is_a_valid_instance_config(tmp_path, monkeypatch):
    """Parses and validates against Dagster's instance schema (no database needed)."""
    shutil.copy(CONFIG, tmp_path / "dagster.yaml")
    for name, value in _pg_env("laion_dagster").items():
        monkeypatch.setenv(name, value)
    config, _ = dagster_instance_config(str(tmp_path))
    storage = config["storage"]["postgres"]
    assert storage["postgres_db"] == {"username": {"env": "DAGSTER_PG_USERNAME"},
                                      "password": {"env": "DAGSTER_PG_PASSWORD"},
                                      "hostname": {"env": "DAGSTER_PG_HOST"},
                                      "db_name": {"env": "DAGSTER_PG_DB"},
                                      "port": {"env": "DAGSTER_PG_PORT"},
                                      "scheme": "postgresql+psycopg2"}
    # What the storage classes get: the environment's values, port as an int.
    resolved = process_config(pg_config(), storage)
    assert resolved.success, resolved.errors
    assert resolved.value["postgres_db"] == {
        "username": USER, "password": PASSWORD, "hostname": HOST, "db_name": "laion_dagster",
        "port": PORT, "params": {}, "scheme": "postgresql+psycopg2"}
    assert config["telemetry"] == {"enabled": False}
    assert config["run_queue"]["max_concurrent_runs"] == 8
    assert config["run_queue"]["tag_concurrency_limits"] == [ENQUEUE_LIMIT]
    same = dagster_instance_config(str(ROOT / "laion_dagster"))[0]  # the sqlite dagster.yaml
    assert config["run_queue"] == same["run_queue"]
    assert config["retention"] == same["retention"]


@pytest.fixture
def database():
    """A fresh, uniquely named database, dropped (connections and all) afterwards."""
    if not _listening():
        pytest.skip(f"no Postgres listening on {HOST}:{PORT}")
    pytest.importorskip("dagster_postgres", reason="dagster-postgres is not installed "
                        "(pip install 'dagster-postgres>=0.29,<0.30')")
    import psycopg2

    name = f"laion_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg2.connect(host=HOST, port=PORT, user=USER, password=PASSWORD,
                                 dbname="postgres", connect_timeout=10)
    except psycopg2.OperationalError as error:
        pytest.skip(f"cannot log in to Postgres on {HOST}:{PORT} as {USER}: {error}")
    admin.autocommit = True
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        yield name
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            assert cursor.fetchone() is None
        admin.close()


def test_the_postgres_instance_stores_a_materialization(database, settings, dataset, tmp_path,
                                                        monkeypatch):
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(CONFIG, home / "dagster.yaml")
    for name, value in _pg_env(database).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DAGSTER_HOME", str(home))

    key = parts.discover(settings.parts_root)[0].key
    laion = LaionResource(data_dir=str(settings.data_dir), parquet_dir=str(settings.parts_root),
                          store_dir=str(settings.store_root), redis_url=settings.redis_url,
                          prefix=settings.prefix, shard_size=settings.shard_size)
    instance = DagsterInstance.from_config(str(home))
    try:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        coordinator = instance.run_coordinator
        assert isinstance(coordinator, QueuedRunCoordinator)
        queue_config = coordinator.get_run_queue_config()
        assert queue_config.max_concurrent_runs == 8
        assert list(queue_config.tag_concurrency_limits) == [ENQUEUE_LIMIT]

        instance.add_dynamic_partitions(PARTS, [key])
        result = materialize([enqueued_part], partition_key=key, instance=instance,
                             resources={"laion": laion})
        assert result.success
    finally:
        instance.dispose()

    # A second instance, as another process would open it: everything came from Postgres.
    again = DagsterInstance.from_config(str(home))
    try:
        assert again.get_dynamic_partitions(PARTS) == [key]
        record = again.get_latest_materialization_event(AssetKey("enqueued_part"))
        assert record is not None and record.run_id == result.run_id
        materialization = record.asset_materialization
        assert materialization.partition == key
        metadata = {k: v.value for k, v in materialization.metadata.items()}
        expected_invalid = sum(1 for (name, _), cls in dataset.expected_by_row.items()
                               if name == dataset.parts[0].name and cls == "invalid_url")
        assert metadata["rows"] == 120
        assert metadata["invalid_rows"] == expected_invalid
        assert metadata["queued_rows"] == 120 - expected_invalid
        assert again.get_run_by_id(result.run_id).is_success
    finally:
        again.dispose()
    # Nothing went to sqlite files under DAGSTER_HOME.
    assert not list(home.rglob("*.db"))
