"""Every fixable failure names its fix, and a rerun with the fix does not report the old outcome.

Real `laion-dagster run` and `status` processes on the embedded Redis they start, a real
Dagster instance beside the store, and the loopback image server, which the address guard
refuses unless told otherwise: what a user's own test server, NAS or intranet meets.
"""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster import AssetKey, AssetRecordsFilter, DagsterInstance

from laion_dagster.core.queue import embedded
from laion_dagster.core.settings import STATE_FOLDER
from tests.conftest import shell_env
from tests.test_run import command


@pytest.fixture
def guarded_env(settings):
    """A user's shell: the test hosts on loopback, and private addresses refused, as by
    default."""
    env = shell_env(processes="1", concurrency="8", shutdown_grace="5")
    env["LAION_ALLOW_PRIVATE_ADDRESSES"] = "false"
    yield env
    for server in Path(settings.data_dir.parent).rglob("redis/server.json"):
        embedded.stop(server.parent)


def own_server_part(settings, image_server, images, rows: int = 30) -> Path:
    """A flat folder with one parquet file of URLs on the user's own (loopback) server."""
    folder = settings.parts_root / "intranet"
    folder.mkdir(parents=True)
    urls = [f"{image_server.url('img-a.test')}{images[i % len(images)].path}?n={i}"
            for i in range(rows)]
    pq.write_table(pa.table({"url": urls, "caption": [f"c{i}" for i in range(rows)]}),
                   folder / "photos.parquet")
    return folder


def part_images_metadata(store: Path, partition: str) -> dict:
    """The latest part_images materialization's metadata, from the instance beside the store."""
    with DagsterInstance.from_config(str(store / STATE_FOLDER / "dagster")) as instance:
        [record] = instance.fetch_materializations(AssetRecordsFilter(
            asset_key=AssetKey("part_images"), asset_partitions=[partition]), limit=1).records
        return {k: v.value for k, v in record.asset_materialization.metadata.items()}


def test_private_addresses_name_their_setting_and_a_rerun_with_it_fetches_them(
        settings, image_server, images, guarded_env, tmp_path):
    folder = own_server_part(settings, image_server, images)
    store = tmp_path / "store"
    args = ["run", "--parquet-dir", str(folder), "--store-dir", str(store)]

    first = command(guarded_env, *args)
    out = first.stdout + first.stderr
    assert first.returncode == 0, out
    assert "ok: 0  failed: 30" in out and "blocked_address 30" in out
    assert re.search(r"to fix: blocked_address 30 of 30 failures: .*--allow-private-addresses",
                     out), out
    # Figures of this invocation: no image, so no "first image" and no image rate.
    assert "first image" not in out and "0 images, 0.0 MB" in out and "no image stored" in out
    status = command(guarded_env, "status", "--store-dir", str(store))
    assert status.returncode == 0, status.stderr
    assert "to fix: blocked_address 30 of 30 failures" in status.stdout
    meta = part_images_metadata(store, "intranet/photos")
    assert meta["ok"] == 0 and meta["failed_blocked_address"] == 30
    assert "--allow-private-addresses" in meta["to_fix"]

    # The rerun with the setting says which rows it fetches again, and why; none is final.
    second = command(guarded_env, *args, "--allow-private-addresses")
    out = second.stdout + second.stderr
    assert second.returncode == 0, out
    assert "already final" not in out
    assert ("its failed rows (30 blocked_address) were decided with "
            "allow_private_addresses=False; this run has allow_private_addresses=True: "
            "fetching those 30 rows again") in out, out
    assert "ok: 30  failed: 0" in out and "to fix" not in out
    assert re.search(r"this run: 30 rows downloaded \(30 images, ", out), out
    meta = part_images_metadata(store, "intranet/photos")
    assert (meta["ok"], meta["failed"], meta["to_fix"]) == (30, 0, "")

    # A third run has nothing to do, and says so instead of a rate.
    third = command(guarded_env, *args, "--allow-private-addresses")
    out = third.stdout + third.stderr
    assert third.returncode == 0, out
    assert "this run: nothing to download; its part was final already" in out
    assert "images/s" not in out and "first image" not in out
