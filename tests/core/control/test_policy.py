"""The one launch / hold / finalize policy the sensors and `run` both follow (policy.py)."""

import time

from laion_dagster.core.control.policy import ENQUEUES_AT_ONCE, next_enqueues, to_finalize
from laion_dagster.core.queue.protocol import PartState
from laion_dagster.core.settings import Settings

KEYS = [f"laion2B-en/{n:05d}" for n in range(7)]


def _states(enqueued=(), done=(), final=()) -> dict[str, PartState]:
    states = {}
    for key in KEYS:
        state = PartState(partition=key)
        if key in enqueued or key in done or key in final:
            state = PartState(partition=key, generation=1, rows=100, shards=2, shards_total=2,
                              enqueued_at=time.time())
        if key in done or key in final:
            state = PartState(partition=key, generation=1, rows=100, shards=2, shards_total=2,
                              shards_done=2, ok=90, failed=10, enqueued_at=time.time(),
                              done_at=time.time(),
                              finalized_at=time.time() if key in final else None)
        states[key] = state
    return states


def test_starts_the_waiting_parts_in_order_within_the_room_left():
    settings = Settings()
    states = _states(enqueued=KEYS[:1])
    decision = next_enqueues(KEYS, states, 0, {}, settings)
    assert decision.start == KEYS[1:1 + ENQUEUES_AT_ONCE] and not decision.held
    # Two under way: room for the rest of ENQUEUES_AT_ONCE, after them, in order.
    busy = next_enqueues(KEYS, states, 0, {}, settings, enqueuing=KEYS[1:3])
    assert busy.start == KEYS[3:3 + ENQUEUES_AT_ONCE - 2]
    assert busy.waiting == KEYS[3:]
    # A part set aside (its enqueue failed) is passed over, not retried.
    aside = next_enqueues(KEYS, states, 0, {}, settings, set_aside={KEYS[1]})
    assert aside.start[0] == KEYS[2]


def test_holds_every_waiting_part_and_says_why_with_the_numbers():
    settings = Settings(queue_threshold=5_000)
    decision = next_enqueues(KEYS, _states(), 6_000, {}, settings)
    assert decision.start == [] and decision.waiting == KEYS
    assert decision.hold_message() == "holding 7 parts: queue 6,000 rows ≥ 5,000"
    full = {"a": {"disk_used_gb": 10, "disk_free_gb": 1, "paused": True,
                  "seen_at": time.time()}}
    disk = next_enqueues(KEYS, _states(), 0, full, Settings(disk_min_free_gb=5))
    assert disk.start == [] and disk.held == ["host a: 1.0 GB free ≤ 5.0 GB"]


def test_nothing_waiting_means_nothing_held():
    decision = next_enqueues(KEYS, _states(enqueued=KEYS), 10**9, {}, Settings())
    assert decision.start == decision.held == decision.waiting == []


def test_finalizes_parts_complete_and_not_final_yet():
    states = _states(enqueued=KEYS[:2], done=KEYS[2:4], final=KEYS[4:5])
    assert to_finalize(states) == KEYS[2:4]
    assert to_finalize(states, set_aside={KEYS[2]}) == [KEYS[3]]
