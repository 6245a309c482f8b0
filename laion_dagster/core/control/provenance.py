"""What a part's queue state was made from and for, and whether it still describes this run.

A part's hash in Redis records the fingerprint of the file it was enqueued from and the store
its shards were written to. Its counts are about those files and no others: a run with another
store, or a changed part file, must not report them as its own (or skip the part as final).

- Another store: the part is downloaded again, as a new generation, into the store of this
  run; nothing in the old store is touched.
- A changed file, same store: refused with a message, because downloading it would replace
  shards made from the old file; the user starts it over on purpose (reset / start_over).
- A final part whose shards are missing from its store (deleted since): downloaded again as a
  new generation; shards still on disk are kept (incremental mode), so only the missing ones
  cost requests.
- A final part whose fixable failures (outcomes.DECIDED_BY) were decided by settings that now
  differ (private addresses allowed since, another resolver, a CA bundle): those rows are not
  final any more (`decided_otherwise`); `run` fetches them again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from laion_dagster.core.input import parts
from laion_dagster.core.outcomes import DECIDED_BY, FETCH_POLICY
from laion_dagster.core.queue.protocol import PartState, Queue, original_shard
from laion_dagster.core.settings import Settings
from laion_dagster.core.shards.files import complete_shards


class PartChanged(RuntimeError):
    """The part file changed since its queue state was made; the message says how to go on."""


@dataclass(frozen=True)
class Verdict:
    restart: bool  # start a new generation before going on
    reason: str | None = None  # why (for the log and the progress output)


def check(state: PartState, part: parts.Part, settings: Settings,
          fingerprint: str | None = None) -> Verdict:
    """Whether `state` (as recorded in Redis) describes `part` written to this run's store.

    Raises PartChanged for a changed file; returns restart=True for another store. A part that
    was never enqueued, or whose state predates these records, is fine as it is.
    """
    store = str(settings.store_root)
    if state.store is not None and state.store != store:
        return Verdict(True, f"{part.key} was downloaded into {state.store}, not {store}; "
                             f"downloading it into {store} as generation "
                             f"{state.generation + 1}")
    current = fingerprint or parts.fingerprint(part.path)
    if state.source is not None and state.source != current:
        raise PartChanged(
            f"{part.key}: {part.path} changed since its rows were queued (size:footer "
            f"{state.source} then, {current} now); its shards in {store} were made from the "
            f"old file. To download the new file into {store}, replacing them, start the part "
            f"over: `laion-dagster reset {part.key}` (or materialize enqueued_part with "
            "start_over: true); or choose another --store-dir")
    return Verdict(False)


def missing_shards(queue: Queue, state: PartState, settings: Settings) -> int:
    """Shards of a finished part that its store no longer holds (deleted since). A retry
    shard was merged into its part's shard (or, on a store spread over hosts, written as a
    shard of its own): either is there."""
    if not state.done:
        return 0
    complete = complete_shards(settings.store_root / parts.relative_dir(state.partition))
    return sum(not (shard in complete or original_shard(shard) in complete)
               for shard in queue.done_shards(state.partition))


def fetch_policy(settings: Settings) -> str:
    """The settings that decide a part's fixable failures at fetch time, as JSON (kept with
    the part's state)."""
    values = settings.model_dump(mode="json", include=set(FETCH_POLICY))
    return json.dumps(values, sort_keys=True)


@dataclass(frozen=True)
class Refetch:
    classes: dict[str, int]  # error class -> failed rows to fetch again
    reason: str  # in a sentence: what decided them then, and what would now


def decided_otherwise(state: PartState, classes: dict[str, int],
                      settings: Settings) -> Refetch | None:
    """The failures of a part that this run's settings would decide otherwise, or None.

    A part downloaded with private addresses refused has its rows failed as blocked_address;
    run again with them allowed, those rows are not its outcome any more. Parts recorded
    before their policy was kept are left as they are.
    """
    if state.fetch_policy is None:
        return None
    then = json.loads(state.fetch_policy)
    now = json.loads(fetch_policy(settings))
    redo: dict[str, int] = {}
    changes: set[str] = set()
    for error_class, names in DECIDED_BY.items():
        changed = [n for n in names if then.get(n) != now.get(n)]
        if changed and classes.get(error_class):
            redo[error_class] = classes[error_class]
            changes.update(changed)
    if not redo:
        return None
    rows = ", ".join(f"{count:,} {name}" for name, count in sorted(redo.items()))
    settings_then = ", ".join(f"{n}={then.get(n)!r}" for n in sorted(changes))
    settings_now = ", ".join(f"{n}={now.get(n)!r}" for n in sorted(changes))
    return Refetch(redo, f"{state.partition}: its failed rows ({rows}) were decided with "
                         f"{settings_then}; this run has {settings_now}")
