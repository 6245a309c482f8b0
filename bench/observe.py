"""What the UI's live view costs (prints figures): the watch_downloads sensor's tick time and
the events it writes, with LAION-5B's 384 parts in a real sqlite Dagster instance and a real
(embedded) Redis, 8 of them downloading.

    python -m bench.observe [--ticks 240] [--downloading 8] [--parts 384] [--hours-per-part 12]

The ticks run back to back on a simulated clock, each `observe_interval` (30 s) after the
last: every downloading part completes the shards its rate gives (a part takes
--hours-per-part), one worker host reports, and the sensor runs as the daemon runs it:
evaluated, then its events written to the instance. Half way, one part finishes and a queued
one starts (the table of every part is written then). A quarter of the parts are final
already: the first tick (a new cursor) reports each once, and is left out of the per-hour
figures. Printed: the tick's time (evaluation, writing), events per tick by asset, events
per downloading part per hour, bytes per event in the instance's databases, and the paper
estimate for a whole LAION-5B download.
"""

import argparse
import json
import socket
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

from dagster import DagsterInstance, build_sensor_context

from laion_dagster.core.control import progress
from laion_dagster.core.control.hosts import HostReport
from laion_dagster.core.queue import embedded
from laion_dagster.core.queue.connection import connect
from laion_dagster.core.queue.protocol import Claim, Outcome, Queue
from laion_dagster.core.settings import Settings
from laion_dagster.dagster_home import ensure_dagster_home
from laion_dagster.defs.partitions import PARTS
from laion_dagster.defs.resources import LaionResource
from laion_dagster.defs.sensors import watch_downloads

SHARD = 10_000  # rows, as LAION's shards
SHARDS = 1_810  # a LAION part's: 18 M rows


def start(queue: Queue, key: str) -> int:
    """A part enqueued whole (its shards' payloads a byte each: only the counts matter)."""
    state = queue.begin(key, recipe="bench", store="/bench", shard_size=SHARD)
    for shard in range(SHARDS):
        queue.enqueue_shard(key, state.generation, shard, SHARD, 0, b"x", b"")
    queue.finish_enqueue(key, state.generation, SHARDS)
    return state.generation


def complete(queue: Queue, key: str, generation: int, shard: int) -> None:
    queue.complete(Claim("0-1", key, str(generation), shard, SHARD, b""),
                   Outcome(ok=7_000, failed=3_000, bytes=7_000 * 12_000,
                           classes={"http_4xx": 1_800, "connection": 700, "dns": 500}))


def size(home: Path) -> int:
    return sum(p.stat().st_size for p in home.rglob("*.db*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ticks", type=int, default=240)
    parser.add_argument("--parts", type=int, default=384)
    parser.add_argument("--downloading", type=int, default=8)
    parser.add_argument("--hours-per-part", type=float, default=12.0,
                        help="for the paper estimate: hours one part takes to download")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="laion-observe-") as tmp:
        settings = Settings(data_dir=Path(tmp) / "data", store_dir=Path(tmp) / "store",
                            parquet_dir=Path(tmp) / "parquet")
        server = embedded.ensure_running(settings.redis_dir)
        try:
            run(args, settings.with_overrides(redis_url=server.url))
        finally:
            embedded.stop(settings.redis_dir)


def run(args: argparse.Namespace, settings: Settings) -> None:
    url = settings.redis_url
    queue = Queue(connect(settings), settings.prefix)
    keys = [f"laion2B-{('en', 'multi', 'nolang')[i % 3]}/{i:05d}" for i in range(args.parts)]
    final = keys[:args.parts // 4]
    downloading = keys[len(final):len(final) + args.downloading]
    waiting = keys[len(final) + args.downloading:]
    for key in final:  # a quarter already downloaded and finalized
        start(queue, key)
        queue.r.hset(queue.keys.part(key), mapping={"shards_done": SHARDS, "ok": 12_000_000,
                                                    "failed": 6_000_000})
        queue.r.hset(queue.keys.part(key), "done_at", time.time())
        queue.mark_finalized(key)
    generations = {key: start(queue, key) for key in downloading}
    done = Counter()

    home = ensure_dagster_home(settings)
    instance = DagsterInstance.from_config(str(home))
    instance.add_dynamic_partitions(PARTS, keys)
    laion = LaionResource(data_dir=str(settings.data_dir), redis_url=url,
                          parquet_dir=str(settings.parquet_dir),
                          store_dir=str(settings.store_dir))
    host = socket.gethostname()
    cursor = None
    evaluate, write, by_asset, events_total = [], [], Counter(), 0
    # The simulated clock, for what the sensor reads of the time (progress.Watch).
    clock = [time.time()]
    progress.time = SimpleNamespace(time=lambda: clock[0], strftime=time.strftime,
                                    gmtime=time.gmtime)
    shards_per_tick = SHARDS / (args.hours_per_part * 3600 / settings.observe_interval)
    owed = Counter()
    before = 0
    for tick in range(args.ticks):
        clock[0] += settings.observe_interval
        if tick == 1:
            before, events_total, by_asset = size(home), 0, Counter()
            evaluate, write = [], []
        for key in list(generations):
            owed[key] += shards_per_tick
            while owed[key] >= 1:
                complete(queue, key, generations[key], done[key])
                done[key] += 1
                owed[key] -= 1
        if tick == args.ticks // 2:  # one part ends, a queued one starts: the table moves
            ended = downloading[0]
            queue.r.hset(queue.keys.part(ended), "done_at", time.time())
            queue.mark_finalized(ended)
            del generations[ended]
            generations[waiting[0]] = start(queue, waiting[0])
        queue.r.hset(queue.keys.hosts, host, HostReport(
            host=host, disk_used_gb=1200.0, disk_free_gb=3800.0 - tick, paused=False,
            pause_reason=None, processes=16, alive_processes=16, rate=1500.0 + tick, ok=0,
            failed=0, bytes=0, seen_at=clock[0],
            waiting=40 + tick % 50).to_json())  # as on LAION: rows always wait for a later try
        context = build_sensor_context(instance=instance, cursor=cursor,
                                       resources={"laion": laion})
        began = time.perf_counter()
        result = watch_downloads(context)
        evaluated = time.perf_counter()
        for event in result.asset_events:
            instance.report_runless_asset_event(event)
        written = time.perf_counter()
        cursor = result.cursor
        evaluate.append(evaluated - began)
        write.append(written - evaluated)
        events_total += len(result.asset_events)
        by_asset.update(e.asset_key.to_user_string() for e in result.asset_events)
    grown = size(home) - before
    instance.dispose()

    ticks = args.ticks - 1  # the first (a new cursor's catch-up) left out
    per_part_tick = by_asset["part_tasks"] / ticks / args.downloading
    per_hour = 3600 / settings.observe_interval
    ticks_pct = sorted(e + w for e, w in zip(evaluate, write, strict=True))
    figures = {
        "parts_in_instance": args.parts, "downloading": args.downloading, "ticks": ticks,
        "simulated_hours": round(ticks * settings.observe_interval / 3600, 2),
        "shards_per_part_per_tick": round(shards_per_tick, 2),
        "tick_s_median": round(statistics.median(ticks_pct), 3),
        "tick_s_max": round(ticks_pct[-1], 3),
        "evaluate_s_median": round(statistics.median(evaluate), 3),
        "write_s_median": round(statistics.median(write), 3),
        "events_per_tick": {k: round(v / ticks, 2) for k, v in sorted(by_asset.items())},
        "events_per_downloading_part_per_hour": round(per_part_tick * per_hour, 1),
        "events_per_hour_hosts_and_queue": round(
            (by_asset["worker_hosts"] + by_asset["queue"]) / ticks * per_hour, 1),
        "bytes_per_event": round(grown / max(events_total, 1)),
    }
    # On paper: every part reported each tick while it downloads, the hosts and the queue each
    # tick for as long as the whole download lasts (parts downloading args.downloading at once).
    part_events = args.parts * args.hours_per_part * figures[
        "events_per_downloading_part_per_hour"]
    hours = args.parts * args.hours_per_part / args.downloading
    asset_events = hours * figures["events_per_hour_hosts_and_queue"]
    figures["laion5b_estimate"] = {
        "hours_per_part": args.hours_per_part,
        "download_hours": round(hours),
        "events": round(part_events + asset_events),
        "gigabytes": round((part_events + asset_events) * figures["bytes_per_event"] / 1e9, 2),
    }
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
