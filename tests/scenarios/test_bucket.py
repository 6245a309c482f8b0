"""A download into an S3 bucket (and from one), against a real S3 API server on loopback.

Every row's outcome is checked in the bucket as on disk: the bucket is mirrored to a local
folder the way `aws s3 sync` would, and read by the same checks as a local store.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster import instance_for_test, materialize

from laion_dagster.core.control.enqueue import enqueue_part
from laion_dagster.core.input import parts
from laion_dagster.core.settings import Settings
from laion_dagster.core.shards.files import leftovers
from laion_dagster.core.storage import BucketPath
from laion_dagster.defs.assets import enqueued_part, part_images
from laion_dagster.defs.partitions import PARTS
from laion_dagster.defs.resources import LaionResource
from laion_dagster.demo.dataset import served_path, write_dataset
from laion_dagster.demo.server import ImageServer
from tests.conftest import TEST_HOSTS, shell_env
from tests.outputs import all_done, check_part, shard_rows, tar_members, wait_until
from tests.pool import start_worker, stop_worker
from tests.s3 import AWS_ENV, HoldingProxy, s3_env
from tests.test_run import Running, alive, command, descendants


@pytest.fixture
def small(settings, image_server, images):
    return write_dataset(settings.parts_root, [image_server.url(h) for h in TEST_HOSTS],
                         subsets=("laion2B-en",), rows_per_part=60, images=images, seed=5)


@pytest.fixture
def env(s3):
    """A user's shell with the AWS SDK's own variables for a MinIO-like server: no flag."""
    return {**shell_env(concurrency="16", shutdown_grace="5"), **s3_env(s3)}


def mirrored(s3, settings, bucket: str, prefix: str, tmp_path) -> Settings:
    """The settings' view of a local copy of the bucket's store."""
    local = s3.mirror(bucket, prefix, tmp_path / f"mirror-{len(list(tmp_path.iterdir()))}")
    return settings.with_overrides(store_dir=local)


def shard_objects(s3, bucket: str) -> dict[str, int]:
    return {k: v for k, v in s3.keys(bucket).items() if "/_errors/" not in k
            and not k.endswith("/")}


def test_a_run_into_a_bucket_writes_every_shard_whole_and_leaves_nothing_behind(
        settings, small, s3, env, tmp_path):
    bucket = s3.bucket()
    data = tmp_path / "data"
    result = command(env, "run", "--parquet-dir", str(settings.parts_root), "--store-dir",
                     f"s3://{bucket}/laion", "--data-dir", str(data))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"images: s3://{bucket}/laion" in result.stdout
    local = mirrored(s3, settings, bucket, "laion", tmp_path)
    for part in parts.discover(settings.parts_root):
        check_part(local, part, small)
    objects = shard_objects(s3, bucket)
    # Every shard is its three objects, the stats last written and present for each.
    tars = sorted(k for k in objects if k.endswith(".tar"))
    assert tars and all(k.replace(".tar", "_stats.json") in objects for k in tars)
    assert not [k for k in s3.keys(bucket) if ".tmp-" in k or ".old-" in k]
    assert not s3.pending_uploads(bucket)
    # Built in the spool, uploaded, and gone from it.
    spool = data / "spool"
    assert spool.is_dir() and not [p for p in spool.rglob("*") if p.is_file()]
    # The part's error file is in the bucket, beside the shards, as on disk.
    errors = pq.read_table(local.errors_root / "laion2B-en" / "00000.parquet")
    assert errors.num_rows == sum(1 for (name, _), outcome in small.expected_by_row.items()
                                  if "part-00000" in name and outcome != "success")

    # A second run finds both parts final in the bucket and downloads nothing.
    again = command(env, "run", "--parquet-dir", str(settings.parts_root), "--store-dir",
                    f"s3://{bucket}/laion", "--data-dir", str(data))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "2 parts already final" in again.stdout, again.stdout
    assert shard_objects(s3, bucket) == objects


def test_a_part_started_over_takes_its_complete_shards_from_the_bucket(
        settings, small, s3, env, image_server, tmp_path):
    """Incremental mode in a bucket: a reset part's shards that are complete (same file, same
    recipe) are reported from the bucket, not downloaded again; one whose objects were
    deleted is downloaded again."""
    bucket = s3.bucket()
    where = ["--parquet-dir", str(settings.parts_root), "--store-dir", f"s3://{bucket}/i",
             "--data-dir", str(tmp_path / "data")]
    assert command(env, "run", *where).returncode == 0
    key = "laion2B-en/00000"
    s3.client.delete_object(Bucket=bucket, Key=f"i/{key}/00001_stats.json")
    asked = sum(image_server.requests.values())
    reset = command(env, "reset", key, *where)
    assert reset.returncode == 0, reset.stderr
    again = command(env, "run", *where)
    assert again.returncode == 0, again.stdout + again.stderr
    local = mirrored(s3, settings, bucket, "i", tmp_path)
    for part in parts.discover(settings.parts_root):
        check_part(local, part, small)
    # Only the deleted shard's rows were asked for again (a row at most twice: its try and
    # its later try); the complete shard, twice its size, was not.
    again_asked = sum(image_server.requests.values()) - asked
    shard = pq.read_table(local.store_root / key / "00001.parquet")
    fetched = sum(1 for url in shard.column("url").to_pylist() if url and "://" in url)
    assert 0 < again_asked <= 2 * fetched, (again_asked, fetched)


def test_a_worker_killed_mid_upload_leaves_no_partial_shard_and_a_resume_finishes(
        settings, small, s3, env, tmp_path):
    """The tar uploads are held in a proxy, the whole run is killed (SIGKILL) while they hang,
    and a new run with the real endpoint picks up: no object a reader could take for a shard
    was ever visible, and every row ends up in the bucket once."""
    bucket = s3.bucket()
    proxy = HoldingProxy(s3, hold=lambda method, path: method == "PUT" and ".tar" in path)
    data = tmp_path / "data"
    where = ["--parquet-dir", str(settings.parts_root), "--store-dir", f"s3://{bucket}/x",
             "--data-dir", str(data)]
    try:
        # The endpoint as a setting, which wins over AWS_ENDPOINT_URL.
        run = Running(env, "run", *where, "--s3-endpoint-url", proxy.url)
        try:
            assert proxy.held.wait(120), run.output
            family = [psutil.Process(run.proc.pid), *descendants(run.proc.pid)]
            for process in family:
                os.kill(process.pid, signal.SIGKILL)
            wait_until(lambda: not alive(family), 30, what="the run and its workers to die")
        finally:
            run.kill()
            run.finish(30)
        visible = shard_objects(s3, bucket)
        assert not [k for k in visible if k.endswith(".tar")], visible
        assert not [k for k in visible if k.endswith("_stats.json")], visible
        spool = data / "spool"
        assert leftovers(spool), "the killed workers' spool files should still be there"
    finally:
        proxy.close()

    resumed = command(env, "run", *where)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    local = mirrored(s3, settings, bucket, "x", tmp_path)
    for part in parts.discover(settings.parts_root):
        check_part(local, part, small)
    assert not leftovers(spool)  # the new pool removed what the killed one left
    assert not [k for k in s3.keys(bucket) if ".tmp-" in k]


def test_parts_are_read_from_a_bucket_as_from_a_folder(settings, small, s3, env, tmp_path):
    """Parquet parts, and a gzipped TSV beside them, listed and read from the bucket;
    the fingerprint of each part is taken from the bucket too (a second run: final)."""
    bucket = s3.bucket()
    tsv_rows = [(f"{small.parts[0].name}", row) for row in range(5)]
    table = pq.read_table(small.parts[0])
    tsv = settings.parts_root / "laion2B-en" / "extra.tsv.gz"
    with gzip.open(tsv, "wt") as handle:
        handle.write("url\tcaption\n")
        for _, row in tsv_rows:
            handle.write(f"{table.column('URL')[row]}\tcaption {row}\n")
    s3.upload_tree(settings.parts_root, bucket, "in")
    where = ["--parquet-dir", f"s3://{bucket}/in", "--store-dir", f"s3://{bucket}/out",
             "--data-dir", str(tmp_path / "data")]
    listed = command(env, "discover", *where[:2])
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert "laion2B-en/00000" in listed.stdout and "laion2B-en/extra" in listed.stdout
    result = command(env, "run", *where)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "parts: 3 (0 failed)" in result.stdout, result.stdout
    local = mirrored(s3, settings, bucket, "out", tmp_path)
    for part in parts.discover(settings.parts_root):
        if part.name != "extra":
            check_part(local, part, small)
    extra = pq.read_table(local.store_root / "laion2B-en" / "extra" / "00000.parquet")
    assert extra.column("url").to_pylist() == [table.column("URL")[r].as_py()
                                               for _, r in tsv_rows]
    expected = [small.expected_by_row[(small.parts[0].name, r)] for _, r in tsv_rows]
    got = [s if s == "success" else c for s, c in zip(extra.column("status").to_pylist(),
                                                       extra.column("error_class").to_pylist(),
                                                       strict=True)]
    assert got == expected
    again = command(env, "run", *where)
    assert again.returncode == 0 and "3 parts already final" in again.stdout, again.stdout
    # `status` reads the rows of the dataset from the parts' footers in the bucket.
    shown = command(env, "status", "--json", *where)
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    assert status["dataset_rows"] == 60 + 60 + len(tsv_rows)
    assert sorted((p["partition"], p["state"]) for p in status["parts"]) == [
        ("laion2B-en/00000", "final"), ("laion2B-en/00001", "final"),
        ("laion2B-en/extra", "final")]


def test_errors_export_and_retry_with_a_bucket_store(settings, s3, env, images, tmp_path):
    """The CLI's error commands read the error file from the bucket, and a retry merges the
    new outcomes into the part's shard objects, carrying its other images over."""
    with ImageServer({image.path: image for image in images[:20]}) as server:
        base = server.url("img-a.test")
        late = images[20:30]  # 404 at first
        urls = ([base + i.path for i in images[:20]] + [base + i.path for i in late]
                + [f"{base}/status/503/{n}.jpg" for n in range(5)] + [None])
        folder = settings.parts_root / "laion2B-en"
        folder.mkdir(parents=True)
        pq.write_table(pa.table({"URL": urls, "TEXT": [f"c{n}" for n in range(len(urls))]}),
                       folder / "part-00000-r-c000.snappy.parquet")
        bucket = s3.bucket()
        where = ["--parquet-dir", str(settings.parts_root), "--store-dir", f"s3://{bucket}/s",
                 "--data-dir", str(tmp_path / "data")]
        first = command(env, "run", *where)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "ok: 20  failed: 15  invalid (no usable URL): 1" in first.stdout, first.stdout

        # The endpoint as a flag this time, as after a run given --s3-endpoint-url.
        bare = {k: v for k, v in env.items() if k != "AWS_ENDPOINT_URL"}
        exported = command(bare, "errors", "export", "laion2B-en/00000", *where,
                           "--out", str(tmp_path / "out"), "--s3-endpoint-url", s3.url)
        assert exported.returncode == 0, exported.stderr
        assert exported.stdout.startswith("16 failed rows of laion2B-en/00000")
        lines = (tmp_path / "out" / "laion2B-en_00000.errors.jsonl").read_text().splitlines()
        assert sorted(json.loads(line)["error_class"] for line in lines) == \
            ["http_4xx"] * 10 + ["http_5xx"] * 5 + ["invalid_url"]

        server.images.update({i.path: i for i in late})
        retried = command(env, "errors", "retry", "laion2B-en/00000", *where,
                          "--classes", "http_4xx")
        assert retried.returncode == 0, retried.stderr
        assert "10 rows (http_4xx 10) queued again" in retried.stdout
        second = command(env, "run", *where)
        assert second.returncode == 0, second.stdout + second.stderr

    local = mirrored(s3, settings, bucket, "s", tmp_path)
    part_dir = local.store_root / "laion2B-en" / "00000"
    assert sorted(p.name for p in part_dir.iterdir()) == ["00000.parquet", "00000.tar",
                                                          "00000_stats.json"]
    shard = pq.read_table(part_dir / "00000.parquet")
    assert shard.column("row").to_pylist() == list(range(len(urls)))
    members = tar_members(part_dir)
    assert len(members) == 3 * 30
    for record in shard.to_pylist()[:30]:
        image = (images[:20] + late)[record["row"]]
        assert members[f"{record['key']}.{record['format']}"] == image.body
    stats = json.loads((part_dir / "00000_stats.json").read_text())
    assert (stats["count"], stats["successes"]) == (36, 30)
    errors = pq.read_table(local.errors_root / "laion2B-en" / "00000.parquet")
    assert sorted(errors.column("error_class").to_pylist()) == ["http_5xx"] * 5 + \
        ["invalid_url"]


def test_the_demo_downloads_into_a_bucket(s3, env, tmp_path):
    bucket = s3.bucket()
    result = subprocess.run(
        [sys.executable, "-m", "laion_dagster.cli", "demo", "--rows-per-part", "200",
         "--store-dir", f"s3://{bucket}/demo", "--data-dir", str(tmp_path / "d")],
        env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"images: s3://{bucket}/demo" in result.stdout
    shards = [k for k in s3.keys(bucket, "demo/") if k.endswith("_stats.json")]
    stats = [json.loads(s3.client.get_object(Bucket=bucket, Key=k)["Body"].read())
             for k in shards]
    rows = sum(s["count"] for s in stats)
    assert rows == 4 * 200, result.stdout
    ok = sum(s["successes"] for s in stats)
    assert f"ok: {ok:,}" in result.stdout, result.stdout


@pytest.mark.parametrize("store", ["hdfs://namenode/x", "ftp://host/x", "s3://UPPER/x",
                                   "s3:/bucket/x"])
def test_a_store_url_we_cannot_write_is_refused_before_anything_starts(settings, small, env,
                                                                       store, tmp_path):
    result = command(env, "run", "--parquet-dir", str(settings.parts_root), "--store-dir",
                     store, "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert store in result.stderr
    assert not (tmp_path / "d").exists() or not list((tmp_path / "d").rglob("*.tar"))
    assert not any(p.name.endswith(":") for p in tmp_path.rglob("*"))


def test_a_bucket_that_does_not_exist_is_refused_with_the_reason(settings, small, env, s3,
                                                                 tmp_path):
    result = command(env, "run", "--parquet-dir", str(settings.parts_root), "--store-dir",
                     "s3://no-such-bucket-here/x", "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "store_dir s3://no-such-bucket-here/x is not writable" in result.stderr


def test_an_upload_killed_half_way_leaves_no_object(s3, tmp_path):
    """A multipart upload (a shard over pyarrow's part size) cut off by a kill: the object
    never appears; the upload stays pending until aborted (a lifecycle rule, see README)."""
    bucket = s3.bucket()
    big = tmp_path / "big.tar"
    big.write_bytes(os.urandom(24 << 20))
    proxy = HoldingProxy(s3, hold=lambda method, path: "partNumber=3" in path)
    script = ("import sys; from pathlib import Path;"
              "from laion_dagster.core.storage import BucketPath, ObjectStore;"
              "BucketPath(sys.argv[1], ObjectStore(sys.argv[2])).upload(Path(sys.argv[3]))")
    try:
        uploader = subprocess.Popen([sys.executable, "-c", script, f"s3://{bucket}/a/big.tar",
                                     proxy.url, str(big)], env={**os.environ, **AWS_ENV})
        assert proxy.held.wait(60)
        uploader.kill()
        uploader.wait(10)
    finally:
        proxy.close()
    assert "a/big.tar" not in s3.keys(bucket)
    assert s3.pending_uploads(bucket) == ["a/big.tar"]
    # The same upload, whole, appears whole.
    where = BucketPath(f"s3://{bucket}/a/big.tar")
    where.upload(big)
    assert s3.keys(bucket)["a/big.tar"] == big.stat().st_size
    assert where.read_bytes() == big.read_bytes()


def test_dagster_materializes_a_part_into_a_bucket_with_the_same_metadata(settings, small, s3,
                                                                           queue):
    """From Dagster: the part is enqueued, a worker host writes it into the bucket, and
    part_images reports it as for a local store, its error file read back from the bucket.
    The host's disk report is its spool's disk."""
    bucket = s3.bucket()
    store = f"s3://{bucket}/d"
    in_bucket = settings.with_overrides(store_dir=store)
    laion = LaionResource(data_dir=str(settings.data_dir), parquet_dir=str(settings.parts_root),
                          store_dir=store, redis_url=settings.redis_url,
                          prefix=settings.prefix, shard_size=settings.shard_size)
    key = parts.discover(settings.parts_root)[0].key
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(PARTS, [key])
        assert materialize([enqueued_part], partition_key=key, instance=instance,
                           resources={"laion": laion}).success
        worker = start_worker(in_bucket)
        try:
            wait_until(lambda: all_done(queue, [key]), 60, what="the part")
            hosts = queue.hosts()
        finally:
            stop_worker(worker)
        result = materialize([part_images], partition_key=key, instance=instance,
                             resources={"laion": laion})
        assert result.success
        meta = result.asset_materializations_for_node("part_images")[0].metadata
    assert meta["output_dir"].value == f"{store}/{key}"
    assert meta["error_file"].value == f"{store}/_errors/{key}.parquet"
    errors = pq.read_table(BucketPath(meta["error_file"].value).open_input())
    assert errors.num_rows == meta["failed"].value + meta["invalid_rows"].value > 0
    assert meta["ok"].value == sum(
        1 for (name, _), outcome in small.expected_by_row.items()
        if name == small.parts[0].name and outcome == "success")
    spool_disk = psutil.disk_usage(str(in_bucket.spool_root))
    report = next(iter(hosts.values()))
    assert abs(report["disk_free_gb"] * 1024**3 - spool_disk.free) < 2 * 1024**3


def test_a_bucket_outage_hands_shards_back_and_loses_no_row(settings, small, s3, queue):
    """Every shard upload fails (503) for a while: the worker hands its shards back without
    using up their deliveries, says why in its host report, and finishes once the bucket
    answers again; no row is dead-lettered."""
    bucket = s3.bucket()
    proxy = HoldingProxy(s3, fail=lambda method, path: method == "PUT" and ".tar" in path)
    proxy.failing.set()
    in_bucket = settings.with_overrides(store_dir=f"s3://{bucket}/o", s3_endpoint_url=proxy.url,
                                        max_deliveries=1)
    keys = [part.key for part in parts.discover(settings.parts_root)]
    for part in parts.discover(settings.parts_root):
        enqueue_part(queue, part, in_bucket)
    worker = start_worker(in_bucket)
    try:
        def reported() -> bool:
            return any("cannot write to the store" in " ".join(r.get("problems") or [])
                       for r in queue.hosts().values())
        wait_until(reported, 120, what="the host to report the outage")
        assert proxy.failed > 0 and not any(queue.part(k).done for k in keys)
        proxy.failing.clear()
        wait_until(lambda: all_done(queue, keys), 120, what="the parts after the outage")
    finally:
        log = stop_worker(worker)
        proxy.close()
    assert queue.dead_letters() == 0, log
    local = s3.mirror(bucket, "o", settings.data_dir.parent / "mirror")
    for part in parts.discover(settings.parts_root):
        check_part(settings.with_overrides(store_dir=local), part, small)


@pytest.mark.parametrize("output_format", ["files", "parquet"])
def test_files_and_parquet_shards_go_to_the_bucket_whole(settings, small, s3, env, tmp_path,
                                                         output_format):
    bucket = s3.bucket()
    result = command(env, "run", "--parquet-dir", str(settings.parts_root), "--store-dir",
                     f"s3://{bucket}/f", "--data-dir", str(tmp_path / "data"),
                     "--output-format", output_format)
    assert result.returncode == 0, result.stdout + result.stderr
    local = mirrored(s3, settings, bucket, "f", tmp_path)
    for part in parts.discover(settings.parts_root):
        part_dir = local.store_root / part.relative_dir
        rows = shard_rows(part_dir)
        assert sorted(rows.column("row").to_pylist()) == list(range(60))
        for record in rows.to_pylist():
            expected = small.expected_by_row[(part.path.name, record["row"])]
            got = "success" if record["status"] == "success" else record["error_class"]
            assert got == expected
            if got != "success":
                continue
            if output_format == "files":
                [found] = part_dir.glob(f"*/{record['key']}.{record['format']}")
                body = found.read_bytes()
            else:
                body = record["image"]
            assert body == small.images[served_path(record["url"])].body
