"""Exclusive groups on fakes and a fake clock: waking one member puts the awake one to sleep first.

Read through what a user sees (the model states and the order of their events, the engine calls,
GET /residency's evictions), not through how placement picks its victims, which may change.
"""
from __future__ import annotations

import asyncio
from typing import Callable

from fakes import Clock, FakeControl, Recorder, instance, settle

from router.config import ResidencySettings, SleepSettings
from router.config.residency import Group
from router.observe.events import Events
from router.observe.metrics import ModelMetrics
from router.server.fleet.lifecycle import Lifecycle
from router.server.fleet.models import Model, ModelTable
from router.server.fleet.replica import Replica
from router.server.fleet.residency import Residency
from router.util.states import AWAKE, HOLDING_GPU, SLEEPING

#: How long a member stays awake before another may take its turn (min_sleep_duration).
TURN = 30.0


def group(names: str = "ab", exclusive: bool = True, policy: str = "cost_aware",
          turn: float = TURN) -> tuple[ModelTable, Residency, FakeControl, Clock, Recorder]:
    """One model per letter (replica `<letter>-0`), all awake, the letters one group."""
    events = Events()
    control = FakeControl()
    clock = Clock()
    recorder = Recorder(events)
    table: list[ModelTable] = []
    settings = ResidencySettings(groups=(Group("pair", tuple(f"{n}-0" for n in names), exclusive),), policy=policy)
    residency = Residency(lambda: table[0], lambda: settings, lambda: turn)

    def lifecycle(name: str, members: Callable[[], tuple[Replica, ...]]) -> Lifecycle:
        return Lifecycle(name, members, SleepSettings(drain_timeout_seconds=5.0), control, events,  # type: ignore[arg-type]
                         residency, clock=clock)

    models = {n: Model(n, (Replica(instance(f"{n}-0", model=n), events),), lifecycle, ModelMetrics(n), 1)
              for n in names}
    table.append(ModelTable(models, {n: n for n in models}))
    clock.advance(TURN)  # every member has been idle a while
    return table[0], residency, control, clock, recorder


def model(table: ModelTable, name: str) -> Model:
    found = table.get(name)
    assert found is not None
    return found


def states(table: ModelTable) -> dict[str, str]:
    return {m.name: m.lifecycle.state for m in table}


def engine_calls(control: FakeControl) -> list[tuple[str, str]]:
    """The sleep and wake calls to the engines, in order: (instance, path)."""
    return [(name, path) for kind, name, path in control.calls if kind == "call"]


def evictions(residency: Residency) -> list[tuple[object, ...]]:
    """GET /residency's last evictions: (model, action, reason)."""
    recent = residency.report()["evictions"]
    assert isinstance(recent, list)
    return [(e["model"], e["action"], e["reason"]) for e in recent]


def transitions(recorder: Recorder) -> list[tuple[str, str]]:
    """The sleep and wake moves of the models, in the order of their events."""
    moves = ("falling_asleep", SLEEPING, "waking", AWAKE)
    return [(e.model or "", e.state) for e in recorder.seen if e.kind == "model" and e.state in moves]


def holding_at_each_event(recorder: Recorder, start: dict[str, str]) -> list[set[str]]:
    """The models holding their GPU memory after each model event, replayed from `start`."""
    now, out = dict(start), []
    for e in recorder.seen:
        if e.kind == "model" and e.model is not None:
            now[e.model] = e.state
            out.append({m for m, s in now.items() if s in HOLDING_GPU})
    return out


def test_waking_one_member_puts_the_awake_one_to_sleep_first() -> None:
    async def test() -> None:
        table, residency, control, clock, recorder = group()
        a, b = model(table, "a"), model(table, "b")
        assert (await b.lifecycle.sleep()).ok
        clock.advance(TURN)
        before = states(table)
        assert before == {"a": AWAKE, "b": SLEEPING}
        recorder.seen.clear()
        control.calls.clear()
        await b.lifecycle.admit()  # a request for b
        assert states(table) == {"a": SLEEPING, "b": AWAKE}
        # a's sleep call went to its engine before b's wake call, and every a event came before b's first.
        calls = engine_calls(control)
        assert [n for n, _ in calls] == ["a-0", "b-0"] and "sleep" in calls[0][1] and "wake" in calls[1][1]
        assert transitions(recorder) == [("a", "falling_asleep"), ("a", SLEEPING), ("b", "waking"), ("b", AWAKE)]
        # Never both holding the GPU, at any event.
        assert all(len(held) <= 1 for held in holding_at_each_event(recorder, before))
        assert evictions(residency) == [("a", "sleep", "group_swap")]
        assert a.lifecycle.state == SLEEPING
    asyncio.run(test())


def test_a_request_in_flight_on_the_awake_member_finishes_before_it_sleeps() -> None:
    async def test() -> None:
        table, _, control, clock, recorder = group()
        a, b = model(table, "a"), model(table, "b")
        assert (await b.lifecycle.sleep()).ok
        clock.advance(TURN)
        await a.lifecycle.admit()  # a request on a, in flight
        control.calls.clear()
        recorder.seen.clear()
        wanting = asyncio.ensure_future(b.lifecycle.admit())
        await settle()
        # a drains: its request goes on, nothing is slept or woken yet, b's request waits.
        assert not wanting.done() and a.lifecycle.in_flight == 1
        assert engine_calls(control) == [] and b.lifecycle.state == SLEEPING
        a.lifecycle.release()  # the request on a ends
        clock.advance(TURN)  # and a pause passes with nothing more for a: it gives way
        await asyncio.wait_for(wanting, 5)
        assert states(table) == {"a": SLEEPING, "b": AWAKE}
        assert [n for n, _ in engine_calls(control)] == ["a-0", "b-0"]
        a_states = [e.state for e in recorder.seen if e.kind == "model" and e.model == "a"]
        assert a_states[:3] == ["draining", "falling_asleep", SLEEPING]
        assert transitions(recorder) == [("a", "falling_asleep"), ("a", SLEEPING), ("b", "waking"), ("b", AWAKE)]
    asyncio.run(test())


def test_a_member_woken_less_than_min_sleep_duration_ago_keeps_its_turn() -> None:
    async def test() -> None:
        table, _, control, clock, _ = group()
        a, b = model(table, "a"), model(table, "b")
        assert (await a.lifecycle.sleep()).ok
        assert (await a.lifecycle.wake()).ok  # b is put to sleep: a's turn starts now
        assert states(table) == {"a": AWAKE, "b": SLEEPING}
        await a.lifecycle.admit()  # and a serves
        control.calls.clear()
        wanting = asyncio.ensure_future(b.lifecycle.admit())
        await settle()
        assert not wanting.done() and states(table) == {"a": AWAKE, "b": SLEEPING}
        a.lifecycle.release()
        clock.advance(TURN)  # a's turn is over: the swap goes ahead
        await asyncio.wait_for(wanting, 5)
        assert states(table) == {"a": SLEEPING, "b": AWAKE}
        assert [n for n, _ in engine_calls(control)] == ["a-0", "b-0"]
    asyncio.run(test())


def test_members_of_a_group_that_is_not_exclusive_stay_awake_together() -> None:
    async def test() -> None:
        table, residency, control, _, _ = group(exclusive=False)
        b = model(table, "b")
        assert (await b.lifecycle.sleep()).ok
        control.calls.clear()
        await b.lifecycle.admit()
        assert states(table) == {"a": AWAKE, "b": AWAKE}
        assert [n for n, _ in engine_calls(control)] == ["b-0"] and evictions(residency) == []
    asyncio.run(test())



def test_requests_that_waited_for_a_wake_go_in_before_another_member_takes_the_place() -> None:
    """Under fifo with no min_sleep_duration, a member that wakes while another member's requests wait
    gives way at once; but the requests that waited for its wake are let in first (they were once sent
    back to wait for the next turn, and waited a whole round more)."""
    async def test() -> None:
        table, residency, _, _, _ = group("abc", policy="fifo", turn=0.0)
        residency.poll_seconds = 0.0  # the other asker looks at every turn of the loop
        a, b, c = model(table, "a"), model(table, "b"), model(table, "c")
        assert (await b.lifecycle.sleep()).ok and (await c.lifecycle.sleep()).ok
        await a.lifecycle.admit()  # a serves one request
        for_b = asyncio.ensure_future(b.lifecycle.admit())  # b asks: a drains
        await settle()
        assert a.lifecycle.state == "draining"
        for_a = asyncio.ensure_future(a.lifecycle.admit())  # a request for a, while a drains: it waits
        await settle()
        a.lifecycle.release()  # a's request ends: a sleeps, b wakes, and a asks for the place back
        await asyncio.wait_for(for_b, 5)
        for_c = asyncio.ensure_future(c.lifecycle.admit())  # c asks too, after a
        await settle()
        b.lifecycle.release()  # b's request ends: b sleeps, a wakes
        await asyncio.wait_for(for_a, 5)
        # a's request is in: a drains for c only once it is over.
        assert a.lifecycle.in_flight == 1 and not for_c.done()
        a.lifecycle.release()
        await asyncio.wait_for(for_c, 5)
        assert states(table) == {"a": SLEEPING, "b": SLEEPING, "c": AWAKE}
    asyncio.run(test())
