"""`laion-dagster run` in a user's hands: its folders, its children, its signals, its silences.

Every test runs the real command as a process on the embedded Redis it starts itself, against
the loopback image server, the way a hurried user would: a second run into another folder, a
changed input, a deleted store, two runs at once, Ctrl-C, `kill`, a killed worker pool, a
read-only or full disk.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laion_dagster.core.input import parts
from laion_dagster.core.queue import embedded
from laion_dagster.core.settings import STATE_FOLDER
from laion_dagster.demo.dataset import write_dataset
from tests.conftest import TEST_HOSTS, mount_tmpfs, shell_env
from tests.outputs import check_part, tar_members


def command(env, *args, timeout=240, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "laion_dagster.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=cwd)


class Running:
    """A command in the background whose output is read as it comes."""

    def __init__(self, env, *args):
        self.proc = subprocess.Popen([sys.executable, "-m", "laion_dagster.cli", *args],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            assert self.proc.poll() is None, f"exited {self.proc.returncode}:\n{self.output}"
            assert time.monotonic() < deadline, f"no {text!r} in:\n{self.output}"
            time.sleep(0.2)

    def finish(self, timeout: float = 180) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(10)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)


@pytest.fixture
def user_env(settings):
    """A user's shell, with no data folder named: state goes beside each store."""
    yield shell_env(concurrency="16", shutdown_grace="5")
    for server in Path(settings.data_dir.parent).rglob("redis/server.json"):
        embedded.stop(server.parent)


@pytest.fixture
def small(settings, image_server, images):
    """One subset of two 60-row parts: a run of it takes seconds."""
    return write_dataset(settings.parts_root, [image_server.url(h) for h in TEST_HOSTS],
                         subsets=("laion2B-en",), rows_per_part=60, images=images, seed=5)


@pytest.fixture
def lasting(settings, image_server, images):
    """Two 120-row parts with a few rows that never answer: a run of it lasts at least one
    `timeout` (5 s) after its first image, long enough to stop or kill it half way."""
    return write_dataset(settings.parts_root, [image_server.url(h) for h in TEST_HOSTS],
                         rows_per_part=120, images=images, seed=3, slow_rows=True)


def where(settings, store: Path, data: Path | None = None) -> list[str]:
    args = ["run", "--parquet-dir", str(settings.parts_root), "--store-dir", str(store)]
    return args + (["--data-dir", str(data)] if data else [])


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    def running(process: psutil.Process) -> bool:
        try:
            return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    return [p for p in processes if running(p)]


def cmdline(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:  # gone, or a zombie not yet reaped
        return ""


# ---------------------------------------------------------------- state belongs to its data

def test_a_second_run_into_another_store_downloads_again_and_reports_what_is_there(
        settings, small, user_env, tmp_path):
    """The same queue (one --data-dir), another store: the parts are downloaded into the new
    store, never reported "already final" from the old one."""
    data, first_store, second_store = tmp_path / "d", tmp_path / "s1", tmp_path / "s2"
    first = command(user_env, *where(settings, first_store, data))
    assert first.returncode == 0, first.stdout + first.stderr
    second = command(user_env, *where(settings, second_store, data))
    out = second.stdout + second.stderr
    assert second.returncode == 0, out
    assert "already final" not in out
    assert f"was downloaded into {first_store}, not {second_store}" in out
    again = settings.with_overrides(store_dir=second_store)
    for part in parts.discover(settings.parts_root):
        check_part(again, part, small)  # every row there, with its outcome and its bytes
    counts = small.outcome_counts()
    assert f"ok: {counts['success']:,}" in out


def test_runs_into_two_stores_share_no_state_by_default(settings, small, user_env, tmp_path):
    """Without --data-dir, a run's Redis, Dagster instance and logs live beside its store:
    two downloads on one machine never see each other's parts."""
    for store in (tmp_path / "a", tmp_path / "b"):
        result = command(user_env, *where(settings, store))
        out = result.stdout + result.stderr
        assert result.returncode == 0, out
        assert "already final" not in out
        state = store / STATE_FOLDER
        assert (state / "redis" / "server.json").exists()
        assert (state / "dagster" / "dagster.yaml").exists()
        assert (state / "logs" / "workers.log").exists()
    again = command(user_env, *where(settings, tmp_path / "a"))
    assert "2 of 2 parts already final" in again.stdout, again.stdout + again.stderr


def test_a_changed_part_file_is_refused_not_reported_as_final(settings, small, user_env,
                                                              tmp_path, image_server, images):
    data, store = tmp_path / "d", tmp_path / "s"
    assert command(user_env, *where(settings, store, data)).returncode == 0
    changed = parts.discover(settings.parts_root)[0]
    before = (store / changed.relative_dir / "00000.parquet").read_bytes()
    # The user regenerates the part: the same file name, other rows.
    other = write_dataset(tmp_path / "regenerated", [image_server.url(h) for h in TEST_HOSTS],
                          subsets=("laion2B-en",), rows_per_part=60, images=images, seed=6)
    other.parts[0].replace(changed.path)

    result = command(user_env, *where(settings, store, data))

    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert f"FAILED {changed.key}: {changed.key}: {changed.path} changed since its rows were " \
           "queued" in out
    assert f"laion-dagster reset {changed.key}" in out
    # Its shards, made from the old file, are untouched.
    assert (store / changed.relative_dir / "00000.parquet").read_bytes() == before


def test_a_final_part_whose_shards_were_deleted_is_downloaded_again(settings, small, user_env,
                                                                    tmp_path):
    data, store = tmp_path / "d", tmp_path / "s"
    assert command(user_env, *where(settings, store, data)).returncode == 0
    part = parts.discover(settings.parts_root)[1]
    for path in (store / part.relative_dir).glob("00001*"):
        path.unlink()

    result = command(user_env, *where(settings, store, data))

    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert f"{part.key}: 1 of 2 shards are missing from {store}; downloading them again" in out
    assert "1 of 2 parts already final" in out
    check_part(settings.with_overrides(store_dir=store), part, small)


# ---------------------------------------------------------------- one command per folder

def test_a_second_run_on_a_folder_in_use_exits_2_and_sigterm_stops_everything(
        settings, lasting, user_env, tmp_path):
    """Two runs on one folder would share one Redis and one Dagster instance: the second is
    refused, naming the first. `kill` (SIGTERM) of the first stops its pool, its enqueue
    processes and its Redis within the grace period, prints the summary so far, exits 143."""
    data, store = tmp_path / "d", tmp_path / "s"
    first = Running(user_env, *where(settings, store, data), "--concurrency", "2")
    try:
        first.wait_for("first image stored")
        second = command(user_env, *where(settings, tmp_path / "other", data))
        assert second.returncode == 2, second.stdout + second.stderr
        assert second.stderr.strip() == (
            f"laion-dagster: {data} is in use by `laion-dagster run` (pid {first.proc.pid}, "
            f"since {_since(data)}); wait for it to end, or give this command another "
            "--data-dir (or --store-dir)")
        children = descendants(first.proc.pid)
        assert any("laion_dagster.cli worker" in cmdline(c) for c in children)
        server = embedded.read_state(data / "redis")
        assert server is not None and embedded.is_alive(server)

        stopped = time.monotonic()
        first.proc.send_signal(signal.SIGTERM)  # `kill PID`, to the run alone
        code = first.finish(60)
        assert time.monotonic() - stopped < 5 + 30  # shutdown_grace, and some
    finally:
        first.kill()
    out = first.output
    assert code == 143, out
    assert "SIGTERM: stopping" in out and "stopped by SIGTERM; the summary so far" in out
    assert "rows: " in out and "Traceback" not in out
    time.sleep(1)
    assert not alive(children), [c.cmdline() for c in alive(children)]
    assert not embedded.is_alive(server)


def _since(folder: Path) -> str:
    info = json.loads((folder / "laion-dagster.lock").read_text())
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))


def test_ctrl_c_stops_everything_and_exits_130(settings, lasting, user_env, tmp_path):
    run = Running(user_env, *where(settings, tmp_path / "s"), "--concurrency", "2")
    try:
        run.wait_for("first image stored")
        children = descendants(run.proc.pid)
        os.killpg(run.proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the group
        code = run.finish(60)
    finally:
        run.kill()
    assert code == 130, run.output
    assert "stopped by SIGINT" in run.output and "Traceback" not in run.output
    time.sleep(1)
    assert not alive(children)
    # Run again: it resumes and finishes.
    again = command(user_env, *where(settings, tmp_path / "s"))
    assert again.returncode == 0, again.stdout + again.stderr


def test_a_killed_worker_pool_is_started_again_and_the_run_finishes(settings, lasting,
                                                                   user_env, tmp_path):
    """The OOM killer takes the pool's supervisor: `run` starts a new pool, which takes the
    dead processes' shards at once; the run finishes with every row."""
    store = tmp_path / "s"
    run = Running(user_env, *where(settings, store), "--concurrency", "2")
    try:
        run.wait_for("first image stored")
        [pool] = [c for c in psutil.Process(run.proc.pid).children()
                  if "laion_dagster.cli worker" in cmdline(c)]
        pool.send_signal(signal.SIGKILL)
        code = run.finish(120)
    finally:
        run.kill()
    assert code == 0, run.output
    assert "the worker pool exited with code -9 (killed, or the OOM killer?); starting it " \
           "again" in run.output
    for part in parts.discover(settings.parts_root):
        check_part(settings.with_overrides(store_dir=store), part, lasting)


def test_a_pool_that_keeps_dying_ends_the_run_with_a_sentence(settings, small, tmp_path,
                                                              monkeypatch):
    """Only repeated failures end a run: a pool that dies three times in a row within a minute
    of starting is broken, and the run says so (exit 1) instead of restarting it forever."""
    from laion_dagster import run as run_command

    class DyingPool(run_command.RunCommand):
        def _start_workers(self):
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self.workers = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
            self.workers_started = time.monotonic()

    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    run_settings = settings.model_copy(update={"data_dir": tmp_path / "d",
                                               "store_dir": tmp_path / "s", "redis_url": None})
    out = open(tmp_path / "out.txt", "w+")  # noqa: SIM115
    before = dict(os.environ)
    result = DyingPool(run_settings, out=out).run()
    assert dict(os.environ) == before  # the settings it gave its children do not stay
    out.seek(0)
    text = out.read()
    assert result.exit_code == 1
    assert result.gave_up == ("the worker pool exited 3 times in a row, each within 60s of "
                              f"starting (last exit code 3); see {run_settings.log_dir}/"
                              "workers.log")
    assert text.count("starting it again") == 2
    assert not embedded.running(run_settings.redis_dir)


def test_a_killed_run_takes_its_worker_pool_with_it(settings, lasting, user_env, tmp_path):
    """SIGKILL of `run` itself (nothing can be done in the process): its pool and enqueue
    processes get SIGTERM from the kernel and stop, instead of working on under PID 1; and
    the pool, finding the embedded Redis gone with `run`, does not start it again."""
    run = Running(user_env, *where(settings, tmp_path / "s"), "--concurrency", "2")
    try:
        run.wait_for("first image stored")
        children = descendants(run.proc.pid)
        run.proc.send_signal(signal.SIGKILL)
        run.finish(10)
        deadline = time.monotonic() + 40
        while alive(children) and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        run.kill()
    assert not alive(children), [cmdline(c) for c in alive(children)]
    assert not embedded.running(tmp_path / "s" / STATE_FOLDER / "redis")


# ---------------------------------------------------------------- nothing waits in silence

def test_a_read_only_store_is_refused_before_anything_starts(settings, small, user_env,
                                                             tmp_path):
    store = tmp_path / "ro"
    if not mount_tmpfs(store, 4):
        pytest.skip("cannot mount a tmpfs here (needs root and mount rights)")
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(store)], check=True)
        result = command(user_env, *where(settings, store, tmp_path / "d"), timeout=60)
    finally:
        subprocess.run(["umount", "-l", str(store)], capture_output=True)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip() == (f"laion-dagster: store_dir {store} is not writable "
                                     "(Read-only file system)")
    assert not (tmp_path / "d" / "redis" / "server.json").exists()  # nothing was started


def test_a_read_only_data_dir_is_refused_with_the_reason(settings, small, user_env, tmp_path):
    data = tmp_path / "ro"
    if not mount_tmpfs(data, 4):
        pytest.skip("cannot mount a tmpfs here (needs root and mount rights)")
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(data)], check=True)
        result = command(user_env, *where(settings, tmp_path / "s", data), timeout=60)
    finally:
        subprocess.run(["umount", "-l", str(data)], capture_output=True)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip() == (f"laion-dagster: {data} is not writable (Read-only file "
                                     "system); give this command a writable --data-dir")


def test_a_store_under_the_free_space_floor_is_refused_at_once(settings, small, user_env,
                                                               tmp_path):
    result = command(user_env, *where(settings, tmp_path / "s", tmp_path / "d"),
                     "--disk-min-free-gb", "1000000", timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"store_dir {tmp_path / 's'}: its disk is full for this run (" in result.stderr
    assert "free ≤ 1,000,000 GB); free some space, or change --disk-min-free-gb" in \
        result.stderr


def test_failing_shards_are_shown_and_a_stuck_run_gives_up_with_the_reason(
        settings, small, user_env, tmp_path):
    """Every shard fails (its folder cannot be made): the progress line says so, and after
    stall_timeout the run ends with exit 1 and that reason, not minutes at 0%."""
    store = tmp_path / "s"
    (store / "laion2B-en").mkdir(parents=True)
    for part in parts.discover(settings.parts_root):
        (store / part.relative_dir).write_text("a file where the part's folder goes")
    result = command(user_env, *where(settings, store, tmp_path / "d"), "--stall-timeout",
                     "12", timeout=120)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "waiting: shards failing on " in out
    assert "gave up: no progress for 12s (stall_timeout): shards failing on " in out
    assert "FileExistsError" in out or "NotADirectoryError" in out


def test_a_host_paused_on_a_full_disk_is_shown_and_ends_a_stuck_run(settings, lasting,
                                                                    user_env, tmp_path):
    store = tmp_path / "small-disk"
    if not mount_tmpfs(store, 64):
        pytest.skip("cannot mount a tmpfs here (needs root and mount rights)")
    try:
        # 64 MB, a 20 MB floor and 43.5 MB of ballast: room to start (~40 images), not to
        # finish. One fetch at a time per process, so a process has a shard or two in flight
        # when the floor is crossed, not the whole dataset (on loopback it takes less than
        # one heartbeat).
        (store / "ballast").write_bytes(b"\0" * (87 * 512 * 1024))
        result = command(user_env, *where(settings, store, tmp_path / "d"),
                         "--disk-min-free-gb", str(20 / 1024), "--stall-timeout", "10",
                         "--concurrency", "1", timeout=120)
    finally:
        subprocess.run(["umount", "-l", str(store)], capture_output=True)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert " MB free ≤ 20 MB" in out  # in the progress line, while it waits
    assert "gave up: no progress for 10s (stall_timeout): host " in out and " paused: " in out


def test_a_url_where_a_local_folder_is_needed_is_refused_not_made_a_local_folder(
        settings, small, user_env, tmp_path):
    """`--store-dir s3://bucket/prefix` once wrote the whole download into a local folder
    named `s3:` and exited 0. The store, inputs and error folder take buckets now
    (tests/scenarios/test_bucket.py); the state and spool folders must be local, and a URL
    given there is refused before anything starts, never made a folder."""
    for flag in ("--data-dir", "--spool-dir"):
        args = {"--parquet-dir": str(settings.parts_root), "--store-dir": str(tmp_path / "s"),
                "--data-dir": str(tmp_path / "d")} | {flag: "s3://bucket/laion"}
        result = command(user_env, "run", *[x for pair in args.items() for x in pair],
                         cwd=tmp_path, timeout=60)
        assert result.returncode == 2, result.stdout + result.stderr
        assert "s3://bucket/laion is a URL; this must be a local folder" in result.stderr
        assert not (tmp_path / "s3:").exists()
        assert not (tmp_path / "s").exists() and not (tmp_path / "d").exists()


def test_a_run_without_parts_starts_nothing_and_says_where_it_looked(settings, user_env,
                                                                    tmp_path):
    result = command(user_env, *where(settings, tmp_path / "s", tmp_path / "d"), timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith(f"laion-dagster: no parts at {settings.parts_root}: it "
                                    "does not exist. Accepted: ")
    assert not embedded.running(tmp_path / "d" / "redis")


# ---------------------------------------------------------------- a user's own data

def test_a_flat_folder_of_tsv_and_jsonl_files_is_downloaded_row_by_row(
        settings, small, user_env, tmp_path):
    """What img2dataset and CC3M users have: a folder of a gzipped TSV and a JSON lines file
    (the demo's parts in other clothes), given as --parquet-dir. Each file is a part named
    after the folder; every row ends as its own server answered; `status` and `errors
    retry`, given only the store, find the inputs the run read."""
    folder = tmp_path / "my-data"
    folder.mkdir()
    sources = parts.discover(settings.parts_root)
    expected = {}
    for part, (name, kind) in zip(sources, (("train.tsv.gz", "tsv"), ("extra.jsonl", "jsonl")),
                                  strict=True):
        rows = pq.read_table(part.path).to_pylist()
        write_as(folder / name, kind, rows)
        expected[name] = [small.expected_by_row[(part.path.name, i)] for i in range(len(rows))]
    store = tmp_path / "store"
    result = command(user_env, "run", "--parquet-dir", str(folder), "--store-dir", str(store))
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "parts: 2 (0 failed)" in out
    # Rows whose first try failed in a way that may pass were tried again; those the server
    # dropped at first (/flaky/) were stored then.
    retried = re.search(r"tried again later: (\d+) rows whose first try failed in a way that "
                        r"may pass; (\d+) of them then succeeded", out)
    flaky = sum("/flaky/" in (row["URL"] or "") for part in sources
                for row in pq.read_table(part.path).to_pylist())
    assert retried and int(retried[1]) > 0 and int(retried[2]) == flaky, out
    for name, key in (("train.tsv.gz", "my-data/train"), ("extra.jsonl", "my-data/extra")):
        shards = sorted((store / key).glob("[0-9]*.parquet"))
        got = pa.concat_tables([pq.read_table(p) for p in shards]).sort_by("row").to_pylist()
        outcomes = ["success" if r["status"] == "success" else r["error_class"] for r in got]
        assert outcomes == expected[name], name
    status = command(user_env, "status", "--store-dir", str(store))
    assert "is not readable from here" not in status.stdout
    assert "dataset: 0 of 120 rows to go" in status.stdout, status.stdout
    assert f"tried again later: {retried[1]} rows, {retried[2]} of them recovered" in \
        status.stdout
    retry = command(user_env, "errors", "retry", "my-data/train", "--store-dir", str(store),
                    "--classes", "http_4xx")
    assert retry.returncode == 0, retry.stderr
    assert "queued again" in retry.stdout


def write_as(path: Path, kind: str, rows: list[dict]) -> None:
    import csv
    import gzip

    if kind == "tsv":
        with gzip.open(path, "wt", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter="\t")
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))


# ---------------------------------------------------------------- what a run reports

def test_keys_are_unique_across_parts_and_every_row_is_in_a_shard_parquet(settings, dataset,
                                                                          user_env, tmp_path):
    """A webdataset made of several parts has no repeated key, and every input row (invalid
    ones included) is in exactly one shard parquet. The Dagster instance beside the store
    records every part (enqueued before Dagster started or not): its enqueue, with as many
    shards as the store has, and its images (a finalize run each), with totals that add up,
    its error file and both asset checks' outcomes."""
    from dagster import AssetCheckKey, AssetKey, AssetRecordsFilter, DagsterInstance

    from laion_dagster.defs.assets import BALANCED, SUCCESS_RATE

    store = tmp_path / "s"
    result = command(user_env, *where(settings, store))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "first image stored" in result.stdout
    keys: list[str] = []
    shards: dict[str, int] = {}
    for part in parts.discover(settings.parts_root):
        check_part(settings.with_overrides(store_dir=store), part, dataset)
        keys += [name.split(".", 1)[0] for name in tar_members(store / part.relative_dir)
                 if name.endswith(".json")]
        shard_parquets = sorted((store / part.relative_dir).glob("[0-9]*.parquet"))
        rows = sum(pq.read_metadata(p).num_rows for p in shard_parquets)
        assert rows == pq.read_metadata(part.path).num_rows
        shards[part.key] = len(shard_parquets)
    assert len(keys) == len(set(keys)) == dataset.outcome_counts()["success"]

    with DagsterInstance.from_config(str(store / STATE_FOLDER / "dagster")) as instance:
        for asset in ("enqueued_part", "part_images"):
            assert instance.get_materialized_partitions(AssetKey(asset)) == set(shards)
        for key, count in shards.items():
            [record] = instance.fetch_materializations(AssetRecordsFilter(
                asset_key=AssetKey("enqueued_part"), asset_partitions=[key]), limit=1).records
            metadata = record.asset_materialization.metadata
            assert metadata["shards"].value == count
            assert metadata["rows"].value == 120
            [record] = instance.fetch_materializations(AssetRecordsFilter(
                asset_key=AssetKey("part_images"), asset_partitions=[key]), limit=1).records
            images = {k: v.value for k, v in record.asset_materialization.metadata.items()}
            assert images["ok"] + images["failed"] + images["invalid_rows"] == 120
            assert images["shards"] == count
            assert Path(images["error_file"]).exists()
        # What the watch_downloads sensor reports under the daemon, `run` reported itself:
        # each part's counts (the last at its end), the worker hosts and the queue.
        for key in shards:
            seen = instance.fetch_observations(AssetRecordsFilter(
                asset_key=AssetKey("enqueued_part"), asset_partitions=[key]), limit=1).records
            assert seen, f"no observation of enqueued_part {key}"
            last = {k: v.value for k, v in seen[0].asset_observation.metadata.items()}
            assert (last["state"], last["rows_done"]) == ("final", 120)
        for asset in ("worker_hosts", "queue"):
            assert instance.fetch_observations(AssetKey(asset), limit=1).records, asset
        for check in (BALANCED, SUCCESS_RATE):
            history = instance.event_log_storage.get_asset_check_execution_history(
                AssetCheckKey(AssetKey("part_images"), check), limit=100)
            assert {instance.get_run_by_id(r.run_id).tags["dagster/partition"]
                    for r in history} == set(shards)
            assert all(r.event.dagster_event.event_specific_data.passed for r in history)


def test_the_progress_rate_is_steady_and_survives_a_new_pool():
    """The rate on the progress line comes from rows fetched over the last 30 s: it does not
    fall to 0 at a minute boundary, and a restarted pool (its counter back at 0) neither
    makes it negative nor loses the rows counted before."""
    from laion_dagster.run import Rate

    rate = Rate(window=30)
    for second in range(0, 61):
        rate.add(float(second), 8 * second)  # 8 rows a second, for a minute
    assert rate.per_second(60.0) == pytest.approx(8)
    rate.add(61.0, 4)  # a new pool: its counter starts again
    rate.add(62.0, 20)
    assert rate.total == 8 * 60 + 4 + 16
    assert 7 < rate.per_second(62.0) < 9


def test_the_progress_bar_counts_rows_fetched_before_their_shard_finishes(settings):
    """A shard is recorded after its slowest row, so on the web a job's shards finish together
    near its end: the bar counts the rows the pool has fetched, and says which of them are in
    finished shards; a resumed job starts from the rows stored before it."""
    import io

    from laion_dagster.core.queue.protocol import PartState
    from laion_dagster.run import RunCommand

    one = RunCommand(settings, out=io.StringIO())
    one.total_rows = 20_000
    states = {f"part-{i}": PartState(partition=f"part-{i}", rows=5_000) for i in range(4)}
    one.rate.add(0.0, 0)
    one.rate.add(5.0, 8_000)
    line = one._progress_line(states, [])
    assert " 40% rows 8,000/20,000 | in finished shards: ok 0 failed 0 invalid 0 |" in line
    states["part-0"].ok, states["part-0"].failed = 4_000, 1_000  # its shards finish
    one.rate.add(10.0, 10_000)
    line = one._progress_line(states, [])
    assert " 50% rows 10,000/20,000 | in finished shards: ok 4,000 failed 1,000 " in line
    one.rate.add(15.0, 26_000)  # rows handed back by a dead process and fetched again
    assert " 100% rows 20,000/20,000 |" in one._progress_line(states, [])

    again = RunCommand(settings, out=io.StringIO())  # the same job, run again later
    again.total_rows = 20_000
    again.rate.add(0.0, 0)
    again.rate.add(5.0, 2_000)
    assert " 35% rows 7,000/20,000 |" in again._progress_line(states, [])


def test_the_progress_rate_is_right_between_heartbeats_and_falls_when_nothing_moves():
    """The pool reports its counter at each heartbeat (every 5 s; the first fetch at once)
    while `run` polls every half second: at every poll the rate is the pool's real one (1,000
    rows a second here), the first line of a job included, not the counter's steps over the
    polls; when the reports stop moving, it falls off."""
    from laion_dagster.run import Rate

    rate = Rate(window=30, quiet=10)
    reported = {0.0: 0, 1.4: 12, 5.0: 3_612, 10.0: 8_612, 15.0: 13_612}
    for tick in range(40):  # polls, half a second apart
        now = tick * 0.5
        rate.add(now, max(value for when, value in reported.items() if when <= now))
        if now >= 5.0:  # (seen up to a poll late: within a few percent)
            assert rate.per_second(now) == pytest.approx(1_000, rel=0.05), now
    assert rate.per_second(40.0) < 500  # 25 s without a step


def test_every_small_part_is_queued_before_dagster_starts(settings, queue, images):
    """A folder of many small parts: `run` queues each of them at once, before Dagster's
    start-up, in order; the policy's limit on enqueues at once counts the ones under way,
    not the ones already queued."""
    from laion_dagster.core.control.policy import ENQUEUES_AT_ONCE
    from laion_dagster.run import RunCommand

    write_dataset(settings.parts_root, ["http://img-a.test/"], subsets=("cc",),
                  parts_per_subset=ENQUEUES_AT_ONCE + 2, rows_per_part=20, images=images)
    found = parts.discover(settings.parts_root)
    command = RunCommand(settings)
    command.rows = {p.key: parts.rows_if_readable(p) for p in found}
    command._enqueue_early(queue, found)
    assert list(command.early) == [p.key for p in found]
    assert all(state.enqueued for state in queue.parts_states(list(command.early)).values())
