"""A model's state taken from outside this router's own transitions: the leading router's word,
and supervisord's view of the engines' processes.

Neither moves a model while a transition holds its lock: that transition knows
the state, and the next look (the watcher's next change, the leader's next
report) catches up.
"""
from __future__ import annotations

import logging

from router.server.fleet.life import ModelLife
from router.server.fleet.machine import LEADER_SAYS, PROCESS_DOWN, PROCESS_UP
from router.server.fleet.outcome import Outcome
from router.util.states import AWAKE, FAILED, SLEEPING, STOPPED

log = logging.getLogger("router.lifecycle")

#: supervisord states of a process that is down, and not on its way up: the engines of a stopped model.
DOWN = frozenset({"STOPPED", "EXITED", "FATAL", "REMOVED"})


def follow(lc: ModelLife, state: str) -> None:
    """Take the leading router's word on the model (after it acted, or for engines that cannot
    say whether they sleep)."""
    if state == lc.state or state not in LEADER_SAYS or lc.busy:
        return
    for replica in lc.members():
        replica.mark_asleep(state == SLEEPING)
    if state == AWAKE:
        lc.last_wake_at = lc.clock()
    elif state == SLEEPING:
        lc.slept_at = lc.clock()
    lc.machine.fire(LEADER_SAYS[state])


async def delegate(lc: ModelLife, action: str, then: str) -> Outcome:
    """Ask the leading router to do `action`; once it has, the model is `then` here too."""
    assert lc.authority is not None
    outcome = await lc.authority.ask(lc.model, action)
    if outcome.ok:
        follow(lc, then)
    else:
        lc.last_error = outcome.message
    return outcome


def process_changed(lc: ModelLife) -> None:
    """supervisord's view moved: a model whose engines all went down is stopped; one whose
    engines all came up outside the router (supervisorctl start, --apply) is awake."""
    if lc.busy or not lc.startable:
        return
    replicas = lc.members()
    down = all(r.process is not None and r.process.state in DOWN for r in replicas)
    up = all(r.process is not None and r.process.running for r in replicas)
    if down and lc.state in (AWAKE, SLEEPING):
        for replica in replicas:
            replica.mark_asleep(False)
        lc.machine.fire(PROCESS_DOWN)
    elif up and lc.state in (STOPPED, FAILED):
        lc.last_wake_at = lc.clock()
        lc.machine.fire(PROCESS_UP)
