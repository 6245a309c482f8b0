"""A part's recipe (output format, filters, resizing, overwrite) travels with it to every worker."""

import io
import json
import logging

from dagster import instance_for_test, materialize
from PIL import Image

from laion_dagster.core.control.enqueue import enqueue_part
from laion_dagster.core.input import parts
from laion_dagster.core.queue.connection import connect
from laion_dagster.core.queue.protocol import Queue
from laion_dagster.defs.assets import enqueued_part
from laion_dagster.defs.partitions import PARTS
from laion_dagster.defs.resources import LaionResource
from tests.outputs import all_done, shard_rows, wait_until
from tests.pool import download, start_worker, stop_worker


def test_settings_chosen_in_dagster_reach_a_worker_started_without_them(settings, dataset):
    """An operator picks format and size in the launchpad; workers elsewhere were started with
    the defaults (webdataset, no resize) and must still produce what the operator chose."""
    part = parts.discover(settings.parts_root)[0]
    laion = LaionResource(data_dir=str(settings.data_dir), parquet_dir=str(settings.parts_root),
                          store_dir=str(settings.store_root), redis_url=settings.redis_url,
                          prefix=settings.prefix, shard_size=settings.shard_size,
                          output_format="files", resize_mode="center_crop", image_size=24,
                          encode_format="png", min_image_size=40)
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(PARTS, [part.key])
        assert materialize([enqueued_part], partition_key=part.key, instance=instance,
                           resources={"laion": laion}).success
    assert settings.output_format == "webdataset" and settings.resize_mode == "no"
    queue = Queue(connect(settings), settings.prefix)
    worker = start_worker(settings)
    try:
        wait_until(lambda: all_done(queue, [part.key]), 60, what="part done")
    finally:
        stop_worker(worker)
    part_dir = settings.store_root / part.relative_dir
    assert not list(part_dir.glob("*.tar"))
    rows = shard_rows(part_dir).to_pylist()
    ok = [r for r in rows if r["status"] == "success"]
    assert ok
    for r in ok:
        files = list(part_dir.glob(f"*/{r['key']}.png"))
        assert len(files) == 1, r["key"]
        with Image.open(io.BytesIO(files[0].read_bytes())) as image:
            assert image.size == (24, 24) and image.format == "PNG"
    # The demo's images are 32 to 256 px a side: those under the part's 40 px floor are
    # filtered, not stored.
    assert all(min(r["original_width"], r["original_height"]) >= 40 for r in ok)
    assert any(r["error_class"] == "filtered" for r in rows)


def test_a_part_keeps_its_recipe_until_it_is_reset(settings, dataset, caplog):
    part = parts.discover(settings.parts_root)[0]
    queue = Queue(connect(settings), settings.prefix)
    first = enqueue_part(queue, part, settings.with_overrides(output_format="files"))
    assert first.recipe.output_format == "files"
    with caplog.at_level(logging.WARNING, logger="laion_dagster.enqueue"):
        again = enqueue_part(queue, part, settings.with_overrides(output_format="parquet",
                                                                  image_size=64))
    assert again.recipe == first.recipe and again.shards_added == 0
    assert "output_format='parquet' (part: 'files')" in caplog.text
    queue.reset(part.key)
    fresh = enqueue_part(queue, part, settings.with_overrides(output_format="parquet"))
    assert fresh.recipe.output_format == "parquet" and fresh.generation == first.generation + 1


def test_starting_over_from_dagster_applies_new_settings(settings, dataset):
    part = parts.discover(settings.parts_root)[0]
    common = dict(data_dir=str(settings.data_dir), parquet_dir=str(settings.parts_root),
                  store_dir=str(settings.store_root), redis_url=settings.redis_url,
                  prefix=settings.prefix, shard_size=settings.shard_size)
    queue = Queue(connect(settings), settings.prefix)
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(PARTS, [part.key])
        for config, output_format, generation in (({}, "files", 1), ({}, "files", 1),
                                                  ({"start_over": True}, "parquet", 2)):
            laion = LaionResource(**common, output_format="parquet" if generation == 2 else
                                  "files")
            result = materialize([enqueued_part], partition_key=part.key, instance=instance,
                                 resources={"laion": laion},
                                 run_config={"ops": {"enqueued_part": {"config": config}}})
            assert result.success
            meta = result.asset_materializations_for_node("enqueued_part")[0].metadata
            assert meta["output_format"].value == output_format
            assert meta["generation"].value == generation
    assert queue.part(part.key).generation == 2
    assert queue.queued_rows() == queue.part(part.key).pending  # the old generation's are gone


def test_reset_command_starts_a_part_over(settings, dataset, capsys):
    from laion_dagster.cli import main

    part = parts.discover(settings.parts_root)[0]
    queue = Queue(connect(settings), settings.prefix)
    where = ["--redis-url", settings.redis_url, "--prefix", settings.prefix,
             "--parquet-dir", str(settings.parts_root)]
    assert main(["reset", part.key, *where]) == 2
    assert "never enqueued" in capsys.readouterr().err
    enqueue_part(queue, part, settings)
    assert queue.queued_rows() > 0
    assert main(["reset", part.key, *where]) == 0
    assert "generation 2" in capsys.readouterr().out
    state = queue.part(part.key)
    assert (state.generation, state.enqueued, queue.queued_rows()) == (2, False, 0)


def test_starting_over_redoes_shards_made_with_another_recipe_and_keeps_the_rest(settings,
                                                                                 dataset):
    as_files = download(settings.with_overrides(output_format="files"))
    part, queue, part_dir = as_files.part, as_files.queue, as_files.part_dir
    shards = queue.part(part.key).shards
    assert len([d for d in part_dir.iterdir() if d.is_dir()]) == shards
    first_ok = queue.part(part.key).ok

    queue.reset(part.key)
    as_tar = download(settings, part)  # webdataset: another recipe, so nothing is kept
    assert "complete in the store already" not in as_tar.log
    assert len(list(part_dir.glob("*.tar"))) == shards
    assert not [d for d in part_dir.iterdir() if d.is_dir()]  # no stale folders of the old run
    stats = json.loads(next(part_dir.glob("*_stats.json")).read_text())
    assert stats["recipe"]["output_format"] == "webdataset"

    queue.reset(part.key)
    again = download(settings, part)  # the same recipe: every shard is taken from disk
    assert again.log.count("complete in the store already") == shards
    assert queue.part(part.key).ok == first_ok
