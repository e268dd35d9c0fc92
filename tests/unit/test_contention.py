"""The scheduler's decision (router/server/fleet/contention.py): when a busy resident gives way."""
from __future__ import annotations

from router.server.fleet.contention import COST_AWARE, FIFO, Waits, decide, next_in_line

#: A level-1 sleep and wake: about a second and a half.
SWITCH = 1.5
MAX_WAIT = 30.0


def cost_aware(resident: Waits, newcomer: Waits, switch: float = SWITCH) -> tuple[bool, str]:
    v = decide(COST_AWARE, resident, newcomer, switch, MAX_WAIT, awake_for=100.0, min_awake=80.0)
    return v.switch, v.reason


def test_waits_measure_from_when_each_request_began_to_wait() -> None:
    w = Waits.since(2, [10.0, 14.0, 19.0], now=20.0)
    assert (w.in_flight, w.waiting, w.queued) == (2, 3, 5)
    assert (w.oldest, w.accumulated) == (10.0, 10.0 + 6.0 + 1.0)
    assert Waits.since(0, [25.0], now=20.0).waited == (0.0,)  # a start after `now` (clocks) counts as no wait


def test_an_idle_resident_gives_way_after_a_pause_of_a_quarter_switch_even_to_a_request_just_come() -> None:
    # A 1.5 s switch: a pause is 0.375 s. Within it the resident's next request may come; after it, the GPU
    # would idle while a request waits.
    switch, reason = cost_aware(Waits(0, (), idle_for=0.37), Waits(0, (0.0,)))
    assert not switch and "less than a 0.38s pause" in reason
    switch, reason = cost_aware(Waits(0, (), idle_for=0.375), Waits(0, (0.0,)))
    assert switch and "no queued work" in reason
    assert Waits.since(0, [], now=5.0, idle_for=2.0).idle_for == 2.0


def test_a_resident_with_queued_work_keeps_serving_while_the_wait_is_below_the_switch_cost() -> None:
    # 5 in flight on the resident (counted twice: the switch there and back), 2 waiting on the
    # newcomer: 12 requests held up by a 1.5 s switch = 18 request-seconds.
    resident = Waits(5, ())
    switch, reason = cost_aware(resident, Waits(0, (8.9, 9.0)))
    assert not switch and "resident has 5 queued" in reason
    switch, reason = cost_aware(resident, Waits(0, (9.0, 9.0)))
    assert switch and "request-seconds" in reason


def test_a_crowd_gets_its_turn_sooner_than_a_lone_request() -> None:
    resident = Waits(8, ())
    lone = [t for t in range(1, 31) if cost_aware(resident, Waits(0, (float(t),)))[0]][0]
    crowd = [t for t in range(1, 31) if cost_aware(resident, Waits(0, (float(t),) * 8))[0]][0]
    assert (lone, crowd) == (26, 5)  # 1.5 s x (2 x 8 + 1) = 25.5; 1.5 x (2 x 8 + 8) / 8 = 4.5


def test_a_slower_switch_is_made_later() -> None:
    resident, newcomer = Waits(2, ()), Waits(0, (5.0, 5.0))
    assert cost_aware(resident, newcomer, switch=1.5)[0]  # 10 >= 1.5 x 6
    assert not cost_aware(resident, newcomer, switch=60.0)[0]  # a cold start: 10 < 360


def test_no_model_is_starved_the_oldest_request_switches_at_max_wait() -> None:
    resident = Waits(150, ())
    assert not cost_aware(resident, Waits(0, (MAX_WAIT - 0.1,)), switch=60.0)[0]
    switch, reason = cost_aware(resident, Waits(0, (MAX_WAIT,)), switch=60.0)
    assert switch and "max_wait_seconds" in reason


def test_fifo_is_the_baseline_the_resident_gives_way_after_min_sleep_duration_whatever_its_queue() -> None:
    busy = Waits(50, ())
    early = decide(FIFO, busy, Waits(0, (0.0,)), SWITCH, MAX_WAIT, awake_for=1.9, min_awake=2.0)
    due = decide(FIFO, busy, Waits(0, (0.0,)), SWITCH, MAX_WAIT, awake_for=2.0, min_awake=2.0)
    assert (early.switch, due.switch) == (False, True)
    assert "min_sleep_duration" in due.reason
    # With min_sleep_duration 0, fifo drains a busy resident for every newcomer: what cost_aware avoids.
    assert decide(FIFO, busy, Waits(0, (0.0,)), SWITCH, MAX_WAIT, awake_for=0.0, min_awake=0.0).switch
    assert not cost_aware(busy, Waits(0, (0.0,)))[0]


def test_a_resident_switched_in_serves_at_least_half_as_long_as_its_switch_took_even_idle() -> None:
    idle, crowd = Waits(0, (), idle_for=10.0), Waits(0, (5.0,) * 10)
    early = decide(COST_AWARE, idle, crowd, SWITCH, MAX_WAIT, awake_for=0.74, min_awake=0.0)
    assert not early.switch and "window" in early.reason
    assert decide(COST_AWARE, idle, crowd, SWITCH, MAX_WAIT, awake_for=0.75, min_awake=0.0).switch
    # ... but not past max_wait_seconds.
    assert decide(COST_AWARE, idle, Waits(0, (MAX_WAIT,)), SWITCH, MAX_WAIT, awake_for=0.0, min_awake=0.0).switch


def test_the_place_goes_to_the_biggest_accumulated_wait_not_the_first_to_ask() -> None:
    waiting = {"first": Waits(0, (6.0,)), "crowd": Waits(0, (3.0, 3.0, 1.0))}
    assert next_in_line(COST_AWARE, waiting, MAX_WAIT) == "crowd"  # 7 request-seconds against 6
    assert next_in_line(COST_AWARE, {"first": Waits(0, (8.0,)), **{"crowd": waiting["crowd"]}}, MAX_WAIT) == "first"


def test_max_wait_seconds_comes_before_the_crowd_the_longest_past_it_first() -> None:
    waiting = {"late": Waits(0, (30.0,)), "later": Waits(0, (31.0,)), "crowd": Waits(0, (29.0,) * 10)}
    assert next_in_line(COST_AWARE, waiting, MAX_WAIT) == "later"
    assert next_in_line(COST_AWARE, {"crowd": waiting["crowd"], "late": waiting["late"]}, MAX_WAIT) == "late"


def test_ties_are_broken_the_same_way_by_every_asker_and_fifo_keeps_the_order_of_asking() -> None:
    same = {"a": Waits(0, (2.0,)), "b": Waits(0, (1.0, 1.0))}
    assert next_in_line(COST_AWARE, same, MAX_WAIT) == "a"  # equal request-seconds: the oldest request first
    assert next_in_line(COST_AWARE, dict(reversed(list(same.items()))), MAX_WAIT) == "a"
    assert next_in_line(FIFO, same, MAX_WAIT) is None


def test_a_resident_whose_waiting_requests_are_going_in_keeps_its_place_under_either_policy() -> None:
    # Awake with requests still waiting: it has just woken for them, and they go in on the loop's next turns.
    for policy in (FIFO, COST_AWARE):
        v = decide(policy, Waits(0, (3.0, 2.0)), Waits(0, (MAX_WAIT,)), SWITCH, MAX_WAIT, awake_for=100.0,
                   min_awake=0.0)
        assert not v.switch and "2 requests that waited for it are going in" in v.reason
        assert decide(policy, Waits(2, ()), Waits(0, (MAX_WAIT,)), SWITCH, MAX_WAIT, awake_for=100.0,
                      min_awake=0.0).switch  # once in, they are in flight: the switch goes ahead (after a drain)
