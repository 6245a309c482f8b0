"""`laion-dagster run`: every part of a folder through Dagster to completion, on one machine.

What img2dataset users expect from one command, but with Dagster keeping the record: each
part's enqueue runs as `dagster asset materialize` in its own process (so a huge part waiting on
the high watermark does not stall the rest), finished parts are finalized in-process, and a
local worker pool downloads. Running it again resumes: finished parts are skipped, and a part
enqueued half way continues where it stopped; a part whose state was made for another store, or
whose shards have gone from the store, is downloaded again (see core/control/provenance.py).

It owns what it starts: the state folder (one command at a time), the embedded Redis (stopped at
the end if it started it), the worker pool (started again if it dies) and the enqueue processes.
SIGTERM or Ctrl-C stops every one of them within the grace period and prints the summary so far.
It never waits in silence: the progress line says why nothing moves, and a run that cannot move
for `stall_timeout` seconds ends with exit 1 and that reason.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from laion_dagster.core.control import provenance
from laion_dagster.core.control.accounting import PartSummary, summarize
from laion_dagster.core.control.enqueue import EnqueueReport, enqueue_part
from laion_dagster.core.control.hosts import is_stale, store_problem
from laion_dagster.core.control.policy import next_enqueues, to_finalize, worker_reasons
from laion_dagster.core.control.progress import Watch
from laion_dagster.core.control.resume import resume
from laion_dagster.core.control.status import bar, plural
from laion_dagster.core.input import parts
from laion_dagster.core.outcomes import fix_sentence
from laion_dagster.core.processes import children, exclusive
from laion_dagster.core.queue import embedded
from laion_dagster.core.queue.connection import connect
from laion_dagster.core.queue.protocol import PartState, Queue
from laion_dagster.core.settings import Settings
from laion_dagster.dagster_home import ensure_dagster_home
from laion_dagster.usage import UsageError

if TYPE_CHECKING:  # Dagster is imported once the pool is starting, its slow import
    # overlapping the pool's own start-up
    from dagster import DagsterInstance

# A pool that dies this many times in a row, each within POOL_QUICK_DEATH seconds of its start,
# is broken (a bad setting, a missing library), not unlucky: the run ends and says so.
POOL_MAX_QUICK_DEATHS = 3
POOL_QUICK_DEATH = 60.0
LINE_EVERY = 5.0
# Parts up to this many rows are enqueued in this process (quick work); bigger ones in
# `dagster asset materialize` processes, as many at once as core/control/policy.py allows.
IN_PROCESS_ROWS = 1_000_000
ENQUEUE_GRACE = 10.0  # an enqueue process stops at once: it resumes where it stopped


@dataclass(frozen=True)
class Progress:
    """Counts of rows with an outcome in the run's parts, at one moment."""

    rows: int = 0  # ok + failed
    ok: int = 0
    bytes: int = 0

    @classmethod
    def of(cls, states: dict[str, PartState]) -> Progress:
        return cls(rows=sum(st.ok + st.failed for st in states.values()),
                   ok=sum(st.ok for st in states.values()),
                   bytes=sum(st.bytes for st in states.values()))

    def since(self, start: Progress) -> Progress:
        return Progress(self.rows - start.rows, self.ok - start.ok, self.bytes - start.bytes)


@dataclass
class RunResult:
    summaries: list[PartSummary] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    duration: float = 0.0
    stopped_by: int | None = None  # the signal that stopped the run early
    gave_up: str | None = None  # why the run ended without finishing (stalled, pool broken)
    first_image: float | None = None  # seconds from start to the first image stored
    # What this invocation did, not what the parts hold (a rerun may have nothing to do).
    downloaded: Progress | None = None
    already_final: int = 0  # parts final before this invocation (skipped)

    @property
    def ok(self) -> bool:
        return not self.failures and self.stopped_by is None and self.gave_up is None

    @property
    def exit_code(self) -> int:
        if self.stopped_by is not None:
            return 128 + self.stopped_by  # 130 for Ctrl-C, 143 for SIGTERM, as shells expect
        return 0 if self.ok else 1


def _dagster_command() -> list[str]:
    script = Path(sys.executable).with_name("dagster")
    return [str(script)] if script.exists() else [sys.executable, "-m", "dagster"]


class Rate:
    """Rows per second over the last `window` seconds, from a cumulative counter that may
    restart from 0 (a new worker pool) and moves in steps: the pools report it at each
    heartbeat. The rate is taken between the moments it moved, not between polls: between
    polls, the first line of a small job showed a small fraction of the pool's real rate, and
    an ETA to match. With no step for `quiet` seconds it falls off with the time."""

    def __init__(self, window: float = 30.0, quiet: float = 10.0):
        self.window = window
        self.quiet = quiet
        self.steps: deque[tuple[float, int]] = deque()  # (when the counter moved, total)
        self.total = 0
        self._last: int | None = None

    def add(self, now: float, counter: int) -> None:
        if counter == self._last:
            return
        if self._last is not None:
            # A smaller value than last time is a counter that restarted from 0.
            self.total += counter - self._last if counter >= self._last else counter
            self.steps.append((now, self.total))
        self._last = counter
        while len(self.steps) > 2 and now - self.steps[1][0] >= self.window:
            self.steps.popleft()

    def per_second(self, now: float) -> float:
        if len(self.steps) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self.steps[0], self.steps[-1]
        end = now if now - t1 > self.quiet else t1
        return (n1 - n0) / (end - t0) if end > t0 else 0.0


class RunCommand:
    def __init__(self, settings: Settings, out=sys.stdout, worker_log: Path | None = None,
                 lock_state: bool = True):
        self.settings = settings
        self.lock_state = lock_state  # False: the caller (the demo) has locked the folder
        self.out = out
        self.log_dir = settings.log_dir
        self.worker_log = worker_log or self.log_dir / "workers.log"
        self.enqueuing: dict[str, subprocess.Popen] = {}
        self.failures: dict[str, str] = {}
        self.finished: set[str] = set()  # final, or failed for this run
        self.total_rows = 0
        self.rows: dict[str, int] = {}
        # Parts queued before Dagster started, their materializations not yet recorded.
        self.early: dict[str, EnqueueReport] = {}
        self.workers: subprocess.Popen | None = None
        self.workers_started = 0.0
        self.pool_released = False  # told to exit: every row is accounted for
        self.quick_deaths = 0
        self.signal: int | None = None
        self.gave_up: str | None = None
        self.started = time.monotonic()
        # The same start as `started`, on the wall clock the workers report theirs in: the
        # time to the first image and the run's duration count from one moment (the process's
        # own start would add, for `demo`, the making of its dataset).
        self.started_at = time.time()
        self.first_image: float | None = None
        self.at_start = Progress()  # the parts' counts once their states were checked
        self.watch = Watch()  # what the UI was told last (defs/observations.py)
        self.observed = 0.0
        self.already_final = 0
        self.rate = Rate()
        self.stored_at_start: int | None = None  # rows in finished shards at the first line

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    # -- children
    def _use_settings_everywhere(self) -> None:
        """Children (Dagster runs, workers) and the in-process finalize, whose resource reads
        the environment, must see exactly these settings, and no other LAION_* variable."""
        for name in [k for k in os.environ if k.startswith("LAION_")]:
            del os.environ[name]
        os.environ.update(self.settings.to_env())

    def _child_env(self) -> dict[str, str]:
        return os.environ.copy()

    def _start_workers(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.worker_log, "ab") as handle:
            self.workers = children.start([sys.executable, "-m", "laion_dagster.cli", "worker"],
                                          stdout=handle, stderr=subprocess.STDOUT,
                                          env=self._child_env())
        self.workers_started = time.monotonic()

    def _launch_enqueue(self, key: str) -> None:
        name = key.replace(parts.SEPARATOR, "_")
        with open(self.log_dir / f"enqueue-{name}.log", "ab") as log:
            self.enqueuing[key] = children.start(
                _dagster_command() + ["asset", "materialize", "-m", "laion_dagster.definitions",
                                      "--select", "enqueued_part", "--partition", key],
                stdout=log, stderr=subprocess.STDOUT, env=self._child_env())

    def _finalize(self, instance: DagsterInstance, key: str) -> None:
        # A run of finalize_job, not reported events: Dagster cannot store a second runless
        # check evaluation for the same partition (a unique key on asset, check, run id and
        # partition), and a part is finalized again when it is downloaded again.
        failure = _run_here(instance, "finalize_job", key)
        if failure is not None:
            self.failures[key] = failure
        self.finished.add(key)

    def _on_signal(self, signum: int, _frame: object) -> None:
        # Only a flag: the loop notices within half a second and stops everything in order.
        self.signal = signum

    # -- the run
    def run(self) -> RunResult:
        s = self.settings
        locked = (exclusive.lock(s.state_dir, "laion-dagster run") if self.lock_state
                  else contextlib.nullcontext())
        with locked:
            problem = store_problem(s)
            if problem:
                raise UsageError(problem)
            found = parts.survey(s.parts_root)
            for note in found.problems:
                self.say(f"warning: {note}")
            if not found.parts:
                raise UsageError(parts.nothing_found(s.parts_root, found))
            s.remember_inputs()
            previous = {sig: signal.signal(sig, self._on_signal)
                        for sig in (signal.SIGINT, signal.SIGTERM)}
            started_redis = not s.redis_url and not embedded.running(s.redis_dir)
            try:
                return self._run(found.parts)
            finally:
                if started_redis:
                    embedded.stop(s.redis_dir)
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    def _run(self, found: list[parts.Part]) -> RunResult:
        environment = dict(os.environ)
        try:
            return self._run_with_settings(found)
        finally:  # a caller in the same process (a test, the demo) gets its environment back
            os.environ.clear()
            os.environ.update(environment)

    def _run_with_settings(self, found: list[parts.Part]) -> RunResult:
        s = self.settings
        self._use_settings_everywhere()
        # The instance's home first, whole (dagster_home.ensure_dagster_home): a UI started a
        # second after this command must not find no home, or one without our dagster.yaml.
        ensure_dagster_home(s)
        if not s.redis_url:  # started here, it dies with this command, even by SIGKILL
            embedded.ensure_running(s.redis_dir, tied=True)
        client = connect(s, name="laion-dagster-run")
        queue = Queue(client, s.prefix, s.visibility_timeout, s.max_deliveries)
        queue.ensure_group()
        keys = [p.key for p in found]
        self.rows = {p.key: parts.rows_if_readable(p) for p in found}
        self.total_rows = sum(self.rows.values())
        resumed = resume(queue, found, s, self.say)
        for key, why in resumed.refused.items():
            self.failures[key] = why
            self.say(f"part {key} failed: {why}")
        self.finished |= resumed.final | set(resumed.refused)
        final = self.already_final = len(resumed.final)
        if final:
            self.say(f"{final} of {plural(len(keys), 'part')} already final in {s.store_root}; "
                     "skipping them")
        self.at_start = Progress.of(queue.parts_states(keys))
        summaries: list[PartSummary] = []
        downloaded = None
        try:
            if len(self.finished) < len(keys):
                # First of all: the pool's processes import their libraries (which takes a
                # while) as this one opens the Dagster instance.
                self._start_workers()
                self.say(f"{plural(len(keys), 'part')}, {s.processes} worker processes × "
                         f"{s.concurrency} fetches; store {s.store_root}; worker log "
                         f"{self.worker_log}")
                # The Dagster instance is opened beside that (its home was made whole at the
                # start). Small parts go on the queue meanwhile, without waiting for Dagster to
                # start (seconds); their Dagster runs, which find them queued, follow.
                from laion_dagster.instance import get_instance

                with ThreadPoolExecutor(1, thread_name_prefix="dagster-instance") as pool:
                    opening = pool.submit(get_instance, s, self.say)
                    self._enqueue_early(queue, found)
                    instance = opening.result()
                from laion_dagster.defs.partitions import PARTS

                known = set(instance.get_dynamic_partitions(PARTS))
                if new := [k for k in keys if k not in known]:
                    instance.add_dynamic_partitions(PARTS, new)
                self._loop(queue, instance, keys)
                self._observe(queue, instance, keys)  # the parts' ends, in the UI
        except _GiveUp:
            self.say(f"giving up: {self.gave_up}")
        finally:
            self._stop_children()
            with contextlib.suppress(Exception):
                states = queue.parts_states(keys)
                summaries = [summarize(st, queue.classes(k), s) for k, st in states.items()]
                downloaded = Progress.of(states).since(self.at_start)
            client.close()
        return RunResult(summaries=summaries, failures=self.failures,
                         duration=time.monotonic() - self.started, stopped_by=self.signal,
                         gave_up=self.gave_up, first_image=self.first_image,
                         downloaded=downloaded, already_final=self.already_final)

    def _loop(self, queue: Queue, instance: DagsterInstance, keys: list[str]) -> None:
        s = self.settings
        last_line = 0.0
        last_move = time.monotonic()
        last_mark: tuple | None = None
        while len(self.finished) < len(keys) and self.signal is None:
            states = queue.parts_states(keys)
            hosts = queue.hosts()
            if time.monotonic() - self.observed >= s.observe_interval:
                self._observe(queue, instance, keys, states, hosts)
            self._reap_enqueues(instance)
            self._release_pool_when_idle(keys, states)
            for key in to_finalize(states, self.finished):
                if self.signal is None:
                    self._finalize(instance, key)
            self._maybe_enqueue(queue, instance, keys, states)
            self._keep_pool_alive()
            now = time.monotonic()
            fetched = sum(int(h.get("fetched", 0)) for h in hosts.values())
            self.rate.add(now, fetched)
            firsts = [h["first_image_at"] for h in hosts.values()
                      if (h.get("first_image_at") or 0) >= self.started_at]
            if firsts and self.first_image is None:
                self.first_image = min(firsts) - self.started_at
                self.say(f"first image stored {self.first_image:.1f}s after start")
            mark = (sum(st.rows for st in states.values()),
                    sum(st.ok + st.failed + st.invalid for st in states.values()),
                    self.rate.total, len(self.finished))
            if mark != last_mark:
                last_mark, last_move = mark, now
            waiting = self._waiting(queue, keys, states, hosts)
            if s.stall_timeout and now - last_move > s.stall_timeout:
                self.gave_up = (f"no progress for {s.stall_timeout:.0f}s (stall_timeout): "
                                + ("; ".join(waiting) if waiting else
                                   f"no row was fetched; see {self.worker_log}"))
                self.say(f"giving up: {self.gave_up}")
                return
            if now - last_line >= LINE_EVERY:
                self.say(self._progress_line(states, waiting))
                last_line = now
            if len(self.finished) < len(keys):  # (the last part final: no reason to wait)
                time.sleep(0.5)

    def _observe(self, queue: Queue, instance: DagsterInstance, keys: list[str],
                 states: dict[str, PartState] | None = None,
                 hosts: dict[str, dict] | None = None) -> None:
        """What the watch_downloads sensor reports to the UI under the daemon, reported by
        this run itself (it runs none): a user who opens the UI sees the same history."""
        from laion_dagster.defs.assets import enqueued_part
        from laion_dagster.defs.observations import events

        self.observed = time.monotonic()
        snapshot = self.watch.read(queue, keys, self.settings, set(self.failures), states,
                                   hosts)
        try:
            for event in events(snapshot, enqueued_part.key):
                instance.report_runless_asset_event(event)
        except Exception as error:  # the UI's view must never stop the download
            self.say(f"could not report progress to the Dagster instance: {error}")

    def _release_pool_when_idle(self, keys: list[str], states: dict[str, PartState]) -> None:
        """Once every part's shards are complete the pool has nothing left to do: it is told
        to exit now, and exits while the last parts are finalized (a Dagster run each) rather
        than after them, which would add its exit to a small job's time from Enter to exit."""
        if self.workers is None or self.pool_released or self.enqueuing or self.early:
            return
        if all(states[k].done or k in self.finished for k in keys):
            self.pool_released = True
            if self.workers.poll() is None:
                self.workers.send_signal(signal.SIGTERM)

    def _keep_pool_alive(self) -> None:
        if self.workers is None or self.workers.poll() is None or self.signal is not None \
                or self.pool_released:
            return
        code = self.workers.returncode
        lived = time.monotonic() - self.workers_started
        self.quick_deaths = self.quick_deaths + 1 if lived < POOL_QUICK_DEATH else 1
        if self.quick_deaths >= POOL_MAX_QUICK_DEATHS:
            self.gave_up = (f"the worker pool exited {self.quick_deaths} times in a row, each "
                            f"within {POOL_QUICK_DEATH:.0f}s of starting (last exit code "
                            f"{code}); see {self.worker_log}")
            raise _GiveUp
        self.say(f"the worker pool exited with code {code} (killed, or the OOM killer?); "
                 "starting it again")
        self._start_workers()

    def _waiting(self, queue: Queue, keys: list[str], states: dict[str, PartState],
                 hosts: dict[str, dict]) -> list[str]:
        """Why work may not be moving right now, in the words the progress line shows."""
        reasons = worker_reasons(hosts, self.settings)
        live = [r for r in hosts.values() if not is_stale(r, self.settings)]
        if self.workers is not None and not live and \
                time.monotonic() - self.workers_started > 30:
            reasons.append(f"no worker is reporting; see {self.worker_log}")
        if not self.enqueuing:
            decision = self._decide(queue, keys, states, hosts)
            reasons += [f"new parts held: {r}" for r in decision.held
                        if not r.startswith("host ")]
        return reasons

    def _decide(self, queue: Queue, keys: list[str], states: dict[str, PartState],
                hosts: dict[str, dict] | None = None, done: set[str] = frozenset()):
        """The sensors' decision (core/control/policy.py), for this run's parts: `done` are
        parts enqueued since `states` was read (not under way: they take no room)."""
        return next_enqueues(keys, states, queue.queued_rows(),
                             queue.hosts() if hosts is None else hosts, self.settings,
                             enqueuing=set(self.enqueuing),
                             set_aside=self.finished | set(self.early) | done)

    def _stop_children(self) -> None:
        """Enqueue processes first (they resume where they stop), then the pool, which
        finishes its shards within shutdown_grace or hands them back."""
        if self.signal is not None:
            name = signal.Signals(self.signal).name
            self.say(f"{name}: stopping; workers finish their shards within "
                     f"{self.settings.shutdown_grace:.0f}s or hand them back")
        children.stop_all([children.Child(proc, signal.SIGTERM, ENQUEUE_GRACE)
                           for proc in self.enqueuing.values()])
        if self.workers is not None:
            children.stop_all([children.Child(self.workers, signal.SIGTERM,
                                              self.settings.shutdown_grace + 30)])

    def _reap_enqueues(self, instance: DagsterInstance) -> None:
        for key, proc in list(self.enqueuing.items()):
            if proc.poll() is None:
                continue
            del self.enqueuing[key]
            if proc.returncode != 0 and self.signal is None:
                from laion_dagster.instance import failure_message

                runs = instance.get_runs(_partition_filter(key), limit=1)
                message = (failure_message(instance, runs[0].run_id) if runs
                           else f"exit code {proc.returncode}")
                self.failures[key] = message
                self.finished.add(key)  # nothing more will happen to it in this run
                self.say(f"part {key} failed: {message}")

    def _fits_here(self, key: str, depth: int) -> bool:
        """Whether a part is enqueued in this process: one that fits under the high watermark
        whatever happens (its rows plus the queued ones) cannot wait on it."""
        rows = self.rows.get(key, 0)
        return 0 < rows <= IN_PROCESS_ROWS and depth + rows <= self.settings.queue_high_watermark

    def _enqueue_early(self, queue: Queue, found: list[parts.Part]) -> None:
        """Queue the small waiting parts straight away, before Dagster is even imported, so a
        small job's first fetch comes within seconds. The loop then records each as an
        enqueued_part materialization (_record_early). A part that cannot be read is left to its
        Dagster run, which names the file and the problem."""
        keys = [p.key for p in found]
        by_key = {p.key: p for p in found}
        states = queue.parts_states(keys)
        while True:
            decision = self._decide(queue, keys, states)
            if not decision.start or not self._fits_here(decision.start[0], queue.queued_rows()):
                return
            key = decision.start[0]
            try:
                self.early[key] = enqueue_part(queue, by_key[key], self.settings)
            except (parts.PartError, provenance.PartChanged):
                return

    def _maybe_enqueue(self, queue: Queue, instance: DagsterInstance, keys: list[str],
                       states: dict[str, PartState]) -> None:
        """Enqueue the parts the policy starts now, in order.

        A part that fits under the high watermark is enqueued here, as a Dagster run in this
        process (no start-up of its own), and the policy is asked again. A bigger one gets a
        `dagster asset materialize` process, so one part waiting on the watermark never holds
        up the rest. A part queued early (_enqueue_early) gets its materialization recorded.
        """
        if self.signal is not None:
            return
        for key in list(self.early):
            self._record_early(instance, key, self.early.pop(key))
        done_here: set[str] = set()
        while True:
            decision = self._decide(queue, keys, states, done=done_here)
            if not decision.start:
                return
            depth = queue.queued_rows()
            here = [k for k in decision.start if self._fits_here(k, depth)]
            if here:
                self._enqueue_here(instance, here[0])
                done_here.add(here[0])
                continue
            for key in decision.start:
                self._launch_enqueue(key)
            return

    def _record_early(self, instance: DagsterInstance, key: str, report: EnqueueReport) -> None:
        """The enqueued_part materialization of a part queued early, as a reported event with the
        metadata its run would have recorded. Not a run: an in-process run of the enqueue job
        costs much CPU (Dagster's run record, events and log capture), a large share of `run`'s
        own CPU on a small job (bench/README.md has the figures)."""
        from dagster import AssetMaterialization

        from laion_dagster.defs.assets import enqueue_metadata, enqueued_part

        instance.report_runless_asset_event(AssetMaterialization(
            asset_key=enqueued_part.key, partition=key,
            description="queued by `laion-dagster run` before Dagster started",
            metadata=enqueue_metadata(report, self.settings)))

    def _enqueue_here(self, instance: DagsterInstance, key: str) -> None:
        failure = _run_here(instance, "enqueue_job", key)
        if failure is not None:
            self.failures[key] = failure
            self.finished.add(key)
            self.say(f"part {key} failed: {failure}")

    def _progress_line(self, states: dict[str, PartState], waiting: list[str]) -> str:
        """A progress bar over every row of every part, with counts, rate, ETA and, when
        something holds work back, why."""
        ok = sum(st.ok for st in states.values())
        failed = sum(st.failed for st in states.values())
        invalid = sum(st.invalid for st in states.values())
        stored = ok + failed + invalid
        if self.stored_at_start is None:
            self.stored_at_start = stored
        total = max(self.total_rows, 1)
        # Rows fetched whose shard is not finished yet. A shard is recorded whole, after its
        # slowest row: on the web a job's shards finish together near its end, and a bar of
        # stored rows alone stood at 0% for most of a small job. (A row fetched
        # again after a crash counts twice: hence the cap.)
        fetched = max(0, min(self.rate.total - (stored - self.stored_at_start), total - stored))
        done = stored + fetched
        per_second = self.rate.per_second(time.monotonic())
        eta = (f"{(total - done) / per_second:,.0f}s" if per_second > 0 and done < total
               else "-")
        final = sum(1 for k in states if k in self.finished)
        line = (f"[{time.strftime('%H:%M:%S')}] {bar(done, total, 24)} {done / total:4.0%} "
                f"rows {done:,}/{self.total_rows:,} | in finished shards: ok {ok:,} failed "
                f"{failed:,} invalid {invalid:,} | parts final {final}/{len(states)} | "
                f"{per_second:,.0f} images/s | ETA {eta}")
        return line + "".join(f"\n    waiting: {reason}" for reason in waiting)


class _GiveUp(Exception):
    """Raised inside the loop when the run cannot go on; `RunCommand.gave_up` says why."""


def _partition_filter(key: str):
    from dagster import RunsFilter

    return RunsFilter(tags={"dagster/partition": key})


def _run_here(instance: DagsterInstance, job_name: str, key: str) -> str | None:
    """Run a job for one partition in this process (no start-up of its own); the reason it
    failed, or None."""
    from laion_dagster.definitions import defs
    from laion_dagster.instance import failure_message

    def execute():
        return defs.resolve_job_def(job_name).execute_in_process(
            partition_key=key, instance=instance, raise_on_error=False,
            run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}})

    # In a thread of its own: a run in the main thread takes SIGINT and SIGTERM over and turns
    # them into its own failure (Ctrl-C during a finalize reported the part FAILED, exit 1, with
    # a stack trace). Elsewhere Dagster leaves them to `run`'s handler, which stops everything
    # in order once this run (a short one: small parts only) has ended.
    with ThreadPoolExecutor(1, thread_name_prefix="dagster-run") as pool:
        result = pool.submit(execute).result()
    return None if result.success else failure_message(instance, result.run_id)


def format_summary(result: RunResult, settings: Settings) -> str:
    """The run's end, in lines: the parts' totals (what they hold, this run or earlier), what to
    do about a failure that dominates them, and what this invocation itself downloaded."""
    rows = sum(s.rows for s in result.summaries)
    ok = sum(s.ok for s in result.summaries)
    failed = sum(s.failed for s in result.summaries)
    invalid = sum(s.invalid for s in result.summaries)
    nbytes = sum(s.bytes for s in result.summaries)
    retried = sum(s.retried for s in result.summaries)
    recovered = sum(s.recovered for s in result.summaries)
    classes: dict[str, int] = {}
    for s in result.summaries:
        for name, count in s.classes.items():
            if name != "invalid_url":  # those are the invalid rows, counted on their own
                classes[name] = classes.get(name, 0) + count
    attempted = ok + failed
    lines = [""]
    if result.stopped_by is not None:
        lines.append(f"stopped by {signal.Signals(result.stopped_by).name}; the summary so far "
                     "(run the same command again to resume):")
    if result.gave_up:
        lines.append(f"gave up: {result.gave_up}")
    lines += [
        f"parts: {len(result.summaries)} ({len(result.failures)} failed)",
        f"rows: {rows:,}  ok: {ok:,}  failed: {failed:,}  invalid (no usable URL): {invalid:,}"
        f"  success rate: {ok / attempted if attempted else 0:.1%}  size: {nbytes / 1e6:,.1f} MB",
    ]
    if retried:
        lines.append(f"tried again later: {plural(retried, 'row')} whose first try failed in a "
                     f"way that may pass; {recovered:,} of them then succeeded")
    if classes:
        lines.append("failed by class: " + ", ".join(
            f"{name} {count:,}" for name, count in sorted(classes.items(), key=lambda kv: -kv[1])))
    fix = fix_sentence(classes)
    if fix:
        lines.append(f"to fix: {fix}")
    lines.append(_this_run(result))
    lines.append(f"images: {settings.store_root}")
    lines.append(f"error files: {settings.errors_root}")
    for key, message in result.failures.items():
        lines.append(f"FAILED {key}: {message}")
    return "\n".join(lines)


def _this_run(result: RunResult) -> str:
    """What this invocation downloaded, and how fast: never figures of earlier runs."""
    done = result.downloaded or Progress()
    if done.rows <= 0:
        if result.already_final and result.already_final == len(result.summaries):
            which = ("its part was" if result.already_final == 1
                     else f"all {result.already_final:,} parts were")
            return (f"this run: nothing to download; {which} final already (`laion-dagster "
                    "reset PART` downloads one again)")
        return f"this run: no rows downloaded in {result.duration:,.1f}s"
    seconds = max(result.duration, 1e-9)
    first = (f"; first image after {result.first_image:.1f}s" if result.first_image is not None
             else "; no image stored")
    return (f"this run: {plural(done.rows, 'row')} downloaded ({done.ok:,} images, "
            f"{done.bytes / 1e6:,.1f} MB) in {result.duration:,.1f}s: "
            f"{done.rows / seconds:,.0f} rows/s, {done.ok / seconds:,.0f} images/s{first}")
