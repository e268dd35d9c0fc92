"""The table of a model's legal moves: every (state, event) pair is either a move or refused."""
from __future__ import annotations

import logging
import os

import pytest

from router.observe.events import Events
from router.server.fleet.machine import EVENTS, LEADER_SAYS, TRANSITIONS, IllegalTransition, Machine, strict
from router.util.states import ALL_STATES, AWAKE, HOLDING_GPU, RESTING, SLEEPING, STOPPED


@pytest.mark.parametrize("state", ALL_STATES)
@pytest.mark.parametrize("event", EVENTS)
def test_every_pair_is_a_move_of_the_table_or_refused(state: str, event: str) -> None:
    events = Events()
    machine = Machine("m", events, state=state, strict_moves=True)
    target = TRANSITIONS.get((state, event))
    if target is not None:
        assert machine.can(event)
        assert machine.fire(event) is True
        assert machine.state == target
        published = events.recent()
        assert [(e.kind, e.state, e.model) for e in published] == [("model", target, "m")]
    else:
        assert not machine.can(event)
        with pytest.raises(IllegalTransition) as raised:
            machine.fire(event)
        assert raised.value.state == state and raised.value.event == event
        assert machine.state == state and events.recent() == []


def test_outside_strict_mode_an_illegal_move_is_logged_and_refused(caplog: pytest.LogCaptureFixture) -> None:
    events = Events()
    machine = Machine("m", events, state=STOPPED, strict_moves=False)
    with caplog.at_level(logging.ERROR, "router.machine"):
        assert machine.fire("slept") is False
    assert machine.state == STOPPED and events.recent() == []
    assert "illegal move 'slept' from 'stopped'" in caplog.text


def test_the_tests_run_strict_and_their_subprocesses_inherit_it() -> None:
    assert os.environ["KVROUTER_STRICT_MACHINE"] == "1" and strict()
    assert Machine("m", Events())._strict


def test_the_table_names_only_known_states_and_every_state_can_be_reached_and_left() -> None:
    assert {s for s, _ in TRANSITIONS} | set(TRANSITIONS.values()) <= set(ALL_STATES)
    assert all(source != target for (source, _), target in TRANSITIONS.items())
    reached, frontier = {AWAKE}, [AWAKE]
    while frontier:
        state = frontier.pop()
        for (source, _), target in TRANSITIONS.items():
            if source == state and target not in reached:
                reached.add(target)
                frontier.append(target)
    assert reached == set(ALL_STATES)
    assert all(any(s == state for s, _ in TRANSITIONS) for state in ALL_STATES)
    # A transient state (a transition holds the lock) is left only by its own transition's events.
    for state in set(ALL_STATES) - RESTING:
        assert not any(s == state and e.startswith(("leader_", "process_", "engine_")) for s, e in TRANSITIONS)
    assert HOLDING_GPU.isdisjoint({SLEEPING, STOPPED})


def test_the_leaders_word_moves_only_between_resting_states() -> None:
    for state, event in LEADER_SAYS.items():
        sources = {s for (s, e) in TRANSITIONS if e == event}
        assert sources == RESTING - {state}
        assert all(TRANSITIONS[(s, event)] == state for s in sources)


def test_a_workers_mirror_takes_any_known_state_without_publishing_and_refuses_others() -> None:
    events = Events()
    machine = Machine("m", events, strict_moves=True)
    for state in ALL_STATES:
        machine.mirror(state)
        assert machine.state == state
    assert events.recent() == []
    with pytest.raises(IllegalTransition):
        machine.mirror("dozing")
    assert machine.state == ALL_STATES[-1]
