"""What a person sees: a downloaded part's page in the Dagster UI, in a real headless Chromium.

Real data end to end: the part is discovered and enqueued (`enqueued_part`) with the commands a
user types, downloaded by a real worker pool, finalized (`part_images`), and then the
partition's page must show the totals, the error-class table, the paths and the two asset
checks. Debian's chromium is driven through Playwright (`executable_path`, no browser of
Playwright's own is ever downloaded), and it can reach nothing but the 127.0.0.1 servers this
test starts: every name except 127.0.0.1 resolves to nothing, and every request is checked.

LAION_UPDATE_SCREENSHOT=1 saves the screenshot to bench/ui-part-images.png (the README's);
otherwise it goes to the test's tmp_path, so the test leaves the work tree clean.
"""

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
from dagster import AssetKey, AssetRecordsFilter, DagsterInstance

from laion_dagster.core.input import parts
from laion_dagster.core.queue.connection import connect
from laion_dagster.core.queue.embedded import free_port
from laion_dagster.core.queue.protocol import Queue
from tests.conftest import worker_env
from tests.outputs import all_done, wait_until
from tests.pool import start_worker, stop_worker

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = ROOT / "bench" / "ui-part-images.png"
PLOTS = ROOT / "bench" / "ui-part-plots.png"
BIN = Path(sys.executable).parent
SLOW = 300  # seconds: the machine may be busy with other test runs

# Nothing but the 127.0.0.1 servers this test starts: no DNS for any other name, no proxy, and
# none of Chromium's own background traffic (updates, sync, translation, metrics, casting).
CHROMIUM_ARGS = [
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--disable-breakpad",
    "--disable-features=Translate,OptimizationHints,MediaRouter,DialMediaRouteProvider,"
    "AutofillServerCommunication,CertificateTransparencyComponentUpdater",
    "--metrics-recording-only",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--no-proxy-server",
    "--disable-dev-shm-usage",
]


def _update_screenshot() -> bool:
    """LAION_UPDATE_SCREENSHOT=1? conftest drops every LAION_* variable from os.environ when it
    is imported (so a developer's settings never leak into a test); this one is not a setting,
    so it is also read from the environment the process started with."""
    if os.environ.get("LAION_UPDATE_SCREENSHOT") == "1":
        return True
    with contextlib.suppress(OSError):
        return b"LAION_UPDATE_SCREENSHOT=1" in Path("/proc/self/environ").read_bytes().split(b"\0")
    return False


def _run(env, cwd, *command: str) -> str:
    result = subprocess.run(list(command), env=env, cwd=cwd, capture_output=True, text=True,
                            timeout=SLOW)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{output[-4000:]}"
    return output


def _stop_group(proc: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left of it.

    The leader is only reaped at the very end: until then its pid (the group's id) cannot be
    reused, so the signals can only reach the processes this test started."""
    def leader_exited() -> bool:
        return proc.returncode is not None or os.waitid(
            os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
        if proc.returncode is not None:
            return  # already reaped by someone else: its group id may no longer be ours
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + wait
        while not leader_exited() and time.monotonic() < deadline:
            time.sleep(0.1)
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers; the group id is still ours
        proc.wait(30)


def _metadata(home: Path, key: str) -> dict:
    """The latest materialization of part_images for partition `key`, read from the instance."""
    instance = DagsterInstance.from_config(str(home))
    try:
        result = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=AssetKey("part_images"), asset_partitions=[key]),
            limit=1)
        assert result.records, f"no materialization of part_images for {key}"
        materialization = result.records[0].asset_materialization
        assert materialization.partition == key
        return {k: v.value for k, v in materialization.metadata.items()}
    finally:
        instance.dispose()


def _shown(value) -> str:
    """A number as the UI prints it (JavaScript's String(): no grouping, 75.0 as 75)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def start_webserver(env, cwd: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """dagster-webserver alone (no daemon needed) on a free loopback port, answering; returns
    it (the caller stops it) and its base URL."""
    port = free_port()
    with log.open("wb") as out:
        webserver = subprocess.Popen(
            [str(BIN / "dagster-webserver"), "-m", "laion_dagster.definitions",
             "-h", "127.0.0.1", "-p", str(port)],
            env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if webserver.poll() is not None:
            raise AssertionError(f"dagster-webserver exited:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{base}/server_info", timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    try:
        wait_until(up, SLOW, interval=0.5, what="dagster-webserver's /server_info")
    except BaseException:
        _stop_group(webserver)
        raise
    return webserver, base


@contextlib.contextmanager
def browse(chromium_path: str, requests: list[str] | None = None):
    """Debian's Chromium, headless and held to CHROMIUM_ARGS, and a page in it (every URL it
    asks for added to `requests`); yields (browser, page)."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, headless=True,
                                             args=CHROMIUM_ARGS, timeout=SLOW * 1000)
        try:
            context = browser.new_context(viewport={"width": 1440, "height": 1500},
                                          service_workers="block")
            if requests is not None:
                context.on("request", lambda request: requests.append(request.url))
            page = context.new_page()
            page.set_default_timeout(SLOW * 1000)
            expect.set_options(timeout=120_000)
            yield browser, page
        finally:
            browser.close()


@pytest.fixture
def chromium_path() -> str:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install -y chromium); the UI test "
                    "drives Debian's Chromium and never downloads a browser")
    pytest.importorskip("playwright.sync_api",
                        reason="Python playwright is not installed (pip install playwright; "
                               "never `playwright install`: the test uses /usr/bin/chromium)")
    return str(CHROMIUM)


@pytest.fixture
def procs():
    """Every process the test starts, stopped (process group and all) whatever happens."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in reversed(started):
        _stop_group(proc)


def test_a_finished_part_shows_its_totals_errors_paths_and_checks_in_the_ui(
        chromium_path, settings, dataset, tmp_path, procs):
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import expect

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    # The instance has "seen" the community sign-up dialog: it would cover the page.
    (home / ".nux").mkdir()
    (home / ".nux" / "nux.yaml").write_text("seen: 1\n")
    env = worker_env(settings)
    env["DAGSTER_HOME"] = str(home)
    two = parts.discover(settings.parts_root)[:2]
    part = two[0]
    key = part.key

    # The data: discover, enqueue (enqueued_part), download with a real pool, finalize; two
    # parts, so that the plots across partitions have something to compare.
    found = _run(env, tmp_path, sys.executable, "-m", "laion_dagster.cli", "discover")
    assert f"added  {key}" in found, found
    keys = ",".join(p.key for p in two)
    materialize = (str(BIN / "dagster"), "asset", "materialize", "-m",
                   "laion_dagster.definitions", "--partition")
    for each in two:
        _run(env, tmp_path, *materialize, each.key, "--select", "enqueued_part")
    client = connect(settings)
    try:
        queue = Queue(client, settings.prefix)
        assert queue.part(key).enqueued
        worker = start_worker(settings)
        procs.append(worker)
        try:
            wait_until(lambda: all_done(queue, [p.key for p in two]), SLOW, interval=0.5,
                       what=f"{keys} downloaded")
        finally:
            with contextlib.suppress(subprocess.TimeoutExpired):
                stop_worker(worker, timeout=60)
    finally:
        client.close()
    for each in reversed(two):
        _run(env, tmp_path, *materialize, each.key, "--select", "part_images")
    meta = _metadata(home, key)
    expected = [c for (name, _), c in dataset.expected_by_row.items() if name == part.path.name]
    assert meta["rows"] == len(expected) == 120
    assert meta["ok"] == expected.count("success") > 0 and meta["failed"] > 0
    failures = {k.removeprefix("failed_"): v for k, v in meta.items()
                if k.startswith("failed_") and v}
    assert len(failures) >= 2
    # Both partitions carry the same metadata keys: what the plots across partitions need.
    assert set(_metadata(home, two[1].key)) == set(meta)
    numeric = sorted(k for k, v in meta.items()
                     if isinstance(v, int | float) and not isinstance(v, bool))

    # The UI: the webserver alone (no daemon needed), on a free loopback port.
    webserver, base = start_webserver(env, tmp_path, tmp_path / "webserver.log")
    procs.append(webserver)
    port = int(base.rsplit(":", 1)[1])

    requests: list[str] = []
    screenshot = SCREENSHOT if _update_screenshot() else tmp_path / "ui-part-images.png"
    with browse(chromium_path, requests) as (browser, page):
        page.goto(f"{base}/assets/part_images?view=partitions&partition={quote(key)}",
                  wait_until="domcontentloaded")

        def row(name: str):
            """The metadata table's row for `name`: its value is the second cell."""
            label = page.locator("td", has_text=re.compile(rf"^\s*{re.escape(name)}\s*$"))
            return page.locator("tr").filter(has=label).first.locator("td").nth(1)

        # The partition's own panel (the list beside it shows the key truncated).
        expect(page.get_by_text(key, exact=True).filter(visible=True).first).to_be_visible()
        for name in ("rows", "ok", "failed", "invalid_rows", "success_rate",
                     "images_per_second", "shards"):
            expect(row(name)).to_have_text(_shown(meta[name]))
        expect(row("size")).to_have_text(meta["size"])  # "1.2 MB", not a byte count
        expect(row("part_file")).to_contain_text(part.path.name)
        expect(row("output_dir")).to_contain_text(
            str(settings.store_root / part.relative_dir))
        expect(row("error_file")).to_contain_text(
            str(settings.errors_root / f"{key}.parquet"))
        # The error classes, rendered from markdown as a table of their own.
        table = row("error_classes").locator("table")
        expect(table).to_be_visible()
        expect(table.locator("th")).to_have_text(["error class", "rows", "share of failures"])
        shown = {cells[0]: cells[1:] for cells in (
            [cell.strip() for cell in tr.locator("td").all_inner_texts()]
            for tr in table.locator("tbody tr").all())}
        total = meta["failed"] + meta["invalid_rows"]
        assert shown == {name: [f"{count:,}", f"{count / total:.1%}"]
                         for name, count in failures.items()}
        page.wait_for_load_state("networkidle")
        page.screenshot(path=str(screenshot), full_page=True)

        # The asset checks: both ran on this materialization and passed.
        page.get_by_role("tab", name="Checks").click()
        for check in ("rows_accounted_for", "success_rate_floor"):
            expect(page.get_by_text(check, exact=True).first).to_be_visible()
        expect(page.get_by_text("Succeeded", exact=True)).to_have_count(2)
        expect(page.get_by_text("Passed", exact=True).first).to_be_visible()
        page.get_by_text("success_rate_floor", exact=True).first.click()
        expect(page.get_by_text("Passed", exact=True).first).to_be_visible()
        expect(page.get_by_text("floor", exact=True).first).to_be_visible()
        page.screenshot(path=str(tmp_path / "ui-part-images-checks.png"))

        # The plots across partitions: they load, and every numeric key has its chart.
        page.goto(f"{base}/assets/part_images", wait_until="domcontentloaded")
        page.get_by_role("button", name="Plots").first.click()
        expect(page.get_by_text("Loading plots…")).to_have_count(0, timeout=60_000)
        for name in numeric:
            expect(page.get_by_text(name, exact=True).first).to_be_visible()
        page.wait_for_load_state("networkidle")
        plots = PLOTS if _update_screenshot() else tmp_path / "ui-part-plots.png"
        page.screenshot(path=str(plots))

        # The resolver rule is in force: even our own server by another name is out of
        # reach (had the rule failed, that name could only lead back to this server).
        probe = browser.new_page()
        with pytest.raises(PlaywrightError, match="ERR_NAME_NOT_RESOLVED"):
            probe.goto(f"http://localhost:{port}/server_info", timeout=60_000)

    assert screenshot.stat().st_size > 10_000
    assert requests, "the browser made no request at all"
    strays = [url for url in requests if urlsplit(url).scheme not in ("data", "blob")
              and urlsplit(url).netloc != f"127.0.0.1:{port}"]
    assert not strays, f"the page asked for something other than the test's server: {strays}"


LIVE_PART = ROOT / "docs" / "ui-live-part.png"
LIVE_HOSTS = ROOT / "docs" / "ui-worker-hosts.png"
LIVE_QUEUE = ROOT / "docs" / "ui-queue.png"


def test_a_downloading_part_its_hosts_and_the_queue_are_live_in_the_ui(
        chromium_path, settings, image_server, images, tmp_path, procs):
    """`laion-dagster run` from a deliberately slow server (one second an image), its store on
    a small disk of its own, the UI open beside it: the part's page shows its counts grow,
    then, with the disk filled past the floor, the part paused and why; the worker host and the
    queue assets show their numbers. The run then resumes and ends, its part final."""
    from playwright.sync_api import expect

    from laion_dagster.demo.dataset import write_dataset
    from tests.conftest import TEST_HOSTS, mount_tmpfs, shell_env

    image_server.delay = 1.0
    write_dataset(settings.parts_root, [image_server.url(h) for h in TEST_HOSTS],
                  subsets=("laion2B-en",), rows_per_part=120, images=images, seed=5)
    keys = [p.key for p in parts.discover(settings.parts_root)]
    key = keys[0]
    store = tmp_path / "small-disk"
    if not mount_tmpfs(store, 64):
        pytest.skip("cannot mount a tmpfs here (needs root and mount rights)")
    procs_before_umount: list[subprocess.Popen] = []
    try:
        home = tmp_path / "dagster_home"
        home.mkdir()
        shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
        (home / ".nux").mkdir()
        (home / ".nux" / "nux.yaml").write_text("seen: 1\n")
        DagsterInstance.from_config(str(home)).dispose()  # an instance already in use
        env = shell_env(processes="1", concurrency="2", shard_size="10", observe_interval="5",
                        disk_min_free_gb=str(20 / 1024)) | {"DAGSTER_HOME": str(home)}
        webserver, base = start_webserver(env, tmp_path, tmp_path / "webserver.log")
        procs.append(webserver)
        run_log = tmp_path / "run.log"
        with run_log.open("wb") as out:
            run = subprocess.Popen(
                [sys.executable, "-m", "laion_dagster.cli", "run", "--parquet-dir",
                 str(settings.parts_root), "--store-dir", str(store), "--data-dir",
                 str(tmp_path / "data")],
                env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        procs_before_umount.append(run)

        shots = {path: path if _update_screenshot() else tmp_path / path.name
                 for path in (LIVE_PART, LIVE_HOSTS, LIVE_QUEUE)}
        with browse(chromium_path) as (_, page):
            def row(name: str):
                label = page.locator("td", has_text=re.compile(
                    rf"^\s*{re.escape(name)}\s*$"))
                return page.locator("tr").filter(has=label).first.locator("td").nth(1)

            def latest(name: str):
                """`name` in an asset's metadata (key, timestamp, value)."""
                label = page.locator("td", has_text=re.compile(
                    rf"^\s*{re.escape(name)}\s*$"))
                return page.locator("tr").filter(has=label).first.locator("td").nth(2)

            def figure(name: str) -> str:
                """`name` on the part's partition page, opened afresh (as a user does)."""
                assert run.poll() is None, run_log.read_text()[-4000:]
                page.goto(f"{base}/assets/enqueued_part?view=partitions&partition="
                          f"{quote(key)}", wait_until="domcontentloaded")
                expect(page.get_by_text(key, exact=True).filter(visible=True).first
                       ).to_be_visible()
                try:
                    expect(row("rows_done")).to_be_visible(timeout=15_000)
                except AssertionError:
                    return ""  # not observed yet
                return row(name).inner_text().strip()

            def done_rows() -> int:
                return int(figure("rows_done") or 0)

            # The counts grow, read from the page twice.
            first = wait_until(done_rows, SLOW, interval=1, what="rows done on the page")
            assert 0 < first < 120, first
            second = wait_until(lambda: (n := done_rows()) > first and n, SLOW, interval=1,
                                what=f"rows done beyond {first} on the page")
            assert row("rows").inner_text().strip() == "120"
            assert row("state").inner_text().strip() == "downloading"
            for name in ("ok", "failed", "size_mb", "images_per_second", "eta_s",
                         "shards", "shards_done"):
                expect(row(name)).to_have_text(re.compile(r"^\s*\d[\d.]*\s*$"))

            # The disk filled past the floor: the host pauses, the part says so and why.
            free = shutil.disk_usage(store).free
            with open(store / "ballast", "wb") as handle:
                handle.truncate(0)
                handle.write(b"\0" * max(free - 10 * 2**20, 0))
            wait_until(lambda: figure("state") == "paused", SLOW, interval=1,
                       what="the part shown paused")
            expect(row("why")).to_contain_text(" paused: ")
            expect(row("why")).to_contain_text("MB free")
            assert int(row("rows_done").inner_text()) >= second
            page.wait_for_load_state("networkidle")
            page.screenshot(path=str(shots[LIVE_PART]), full_page=True)

            # The worker host and the queue, with their numbers.
            page.goto(f"{base}/assets/worker_hosts", wait_until="domcontentloaded")
            expect(latest("hosts")).to_have_text("1")
            expect(latest("hosts_paused")).to_have_text("1")
            expect(latest("processes")).to_have_text("1")
            expect(latest("disk_free_gb_min")).to_have_text(re.compile(r"^\s*0\.0\d+\s*$"))
            hosts = latest("table")
            expect(hosts).to_contain_text("paused")
            expect(hosts).to_contain_text("MB free")
            page.wait_for_load_state("networkidle")
            page.screenshot(path=str(shots[LIVE_HOSTS]), full_page=True)

            page.goto(f"{base}/assets/queue", wait_until="domcontentloaded")
            expect(latest("queue_threshold")).to_have_text(_shown(settings.queue_threshold))
            expect(latest("queue_high_watermark")).to_have_text(
                _shown(settings.queue_high_watermark))
            expect(latest("queued_rows")).to_have_text(re.compile(r"^\s*\d+\s*$"))
            expect(latest("parts_paused")).to_have_text(re.compile(r"^\s*[12]\s*$"))
            table = latest("parts")
            for each in keys:
                expect(table).to_contain_text(each)
            expect(table).to_contain_text("paused")
            page.wait_for_load_state("networkidle")
            page.screenshot(path=str(shots[LIVE_QUEUE]), full_page=True)

            # Room again: the download resumes and ends; the part's last report is final.
            (store / "ballast").unlink()
            assert run.wait(SLOW) == 0, run_log.read_text()[-4000:]
            page.goto(f"{base}/assets/enqueued_part?view=partitions&partition={quote(key)}",
                      wait_until="domcontentloaded")
            expect(row("state")).to_have_text("final")
            expect(row("rows_done")).to_have_text("120")
    finally:
        for proc in procs_before_umount:
            _stop_group(proc)
        subprocess.run(["umount", "-l", str(store)], capture_output=True)
    for shot in shots.values():
        assert shot.stat().st_size > 10_000
