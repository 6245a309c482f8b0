"""The worker pool on one host: P processes, kept alive, paused on a full disk, stopped cleanly.

The successor of downloader.py + monitor_disk.py. The supervisor restarts a process that dies,
checks the store's disk every heartbeat (pausing every process's claiming while it is full and
resuming by itself when space frees up), and reports the host to Redis. On SIGTERM or Ctrl-C it
asks its processes to finish their in-flight shards; what they cannot finish within the grace
period is handed back to the queue, never left half-written.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import signal
import socket
import time
from collections.abc import Callable

import psutil
import redis

from laion_dagster.core.control.hosts import HostReport, disk_state
from laion_dagster.core.processes import children
from laion_dagster.core.queue import embedded
from laion_dagster.core.queue.connection import RedisUnavailable, connect
from laion_dagster.core.queue.protocol import Keys, Queue, ensure_group
from laion_dagster.core.settings import Settings
from laion_dagster.core.shards.files import clear_dead_temporaries
from laion_dagster.worker.entry import run_process
from laion_dagster.worker.shared_memory import Shared

log = logging.getLogger("laion_dagster.worker")


class Supervisor:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.ctx = mp.get_context("spawn")
        self.stop = self.ctx.RawValue("b", 0)
        self.paused = self.ctx.RawValue("b", 0)
        self.children: list[tuple[mp.process.BaseProcess, Shared]] = []
        self.host = settings.host_id or socket.gethostname()
        self.keys = Keys(settings.prefix)
        self.restarts = 0
        self._last = (time.monotonic(), 0, 0)
        self._free_at_enospc: float | None = None
        self._redis: redis.Redis | None = None
        self._queue: Queue | None = None
        self._signal: int | None = None
        # Consumers (host:pid) of processes that died: their shards go back to the queue at
        # once, and the consumer leaves the group once it holds nothing.
        # consumer -> whether its death is forgiven, or None once its shards are handed back
        self._dead: dict[str, bool | None] = {}


    # -- processes
    def _spawn(self, index: int) -> tuple[mp.process.BaseProcess, Shared]:
        shared = Shared.create(self.ctx, self.stop, self.paused)
        child = self.ctx.Process(target=run_process, name=f"laion-worker-{index}",
                                 args=(self.settings.model_dump_json(), index, shared),
                                 daemon=False)
        child.start()
        return child, shared

    def start(self) -> None:
        settings = self.settings
        self._redis = self._wait_for_redis()
        if self._redis is None:
            return
        self._queue = Queue(self._redis, settings.prefix, settings.visibility_timeout,
                            settings.max_deliveries)
        settings.disk_root.mkdir(parents=True, exist_ok=True)
        if settings.in_bucket:
            # Shards of this host's killed workers were finished elsewhere: their spool
            # copies would fill the disk the pool watches.
            removed = clear_dead_temporaries(settings.spool_root, psutil.pid_exists)
            if removed:
                log.info("removed %d spool files of stopped workers from %s", removed,
                         settings.spool_root)
        # First of all: each process takes a while importing its libraries.
        self.children = [self._spawn(i) for i in range(settings.processes)]
        ensure_group(self._redis, self.keys.shards)
        self._adopt_orphans()
        log.info("worker pool on %s: %d processes × %d concurrent fetches, store %s",
                 self.host, settings.processes, settings.concurrency, settings.store_root)

    def _wait_for_redis(self) -> redis.Redis | None:
        """Connect, waiting as long as it takes: a pool started before Redis (a reboot, a
        restart of both) begins once Redis answers, instead of exiting. None if stopped first.

        Heartbeats come every few seconds and a missed one is harmless: the client's short
        retry budget keeps a dead Redis from delaying a stop or a disk check.
        """
        last_note = 0.0
        while not self.stop.value:
            try:
                return connect(self.settings, name=f"supervisor:{self.host}", retries=1)
            except RedisUnavailable as error:
                if time.monotonic() - last_note >= 10:
                    log.warning("%s; waiting for it (Ctrl-C to give up)", error)
                    last_note = time.monotonic()
                time.sleep(0.5)
        return None

    def _revive(self) -> None:
        for index, (child, shared) in enumerate(self.children):
            if child.is_alive() or self.stop.value:
                continue
            # A clean exit cannot be a shard's fault; a signal (the OOM killer, a crash in a
            # decoder) may be, so then each of its shards pays a delivery: the poison-shard rule.
            self._dead[f"{self.host}:{child.pid}"] = child.exitcode == 0
            log.warning("worker process %d (pid %s) exited with %s; restarting it and handing "
                        "its shards back to the queue", index, child.pid, child.exitcode)
            # Keep the dead child's counters: they are part of this host's totals.
            done = list(shared.counters)
            new_child, new_shared = self._spawn(index)
            for i, value in enumerate(done):
                new_shared.counters[i] = value
            self.children[index] = (new_child, new_shared)
            self.restarts += 1
        self._hand_back_dead()

    def _hand_back_dead(self, forget: bool = False) -> None:
        """Shards of dead processes go back to the queue now, not after visibility_timeout;
        with `forget`, consumers that hold nothing any more leave the group."""
        if self._queue is None or not self._dead:
            return
        try:
            for consumer, forgive in list(self._dead.items()):
                if forgive is not None:
                    count = self._queue.hand_back_consumer(consumer, forgive)
                    if count:
                        log.info("handed back the %d shards of %s", count, consumer)
                    self._dead[consumer] = None
                elif forget:
                    self._queue.forget_consumer(consumer)
                    if consumer not in self._queue.consumers():
                        del self._dead[consumer]
        except redis.RedisError as error:
            log.warning("could not hand back the shards of a dead process yet: %s", error)

    def _adopt_orphans(self) -> None:
        """Shards held by this host's processes of an earlier pool that died with it (a
        SIGKILLed supervisor, a reboot) go back to the queue at once."""
        assert self._queue is not None
        mine = {f"{self.host}:{child.pid}" for child, _ in self.children}
        for consumer in self._queue.consumers():
            host, _, pid = consumer.rpartition(":")
            if host == self.host and consumer not in mine and not _is_worker(pid):
                self._dead[consumer] = False
        self._hand_back_dead()

    # -- host checks
    def totals(self) -> tuple[int, int, int]:
        ok = failed = nbytes = 0
        for _, shared in self.children:
            ok += shared.counters[0]
            failed += shared.counters[1]
            nbytes += shared.counters[2]
        return ok, failed, nbytes

    def fetched(self) -> int:
        return sum(shared.counters[3] for _, shared in self.children)

    def waiting(self) -> int:
        """Rows waiting for their later try, in the processes alive now."""
        return sum(shared.waiting.value for child, shared in self.children if child.is_alive())

    def problems(self) -> list[str]:
        return sorted({text for _, shared in self.children if (text := shared.read_problem())})

    def _check_out_of_space(self, free_gb: float) -> str | None:
        """A process that hit ENOSPC waits until space is freed: until the free space has
        doubled (and grown by at least 1 MB) since. Returns the pause reason while it waits."""
        stuck = [shared for _, shared in self.children if shared.out_of_space.value]
        if not stuck:
            self._free_at_enospc = None
            return None
        if self._free_at_enospc is None:
            self._free_at_enospc = free_gb
            log.warning("a process ran out of space writing a shard (%.3f GB free); pausing "
                        "until space is freed", free_gb)
        if free_gb >= 2 * self._free_at_enospc + 0.001:
            log.info("space was freed (%.3f GB free): resuming", free_gb)
            for shared in stuck:
                shared.out_of_space.value = 0
            self._free_at_enospc = None
            return None
        return (f"no space left on device writing a shard ({free_gb * 1000:,.0f} MB free); "
                "waiting for space to be freed")

    def _first_image_at(self) -> float | None:
        return min((shared.first_image.value for _, shared in self.children
                    if shared.first_image.value), default=None)

    def heartbeat(self) -> HostReport:
        disk = disk_state(self.settings.disk_root, self.settings)
        out_of_space = self._check_out_of_space(disk.free_gb)
        if out_of_space:
            # The more telling reason, even when the free-space floor says "full" too (with a
            # floor of 0 it does whenever a write has just filled the disk to the last byte).
            disk = dataclasses.replace(disk, full=True, reason=out_of_space)
        if disk.full and not self.paused.value:
            log.warning("store disk full (%s): pausing", disk.reason)
            self.paused.value = 1
        elif not disk.full and self.paused.value:
            log.info("store disk has room again: resuming")
            self.paused.value = 0
        ok, failed, nbytes = self.totals()
        now = time.monotonic()
        then, ok0, failed0 = self._last
        rate = (ok + failed - ok0 - failed0) / max(now - then, 1e-9)
        self._last = (now, ok, failed)
        report = HostReport(
            host=self.host, disk_used_gb=disk.used_gb, disk_free_gb=disk.free_gb,
            paused=bool(self.paused.value), pause_reason=disk.reason,
            processes=len(self.children),
            alive_processes=sum(c.is_alive() for c, _ in self.children),
            rate=round(rate, 2), ok=ok, failed=failed, bytes=nbytes, seen_at=time.time(),
            fetched=self.fetched(), problems=self.problems(), waiting=self.waiting(),
            first_image_at=self._first_image_at())
        try:
            assert self._redis is not None
            self._redis.hset(self.keys.hosts, self.host, report.to_json())
            self._hand_back_dead(forget=True)
        except redis.RedisError as error:
            log.warning("could not report host state: %s", error)
            self._restart_embedded_server()
        return report

    def _restart_embedded_server(self) -> None:
        """With the embedded server (no redis_url), a pool on its machine brings it back after
        a crash: at the same address, from its append-only file, so every client's backoff
        reconnects by itself. Not while the pool stops: the server may have gone with the
        command that started both (a `run` killed), and one started now would outlive them;
        shards not handed back go back to the queue after the visibility timeout."""
        if self.settings.redis_url or self.stop.value or self._signal is not None:
            return
        try:
            embedded.ensure_running(self.settings.redis_dir)
        except embedded.EmbeddedServerError as error:
            log.error("could not restart the embedded Redis: %s", error)

    # -- the loop
    def run(self, until: Callable[[], bool] | None = None, handle_signals: bool = True) -> int:
        """Run until stopped (signal, or `until()` returning True); returns an exit code.

        `until` is asked every heartbeat, not every loop turn: it may cost a Redis round trip.
        """
        sigs = (signal.SIGINT, signal.SIGTERM) if handle_signals else ()
        previous = {sig: signal.getsignal(sig) for sig in sigs}

        def request_stop(signum, _frame):
            # Only plain memory writes here: a handler that takes a lock can deadlock with
            # the code it interrupted.
            self.stop.value = 1
            self._signal = signum

        for sig in previous:
            signal.signal(sig, request_stop)
        try:
            self.start()
            next_beat = 0.0
            first_reported = False
            while not self.stop.value:
                # The first image is reported at once, not at the next beat: `run` prints the
                # time to the first image, and a small job can be over within one interval.
                first_due = not first_reported and self._first_image_at() is not None
                if time.monotonic() >= next_beat or first_due:
                    first_reported = self.heartbeat().first_image_at is not None
                    next_beat = time.monotonic() + self.settings.heartbeat_interval
                    if until is not None and until():
                        break
                self._revive()
                time.sleep(0.2)
            if self._signal is not None:
                log.info("received %s: finishing in-flight shards",
                         signal.Signals(self._signal).name)
        finally:
            self.shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 0

    def shutdown(self) -> None:
        self.stop.value = 1
        stopping = [children.Child(children.Spawned(child), None,
                                   self.settings.shutdown_grace + 15, term_grace=0.0)
                    for child, _ in self.children]
        children.stop_all(stopping)
        for child, _ in self.children:
            child.join(5)  # reaped, its resources released
        if self._redis is not None:
            try:
                self.heartbeat()
                self._redis.hdel(self.keys.hosts, self.host)
            except redis.RedisError:
                pass
            self._redis.close()


def _is_worker(pid: str) -> bool:
    """Whether `pid` is a live worker process (a spawned multiprocessing child), not a pid
    the system has given to something else since."""
    try:
        process = psutil.Process(int(pid))
        return process.status() != psutil.STATUS_ZOMBIE and any(
            "multiprocessing" in part for part in process.cmdline())
    except (psutil.Error, ValueError):
        return False
