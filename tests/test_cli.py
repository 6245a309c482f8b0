"""The commands a user types, run as processes, on the embedded Redis they start themselves."""

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laion_dagster.core import embedded, parts
from tests.conftest import TEST_HOSTS
from tests.outputs import check_part


def cli(env, *args, timeout=240):
    return subprocess.run([sys.executable, "-m", "laion_dagster.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def user_env(settings):
    """What a user's shell has: no Redis URL (so the embedded one), no DAGSTER_HOME."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("LAION_") and k != "DAGSTER_HOME"}
    env.update({
        "LAION_DATA_DIR": str(settings.data_dir),
        "LAION_HOST_MAP": json.dumps({h: "127.0.0.1" for h in TEST_HOSTS}),
        "LAION_ALLOW_PRIVATE_ADDRESSES": "true",
        "LAION_SHARD_SIZE": "40",
        "LAION_TIMEOUT": "5",
        "LAION_HEARTBEAT_INTERVAL": "0.5",
        "LAION_RETRIES": "0",
    })
    yield env
    embedded.stop(settings.data_dir / "redis")


def test_run_downloads_everything_reports_bad_parts_and_resumes(settings, dataset, user_env):
    bad = settings.parts_root / "laion1B-nolang" / "part-00000-bad-c000.snappy.parquet"
    bad.parent.mkdir(parents=True)
    pq.write_table(pa.table({"SAMPLE_ID": [1, 2], "TEXT": ["a", "b"]}), bad)
    args = ["run", "--parquet-dir", str(settings.parts_root), "--store-dir",
            str(settings.store_root), "--processes", "2", "--concurrency", "16"]

    first = cli(user_env, *args)
    output = first.stdout + first.stderr
    assert first.returncode == 1, output
    assert f"FAILED laion1B-nolang__part-00000-bad-c000: {bad}: no URL column" in output
    assert "Traceback" not in first.stdout
    good = [p for p in parts.discover(settings.parts_root) if p.subset != "laion1B-nolang"]
    total_rows = 0
    for part in good:
        rows = check_part(settings, part, dataset)
        expected = {i: c for (n, i), c in dataset.expected_by_row.items()
                    if n == part.path.name}
        errors = pq.read_table(settings.errors_root / f"{part.key}.parquet")
        assert {r["row"]: r["error_class"] for r in errors.to_pylist()} == {
            i: c for i, c in expected.items() if c != "success"}
        total_rows += len(expected)
        assert rows.num_rows + sum(c == "invalid_url" for c in expected.values()) == len(
            expected)
    counts = dataset.outcome_counts()
    assert f"rows: {total_rows:,}  ok: {counts['success']:,}" in output
    state = embedded.read_state(settings.data_dir / "redis")
    assert state is None  # the embedded server it started is stopped again

    bad.unlink()
    again = cli(user_env, *args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "4 of 4 parts are already final; skipping them" in again.stdout


def test_status_and_discover(settings, dataset, user_env):
    status = cli(user_env, "status", "--json", timeout=60)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["queued_rows"] == 0 and report["parts"] == [] and report["hosts"] == []
    found = cli(user_env, "discover", "--parquet-dir", str(settings.parts_root), timeout=60)
    assert found.returncode == 0, found.stderr
    assert "4 new, 4 parts" in found.stdout
    assert (settings.data_dir / "dagster" / "dagster.yaml").exists()
    again = cli(user_env, "discover", "--parquet-dir", str(settings.parts_root), timeout=60)
    assert "0 new, 4 parts" in again.stdout


def test_unreachable_redis_is_one_clear_line(settings, user_env):
    env = dict(user_env, LAION_REDIS_URL="redis://:pw@127.0.0.1:9/0")
    import laion_dagster.core.connection  # noqa: F401 - the retry budget is a constant

    result = cli(env, "status", timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("laion-dagster: cannot reach Redis at "
                                            "redis://***@127.0.0.1:9/0")
    assert "Traceback" not in result.stderr
