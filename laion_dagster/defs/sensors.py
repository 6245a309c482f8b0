"""Sensors: find parts, launch or hold their enqueue, and finalize finished parts.

All three are on by default, so `dagster dev` or the daemon runs a whole folder unattended.
Every skip says why in a sentence with the numbers in it.
"""

import os
import socket

import psutil
from dagster import (
    DagsterInstance,
    DagsterRunStatus,
    DefaultSensorStatus,
    RunRequest,
    RunsFilter,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from laion_dagster.core.control.policy import next_enqueues, to_finalize
from laion_dagster.core.control.progress import Watch
from laion_dagster.core.control.status import plural
from laion_dagster.core.input import parts
from laion_dagster.core.queue.connection import RedisUnavailable
from laion_dagster.core.queue.embedded import EmbeddedServerError
from laion_dagster.core.queue.protocol import PartState
from laion_dagster.core.settings import Settings
from laion_dagster.defs.assets import enqueued_part
from laion_dagster.defs.jobs import enqueue_job, finalize_job
from laion_dagster.defs.observations import events
from laion_dagster.defs.partitions import PARTS, parts_partitions
from laion_dagster.defs.resources import LaionResource

# The asset that enqueues a part, by its names: `part_tasks` in 0.1, so runs an instance
# recorded before the rename are still recognised.
ENQUEUE_ASSET_NAMES = ("enqueued_part", "part_tasks")
UNFINISHED = {DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING,
              DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING}


@sensor(minimum_interval_seconds=30, default_status=DefaultSensorStatus.RUNNING,
        description="Adds a partition for every new part file under parquet_dir.")
def discover_parts(context: SensorEvaluationContext, laion: LaionResource) -> SensorResult:
    settings = laion.settings()
    found = parts.survey(settings.parts_root)
    known = set(context.instance.get_dynamic_partitions(PARTS))
    new = [p.key for p in found.parts if p.key not in known]
    skipped = (f"; {len(found.problems)} files are not parts: {found.problems[0]}"
               + (" …" if len(found.problems) > 1 else "") if found.problems else "")
    if not new:
        return SensorResult(skip_reason=SkipReason(
            f"no new parts in {settings.parts_root} ({len(known)} known){skipped}"))
    context.log.info(f"adding {len(new)} parts: {', '.join(new[:5])}{' …' if len(new) > 5 else ''}"
                     f"{skipped}")
    return SensorResult(dynamic_partitions_requests=[parts_partitions.build_add_request(new)])


def _is_enqueue_run(run) -> bool:
    """A run that enqueues a part, from any job (the sensor's, the UI's, `run`'s)."""
    selection = run.asset_selection or set()
    return (run.job_name == enqueue_job.name
            or run.tags.get("dagster/run_key", "").startswith("enqueue:")
            or any(k.path[-1] in ENQUEUE_ASSET_NAMES for k in selection))


def _latest_enqueue_run(instance: DagsterInstance, partition: str):
    """The newest run that enqueued this partition, from any job."""
    for run in instance.get_runs(RunsFilter(tags={"dagster/partition": partition}), limit=10):
        if _is_enqueue_run(run):
            return run
    return None


def enqueue_run_key(partition: str, generation: int, mtime_ns: int, lost: int = 0) -> str:
    """A new generation or a changed file gives a new key, so a failed part can run again;
    so does each run found dead (its process gone), which is no fault of the part."""
    return f"enqueue:{partition}:g{generation}:{mtime_ns}" + (f":l{lost}" if lost else "")


LOST_TAG = "laion/lost"


def _lost_enqueue(run, started: float | None, enqueuer: str | None) -> str | None:
    """Why an unfinished enqueue run is dead, or None if it may be alive.

    Dagster's default run launcher cannot tell that a run's process died (a reboot, SIGKILL,
    the OOM killer): the run stays STARTED forever and would hold its part for good. The run
    recorded its host and pid in the part's hash; on the same host, a pid that is gone (or
    reused by another process since) settles it.
    """
    if run.status != DagsterRunStatus.STARTED or not enqueuer:
        return None
    host, pid, run_id = enqueuer.split(":", 2)
    if run_id != run.run_id or host != socket.gethostname():
        return None
    try:
        process = psutil.Process(int(pid))
        alive = process.status() != psutil.STATUS_ZOMBIE
        if alive and started is not None:
            alive = process.create_time() <= started + 60  # not a pid reused since
    except (psutil.NoSuchProcess, ValueError):
        alive = False
    return None if alive else f"its process {host}:{pid} is gone"


def _lost_runs(instance: DagsterInstance, partition: str) -> int:
    return len(instance.get_run_records(
        RunsFilter(tags={"dagster/partition": partition, LOST_TAG: "true"})))


def _enqueuing(instance: DagsterInstance, states: dict[str, PartState], log) -> set[str]:
    """Parts whose enqueue run is under way; a run found dead is marked failed instead."""
    alive = set()
    for run in instance.get_runs(RunsFilter(statuses=list(UNFINISHED)), limit=1000):
        key = run.tags.get("dagster/partition")
        if key not in states or not _is_enqueue_run(run):
            continue
        record = instance.get_run_record_by_id(run.run_id)
        gone = _lost_enqueue(run, record.start_time if record else None, states[key].enqueuer)
        if gone is None:
            alive.add(key)
            continue
        log.warning(f"run {run.run_id[:8]} enqueuing {key}: {gone}; marking it failed and "
                    "launching the part again")
        instance.add_run_tags(run.run_id, {LOST_TAG: "true"})
        instance.report_run_failed(run, message=gone)
    return alive


def _why_not(instance: DagsterInstance, settings: Settings, key: str, state: PartState
             ) -> tuple[str | None, str | None]:
    """The run key to enqueue a part with, or why it cannot be enqueued by the sensor."""
    try:
        part = parts.find(settings.parts_root, key)
    except parts.PartError as error:
        return None, f"{key}: {error}"
    run_key = enqueue_run_key(key, max(state.generation, 1), part.path.stat().st_mtime_ns,
                              _lost_runs(instance, key))
    run = _latest_enqueue_run(instance, key)
    if (run is not None and run.status == DagsterRunStatus.FAILURE
            and run.tags.get("dagster/run_key") == run_key):
        return None, (f"{key}: its last enqueue run {run.run_id[:8]} failed; fix the file or "
                      "re-materialize the partition")
    return run_key, None


@sensor(minimum_interval_seconds=15, default_status=DefaultSensorStatus.RUNNING,
        job=enqueue_job,
        description="Launches the next parts' enqueue while the queue is below queue_threshold "
                    "and every worker host has disk room; otherwise says why it holds.")
def launch_or_hold(context: SensorEvaluationContext, laion: LaionResource):
    settings = laion.settings()
    keys = sorted(context.instance.get_dynamic_partitions(PARTS))
    if not keys:
        return SkipReason("no parts yet (discover_parts adds them from "
                          f"{settings.parts_root})")
    try:
        with laion.queue() as queue:
            states = queue.parts_states(keys)
            depth = queue.queued_rows()
            hosts = queue.hosts()
    except (RedisUnavailable, EmbeddedServerError) as error:
        return SkipReason(f"Redis unavailable: {error}")
    if all(states[k].enqueued for k in keys):
        return SkipReason(f"all {len(keys)} parts are enqueued; queue {depth:,} rows")
    enqueuing = _enqueuing(context.instance, states, context.log)
    run_keys: dict[str, str] = {}
    set_aside: dict[str, str] = {}
    while True:  # the policy decides; a part the sensor cannot start is set aside, and again
        decision = next_enqueues(keys, states, depth, hosts, settings, enqueuing, set_aside)
        if decision.held:
            return SkipReason(decision.hold_message())
        unchecked = [key for key in decision.start if key not in run_keys]
        for key in unchecked:  # each part is looked up once, however often the policy is asked
            run_key, problem = _why_not(context.instance, settings, key, states[key])
            if problem:
                set_aside[key] = problem
            else:
                run_keys[key] = run_key
        if all(key in run_keys for key in decision.start):
            break
    run_keys = {key: run_keys[key] for key in decision.start}
    if run_keys:
        reason = f"queue {depth:,} < {settings.queue_threshold:,}"
        return [RunRequest(run_key=run_key, partition_key=key, tags={"laion/reason": reason})
                for key, run_key in run_keys.items()]
    if enqueuing:
        first = sorted(enqueuing)[0]
        return SkipReason(f"{plural(len(enqueuing), 'part')} being enqueued ({first} …); "
                          f"{len(decision.waiting)} more waiting")
    return SkipReason(f"{len(set_aside)} waiting parts need attention: "
                      + " | ".join(list(set_aside.values())[:5]))


@sensor(minimum_interval_seconds=15, default_status=DefaultSensorStatus.RUNNING,
        job=finalize_job,
        description="Launches part_images for every part whose shards are all complete.")
def finalize_parts(context: SensorEvaluationContext, laion: LaionResource):
    keys = sorted(context.instance.get_dynamic_partitions(PARTS))
    try:
        with laion.queue() as queue:
            states = queue.parts_states(keys)
    except (RedisUnavailable, EmbeddedServerError) as error:
        return SkipReason(f"Redis unavailable: {error}")
    # A retry round finalizes the part again: it gets a run key of its own.
    requests = [RunRequest(run_key=f"finalize:{k}:g{states[k].generation}:"
                                   f"r{states[k].retry_round}", partition_key=k)
                for k in to_finalize(states)]
    if requests:
        return requests
    running = [s for s in states.values() if s.enqueued and not s.done]
    if not running:
        final = sum(1 for s in states.values() if s.finalized_at is not None)
        return SkipReason(f"nothing to finalize: {final} of {len(keys)} parts final, "
                          f"{len(keys) - final} not enqueued yet")
    progress = ", ".join(f"{s.partition} {s.shards_done}/{s.shards_total} shards"
                         for s in running[:3])
    return SkipReason(f"{len(running)} parts downloading: {progress}"
                      f"{' …' if len(running) > 3 else ''}")


def _observe_interval() -> int:
    """The sensor's interval is fixed when the code location loads: from the environment, as
    the settings model reads it, or its default."""
    try:
        return Settings.model_validate(
            {"observe_interval": os.environ["LAION_OBSERVE_INTERVAL"]}).observe_interval
    except (KeyError, ValueError):
        return Settings.model_fields["observe_interval"].default


def failed_parts(instance: DagsterInstance, states: dict[str, PartState]) -> set[str]:
    """Parts whose latest enqueue run failed before they were queued, or whose finalize run
    failed once they were complete: one query per job, not one per part."""
    failed = set()
    for job, waiting in ((enqueue_job.name, lambda st: not st.enqueued),
                         (finalize_job.name, lambda st: st.done and st.finalized_at is None)):
        latest: dict[str, DagsterRunStatus] = {}
        for record in instance.get_run_records(RunsFilter(job_name=job), limit=2000):
            key = record.dagster_run.tags.get("dagster/partition")
            if key is not None and key not in latest:
                latest[key] = record.dagster_run.status
        failed |= {key for key, status in latest.items() if status == DagsterRunStatus.FAILURE
                   and key in states and waiting(states[key])}
    return failed


@sensor(minimum_interval_seconds=_observe_interval(), default_status=DefaultSensorStatus.RUNNING,
        description="Reports each downloading part's counts (on enqueued_part), the worker hosts "
                    "and the queue to the UI as runless observations; moves no work.")
def watch_downloads(context: SensorEvaluationContext, laion: LaionResource) -> SensorResult:
    settings = laion.settings()
    keys = sorted(context.instance.get_dynamic_partitions(PARTS))
    try:
        # One try and a short backoff: a sensor that reports must not wait on Redis long.
        with laion.queue(retries=1) as queue:
            states = queue.parts_states(keys)
            failed = failed_parts(context.instance, states)
            watch = Watch.from_json(context.cursor)
            snapshot = watch.read(queue, keys, settings, failed, states=states)
    except (RedisUnavailable, EmbeddedServerError) as error:
        return SensorResult(skip_reason=SkipReason(f"Redis unavailable: {error}"))
    said = [f"{len(snapshot.parts)} parts" if snapshot.parts else "no part (none moved)"]
    said += [name for name, figures in (("the worker hosts", snapshot.hosts),
                                        ("the queue", snapshot.queue)) if figures is not None]
    return SensorResult(asset_events=events(snapshot, enqueued_part.key), cursor=watch.to_json(),
                        skip_reason=SkipReason("reported " + ", ".join(said)))
