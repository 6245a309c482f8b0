"""What a person sees: a downloaded part's page in the Dagster UI, in a real headless Chromium.

Real data end to end: the part is discovered and enqueued (`part_tasks`) with the commands a
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

from laion_dagster.core import parts
from laion_dagster.core.connection import connect
from laion_dagster.core.embedded import free_port
from laion_dagster.core.queue import Queue
from tests.conftest import worker_env
from tests.outputs import all_done, wait_until
from tests.pool import start_worker, stop_worker

ROOT = Path(__file__).resolve().parents[1]
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
    from playwright.sync_api import expect, sync_playwright

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

    # The data: discover, enqueue (part_tasks), download with a real pool, finalize; two
    # parts, so that the plots across partitions have something to compare.
    found = _run(env, tmp_path, sys.executable, "-m", "laion_dagster.cli", "discover")
    assert f"added  {key}" in found, found
    keys = ",".join(p.key for p in two)
    materialize = (str(BIN / "dagster"), "asset", "materialize", "-m",
                   "laion_dagster.definitions", "--partition")
    for each in two:
        _run(env, tmp_path, *materialize, each.key, "--select", "part_tasks")
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
    numeric = sorted(k for k, v in meta.items() if isinstance(v, int | float))

    # The UI: the webserver alone (no daemon needed), on a free loopback port.
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "webserver.log"
    with log.open("wb") as out:
        webserver = subprocess.Popen(
            [str(BIN / "dagster-webserver"), "-m", "laion_dagster.definitions",
             "-h", "127.0.0.1", "-p", str(port)],
            env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    procs.append(webserver)

    def up() -> bool:
        if webserver.poll() is not None:
            raise AssertionError(f"dagster-webserver exited:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{base}/server_info", timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    wait_until(up, SLOW, interval=0.5, what="dagster-webserver's /server_info")

    requests: list[str] = []
    screenshot = SCREENSHOT if _update_screenshot() else tmp_path / "ui-part-images.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, headless=True,
                                             args=CHROMIUM_ARGS, timeout=SLOW * 1000)
        try:
            context = browser.new_context(viewport={"width": 1440, "height": 1500},
                                          service_workers="block")
            context.on("request", lambda request: requests.append(request.url))
            page = context.new_page()
            page.set_default_timeout(SLOW * 1000)
            expect.set_options(timeout=120_000)

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
        finally:
            browser.close()

    assert screenshot.stat().st_size > 10_000
    assert requests, "the browser made no request at all"
    strays = [url for url in requests if urlsplit(url).scheme not in ("data", "blob")
              and urlsplit(url).netloc != f"127.0.0.1:{port}"]
    assert not strays, f"the page asked for something other than the test's server: {strays}"
