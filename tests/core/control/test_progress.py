"""What the UI is told while a download runs (core/progress.py): each part's state and figures,
and when a part, the hosts and the queue are reported, so the event log stays small."""

import json

import pytest

from laion_dagster.core.control.progress import (
    HEARTBEAT,
    MOVING_EVERY,
    STATES,
    STEP,
    Watch,
    part_state,
    view_part,
)
from laion_dagster.core.queue.protocol import PartState
from laion_dagster.core.settings import Settings

NOW = 1_800_000_000.0


def part(key="laion2B-en/00000", **values) -> PartState:
    base = {"generation": 1, "rows": 10_000, "shards": 10, "shards_total": 10,
            "started_at": NOW - 100, "enqueued_at": NOW - 90}
    return PartState(partition=key, **(base | values))


def host(paused=False, waiting=0, seen=NOW) -> dict:
    return {"disk_used_gb": 10, "disk_free_gb": 90, "paused": paused,
            "pause_reason": "1 GB free ≤ 5 GB" if paused else None, "processes": 2,
            "alive_processes": 2, "rate": 120.0, "seen_at": seen, "waiting": waiting}


def test_a_part_goes_through_its_states():
    assert part_state(PartState(partition="a/b")) == "queued"
    assert part_state(part(enqueued_at=None)) == "enqueuing"
    assert part_state(part()) == "downloading"
    assert part_state(part(), paused=True) == "paused"
    assert part_state(part(shards_done=10, done_at=NOW)) == "finalizing"
    assert part_state(part(shards_done=10, done_at=NOW, finalized_at=NOW)) == "final"
    assert part_state(part(), failed=True) == "failed"


def test_a_parts_figures_while_it_downloads_and_at_its_end_have_the_same_keys():
    moving = view_part(part(ok=3_000, failed=900, invalid=100, shards_done=4),
                       {"http_4xx": 800, "dns": 100}, now=NOW, last=(2_000, NOW - 30))
    figures = moving.figures()
    assert figures["state"] == "downloading" and figures["rows_done"] == 4_000
    assert figures["images_per_second"] == round(2_000 / 30, 1)  # since last reported
    assert figures["eta_s"] == round(6_000 / (2_000 / 30))
    assert figures["failed_http_4xx"] == 800 and figures["failed_timeout"] == 0
    assert figures["success_rate"] == round(3_000 / 3_900, 4)
    final = view_part(part(ok=8_000, failed=1_900, invalid=100, shards_done=10, done_at=NOW,
                           finalized_at=NOW), {}, now=NOW + 50).figures()
    assert set(final) == set(figures)
    assert final["state"] == "final" and final["eta_s"] == 0 and final["rows_done"] == 10_000
    assert final["images_per_second"] == round(9_900 / 100, 1)  # over its life


def test_a_downloading_part_is_reported_when_it_moves_and_says_why_when_it_does_not():
    settings = Settings()
    watch = Watch()
    states = {"a/0": part("a/0", ok=100), "a/1": PartState(partition="a/1")}
    first = watch.look(states, {}, {"h": host()}, 9_900, 0, settings, now=NOW)
    assert [v.partition for v in first.parts] == ["a/0"]  # a queued part: nothing to see yet
    assert watch.look(states, {}, {"h": host(seen=NOW + 30)}, 9_900, 0, settings,
                      now=NOW + 30).parts == []
    states["a/0"] = part("a/0", ok=600, shards_done=1)
    [moved] = watch.look(states, {}, {"h": host(seen=NOW + 60)}, 9_400, 0, settings,
                         now=NOW + 60).parts
    assert moved.rows_done == 600 and moved.images_per_second == pytest.approx(500 / 60)
    # It stops: the host is paused. Said once, with the reason; then again only after a while.
    [still] = watch.look(states, {}, {"h": host(paused=True, seen=NOW + 90)}, 9_400, 0,
                         settings, now=NOW + 90).parts
    assert still.state == "paused" and still.why == "host h paused: 1 GB free ≤ 5 GB"
    assert watch.look(states, {}, {"h": host(paused=True, seen=NOW + 120)}, 9_400, 0,
                      settings, now=NOW + 120).parts == []
    again = watch.look(states, {}, {"h": host(paused=True, seen=NOW + 90 + HEARTBEAT)}, 9_400,
                       0, settings, now=NOW + 90 + HEARTBEAT).parts
    assert [v.state for v in again] == ["paused"]
    # No worker reports any more: that is why.
    [gone] = watch.look(states, {}, {}, 9_400, 0, settings, now=NOW + 100 + HEARTBEAT).parts
    assert gone.why == "no worker is reporting"


def test_a_large_part_is_reported_by_its_steps_and_every_few_minutes_not_every_tick():
    """A LAION part (18 M rows) moves a little every tick: it is reported when it moved by
    STEP of its rows, or MOVING_EVERY seconds after its last report, whichever comes first;
    a class once shown stays among its keys (the UI would keep a left-out key's old value)."""
    settings = Settings()
    watch = Watch()
    rows = 18_000_000
    big = {"generation": 1, "rows": rows, "shards": 1_800, "shards_total": 1_800}

    def tick(at: float, done: int, classes: dict) -> list:
        """Rows always wait for their later try, fewer or more each tick: the part's why
        says so, its numbers moving (not news each tick)."""
        states = {"a/0": part("a/0", ok=done, **big)}
        busy = host(seen=at, waiting=int(at) % 97 + 1)
        return watch.look(states, {"a/0": classes}, {"h": busy}, 0, 0, settings,
                          now=at).parts

    [first] = tick(NOW, 10_000, {"dns": 5})
    assert "wait for their later try" in first.why
    assert [k for k in first.figures() if k.startswith("failed_")] == ["failed_dns"]
    small_step = 10_000  # per 30 s tick: far less than STEP of the part
    reported = [t for t in range(1, 13)
                if tick(NOW + 30 * t, 10_000 + small_step * t, {"dns": 5})]
    assert reported == [MOVING_EVERY // 30 * n for n in (1, 2, 3)]
    [leap] = tick(NOW + 400, 10_000 + 12 * small_step + int(STEP * rows), {"http_4xx": 9})
    assert [k for k in leap.figures() if k.startswith("failed_")] == [
        "failed_dns", "failed_http_4xx"]
    assert leap.figures()["failed_dns"] == 0


def test_a_parts_end_is_reported_once_and_the_memory_survives_a_cursor():
    settings = Settings()
    watch = Watch()
    states = {"a/0": part("a/0", ok=9_000, failed=1_000, shards_done=10, done_at=NOW,
                          finalized_at=NOW)}
    assert [v.state for v in watch.look(states, {}, {}, 0, 0, settings, now=NOW).parts] == [
        "final"]
    restored = Watch.from_json(watch.to_json())
    assert restored.look(states, {}, {}, 0, 0, settings, now=NOW + 30).parts == []
    assert Watch.from_json("not json").parts == {}


def test_the_hosts_and_the_queue_are_reported_when_they_change_and_the_table_on_a_state_change():
    settings = Settings(queue_threshold=5_000)
    watch = Watch()
    states = {f"a/{i}": PartState(partition=f"a/{i}") for i in range(3)}
    states["a/0"] = part("a/0")
    first = watch.look(states, {}, {"h": host()}, 6_000, 1, settings, now=NOW)
    assert first.hosts["hosts"] == 1 and first.hosts["images_per_second"] == 120.0
    assert first.hosts["table"][0]["state"] == "running"
    queue = first.queue
    assert (queue["queued_rows"], queue["queue_threshold"], queue["dead_letters"]) == (
        6_000, 5_000, 1)
    assert queue["hold"] == "holding new parts: queue 6,000 rows ≥ 5,000"
    assert (queue["parts_queued"], queue["parts_downloading"]) == (2, 1)
    assert [row["state"] for row in queue["parts"]] == ["queued", "queued", "downloading"]
    same = watch.look(states, {}, {"h": host()}, 6_000, 1, settings, now=NOW + 30)
    assert same.hosts is None and same.queue is None  # nothing changed: nothing said
    # Only numbers moved (a heartbeat later, rows queued): said every MOVING_EVERY seconds.
    moving = watch.look(states, {}, {"h": host(seen=NOW + 60)}, 5_900, 1, settings,
                        now=NOW + 60)
    assert moving.hosts is None and moving.queue is None
    later = watch.look(states, {}, {"h": host(seen=NOW + MOVING_EVERY)}, 5_800, 1, settings,
                       now=NOW + MOVING_EVERY)
    assert later.hosts["table"][0]["last_heartbeat"] != first.hosts["table"][0][
        "last_heartbeat"]
    assert later.queue["queued_rows"] == 5_800
    # The state changed (the queue below its threshold, the host paused: another hold): said
    # at the next tick.
    fewer = watch.look(states, {}, {"h": host(paused=True, seen=NOW + MOVING_EVERY + 30)},
                       4_000, 1, settings, now=NOW + MOVING_EVERY + 30)
    assert fewer.queue["queued_rows"] == 4_000
    assert fewer.queue["hold"] == "holding new parts: host h: 1 GB free ≤ 5 GB"
    assert fewer.hosts["hosts_paused"] == 1
    assert [row["state"] for row in fewer.queue["parts"]] == ["queued", "queued", "paused"]
    assert "parts" not in later.queue  # no part changed state then: no table
    states["a/1"] = part("a/1", enqueued_at=None)
    changed = watch.look(states, {}, {"h": host(paused=True, seen=NOW + MOVING_EVERY + 60)},
                         4_000, 1, settings, now=NOW + MOVING_EVERY + 60)
    assert [row["state"] for row in changed.queue["parts"]] == ["queued", "enqueuing",
                                                                "paused"]
    assert len(json.dumps(changed.queue)) < 2_000
    assert set(STATES) == {k.removeprefix("parts_") for k in changed.queue
                           if k.startswith("parts_") and k != "parts"}
