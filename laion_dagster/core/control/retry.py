"""Retrying only the failed rows of a part: what img2dataset cannot do.

The rows of the chosen error classes go back on the queue as new shards (ids above a
million, one range per retry round, one retry shard per shard of the part that has such rows)
in one atomic step that also takes their old failures out of the part's counts and error
records; their new outcome is counted when those shards complete, and written into the part's
shard they belong to (the worker merges it into that shard's files), and finalizing writes the
error file again. Nothing is counted twice, and every row stays in one shard parquet.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from laion_dagster.core.control.accounting import part_errors
from laion_dagster.core.control.enqueue import MAX_SHARD
from laion_dagster.core.input import parts
from laion_dagster.core.queue.protocol import RETRY_ROUND, Queue, encode_table
from laion_dagster.core.settings import Settings
from laion_dagster.core.shards.recipe import Recipe

# Worth another try by default: a transient network or server failure, or a DNS hiccup
# (a flaky resolver is the commonest cause of poor LAION success rates).
DEFAULT_CLASSES = ("timeout", "connection", "dns", "http_5xx")
ROUND = RETRY_ROUND


class RetryRefused(RuntimeError):
    """The part cannot be retried now; the message says why."""


@dataclass
class RetryReport:
    partition: str
    round: int
    rows: int
    shards: int
    classes: dict[str, int]


def retry_failed(queue: Queue, part: parts.Part, settings: Settings,
                 classes: tuple[str, ...] = DEFAULT_CLASSES) -> RetryReport:
    state = queue.part(part.key)
    if not state.done:
        raise RetryRefused(f"{part.key} is still downloading ({state.shards_done} of "
                           f"{state.shards_total or '?'} shards); retry once it is done")
    wanted = sorted(set(classes) - {"invalid_url"})  # a URL that is not one stays invalid
    errors = part_errors(queue, part.key, settings)
    chosen_mask = pc.is_in(errors.column("error_class"), pa.array(wanted, pa.string()))
    chosen = errors.filter(chosen_mask)
    if chosen.num_rows == 0:
        return RetryReport(part.key, state.retry_round, 0, 0, {})
    counts = dict(zip(*pc.value_counts(chosen.column("error_class")).flatten(), strict=True))
    counts = {k.as_py(): v.as_py() for k, v in counts.items()}
    rows = pa.array(sorted(set(chosen.column("row").to_pylist())), pa.int64())
    recipe = Recipe.from_json(state.recipe) if state.recipe else Recipe.from_settings(settings)
    required = (recipe.verify_hash_column,) if recipe.verify_hash_column else ()
    # The rows' full input (extra columns included) comes from the part file itself, cut
    # with the part's own shard size: each retry shard holds rows of one shard of the part,
    # and its id (round × 1,000,000 + that shard's) tells the worker which shard to merge
    # the new outcomes into, so every row stays in exactly one shard parquet.
    shards = []
    size = state.shard_size or settings.shard_size or MAX_SHARD  # the old default, if unrecorded
    for shard in parts.iter_shards(part.path, size,
                                   settings.url_column, settings.caption_column, required,
                                   settings.save_additional_columns, settings.key_columns):
        picked = shard.valid.filter(pc.is_in(shard.valid.column("row"), rows))
        if picked.num_rows:
            shards.append((shard.index, picked.num_rows, encode_table(picked)))
    remaining = errors.filter(pc.invert(chosen_mask))
    blob = encode_table(remaining) if remaining.num_rows else b""
    round_ = queue.requeue_failed(part.key, state.generation, blob, counts, shards)
    if round_ == -1:
        raise RetryRefused(f"{part.key} was reset while retrying; run again")
    return RetryReport(part.key, round_, sum(n for _, n, _ in shards), len(shards), counts)
