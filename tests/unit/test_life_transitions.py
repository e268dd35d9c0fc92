"""Each legal move of a model's machine, made by the real operations over a fake engine control,
fake supervisord process states and a fake clock."""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

import pytest
from fakes import make, process, settle, stopped

from router.config import SleepSettings
from router.server.fleet.outcome import ModelUnavailable, Outcome

Test = Callable[[], Awaitable[None]]


def run(test: Test) -> None:
    asyncio.run(asyncio.wait_for(test(), 10))


def test_thirty_requests_at_a_stopped_model_share_one_start() -> None:
    async def test() -> None:
        lc, control, _, rec, replicas = make(("m-0", "m-1"), on_demand=True)
        stopped(lc, replicas)
        control.hold("start")
        admits = [asyncio.ensure_future(lc.admit()) for _ in range(30)]
        await settle()
        assert lc.state == "starting" and lc.waiting == 30 and lc.in_flight == 0
        control.release("start")
        await asyncio.gather(*admits)
        assert control.count("start") == 2  # one per replica, however many requests
        assert lc.state == "awake" and lc.in_flight == 30 and lc.waiting == 0 and lc.start_count == 1
        assert rec.states()[-2:] == ["starting", "awake"]
        assert all(r.health == "healthy" for r in replicas)
    run(test)


def test_a_failed_start_refuses_its_requests_and_the_next_request_tries_again() -> None:
    async def test() -> None:
        lc, control, _, rec, replicas = make(on_demand=True)
        stopped(lc, replicas)
        control.start_state = "FATAL"
        with pytest.raises(ModelUnavailable, match="went FATAL while starting"):
            await lc.admit()
        assert lc.state == "failed" and lc.start_failures == 1 and lc.in_flight == 0
        assert rec.states()[-3:] == ["starting", "failed", "start_failed"]
        assert control.count("stop") == 1  # no more retries by supervisord
        control.start_state = "RUNNING"
        await lc.admit()
        assert lc.state == "awake" and lc.in_flight == 1
    run(test)


def test_thirty_requests_at_a_sleeping_model_share_one_wake() -> None:
    async def test() -> None:
        lc, control, clock, rec, replicas = make(("m-0", "m-1"))
        assert (await lc.sleep()).ok and lc.state == "sleeping"
        assert all(r.asleep for r in replicas)
        control.hold("call")
        admits = [asyncio.ensure_future(lc.admit()) for _ in range(30)]
        await settle()
        assert lc.state == "waking" and lc.waiting == 30
        clock.advance(2.5)
        control.release("call")
        await asyncio.gather(*admits)
        assert control.count("call", "/wake_up") == 2
        assert lc.state == "awake" and lc.in_flight == 30 and lc.wake_count == 1 and lc.last_wake_seconds == 2.5
        assert rec.states() == ["draining", "falling_asleep", "sleeping", "waking", "awake"]
        assert not any(r.asleep for r in replicas)
    run(test)


def test_a_sleep_drains_first_and_a_request_held_meanwhile_wakes_the_model_after() -> None:
    async def test() -> None:
        lc, control, _, rec, _ = make()
        await lc.admit()
        sleep = asyncio.ensure_future(lc.sleep())
        await settle()
        assert lc.state == "draining" and control.count("call") == 0
        held = asyncio.ensure_future(lc.admit())  # held, not refused
        await settle()
        assert lc.waiting == 1 and not held.done()
        lc.release()
        assert (await sleep).ok
        await held
        assert control.count("call", "/sleep") == 1 and control.count("call", "/wake_up") == 1
        assert rec.states() == ["draining", "falling_asleep", "sleeping", "waking", "awake"]
        assert lc.state == "awake" and lc.in_flight == 1 and lc.sleep_count == 1 and lc.manual is False
    run(test)


def test_an_operators_sleep_that_joins_the_idle_loops_is_the_operators() -> None:
    async def test() -> None:
        lc, control, _, _, _ = make()
        control.hold("call")
        idle = asyncio.ensure_future(lc.sleep(lambda: None))  # the idle loop's: its check finds no blocker
        await settle()
        manual = asyncio.ensure_future(lc.sleep())  # the operator's, while the idle loop's call runs
        await settle()
        control.release("call")
        assert (await idle).ok and (await manual).ok
        assert control.count("call", "/sleep") == 1  # one sleep, shared
        assert lc.state == "sleeping" and lc.manual is True  # so the idle loop never wakes it
    run(test)


def test_a_drain_that_times_out_goes_back_to_awake_and_sleeps_nothing() -> None:
    async def test() -> None:
        lc, control, _, rec, _ = make(settings=SleepSettings(drain_timeout_seconds=0.01))
        await lc.admit()
        outcome = await lc.sleep()
        assert outcome == Outcome(False, outcome.message, 409) and "1 requests in flight" in outcome.message
        assert lc.state == "awake" and rec.states() == ["draining", "awake"] and control.count("call") == 0
    run(test)


def test_a_failed_sleep_rolls_the_slept_replicas_back_and_backs_off() -> None:
    async def test() -> None:
        lc, control, clock, rec, replicas = make(("m-0", "m-1"), settings=SleepSettings(check_interval_seconds=60))
        control.refuse.add("m-1")
        outcome = await lc.sleep()
        assert not outcome.ok and outcome.status == 502 and "m-1" in outcome.message
        assert [(k, n, d) for k, n, d in control.calls if n == "m-0"] == [("call", "m-0", "/sleep"),
                                                                          ("call", "m-0", "/wake_up")]
        assert lc.state == "awake" and not any(r.asleep for r in replicas)
        assert rec.states() == ["draining", "falling_asleep", "awake", "sleep_failed"]
        assert lc.sleep_failures_in_row == 1 and lc.sleep_retry_at == clock() + 120
    run(test)


def test_a_failed_sleep_whose_rollback_fails_too_leaves_the_model_sleeping() -> None:
    async def test() -> None:
        lc, control, _, rec, replicas = make(("m-0", "m-1"))
        control.refuse.add("m-1")
        real_call = control.call

        async def wake_refused(replica, call, timeout):  # m-0 sleeps, then will not wake
            if call.path == "/wake_up":
                control.refuse.add(replica.name)
            await real_call(replica, call, timeout)
        control.call = wake_refused  # type: ignore[method-assign]
        assert not (await lc.sleep()).ok
        assert lc.state == "sleeping" and replicas[0].asleep and not replicas[1].asleep
        assert rec.states() == ["draining", "falling_asleep", "sleeping", "sleep_failed"]
    run(test)


def test_a_failed_wake_goes_back_to_sleeping_and_refuses_the_request() -> None:
    async def test() -> None:
        lc, control, _, rec, _ = make()
        assert (await lc.sleep()).ok
        control.refuse.add("m-0")
        with pytest.raises(ModelUnavailable, match="could not wake"):
            await lc.admit()
        assert lc.state == "sleeping" and lc.wake_failures == 1 and lc.in_flight == 0
        assert rec.states()[-3:] == ["waking", "sleeping", "wake_failed"]
    run(test)


def test_a_stop_drains_then_stops_every_program_and_a_failed_one_goes_back() -> None:
    async def test() -> None:
        lc, control, _, rec, replicas = make(("m-0", "m-1"))
        assert (await lc.sleep()).ok
        control.refuse_stop.add("m-1")
        outcome = await lc.stop()
        assert not outcome.ok and lc.state == "sleeping"  # back where it began
        assert rec.states()[-3:] == ["stopping", "sleeping", "stop_failed"]
        control.refuse_stop.clear()
        assert (await lc.stop()).ok
        assert lc.state == "stopped" and lc.stop_count == 1 and not any(r.asleep for r in replicas)
        assert rec.states()[-2:] == ["stopping", "stopped"]
        assert (await lc.stop()).message == "model 'm' is already stopped"
        assert (await lc.sleep()).status == 409 and lc.state == "stopped"  # a stopped model is not slept
    run(test)


def test_a_stop_whose_drain_times_out_goes_back_to_awake() -> None:
    async def test() -> None:
        lc, control, _, rec, _ = make(settings=SleepSettings(drain_timeout_seconds=0.01))
        await lc.admit()
        assert (await lc.stop()).status == 409
        assert lc.state == "awake" and rec.states() == ["stopping", "awake"] and control.count("stop") == 0
    run(test)


def test_supervisord_saying_the_engines_went_down_or_came_up_moves_the_model() -> None:
    async def test() -> None:
        lc, _, _, rec, replicas = make(("m-0", "m-1"), on_demand=True)
        replicas[0].set_process(process("m-0", "FATAL"))
        lc.process_changed()
        assert lc.state == "awake"  # one engine is still up
        replicas[1].set_process(process("m-1", "EXITED"))
        lc.process_changed()
        assert lc.state == "stopped"
        replicas[0].set_process(process("m-0", "RUNNING"))
        lc.process_changed()
        assert lc.state == "stopped"
        replicas[1].set_process(process("m-1", "RUNNING"))
        lc.process_changed()
        assert lc.state == "awake" and rec.states() == ["stopped", "awake"]
    run(test)


def test_reconcile_takes_the_engines_word_on_sleep() -> None:
    async def test() -> None:
        lc, control, _, rec, replicas = make(settings=SleepSettings(wakeup_on_request=False))
        control.asleep["m-0"] = True
        await lc.reconcile()
        assert lc.state == "sleeping" and replicas[0].asleep and lc.manual is False
        control.asleep["m-0"] = None  # cannot tell: nothing changes
        await lc.reconcile()
        assert lc.state == "sleeping"
        control.asleep["m-0"] = False
        await lc.reconcile()
        assert lc.state == "awake" and rec.states() == ["sleeping", "awake"]
    run(test)


def test_reconcile_wakes_an_engine_found_asleep_under_requests_already_sent() -> None:
    async def test() -> None:
        lc, control, _, rec, _ = make()
        await lc.admit()
        control.asleep["m-0"] = True
        await lc.reconcile()
        await lc.wake()
        assert control.count("call", "/wake_up") == 1 and lc.state == "awake"
        assert rec.states() == ["sleeping", "waking", "awake"]
    run(test)


def test_sglang_cannot_be_asked_so_reconcile_leaves_it_alone() -> None:
    async def test() -> None:
        lc, control, _, rec, _ = make(engine="sglang")
        await lc.reconcile()
        assert control.calls == [] and rec.states() == []
    run(test)


def test_following_the_leaders_word() -> None:
    async def test() -> None:
        lc, control, _, rec, replicas = make()
        lc.follow("sleeping")
        assert lc.state == "sleeping" and replicas[0].asleep
        lc.follow("sleeping")  # the same word again: nothing
        lc.follow("draining")  # a transient state is not followed
        lc.follow("stopped")
        lc.follow("awake")
        assert rec.states() == ["sleeping", "stopped", "awake"] and not replicas[0].asleep
        assert control.calls == []
    run(test)


def test_a_router_that_does_not_lead_asks_the_leader_then_follows() -> None:
    class Leader:
        def __init__(self) -> None:
            self.asked: list[tuple[str, str]] = []

        def local(self) -> bool:
            return False

        async def ask(self, model: str, action: str) -> Outcome:
            self.asked.append((model, action))
            return Outcome(action != "wakeup", "refused" if action == "wakeup" else "done")

    async def test() -> None:
        lc, control, _, rec, _ = make()
        leader = Leader()
        lc.authority = leader
        assert (await lc.sleep()).ok and lc.state == "sleeping"
        assert not (await lc.wake()).ok and lc.state == "sleeping" and lc.last_error == "refused"
        assert (await lc.stop()).ok and lc.state == "stopped"
        assert leader.asked == [("m", "sleep"), ("m", "wakeup"), ("m", "stop")] and control.calls == []
        assert rec.states() == ["sleeping", "stopped"]
    run(test)


def test_eviction_takes_only_an_idle_model_unless_asked_to_drain() -> None:
    async def test() -> None:
        lc, control, _, rec, _ = make()
        await lc.admit()
        assert (await lc.evict(stop=False, reason="gpu_budget")).status == 409
        assert rec.states() == []
        lc.release()
        outcome = await lc.evict(stop=False, reason="gpu_budget")
        assert outcome.ok and lc.state == "sleeping"
        assert [(e.state, e.detail) for e in rec.seen][-1] == ("evicted", {"action": "sleep", "reason": "gpu_budget"})
        assert (await lc.evict(stop=True, reason="host_budget")).ok and lc.state == "stopped"
    run(test)


async def _reach(state: str) -> tuple:
    """A lifecycle brought to a resting `state` by the real operations."""
    made = make(("m-0",), on_demand=True)
    lc, control, _, _, replicas = made
    if state == "sleeping":
        assert (await lc.sleep()).ok
    elif state in ("stopped", "failed"):
        stopped(lc, replicas)
        if state == "failed":
            control.start_state = "FATAL"
            assert not (await lc.start()).ok
            control.start_state = "RUNNING"
    assert lc.state == state
    return made


@pytest.mark.parametrize("source", ["awake", "sleeping", "stopped", "failed"])
@pytest.mark.parametrize("said", ["awake", "sleeping", "stopped"])
def test_the_leaders_word_moves_a_model_from_every_resting_state(source: str, said: str) -> None:
    async def test() -> None:
        lc, _, _, rec, replicas = await _reach(source)
        before = len(rec.states())
        lc.follow(said)
        assert lc.state == said and replicas[0].asleep == (said == "sleeping")
        assert rec.states()[before:] == ([] if said == source else [said])
    run(test)


@pytest.mark.parametrize("source", ["awake", "sleeping"])
def test_every_engine_down_stops_an_awake_or_sleeping_model(source: str) -> None:
    async def test() -> None:
        lc, _, _, rec, replicas = await _reach(source)
        stopped(lc, replicas)
        assert rec.states()[-1] == "stopped" and not replicas[0].asleep
    run(test)


@pytest.mark.parametrize("source", ["stopped", "failed"])
def test_every_engine_up_outside_the_router_wakes_a_stopped_or_failed_model(source: str) -> None:
    async def test() -> None:
        lc, _, clock, rec, replicas = await _reach(source)
        replicas[0].set_process(process("m-0", "RUNNING"))
        lc.process_changed()
        assert lc.state == "awake" and rec.states()[-1] == "awake" and lc.last_wake_at == clock()
    run(test)
