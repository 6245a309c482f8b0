"""The commands a user types, run as processes, on the embedded Redis they start themselves."""

import json
import os
import socket
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laion_dagster.core.input import parts
from laion_dagster.core.queue import embedded
from tests.conftest import shell_env
from tests.outputs import check_part


def cli(env, *args, timeout=240):
    return subprocess.run([sys.executable, "-m", "laion_dagster.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def user_env(settings):
    """A user's shell, with one data folder for everything."""
    yield shell_env(data_dir=str(settings.data_dir))
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
    assert f"FAILED laion1B-nolang/00000: {bad}: no URL column" in output
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
        assert rows.num_rows == len(expected)  # every row in a shard parquet, invalid ones too
    counts = dataset.outcome_counts()
    assert f"rows: {total_rows:,}  ok: {counts['success']:,}" in output
    state = embedded.read_state(settings.data_dir / "redis")
    assert state is not None and not embedded.is_alive(state)  # the server it started is stopped

    bad.unlink()
    again = cli(user_env, *args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"4 of 4 parts already final in {settings.store_root}; skipping them" in again.stdout

    part = good[0]
    lost = cli(user_env, "errors", "export", part.key, timeout=60)  # forgot --store-dir
    assert lost.returncode == 2 and "error file" in lost.stderr and "missing" in lost.stderr
    exported = cli(user_env, "errors", "export", part.key, "--store-dir",
                   str(settings.store_root), "--out", str(settings.data_dir / "x"), timeout=60)
    assert exported.returncode == 0, exported.stderr
    name = part.key.replace("/", "_")
    lines = (settings.data_dir / "x" / f"{name}.errors.jsonl").read_text().splitlines()
    expected = {i: c for (n, i), c in dataset.expected_by_row.items()
                if n == part.path.name and c != "success"}
    assert {json.loads(line)["row"]: json.loads(line)["error_class"] for line in lines} == expected
    table = pq.read_table(settings.data_dir / "x" / f"{name}.errors.parquet")
    assert table.num_rows == len(expected)
    unknown = cli(user_env, "errors", "export", "nope/part", timeout=60)
    assert unknown.returncode == 2 and "unknown part 'nope/part'" in unknown.stderr
    # The commands that only look started the embedded server to read the queue, and stopped
    # it again.
    assert not embedded.running(settings.data_dir / "redis")


def test_status_and_discover(settings, dataset, user_env):
    status = cli(user_env, "status", "--json", timeout=60)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["queued_rows"] == 0 and report["parts"] == [] and report["hosts"] == []
    # It had to start the embedded server to read the queue; it stopped it again.
    assert not embedded.running(settings.data_dir / "redis")
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


@pytest.mark.parametrize("parent,sig,code", [
    ("terminal", "SIGINT", 130), ("script", "SIGINT", 130), ("script", "SIGTERM", 143)])
def test_up_starts_everything_and_one_signal_stops_it_all(settings, dataset, user_env, parent,
                                                          sig, code):
    """`up` from a terminal (Ctrl-C reaches its whole group) or from a script (a background
    job: SIGINT ignored from the start; `kill -INT` or `kill -TERM` reaches its pid only):
    every child stops within the grace period, the UI's port is free, nothing it started
    (webserver, daemon, code servers, pool, embedded Redis) is left, and the exit code says
    which signal (130, 143), as `run`'s."""
    import signal
    import time
    import urllib.request

    import psutil

    port = embedded.free_port()
    env = dict(user_env, LAION_PARQUET_DIR=str(settings.parts_root),
               LAION_STORE_DIR=str(settings.store_root), LAION_PROCESSES="1")
    disposition = signal.SIG_DFL if parent == "terminal" else signal.SIG_IGN
    up = subprocess.Popen(
        [sys.executable, "-m", "laion_dagster.cli", "up", "--port", str(port)], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, disposition))
    started: list[psutil.Process] = []
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
        started = psutil.Process(up.pid).children(recursive=True)
        names = " ".join(cmdline(p) for p in started)
        assert "laion_dagster.cli worker" in names and "dagster" in names, names
        assert "dagster-webserver" in names or "dagster_webserver" in names, names
        server = embedded.read_state(settings.data_dir / "redis")
        assert server is not None and embedded.is_alive(server)
        stopping = time.monotonic()
        if parent == "terminal":
            os.killpg(up.pid, signal.SIGINT)  # Ctrl-C
        else:
            os.kill(up.pid, getattr(signal, sig))  # kill -INT / kill -TERM PID
        up.wait(120)
        took = time.monotonic() - stopping
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
    out = up.stdout.read().decode()
    assert up.returncode == code, out
    assert took < 5 + 30, out  # shutdown_grace (5 s) for the pool; dagster dev's own stop
    assert f"{sig}: stopping" in out
    left = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, [cmdline(p) for p in left]
    with socket.socket() as probe:  # nothing listens on the UI's port (a server can take it)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))
        probe.listen()
    assert not embedded.is_alive(server)  # `up` started the embedded Redis, so it stops it


def cmdline(process) -> str:
    import psutil

    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def test_errors_export_reports_progress_on_a_big_part(settings, tmp_path):
    """25,000 failed rows (URLs that are not URLs, so no download is needed): the export
    writes them all and reports its progress as it goes."""
    from laion_dagster.core.control.accounting import export_errors
    from laion_dagster.core.control.enqueue import enqueue_part
    from laion_dagster.core.queue.connection import connect
    from laion_dagster.core.queue.protocol import Queue

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


# ---------------------------------------------------------------- clear words for mistakes

@pytest.mark.parametrize("args, env, sentence", [
    (["run", "--processes", "0"], {},
     "--processes 0 is not allowed: input should be greater than or equal to 1"),
    (["worker", "--concurrency", "0"], {},
     "--concurrency 0 is not allowed: input should be greater than or equal to 1"),
    (["status"], {"LAION_PROCESSES": "0"},
     "LAION_PROCESSES '0' is not allowed: input should be greater than or equal to 1"),
    (["status"], {"LAION_REDIS_URL": "notaurl"},
     "LAION_REDIS_URL 'notaurl' is not allowed: expected redis://[:password@]host[:port][/db], "
     "rediss://... for TLS, or unix:///path/to/socket"),
    (["reset", "laion2B-en/00000"], {"LAION_REDIS_URL": "http://queue-host:6379"},
     "LAION_REDIS_URL 'http://queue-host:6379' is not allowed: expected redis://"),
    (["run", "--redis-url", "redis://host:port"], {},
     "--redis-url 'redis://host:port' is not allowed: bad port"),
])
def test_a_bad_setting_is_one_sentence_naming_it_and_what_is_allowed(user_env, args, env,
                                                                    sentence):
    result = cli({**user_env, **env}, *args, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"laion-dagster: {sentence}"), lines
    assert "Traceback" not in result.stderr


def test_help_says_what_each_command_does_and_lists_only_its_flags():
    run = cli(os.environ, "run", "--help", timeout=60).stdout
    assert run.startswith("usage: laion-dagster run --parquet-dir PATH --store-dir PATH "
                          "[settings ...]\n")
    words = " ".join(run.split())
    # What is required, the layouts and formats taken, and the address guard with its setting.
    assert "Download every part at --parquet-dir into --store-dir" in words
    assert ("--parquet-dir is one file, a folder of files (its name is the subset) or a folder "
            "of subset folders") in words
    assert "parquet, csv, tsv, txt (one URL a line), json or jsonl" in words
    assert ("Private, loopback and link-local addresses are refused (class blocked_address) "
            "unless --allow-private-addresses") in words
    overwrite = run.split("--overwrite, --no-overwrite", 1)[1].split("\n  --", 1)[0]
    assert overwrite.count("default") == 1 and "(default: keep them)" in " ".join(
        overwrite.split())
    status = cli(os.environ, "status", "--help", timeout=60).stdout
    assert "redraw every SECONDS" in " ".join(status.split())
    assert "--json" in status and "as JSON, for scripts" in status
    for command in (["status"], ["reset"], ["discover"], ["errors", "export"],
                    ["errors", "retry"]):
        text = cli(os.environ, *command, "--help", timeout=60).stdout
        for flag in ("--concurrency", "--timeout", "--resize-mode", "--processes",
                     "--overwrite"):
            assert flag not in text, (command, flag)
        assert "--store-dir" in text
    assert "laion2B-en/00042" in cli(os.environ, "reset", "--help", timeout=60).stdout


# ---------------------------------------------------------------- the demo

def test_the_demo_clears_only_what_it_made_and_its_ui_hint_works_pasted(user_env, tmp_path):
    """`demo --data-dir DIR` works in DIR/demo, marked as its own, and leaves the rest of DIR
    alone; it refuses to clear a folder it did not make. The UI command it prints, pasted as
    is, opens an instance that shows the demo's four parts, materialized."""
    import re
    import signal
    import urllib.request

    env = {k: v for k, v in user_env.items() if not k.startswith("LAION_")}
    folder = tmp_path / "mine"
    (folder / "photos").mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes")
    (folder / "photos" / "cat.jpg").write_bytes(b"not really a cat")

    result = cli(env, "demo", "--data-dir", str(folder), "--rows-per-part", "60", timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert (folder / "notes.txt").read_text() == "my notes"
    assert (folder / "photos" / "cat.jpg").read_bytes() == b"not really a cat"
    assert (folder / "demo" / ".laion-dagster-demo").exists()
    demo_redis = folder / "demo" / "redis"
    assert not embedded.running(demo_redis)

    hint = out.split("see it in the UI (paste this):\n", 1)[1].strip().splitlines()[0].strip()
    assert re.fullmatch(r"DAGSTER_HOME=\S+ LAION_DATA_DIR=\S+ LAION_PARQUET_DIR=\S+ "
                        r"LAION_STORE_DIR=\S+ LAION_PREFIX=laion-demo /\S+/dagster dev -m "
                        r"laion_dagster.definitions", hint), hint
    port = embedded.free_port()
    ui = subprocess.Popen(["bash", "-c", f"{hint} -p {port}"], env=env, cwd=tmp_path,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)
    query = ('{ assetNodeOrError(assetKey: {path: ["part_images"]}) { ... on AssetNode { '
             'partitionKeys assetPartitionStatuses { ... on DefaultPartitionStatuses { '
             'materializedPartitions } } } } }')
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query}).encode(),
                    headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=10) as reply:
                    node = json.loads(reply.read())["data"]["assetNodeOrError"]
                break
            except (OSError, KeyError, TypeError):
                assert ui.poll() is None, "the pasted command exited"
                assert time.monotonic() < deadline, "the UI did not come up"
                time.sleep(1)
    finally:
        os.killpg(ui.pid, signal.SIGINT)
        try:
            ui.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)
        embedded.stop(demo_redis)  # the UI's sensors may have started it
    expected = ["laion2B-en/00000", "laion2B-en/00001", "laion2B-multi/00000",
                "laion2B-multi/00001"]
    assert sorted(node["partitionKeys"]) == expected
    assert sorted(node["assetPartitionStatuses"]["materializedPartitions"]) == expected

    # A file the demo did not make, in its folder: it refuses to clear the folder.
    (folder / "demo" / "keep-me.txt").write_text("mine")
    again = cli(env, "demo", "--data-dir", str(folder), "--rows-per-part", "60", timeout=120)
    assert again.returncode == 2
    assert f"{folder / 'demo'} holds files the demo did not make (keep-me.txt)" in again.stderr
    assert (folder / "demo" / "keep-me.txt").read_text() == "mine"
    # A folder named demo that is the user's own: refused too, untouched.
    other = tmp_path / "other"
    (other / "demo").mkdir(parents=True)
    (other / "demo" / "thesis.tex").write_text("chapter 1")
    refused = cli(env, "demo", "--data-dir", str(other), timeout=120)
    assert refused.returncode == 2
    assert "exists and was not made by the demo" in refused.stderr
    assert (other / "demo" / "thesis.tex").read_text() == "chapter 1"
