"""A download started again on a folder: what becomes of each part's queue state.

provenance.py judges a part's state; this applies the verdicts for a run over many parts: a
part final in this store is skipped, one made for another store, or with shards gone from the
store, starts again as a new generation, one whose file changed is refused, and a final part
whose fixable failures this run's settings decide otherwise has those rows fetched again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from laion_dagster.core.control import provenance
from laion_dagster.core.control.retry import RetryRefused, retry_failed
from laion_dagster.core.control.status import plural
from laion_dagster.core.input import parts
from laion_dagster.core.queue.protocol import PartState, Queue
from laion_dagster.core.settings import Settings


@dataclass
class Resumed:
    final: set[str] = field(default_factory=set)  # final already: nothing to do
    refused: dict[str, str] = field(default_factory=dict)  # part -> why it cannot run


def resume(queue: Queue, found: list[parts.Part], settings: Settings,
           say: Callable[[str], None]) -> Resumed:
    """Settle every part's queue state for this run, saying what it does and why."""
    resumed = Resumed()
    states = queue.parts_states([p.key for p in found])
    for part in found:
        state = states[part.key]
        if not state.generation:
            continue
        try:
            verdict = provenance.check(state, part, settings)
        except (provenance.PartChanged, parts.PartError) as error:
            resumed.refused[part.key] = str(error)
            continue
        reason = verdict.reason
        if not verdict.restart and state.finalized_at is not None:
            missing = provenance.missing_shards(queue, state, settings)
            if not missing:
                if not _refetch(queue, part, state, settings, say):
                    resumed.final.add(part.key)
                continue
            reason = (f"{part.key}: {missing} of {plural(state.shards_total or 0, 'shard')} "
                      f"are missing from {settings.store_root}; downloading them again (the "
                      "others are kept)")
        if reason:
            say(reason)
            queue.reset(part.key)
    return resumed


def _refetch(queue: Queue, part: parts.Part, state: PartState, settings: Settings,
             say: Callable[[str], None]) -> bool:
    """Queue again the failed rows of a final part that this run's settings decide otherwise
    (provenance.decided_otherwise); True if it did."""
    redo = provenance.decided_otherwise(state, queue.classes(part.key), settings)
    if redo is None:
        return False
    try:
        report = retry_failed(queue, part, settings, tuple(redo.classes))
    except (RetryRefused, parts.PartError, FileNotFoundError) as error:
        say(f"{redo.reason}; could not fetch them again: {error}")
        return False
    queue.set_fetch_policy(part.key, provenance.fetch_policy(settings))
    say(f"{redo.reason}: fetching those {plural(report.rows, 'row')} again")
    return report.rows > 0
