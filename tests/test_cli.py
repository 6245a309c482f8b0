"""The commands a user types, run as processes, on the embedded Redis they start themselves."""

import json
import os
import subprocess
import sys
import time

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
    assert state is not None and not embedded.is_alive(state)  # the server it started is stopped

    bad.unlink()
    again = cli(user_env, *args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "4 of 4 parts are already final; skipping them" in again.stdout

    part = good[0]
    lost = cli(user_env, "errors", "export", part.key, timeout=60)  # forgot --store-dir
    assert lost.returncode == 2 and "error file" in lost.stderr and "missing" in lost.stderr
    exported = cli(user_env, "errors", "export", part.key, "--store-dir",
                   str(settings.store_root), "--out", str(settings.data_dir / "x"), timeout=60)
    assert exported.returncode == 0, exported.stderr
    lines = (settings.data_dir / "x" / f"{part.key}.errors.jsonl").read_text().splitlines()
    expected = {i: c for (n, i), c in dataset.expected_by_row.items()
                if n == part.path.name and c != "success"}
    assert {json.loads(line)["row"]: json.loads(line)["error_class"] for line in lines} == expected
    table = pq.read_table(settings.data_dir / "x" / f"{part.key}.errors.parquet")
    assert table.num_rows == len(expected)
    unknown = cli(user_env, "errors", "export", "nope__part", timeout=60)
    assert unknown.returncode == 2 and "unknown part 'nope__part'" in unknown.stderr


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
    started = time.monotonic()
    result = cli(env, "status", timeout=120)
    assert time.monotonic() - started < 15  # a person is waiting
    assert result.returncode == 2
    assert result.stderr.strip().startswith("laion-dagster: cannot reach Redis at "
                                            "redis://***@127.0.0.1:9/0")
    assert "Traceback" not in result.stderr


def test_up_starts_everything_and_one_ctrl_c_stops_it_all(settings, dataset, user_env):
    import signal
    import time
    import urllib.request

    import psutil

    port = embedded.free_port()
    env = dict(user_env, LAION_PARQUET_DIR=str(settings.parts_root),
               LAION_STORE_DIR=str(settings.store_root), LAION_PROCESSES="1")
    up = subprocess.Popen(
        [sys.executable, "-m", "laion_dagster.cli", "up", "--port", str(port)], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        # A terminal's Ctrl-C reaches a foreground group whose SIGINT is not ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info",
                                            timeout=2) as reply:
                    assert reply.status == 200
                    break
            except OSError:
                assert up.poll() is None, up.stdout.read().decode()
                assert time.monotonic() < deadline, "the UI did not come up"
                time.sleep(1)
        group = [p for p in psutil.process_iter(["pid"]) if _in_group(p, up.pid)]
        names = " ".join(" ".join(p.cmdline()) for p in group if p.is_running())
        assert "laion_dagster.cli worker" in names and "dagster" in names
        server = embedded.read_state(settings.data_dir / "redis")
        assert server is not None and embedded.is_alive(server)
        os.killpg(up.pid, signal.SIGINT)  # Ctrl-C
        up.wait(120)
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
    out = up.stdout.read().decode()
    assert up.returncode == 0, out
    time.sleep(1)
    assert not [p for p in psutil.process_iter(["pid"]) if _in_group(p, up.pid)]
    assert not embedded.is_alive(server)  # `up` started the embedded Redis, so it stops it


def _in_group(process, group: int) -> bool:
    """A live process of the group (an exited one waiting to be reaped does not count)."""
    import psutil

    try:
        return os.getpgid(process.pid) == group and process.status() != psutil.STATUS_ZOMBIE
    except (ProcessLookupError, PermissionError, psutil.Error):
        return False


def test_errors_export_reports_progress_on_a_big_part(settings, tmp_path):
    """25,000 failed rows (URLs that are not URLs, so no download is needed): the export
    writes them all and reports its progress as it goes."""
    from laion_dagster.core.accounting import export_errors
    from laion_dagster.core.connection import connect
    from laion_dagster.core.enqueue import enqueue_part
    from laion_dagster.core.queue import Queue

    folder = settings.parts_root / "laion2B-en"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"URL": [f"ftp://x/{i}" for i in range(25_000)]}),
                   folder / "part-00000-x-c000.snappy.parquet")
    part = parts.discover(settings.parts_root)[0]
    queue = Queue(connect(settings), settings.prefix)
    enqueue_part(queue, part, settings.with_overrides(shard_size=5_000))
    calls = []
    _, jsonl, count = export_errors(queue, part.key, settings, tmp_path / "out",
                                    progress=lambda done, total: calls.append((done, total)))
    assert count == 25_000 and len(jsonl.read_text().splitlines()) == 25_000
    assert calls == [(10_000, 25_000), (20_000, 25_000), (25_000, 25_000)]
