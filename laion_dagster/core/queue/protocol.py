"""The queue protocol: shards on a Redis stream, claimed by a consumer group, completed once.

Keys (all under the prefix):
  tasks                 the shard stream (its first name, kept), group "workers"
  dead                  shards that killed too many workers
  parts                 set of partitions the queue has seen (status views never scan keys)
  queued_rows           rows enqueued and not complete: the backpressure signal
  part:<p>              hash: generation, rows, invalid, shards, shards_total, shards_done, ok,
                        failed, bytes, pending, retried, recovered (rows tried again later
                        in their shard, and those that then succeeded), retry_round,
                        started_at, enqueued_at, done_at, finalized_at, recipe (JSON, see
                        core/shards/recipe.py), source (the part file's fingerprint), path (the part
                        file), store (where its shards go), shard_size, fetch_policy (JSON:
                        the settings that decided its fixable failures, see core/outcomes.py)
  part:<p>:queued       shard ids enqueued in this generation (makes enqueue idempotent)
  part:<p>:done         shard ids completed in this generation (makes completion count once)
  part:<p>:classes      error class -> rows
  errors:<p>            one entry per shard with failures: its error records as Arrow IPC
  hosts                 host id -> JSON heartbeat
  rate:<minute>         ok / failed / bytes completed in that minute, for rates without scans

Every state change that touches more than one key is one Lua script, so a crash between two
commands cannot count a shard twice or lose it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis

if TYPE_CHECKING:  # pyarrow only where errors are read: a pool's supervisor never needs it
    import pyarrow as pa

GROUP = "workers"
GENERATION_START = 1
# Shards of a retry round (core/control/retry.py) have ids round × RETRY_ROUND + the id of the
# shard of the part they belong to, so they never meet the part's own ids.
RETRY_ROUND = 1_000_000


def original_shard(shard: int) -> int:
    """The part's shard a shard id belongs to (itself, for a shard of the part)."""
    return shard % RETRY_ROUND

# Every timestamp comes from the Redis server's clock: worker hosts' clocks may disagree.
_NOW = "local function now() local t = redis.call('TIME') " \
       "return t[1] .. '.' .. string.format('%06d', tonumber(t[2])) end\n"

_ENQUEUE = """
local part, queued, claims, queued_rows, errors, classes = unpack(KEYS)
local p, gen, shard, valid, invalid, payload, invalid_blob = unpack(ARGV)
if redis.call('HGET', part, 'generation') ~= gen then return -1 end
if redis.call('SADD', queued, shard) == 0 then return 0 end
valid = tonumber(valid); invalid = tonumber(invalid)
redis.call('HINCRBY', part, 'rows', valid + invalid)
redis.call('HINCRBY', part, 'shards', 1)
if invalid > 0 then
  redis.call('HINCRBY', part, 'invalid', invalid)
  redis.call('HINCRBY', classes, 'invalid_url', invalid)
  redis.call('XADD', errors, '*', 'shard', shard, 'data', invalid_blob)
end
-- Every shard goes to a worker, even one without a row to fetch: the worker writes its shard
-- parquet, which must list every input row (rejected ones included).
redis.call('XADD', claims, '*', 'p', p, 'g', gen, 's', shard, 'n', valid, 'd', payload)
redis.call('INCRBY', queued_rows, valid)
redis.call('HINCRBY', part, 'pending', valid)
return 1
"""

_FINISH_ENQUEUE = _NOW + """
local part = KEYS[1]
local gen, total = ARGV[1], tonumber(ARGV[2])
if redis.call('HGET', part, 'generation') ~= gen then return -1 end
local now = now()
redis.call('HSET', part, 'shards_total', total, 'enqueued_at', now)
local done = tonumber(redis.call('HGET', part, 'shards_done') or '0')
if done >= total and not redis.call('HGET', part, 'done_at') then
  redis.call('HSET', part, 'done_at', now)
end
return 1
"""

_COMPLETE = _NOW + """
local claims, part, done, queued_rows, errors, classes, rate_prefix = unpack(KEYS)
local entry, group, gen, shard = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local ok, failed, nbytes, rows = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]),
                                 tonumber(ARGV[8])
local blob = ARGV[9]
local retried, recovered = tonumber(ARGV[10]), tonumber(ARGV[11])
redis.call('XACK', claims, group, entry)
redis.call('XDEL', claims, entry)
if redis.call('HGET', part, 'generation') ~= gen then return -1 end
if redis.call('SADD', done, shard) == 0 then return 0 end
redis.call('HINCRBY', part, 'ok', ok)
redis.call('HINCRBY', part, 'failed', failed)
redis.call('HINCRBY', part, 'bytes', nbytes)
redis.call('HINCRBY', part, 'pending', -rows)
if retried > 0 then
  redis.call('HINCRBY', part, 'retried', retried)
  redis.call('HINCRBY', part, 'recovered', recovered)
end
redis.call('DECRBY', queued_rows, rows)
local shards_done = redis.call('HINCRBY', part, 'shards_done', 1)
if blob ~= '' then redis.call('XADD', errors, '*', 'shard', shard, 'data', blob) end
for i = 12, #ARGV, 2 do redis.call('HINCRBY', classes, ARGV[i], tonumber(ARGV[i + 1])) end
local now = now()
local rate = rate_prefix .. math.floor(tonumber(now) / 60)
redis.call('HINCRBY', rate, 'ok', ok)
redis.call('HINCRBY', rate, 'failed', failed)
redis.call('HINCRBY', rate, 'bytes', nbytes)
redis.call('EXPIRE', rate, 7200)
local total = redis.call('HGET', part, 'shards_total')
if total and shards_done >= tonumber(total) and not redis.call('HGET', part, 'done_at') then
  redis.call('HSET', part, 'done_at', now)
end
return 1
"""

_RETRY = _NOW + """
local part, queued, errors, classes, queued_rows, claims = unpack(KEYS)
local p, gen, remaining, nrows = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local nclasses = tonumber(ARGV[5])
if redis.call('HGET', part, 'generation') ~= gen then return -1 end
local round = redis.call('HINCRBY', part, 'retry_round', 1)
-- The retried rows' old failures leave the counts and the error records...
redis.call('HINCRBY', part, 'failed', -nrows)
for i = 6, 5 + 2 * nclasses, 2 do
  redis.call('HINCRBY', classes, ARGV[i], -tonumber(ARGV[i + 1]))
end
redis.call('DEL', errors)
if remaining ~= '' then redis.call('XADD', errors, '*', 'shard', 'kept', 'data', remaining) end
-- ...and the rows go back on the queue as new shards of this generation.
redis.call('HDEL', part, 'done_at', 'finalized_at')
local first = 6 + 2 * nclasses
local nshards = 0
for i = first, #ARGV, 3 do
  local shard = tostring(round * 1000000 + tonumber(ARGV[i]))
  redis.call('SADD', queued, shard)
  redis.call('XADD', claims, '*', 'p', p, 'g', gen, 's', shard, 'n', ARGV[i + 1],
             'd', ARGV[i + 2])
  nshards = nshards + 1
end
redis.call('HINCRBY', part, 'shards', nshards)
redis.call('HINCRBY', part, 'shards_total', nshards)
redis.call('HINCRBY', part, 'pending', nrows)
redis.call('INCRBY', queued_rows, nrows)
return round
"""

_RESET = _NOW + """
local part, queued, done, queued_rows, errors, classes = unpack(KEYS)
local pending = tonumber(redis.call('HGET', part, 'pending') or '0')
local gen = tonumber(redis.call('HGET', part, 'generation') or '0') + 1
redis.call('DECRBY', queued_rows, pending)
redis.call('DEL', part, queued, done, errors, classes)
redis.call('HSET', part, 'generation', gen, 'started_at', now())
return gen
"""


@dataclass(frozen=True)
class Claim:
    """One claimed shard."""

    entry_id: str
    partition: str
    generation: str
    shard: int
    rows: int
    payload: bytes
    deliveries: int = 1


@dataclass(frozen=True)
class Outcome:
    """What a worker reports for a shard: counts, error classes and the error records."""

    ok: int
    failed: int
    bytes: int
    classes: dict[str, int]
    errors: bytes = b""  # Arrow IPC of the failed rows, b"" when none failed
    retried: int = 0  # rows tried again later (Settings.retry_rounds)
    recovered: int = 0  # of those, rows that then succeeded


class Keys:
    def __init__(self, prefix: str):
        self.prefix = prefix
        self.shards = f"{prefix}:tasks"  # the shard stream; its 0.1 name kept across upgrades
        self.dead = f"{prefix}:dead"
        self.parts = f"{prefix}:parts"
        self.queued_rows = f"{prefix}:queued_rows"
        self.hosts = f"{prefix}:hosts"
        self.rate_prefix = f"{prefix}:rate:"

    def part(self, p: str) -> str:
        return f"{self.prefix}:part:{p}"

    def queued(self, p: str) -> str:
        return f"{self.prefix}:part:{p}:queued"

    def done(self, p: str) -> str:
        return f"{self.prefix}:part:{p}:done"

    def classes(self, p: str) -> str:
        return f"{self.prefix}:part:{p}:classes"

    def errors(self, p: str) -> str:
        return f"{self.prefix}:errors:{p}"


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def parse_entry(entry_id: bytes | str, fields: dict, deliveries: int = 1) -> Claim:
    def get(name: str) -> bytes:
        return fields[name.encode()] if name.encode() in fields else fields[name]

    return Claim(entry_id=_text(entry_id), partition=_text(get("p")), generation=_text(get("g")),
                shard=int(get("s")), rows=int(get("n")), payload=get("d"), deliveries=deliveries)


@dataclass(kw_only=True)
class PartCounts:
    """A part's rows and shards as counted: what the queue keeps and every view of it shows."""

    rows: int = 0
    invalid: int = 0  # rejected at enqueue (no usable URL)
    ok: int = 0
    failed: int = 0
    bytes: int = 0
    shards_done: int = 0
    retried: int = 0  # rows tried again later in their shard
    recovered: int = 0  # of those, rows that then succeeded

    def counts(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(PartCounts)}


@dataclass
class PartState(PartCounts):
    """A part's counters as the queue sees them right now."""

    partition: str
    generation: int = 0
    shards: int = 0
    shards_total: int | None = None
    pending: int = 0
    retry_round: int = 0
    started_at: float | None = None
    enqueued_at: float | None = None
    done_at: float | None = None
    finalized_at: float | None = None
    recipe: str | None = None  # JSON, see core/shards/recipe.py
    enqueuer: str | None = None  # host:pid:run id of the process that enqueued it
    source: str | None = None  # fingerprint of the part file it was enqueued from
    store: str | None = None  # the store its shards are written to
    shard_size: int | None = None  # rows per shard it was cut with
    path: str | None = None  # the part file it was enqueued from
    fetch_policy: str | None = None  # JSON: the settings that decided its fixable failures

    @property
    def enqueued(self) -> bool:
        return self.enqueued_at is not None

    @property
    def done(self) -> bool:
        return self.done_at is not None

    @property
    def in_flight_or_queued(self) -> int:
        return self.rows - self.invalid - self.ok - self.failed

    @classmethod
    def from_hash(cls, partition: str, raw: dict) -> PartState:
        values = {_text(k): _text(v) for k, v in raw.items()}
        state = cls(partition=partition)
        for name in ("generation", "rows", "invalid", "shards", "shards_done", "ok", "failed",
                     "bytes", "pending", "retried", "recovered", "retry_round"):
            setattr(state, name, int(values.get(name) or 0))
        for name in ("shards_total", "shard_size"):
            if values.get(name) is not None:
                setattr(state, name, int(values[name]))
        for name in ("started_at", "enqueued_at", "done_at", "finalized_at"):
            if values.get(name) is not None:
                setattr(state, name, float(values[name]))
        for name in ("recipe", "enqueuer", "source", "store", "path", "fetch_policy"):
            setattr(state, name, values.get(name))
        return state


class Queue:
    """The synchronous side of the protocol: enqueue, inspect, finalize (Dagster, CLI)."""

    def __init__(self, client: redis.Redis, prefix: str, visibility_timeout: float = 600.0,
                 max_deliveries: int = 3):
        self.r = client
        self.keys = Keys(prefix)
        self.visibility_ms = int(visibility_timeout * 1000)
        self.max_deliveries = max_deliveries
        self._enqueue = client.register_script(_ENQUEUE)
        self._finish = client.register_script(_FINISH_ENQUEUE)
        self._complete = client.register_script(_COMPLETE)
        self._reset = client.register_script(_RESET)
        self._retry = client.register_script(_RETRY)

    # -- setup
    def ensure_group(self) -> None:
        ensure_group(self.r, self.keys.shards)

    # -- enqueue side
    def begin(self, partition: str, recipe: str | None = None, enqueuer: str | None = None,
              source: str | None = None, store: str | None = None,
              shard_size: int | None = None, path: str | None = None,
              fetch_policy: str | None = None) -> PartState:
        """Register a part; returns its state, generation and recipe included.

        Existing values are kept, so a re-run resumes the same generation with the recipe its
        first shards were made with, and the state keeps saying which file and store it is
        about (control/provenance.py compares them); a reset starts all of them afresh. `enqueuer`
        ("host:pid:run id") names the process enqueuing it, so a sensor can tell a run that
        died without a word (a reboot, SIGKILL) from one still at work. `path` is where the
        part file is now (a command that names only the store finds it there).
        """
        key = self.keys.part(partition)
        seconds, micros = self.r.time()
        pipe = self.r.pipeline()
        pipe.hsetnx(key, "generation", GENERATION_START)
        pipe.hsetnx(key, "started_at", f"{seconds}.{micros:06d}")
        for name, value in (("recipe", recipe), ("source", source), ("store", store),
                            ("shard_size", shard_size), ("fetch_policy", fetch_policy)):
            if value is not None:
                pipe.hsetnx(key, name, value)
        for name, value in (("enqueuer", enqueuer), ("path", path)):
            if value is not None:
                pipe.hset(key, name, value)
        pipe.sadd(self.keys.parts, partition)
        pipe.hgetall(key)
        return PartState.from_hash(partition, pipe.execute()[-1])

    def reset(self, partition: str) -> int:
        """Start the part over as a new generation; late results of the old one are ignored."""
        k = self.keys
        self.r.sadd(k.parts, partition)
        return int(self._reset(keys=[k.part(partition), k.queued(partition), k.done(partition),
                                     k.queued_rows, k.errors(partition), k.classes(partition)]))

    def enqueue_shard(self, partition: str, generation: int, shard: int, valid_rows: int,
                      invalid_rows: int, payload: bytes, invalid_blob: bytes) -> int:
        """1 if enqueued now, 0 if this generation already has it, -1 if the generation moved on."""
        k = self.keys
        return int(self._enqueue(
            keys=[k.part(partition), k.queued(partition), k.shards, k.queued_rows,
                  k.errors(partition), k.classes(partition)],
            args=[partition, generation, shard, valid_rows, invalid_rows, payload, invalid_blob],
        ))

    def finish_enqueue(self, partition: str, generation: int, shards_total: int) -> None:
        self._finish(keys=[self.keys.part(partition)], args=[generation, shards_total])

    def requeue_failed(self, partition: str, generation: int, remaining_errors: bytes,
                       classes: dict[str, int], shards: list[tuple[int, int, bytes]]) -> int:
        """Put failed rows back on the queue in one step; returns the retry round (-1: the
        generation moved on). `shards` are (index within the round, rows, payload); their ids
        are round × 1,000,000 + index, so they never meet the part's own shard ids."""
        k = self.keys
        args: list = [partition, generation, remaining_errors,
                      sum(rows for _, rows, _ in shards), len(classes)]
        for name, count in sorted(classes.items()):
            args += [name, count]
        for index, rows, payload in shards:
            args += [index, rows, payload]
        return int(self._retry(keys=[k.part(partition), k.queued(partition),
                                     k.errors(partition), k.classes(partition), k.queued_rows,
                                     k.shards], args=args))

    def set_fetch_policy(self, partition: str, policy: str) -> None:
        """The settings its failures are decided with from now on (after a retry under new
        ones)."""
        self.r.hset(self.keys.part(partition), "fetch_policy", policy)

    def is_queued(self, partition: str, shard: int) -> bool:
        return bool(self.r.sismember(self.keys.queued(partition), shard))

    def done_shards(self, partition: str) -> list[int]:
        """Ids of the shards of the part's current generation that are complete."""
        return sorted(int(s) for s in self.r.smembers(self.keys.done(partition)))

    # -- a host's worker processes (the supervisor's side)
    def hand_back_consumer(self, consumer: str, forgive: bool) -> int:
        """Make every shard that `consumer` (a worker process that died) holds claimable at
        once, instead of after the visibility timeout; returns how many.

        Unless forgiven, the death costs each shard one delivery, as a reclaim after the
        timeout would: a shard that kills every process taking it still reaches the
        dead-letter stream (and, delivered before, runs alone meanwhile).
        """
        entries = self.r.xpending_range(self.keys.shards, GROUP, min="-", max="+",
                                        count=100_000, consumername=consumer)
        for entry in entries:
            delivered = int(entry["times_delivered"])
            self.r.xclaim(self.keys.shards, GROUP, consumer, 0, [entry["message_id"]],
                          idle=self.visibility_ms + 1, justid=True,
                          retrycount=max(delivered - 1, 0) if forgive else delivered)
        return len(entries)

    def consumers(self) -> dict[str, int]:
        """Worker processes the group knows (host:pid) and how many shards each holds."""
        try:
            info = self.r.xinfo_consumers(self.keys.shards, GROUP)
        except redis.ResponseError:  # no stream or group yet
            return {}
        return {_text(c["name"]): int(c["pending"]) for c in info}

    def forget_consumer(self, consumer: str) -> None:
        """Drop a dead process from the group once it holds nothing (the group's consumer
        list would otherwise grow with every process restart of a weeks-long run)."""
        if self.consumers().get(consumer, 1) == 0:
            self.r.xgroup_delconsumer(self.keys.shards, GROUP, consumer)

    # -- worker side (synchronous variant, used by tests and tools; workers use AsyncQueue)
    def complete(self, claim: Claim, outcome: Outcome) -> int:
        return int(self._complete(keys=complete_keys(self.keys, claim.partition),
                                  args=complete_args(claim, outcome)))

    # -- views
    def queued_rows(self) -> int:
        return int(self.r.get(self.keys.queued_rows) or 0)

    def partitions(self) -> list[str]:
        return sorted(_text(p) for p in self.r.smembers(self.keys.parts))

    def part(self, partition: str) -> PartState:
        return PartState.from_hash(partition, self.r.hgetall(self.keys.part(partition)))

    def parts_states(self, partitions: list[str]) -> dict[str, PartState]:
        pipe = self.r.pipeline(transaction=False)
        for p in partitions:
            pipe.hgetall(self.keys.part(p))
        replies = pipe.execute()
        return {p: PartState.from_hash(p, raw) for p, raw in zip(partitions, replies, strict=True)}

    def classes(self, partition: str) -> dict[str, int]:
        raw = self.r.hgetall(self.keys.classes(partition))
        return {_text(k): int(v) for k, v in raw.items() if int(v)}

    def classes_of(self, partitions: list[str]) -> list[dict[str, int]]:
        """Error class counts of many parts in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for p in partitions:
            pipe.hgetall(self.keys.classes(p))
        return [{_text(k): int(v) for k, v in raw.items()} for raw in pipe.execute()]

    def hosts(self) -> dict[str, dict]:
        return {_text(k): json.loads(v) for k, v in self.r.hgetall(self.keys.hosts).items()}

    def rates(self, minutes: int = 2, since: float | None = None) -> tuple[dict[str, int], float]:
        """ok / failed / bytes completed in the current minute and the `minutes - 1` before
        it, and how many seconds that window spans (from the start of its first minute, or
        `since` if later, to now).

        Dividing by the seconds actually covered keeps a rate steady across minute
        boundaries: a partial minute counted as a whole one makes it drop to 0 every minute.
        """
        seconds, micros = self.r.time()
        now = seconds + micros / 1e6
        minute = int(now) // 60
        start = max((minute - minutes + 1) * 60, since or 0.0)
        pipe = self.r.pipeline(transaction=False)
        for m in range(minute - minutes + 1, minute + 1):
            pipe.hgetall(f"{self.keys.rate_prefix}{m}")
        total = {"ok": 0, "failed": 0, "bytes": 0}
        for raw in pipe.execute():
            for key, value in raw.items():
                total[_text(key)] = total.get(_text(key), 0) + int(value)
        return total, max(now - start, 1.0)

    def dead_letters(self) -> int:
        return int(self.r.xlen(self.keys.dead))

    # -- finalize side
    def read_errors(self, partition: str, batch: int = 500) -> pa.Table | None:
        """Every error record of the part, oldest first, as one table (None when there are none)."""
        import pyarrow as pa

        tables = []
        start = "-"
        key = self.keys.errors(partition)
        while True:
            entries = self.r.xrange(key, min=start, max="+", count=batch)
            if not entries:
                break
            for _, fields in entries:
                tables.append(decode_table(fields[b"data"]))
            start = "(" + _text(entries[-1][0])
        if not tables:
            return None
        return pa.concat_tables(tables, promote_options="default")

    def mark_finalized(self, partition: str) -> None:
        """The error file is written: the error records may leave Redis."""
        pipe = self.r.pipeline()
        seconds, micros = self.r.time()
        pipe.hset(self.keys.part(partition), "finalized_at", f"{seconds}.{micros:06d}")
        pipe.delete(self.keys.errors(partition))
        pipe.execute()


def ensure_group(client: redis.Redis, stream: str) -> None:
    try:
        client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    except redis.ResponseError as error:
        if "BUSYGROUP" not in str(error):
            raise


def complete_keys(keys: Keys, partition: str) -> list[str]:
    return [keys.shards, keys.part(partition), keys.done(partition), keys.queued_rows,
            keys.errors(partition), keys.classes(partition), keys.rate_prefix]


def complete_args(claim: Claim, outcome: Outcome) -> list:
    args: list = [claim.entry_id, GROUP, claim.generation, claim.shard, outcome.ok, outcome.failed,
                  outcome.bytes, claim.rows, outcome.errors, outcome.retried, outcome.recovered]
    for name, count in sorted(outcome.classes.items()):
        args += [name, count]
    return args


class AsyncQueue:
    """The worker side: claim new or stale shards, keep claims fresh, complete or release them.

    Delivery is at least once. A claim that a live worker holds is refreshed every quarter of
    the visibility timeout; a claim left idle longer (its worker died or hung) is taken over
    with XAUTOCLAIM. A shard delivered more than max_deliveries times is dead-lettered.
    """

    def __init__(self, client, prefix: str, consumer: str, visibility_timeout: float = 600.0,
                 max_deliveries: int = 3):
        self.r = client
        self.keys = Keys(prefix)
        self.consumer = consumer
        self.visibility_ms = int(visibility_timeout * 1000)
        self.max_deliveries = max_deliveries
        self._complete = client.register_script(_COMPLETE)
        self._cursor = "0-0"

    async def ensure_group(self) -> None:
        try:
            await self.r.xgroup_create(self.keys.shards, GROUP, id="0", mkstream=True)
        except redis.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    async def reclaim(self) -> Claim | None:
        """Take over one shard whose worker stopped refreshing it, if there is one."""
        next_id, entries, *_ = await self.r.xautoclaim(
            self.keys.shards, GROUP, self.consumer, min_idle_time=self.visibility_ms,
            start_id=self._cursor, count=1)
        self._cursor = _text(next_id) or "0-0"
        for entry_id, fields in entries:
            if not fields:
                continue
            info = await self.r.xpending_range(self.keys.shards, GROUP, min=entry_id,
                                               max=entry_id, count=1)
            deliveries = int(info[0]["times_delivered"]) if info else 1
            return parse_entry(entry_id, fields, deliveries)
        return None

    async def claim(self, block_ms: int = 1000) -> Claim | None:
        """A stale shard first (so nothing starves), else a new one, else None after block_ms."""
        claim = await self.reclaim()
        if claim is not None:
            return claim
        reply = await self.r.xreadgroup(GROUP, self.consumer, {self.keys.shards: ">"}, count=1,
                                        block=block_ms)
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                return parse_entry(entry_id, fields)
        return None

    async def refresh(self, claims: list[Claim]) -> None:
        """Reset the idle time of shards this worker is still working on."""
        if claims:
            await self.r.xclaim(self.keys.shards, GROUP, self.consumer, 0,
                                [t.entry_id for t in claims], justid=True)

    async def hand_back(self, claims: list[Claim]) -> None:
        """Hand shards back at once (on a stop, or a full disk) instead of after the visibility
        timeout. The delivery is forgiven: a shard handed back in good order is not poison, and
        must not reach the dead-letter stream because its workers were stopped three times."""
        for claim in claims:
            await self.r.xclaim(self.keys.shards, GROUP, self.consumer, 0, [claim.entry_id],
                                idle=self.visibility_ms + 1, justid=True,
                                retrycount=max(claim.deliveries - 1, 0))

    async def unreceived(self, known: set[str], min_idle: float) -> tuple[list[Claim], set[str]]:
        """Shards Redis says this consumer holds that it does not know of, idle `min_idle`
        seconds or more, as claims to hand back; and every entry id it holds.

        A claim is a write: when Redis served an XREADGROUP or XAUTOCLAIM but its reply never
        arrived (the server was killed after writing it to its append-only file, or the
        connection dropped), the client's retry claims the next shard, and the first one sits
        in this consumer's pending list, refreshed by nobody, for the whole visibility timeout
        (10 minutes by default: a run's end waited that long after a Redis restart)."""
        entries = await self.r.xpending_range(self.keys.shards, GROUP, min="-", max="+",
                                              count=10_000, consumername=self.consumer)
        held = {_text(e["message_id"]) for e in entries}
        # Past the visibility timeout any worker's XAUTOCLAIM takes a shard anyway (and those
        # this process released are there already).
        lost = [Claim(_text(e["message_id"]), "", "", -1, 0, b"", int(e["times_delivered"]))
                for e in entries if _text(e["message_id"]) not in known
                and min_idle * 1000 <= int(e["time_since_delivered"]) < self.visibility_ms]
        return lost, held

    async def still_mine(self, claim: Claim) -> bool:
        """Whether this consumer still holds the shard: False once another worker took it
        over (this one was cut off or stalled past the visibility timeout) or completed it."""
        info = await self.r.xpending_range(self.keys.shards, GROUP, min=claim.entry_id,
                                           max=claim.entry_id, count=1)
        return bool(info) and _text(info[0]["consumer"]) == self.consumer

    async def current_generation(self, partition: str
                                 ) -> tuple[str | None, str | None, str | None]:
        """The part's generation, its recipe (JSON) and its file's fingerprint, in one round
        trip."""
        generation, recipe, source = await self.r.hmget(self.keys.part(partition),
                                                        ["generation", "recipe", "source"])
        return _text(generation), _text(recipe), _text(source)

    async def complete(self, claim: Claim, outcome: Outcome) -> int:
        return int(await self._complete(keys=complete_keys(self.keys, claim.partition),
                                        args=complete_args(claim, outcome)))

    async def dead_letter(self, claim: Claim, outcome: Outcome, reason: str) -> int:
        """Park a poison shard in the dead stream and count its rows as failed."""
        await self.r.xadd(self.keys.dead, {"p": claim.partition, "g": claim.generation,
                                           "s": claim.shard, "n": claim.rows, "d": claim.payload,
                                           "reason": reason, "deliveries": claim.deliveries})
        return await self.complete(claim, outcome)


def encode_table(table: pa.Table) -> bytes:
    """Arrow IPC with zstd: compact in Redis, and decoded without a per-row parser."""
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def decode_table(data: bytes) -> pa.Table:
    import pyarrow as pa

    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()
