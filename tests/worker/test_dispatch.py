"""The order a worker process fetches its rows in (worker/dispatch.py): pure bookkeeping, so
these tests drive it step by step, as process.py does, and check what a user relies on: no
host over its limit, no slot held by a host at its limit, a busy host's rows back to back on
its warm connection, every row taken exactly once."""

from __future__ import annotations

import random
from collections import Counter

from laion_dagster.worker.dispatch import ROWS_PER_CONNECTION, Dispatcher


def take_all(dispatcher: Dispatcher) -> list[tuple[str, object]]:
    taken = []
    while (item := dispatcher.take()) is not None:
        taken.append(item)
    return taken


def test_a_host_opens_one_connection_per_few_waiting_rows_up_to_its_limit():
    """One connection serves a host's rows one after another; another opens only for every
    ROWS_PER_CONNECTION rows waiting, and never more than per_host_limit."""
    dispatcher = Dispatcher(concurrency=100, per_host_limit=8)
    dispatcher.add(("few.example", i) for i in range(ROWS_PER_CONNECTION))
    dispatcher.add(("some.example", i) for i in range(3 * ROWS_PER_CONNECTION))
    dispatcher.add(("many.example", i) for i in range(1000))
    busy = Counter(host for host, _ in take_all(dispatcher))
    assert busy == {"few.example": 1, "some.example": 3, "many.example": 8}
    assert dispatcher.free == 100 - 12
    assert dispatcher.stalled  # free slots, but every waiting row waits on its host


def test_a_finished_fetch_hands_its_slot_to_the_same_hosts_next_row_first():
    """The row after a finished fetch is the same host's (its connection is warm), ahead of
    hosts that were waiting for their turn."""
    dispatcher = Dispatcher(concurrency=2, per_host_limit=8)
    dispatcher.add([("a.example", 1), ("b.example", 1), ("c.example", 1), ("a.example", 2),
                    ("a.example", 3)])
    assert take_all(dispatcher) == [("a.example", 1), ("b.example", 1)]
    dispatcher.finish("a.example")
    assert dispatcher.take() == ("a.example", 2)
    dispatcher.finish("b.example")  # b has nothing left: the next host in turn goes
    assert dispatcher.take() == ("c.example", 1)
    assert dispatcher.take() is None  # no free slot
    dispatcher.finish("a.example")
    assert dispatcher.take() == ("a.example", 3)


def test_rows_due_for_their_later_try_go_first_each_on_a_connection_of_its_own():
    """Rows whose later try is due have waited their delay already: they go at the head of
    their host's queue, their host ahead of the others in turn, and each opens a connection
    of its own up to per_host_limit, instead of one per few rows (queued behind each other,
    a host's hanging rows started seconds late on bench/field.py, one per SLOW_FETCH, and the
    run's end moved by more than the delay)."""
    dispatcher = Dispatcher(concurrency=1, per_host_limit=8)
    dispatcher.add([("a.example", 1), ("b.example", 1), ("b.example", 2)])
    assert dispatcher.take() == ("a.example", 1)
    dispatcher.add([("b.example", "later")], due=True)
    dispatcher.finish("a.example")
    assert dispatcher.take() == ("b.example", "later")
    dispatcher.finish("b.example")
    assert take_all(dispatcher) == [("b.example", 1)]

    wide = Dispatcher(concurrency=100, per_host_limit=8)
    wide.add([("h.example", "first")])
    assert take_all(wide) == [("h.example", "first")]
    wide.add(("h.example", f"first {i}") for i in range(3))
    assert take_all(wide) == []  # rows on their first try wait for the warm connection
    wide.drop(lambda row: True)
    wide.add((("h.example", f"later {i}") for i in range(3)), due=True)
    assert len(take_all(wide)) == 3  # each on a connection of its own at once
    wide.add((("h.example", f"later {i}") for i in range(3, 13)), due=True)
    assert len(take_all(wide)) == 4  # within per_host_limit (8)


def test_a_slow_fetch_lets_its_host_open_another_connection_within_its_limit():
    """Rows queued behind a fetch that hangs go out once it is reported slow, one more
    connection per slow fetch, never past per_host_limit; when the slow fetch ends, the
    host is back to its share."""
    dispatcher = Dispatcher(concurrency=100, per_host_limit=3)
    dispatcher.add(("h.example", i) for i in range(3))  # fewer than ROWS_PER_CONNECTION
    assert take_all(dispatcher) == [("h.example", 0)]
    dispatcher.slowed("h.example")
    assert take_all(dispatcher) == [("h.example", 1)]
    dispatcher.slowed("h.example")
    assert take_all(dispatcher) == [("h.example", 2)]
    dispatcher.add(("h.example", i) for i in range(3, 6))
    dispatcher.slowed("h.example")
    assert take_all(dispatcher) == []  # three under way: the limit
    dispatcher.finish("h.example", slow=True)
    assert take_all(dispatcher) == [("h.example", 3)]
    assert dispatcher.busy["h.example"] == 3
    for _ in range(2):
        dispatcher.finish("h.example", slow=True)
    dispatcher.finish("h.example")
    # No slow fetch left: two rows waiting share one connection again.
    assert take_all(dispatcher) == [("h.example", 4)]
    assert not dispatcher.slow


def test_hosts_take_turns_for_the_slots_left():
    dispatcher = Dispatcher(concurrency=6, per_host_limit=1)
    for host in ("a", "b", "c"):
        dispatcher.add((host, i) for i in range(5))
    assert [host for host, _ in take_all(dispatcher)] == ["a", "b", "c"]
    assert dispatcher.free == 3 and dispatcher.stalled


def test_no_limit_of_its_own_means_the_process_concurrency():
    dispatcher = Dispatcher(concurrency=10, per_host_limit=0)
    dispatcher.add(("one.example", i) for i in range(1000))
    assert len(take_all(dispatcher)) == 10
    assert not dispatcher.stalled  # no free slot: nothing to ask for


def test_dropped_rows_are_never_taken_and_the_count_stays_true():
    dispatcher = Dispatcher(concurrency=4, per_host_limit=4)
    dispatcher.add((f"h{i % 3}", ("abandoned" if i % 2 else "kept", i)) for i in range(30))
    assert dispatcher.drop(lambda row: row[0] == "abandoned") == 15
    assert dispatcher.queued == 15
    seen = []
    while dispatcher.queued or dispatcher.busy:
        for host, row in take_all(dispatcher):
            seen.append(row)
            dispatcher.finish(host)
    assert sorted(i for _, i in seen) == list(range(0, 30, 2))
    assert all(kind == "kept" for kind, _ in seen)


def test_every_row_is_taken_once_and_no_limit_is_ever_exceeded():
    """A random mix of Zipf-like hosts, added in batches while fetches finish in random order:
    each row comes out exactly once, at most per_host_limit per host and concurrency in all
    at any moment."""
    rng = random.Random(7)
    hosts = [f"h{i}.example" for i in range(50)]
    weights = [1 / (rank + 1) for rank in range(len(hosts))]
    dispatcher = Dispatcher(concurrency=32, per_host_limit=4)
    added, taken, under_way = 0, [], []
    for _batch in range(40):
        rows = [(rng.choices(hosts, weights)[0], added + i) for i in range(rng.randint(0, 80))]
        added += len(rows)
        dispatcher.add(rows)
        for _ in range(rng.randint(1, 40)):
            item = dispatcher.take()
            if item is None:
                break
            taken.append(item[1])
            under_way.append(item[0])
            assert len(under_way) <= 32
            assert Counter(under_way)[item[0]] <= 4
        rng.shuffle(under_way)
        for _ in range(rng.randint(0, len(under_way))):
            dispatcher.finish(under_way.pop())
    while dispatcher.queued:
        item = dispatcher.take()
        if item is None:
            dispatcher.finish(under_way.pop())
            continue
        taken.append(item[1])
        under_way.append(item[0])
        assert Counter(under_way)[item[0]] <= 4
    assert sorted(taken) == list(range(added))
