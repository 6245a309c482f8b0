"""The Dagster instance our commands share with the UI: created and migrated before anything
else uses it, a doubled schema head repaired where found, and a UI and a `run` started at once
on a new instance both working, then and after."""

import json
import sqlite3
import subprocess
import sys
import urllib.request
from pathlib import Path

from laion_dagster.core.queue.embedded import free_port
from laion_dagster.core.settings import Settings
from laion_dagster.dagster_home import (
    SQLITE_STORAGES,
    ensure_dagster_home,
    schema_head,
    storage_template,
)
from tests.conftest import shell_env
from tests.outputs import wait_until
from tests.scenarios.test_ui import _stop_group

BIN = Path(sys.executable).parent
OLDER = "5771160a95ad"  # what Dagster stamps on finding the tables but no revision yet


def cli(env, *args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "laion_dagster.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def dagster_sensors(env) -> subprocess.CompletedProcess:
    """A Dagster process of the user's that opens the instance's schedule storage."""
    return subprocess.run([str(BIN / "dagster"), "sensor", "list", "-m",
                           "laion_dagster.definitions"], env=env, capture_output=True,
                          text=True, timeout=120)


def revisions(home: Path) -> dict[str, list[str]]:
    found = {}
    for name in SQLITE_STORAGES:
        with sqlite3.connect(home / name) as db:
            found[name] = [r[0] for r in db.execute("SELECT version_num FROM alembic_version")]
    return found


def test_a_new_home_copies_the_storage_the_first_one_created(tmp_path, monkeypatch):
    """Creating an instance's databases runs every migration Dagster has: the first new home
    on a machine keeps them in the cache folder (per Dagster version), later ones copy them,
    stamped at the head, and what one home records stays its own."""
    from dagster import DagsterInstance

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    first = ensure_dagster_home(Settings(data_dir=tmp_path / "a"))
    template = storage_template()
    assert template.parent == tmp_path / "cache" / "laion-dagster"
    assert sorted(p.relative_to(template).as_posix() for p in template.rglob("*.db")) == \
        sorted(SQLITE_STORAGES)
    monkeypatch.delenv("DAGSTER_HOME")
    second = ensure_dagster_home(Settings(data_dir=tmp_path / "b"))
    assert second != first
    assert revisions(second) == revisions(first) == {n: [schema_head()] for n in SQLITE_STORAGES}
    with DagsterInstance.from_config(str(second)) as instance:
        instance.add_dynamic_partitions("parts", ["laion2B-en/00000"])
        assert instance.get_dynamic_partitions("parts") == ["laion2B-en/00000"]
    monkeypatch.delenv("DAGSTER_HOME")
    third = ensure_dagster_home(Settings(data_dir=tmp_path / "c"))
    with DagsterInstance.from_config(str(third)) as instance:
        assert instance.get_dynamic_partitions("parts") == []


def test_a_doubled_schema_head_is_repaired_where_found(settings, dataset, tmp_path):
    """The race's result, as it leaves an instance (one made before ours, or by Dagster
    itself): the schedule storage stamped twice, its head and the older revision Dagster stamps
    on finding tables but no revision. Every Dagster process fails on it; the next command of
    ours repairs it and says so."""
    home = tmp_path / "home"
    env = shell_env() | {"DAGSTER_HOME": str(home)}
    where = ["--parquet-dir", str(settings.parts_root), "--store-dir", str(tmp_path / "s")]
    assert cli(env, "discover", *where).returncode == 0
    head = schema_head()
    assert set(map(tuple, revisions(home).values())) == {(head,)}
    schedules = home / "schedules" / "schedules.db"
    with sqlite3.connect(schedules) as db:
        db.execute("INSERT INTO alembic_version VALUES (?)", (OLDER,))
    broken = subprocess.run([str(BIN / "dagster"), "instance", "info"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert broken.returncode != 0 and "more than one head" in broken.stdout + broken.stderr
    repaired = cli(env, "discover", *where)
    assert repaired.returncode == 0, repaired.stderr
    assert f"repaired {schedules}" in repaired.stdout
    assert revisions(home)["schedules/schedules.db"] == [head]
    assert dagster_sensors(env).returncode == 0


def test_revisions_without_the_head_are_refused_with_the_command_that_repairs(settings,
                                                                             dataset,
                                                                             tmp_path):
    home = tmp_path / "home"
    env = shell_env() | {"DAGSTER_HOME": str(home)}
    where = ["--parquet-dir", str(settings.parts_root), "--store-dir", str(tmp_path / "s")]
    assert cli(env, "discover", *where).returncode == 0
    with sqlite3.connect(home / "history" / "runs.db") as db:
        db.execute("DELETE FROM alembic_version")
        db.executemany("INSERT INTO alembic_version VALUES (?)", [(OLDER,), ("0123456789ab",)])
    refused = cli(env, "discover", *where)
    assert refused.returncode == 2
    assert refused.stderr.strip().endswith(
        f"repair it with `DAGSTER_HOME={home} dagster instance migrate`")


def test_a_ui_and_a_run_started_together_share_one_working_instance(settings, dataset,
                                                                   tmp_path):
    """`dagster-webserver` started the moment `run` has made a new DAGSTER_HOME, before the
    run opens the instance (when both created its databases, the schema head was doubled in
    about one start in four here). The run finishes without a repair to make, the UI lists the
    assets, every storage has one revision, and every Dagster process opens the instance."""
    home = tmp_path / "home"
    env = shell_env(processes="1", concurrency="8") | {"DAGSTER_HOME": str(home)}
    port = free_port()
    run = subprocess.Popen([sys.executable, "-m", "laion_dagster.cli", "run", "--parquet-dir",
                            str(settings.parts_root), "--store-dir", str(tmp_path / "s")],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, start_new_session=True)
    log = tmp_path / "webserver.log"
    web = None
    try:
        wait_until(lambda: home.exists() or run.poll() is not None, 60, interval=0.05,
                   what="run making the instance's home")
        with log.open("wb") as handle:
            web = subprocess.Popen([str(BIN / "dagster-webserver"), "-m",
                                    "laion_dagster.definitions", "-h", "127.0.0.1", "-p",
                                    str(port)], env=env, stdout=handle,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        out, _ = run.communicate(timeout=240)
        assert run.returncode == 0, out
        assert "repaired " not in out
        wait_until(lambda: _answers(port), 120, interval=0.5,
                   what=f"the UI (its log: {log.read_text()[-3000:]})")
        # The code location loads (it does not end as "No assets", its error being the
        # instance's), with every asset.
        wait_until(lambda: _location_loaded(port), 120, interval=0.5, what="the code location")
        assets = _graphql(port, "{ assetNodes { assetKey { path } } }")["assetNodes"]
        assert {"enqueued_part", "part_images", "queue", "worker_hosts"} <= {
            a["assetKey"]["path"][0] for a in assets}
        assert "repaired " not in log.read_text()
    finally:
        for proc in (web, run):
            if proc is not None:
                _stop_group(proc)
    assert set(map(tuple, revisions(home).values())) == {(schema_head(),)}
    assert dagster_sensors(env).returncode == 0


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def _graphql(port: int, query: str) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql",
                                     data=json.dumps({"query": query}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["data"]


LOCATIONS = """{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus
  locationOrLoadError { __typename ... on PythonError { message } } } } } }"""


def _location_loaded(port: int) -> bool:
    entries = _graphql(port, LOCATIONS)["workspaceOrError"]["locationEntries"]
    for entry in entries:
        error = entry["locationOrLoadError"] or {}
        assert error.get("__typename") != "PythonError", error.get("message")
    return bool(entries) and all(e["loadStatus"] == "LOADED" and e["locationOrLoadError"]
                                 for e in entries)
