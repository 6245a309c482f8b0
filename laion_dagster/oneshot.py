"""`laion-dagster run`: every part of a folder through Dagster to completion, on one machine.

What img2dataset users expect from one command, but with Dagster keeping the record: each
part's enqueue runs as `dagster asset materialize` in its own process (so a huge part waiting on
the high watermark does not stall the rest), finished parts are finalized in-process, and a
local worker pool downloads. Running it again resumes: finished parts are skipped, and a part
enqueued half way continues where it stopped.
"""

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from dagster import DagsterInstance

from laion_dagster.core import embedded, parts
from laion_dagster.core.accounting import PartSummary, summarize
from laion_dagster.core.admission import hold_reasons
from laion_dagster.core.connection import connect
from laion_dagster.core.queue import PartState, Queue
from laion_dagster.core.settings import Settings
from laion_dagster.core.status import bar
from laion_dagster.defs.partitions import PARTS
from laion_dagster.instance import failure_message, get_instance


@dataclass
class RunResult:
    summaries: list[PartSummary] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    duration: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures


def _dagster_command() -> list[str]:
    script = Path(sys.executable).with_name("dagster")
    return [str(script)] if script.exists() else [sys.executable, "-m", "dagster"]


class OneShot:
    def __init__(self, settings: Settings, out=sys.stdout, worker_log: Path | None = None):
        self.settings = settings
        self.out = out
        self.log_dir = settings.data_dir / "logs"
        self.worker_log = worker_log or self.log_dir / "workers.log"
        self.enqueuing: dict[str, subprocess.Popen] = {}
        self.failures: dict[str, str] = {}
        self.finalized: set[str] = set()
        self.total_rows = 0
        self.started_redis = False

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    # -- setup
    def _environment(self) -> None:
        """Children (Dagster runs, workers) must see exactly these settings."""
        os.environ.update(self.settings.to_env())

    def _start_workers(self) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.worker_log, "ab")  # noqa: SIM115 - owned by the child
        return subprocess.Popen([sys.executable, "-m", "laion_dagster.cli", "worker"],
                                stdout=handle, stderr=subprocess.STDOUT, env=os.environ.copy())

    def _launch_enqueue(self, key: str) -> None:
        log = open(self.log_dir / f"enqueue-{key}.log", "ab")  # noqa: SIM115
        self.enqueuing[key] = subprocess.Popen(
            _dagster_command() + ["asset", "materialize", "-m", "laion_dagster.definitions",
                                  "--select", "part_tasks", "--partition", key],
            stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())

    def _finalize(self, instance: DagsterInstance, key: str) -> None:
        from laion_dagster.definitions import defs

        job = defs.resolve_job_def("finalize_job")
        result = job.execute_in_process(
            partition_key=key, instance=instance, raise_on_error=False,
            run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}})
        if not result.success:
            self.failures[key] = failure_message(instance, result.run_id)
        self.finalized.add(key)

    # -- the loop
    def run(self) -> RunResult:
        started = time.monotonic()
        s = self.settings
        self._environment()
        self.started_redis = not s.redis_url and not (
            (state := embedded.read_state(s.redis_dir)) and embedded.is_alive(state))
        client = connect(s, name="laion-dagster-run")
        queue = Queue(client, s.prefix, s.visibility_timeout, s.max_deliveries)
        queue.ensure_group()
        instance = get_instance(s)
        found = parts.discover(s.parts_root)
        if not found:
            raise SystemExit(f"no parquet parts under {s.parts_root}/<subset>/*.parquet")
        keys = [p.key for p in found]
        self.total_rows = sum(parts.rows_if_readable(p) for p in found)
        known = set(instance.get_dynamic_partitions(PARTS))
        new = [k for k in keys if k not in known]
        if new:
            instance.add_dynamic_partitions(PARTS, new)
        states = queue.parts_states(keys)
        self.finalized = {k for k, st in states.items() if st.finalized_at is not None}
        if self.finalized:
            self.say(f"{len(self.finalized)} of {len(keys)} parts are already final; skipping them")
        workers = None
        if len(self.finalized) < len(keys):
            workers = self._start_workers()
            self.say(f"{len(keys)} parts, {s.processes} worker processes × {s.concurrency} "
                     f"fetches; store {s.store_root}; worker log {self.worker_log}")
        try:
            last_line = 0.0
            while len(self.finalized) < len(keys):
                states = queue.parts_states(keys)
                self._reap_enqueues(instance)
                for key, st in states.items():
                    if st.done and key not in self.finalized:
                        self._finalize(instance, key)
                self._maybe_enqueue(queue, keys, states)
                if workers is not None and workers.poll() is not None:
                    raise RuntimeError(f"the worker pool exited with code {workers.returncode}; "
                                       f"see {self.worker_log}")
                if time.monotonic() - last_line > 5:
                    self.say(self._progress_line(queue, states))
                    last_line = time.monotonic()
                time.sleep(0.5)
        finally:
            for proc in self.enqueuing.values():
                proc.terminate()
            if workers is not None:
                workers.send_signal(signal.SIGTERM)
                try:
                    workers.wait(s.shutdown_grace + 30)
                except subprocess.TimeoutExpired:
                    workers.kill()
            final = queue.parts_states(keys)
            summaries = [summarize(st, queue.classes(k), s) for k, st in final.items()]
            client.close()
            if self.started_redis:
                embedded.stop(s.redis_dir)
        return RunResult(summaries=summaries, failures=self.failures,
                         duration=time.monotonic() - started)

    def _reap_enqueues(self, instance: DagsterInstance) -> None:
        for key, proc in list(self.enqueuing.items()):
            if proc.poll() is None:
                continue
            del self.enqueuing[key]
            if proc.returncode != 0:
                runs = instance.get_runs(_partition_filter(key), limit=1)
                message = (failure_message(instance, runs[0].run_id) if runs
                           else f"exit code {proc.returncode}")
                self.failures[key] = message
                self.finalized.add(key)  # nothing more will happen to it in this run
                self.say(f"part {key} failed: {message}")

    def _maybe_enqueue(self, queue: Queue, keys: list[str], states: dict[str, PartState]) -> None:
        if self.enqueuing:
            return  # one part at a time, in order, as the sensor does
        waiting = [k for k in keys if not states[k].enqueued and k not in self.failures]
        if not waiting:
            return
        if hold_reasons(queue.queued_rows(), queue.hosts(), self.settings):
            return
        self._launch_enqueue(waiting[0])

    def _progress_line(self, queue: Queue, states: dict[str, PartState]) -> str:
        """A progress bar over every row of every part, with counts, rate and ETA."""
        ok = sum(st.ok for st in states.values())
        failed = sum(st.failed for st in states.values())
        done = ok + failed + sum(st.invalid for st in states.values())
        total = max(self.total_rows, 1)
        rate = queue.rates(minutes=1)
        recent = rate["ok"] + rate["failed"]
        per_second = recent / 60.0
        eta = f"{(total - done) / per_second:,.0f}s" if per_second > 0 and done < total else "-"
        return (f"[{time.strftime('%H:%M:%S')}] {bar(done, total, 24)} {done / total:4.0%} "
                f"rows {done:,}/{self.total_rows:,} | ok {ok:,} failed {failed:,} | parts final "
                f"{len(self.finalized)}/{len(states)} | queue {queue.queued_rows():,} | "
                f"{recent:,} images in the last minute | ETA {eta}")


def _partition_filter(key: str):
    from dagster import RunsFilter

    return RunsFilter(tags={"dagster/partition": key})


def format_summary(result: RunResult, settings: Settings) -> str:
    rows = sum(s.rows for s in result.summaries)
    ok = sum(s.ok for s in result.summaries)
    failed = sum(s.failed for s in result.summaries)
    invalid = sum(s.invalid for s in result.summaries)
    nbytes = sum(s.bytes for s in result.summaries)
    classes: dict[str, int] = {}
    for s in result.summaries:
        for name, count in s.classes.items():
            classes[name] = classes.get(name, 0) + count
    attempted = ok + failed
    lines = [
        "",
        f"parts: {len(result.summaries)} ({len(result.failures)} failed)",
        f"rows: {rows:,}  ok: {ok:,}  failed: {failed:,}  invalid: {invalid:,}"
        f"  success rate: {ok / attempted if attempted else 0:.1%}",
        f"bytes: {nbytes / 1e6:,.1f} MB  in {result.duration:,.1f}s"
        f"  ({attempted / result.duration if result.duration else 0:,.0f} images/s overall)",
    ]
    if classes:
        lines.append("failed by class: " + ", ".join(
            f"{name} {count:,}" for name, count in sorted(classes.items(), key=lambda kv: -kv[1])))
    lines.append(f"images: {settings.store_root}")
    lines.append(f"error files: {settings.errors_root}")
    for key, message in result.failures.items():
        lines.append(f"FAILED {key}: {message}")
    return "\n".join(lines)
