"""Jobs: enqueue a part, finalize a part, and run a local worker pool from the UI."""


import threading
import time

from dagster import AssetSelection, Config, OpExecutionContext, define_asset_job, job, op

from laion_dagster.defs.assets import enqueued_part, part_images
from laion_dagster.defs.resources import LaionResource
from laion_dagster.worker.supervisor import Supervisor

enqueue_job = define_asset_job(
    "enqueue_job", selection=AssetSelection.assets(enqueued_part),
    description="Queue one part's rows (what launch_or_hold launches; backfill it by partition).")

finalize_job = define_asset_job(
    "finalize_job", selection=AssetSelection.assets(part_images),
    description="Write a finished part's error file, totals and checks (what finalize_parts "
                "launches).")


class WorkerPoolConfig(Config):
    processes: int | None = None
    concurrency: int | None = None
    stop_when_idle: bool = True
    idle_seconds: float = 120.0
    max_minutes: float | None = None


@op(description="A worker pool on the machine that runs Dagster, until the queue stays empty.")
def run_worker_pool(context: OpExecutionContext, config: WorkerPoolConfig,
                    laion: LaionResource) -> None:
    settings = laion.settings().with_overrides(processes=config.processes,
                                               concurrency=config.concurrency)
    supervisor = Supervisor(settings)
    started = time.monotonic()
    idle_since: list[float | None] = [None]

    def until() -> bool:
        if config.max_minutes is not None and time.monotonic() - started > config.max_minutes * 60:
            context.log.info("max_minutes reached; stopping the pool")
            return True
        if not config.stop_when_idle:
            return False
        with laion.queue() as queue:
            busy = queue.queued_rows() > 0
        if busy:
            idle_since[0] = None
            return False
        idle_since[0] = idle_since[0] or time.monotonic()
        return time.monotonic() - idle_since[0] >= config.idle_seconds

    context.log.info(f"starting {settings.processes} worker processes × {settings.concurrency} "
                     f"fetches, store {settings.store_root}")
    supervisor.run(until=until, handle_signals=threading.current_thread()
                   is threading.main_thread())
    ok, failed, nbytes = supervisor.totals()
    context.log.info(f"worker pool stopped: {ok:,} ok, {failed:,} failed, {nbytes / 1e6:,.1f} MB, "
                     f"{supervisor.restarts} process restarts")


@job(description="Run a local worker pool (for one machine, from the UI). Workers on other "
                 "hosts run `laion-dagster worker` instead.")
def local_workers() -> None:
    run_worker_pool()
