"""Start and stop of one model's engines (residency: on-demand models, idle stops, evictions).

A start runs every replica's supervisord program and waits until each passes
its health check (or goes FATAL, or ``start_timeout_seconds`` pass: the 503
then names the instance, its process state and the last lines of its log).
Requests arriving meanwhile share that one start. A stop drains the model
first, as a sleep does, then stops the programs; a request then starts them
again if the model is on demand.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Optional

from router.config import RouterSettings
from router.server.fleet.control import EngineCallError
from router.server.fleet.costs import START as START_COST
from router.server.fleet.follow import delegate
from router.server.fleet.life import ModelLife
from router.server.fleet.machine import DRAIN_STOP, START, START_FAILED, STARTED, STOP_ABORTED, STOP_ABORTED_ASLEEP, STOPPED_EVENT
from router.server.fleet.outcome import Outcome
from router.util.states import AWAKE, FAILED, HOLDING_GPU, SLEEPING, STOPPED

log = logging.getLogger("router.lifecycle")

#: A replica that passed its health check during a start is healthy at once.
_HEALTHY_AT_ONCE = RouterSettings(healthy_threshold=1)
#: supervisord states of a process that went down while it was being started.
START_FAILED_PROCESS = frozenset({"FATAL", "BACKOFF", "EXITED"})
#: How often a start looks at the engines' health and process states.
START_POLL_SECONDS = 0.25
#: Lines of an engine's log quoted in the 503 of a failed start.
LOG_LINES = 5


def begin_start(lc: ModelLife) -> "asyncio.Task[Outcome]":
    """The start under way (shared by every request that waits for it), or a new one."""
    if lc.start_task is None or lc.start_task.done():
        lc.start_task = asyncio.ensure_future(_do_start(lc))
    return lc.start_task


def begin_stop(lc: ModelLife, reason: str) -> "asyncio.Task[Outcome]":
    if lc.stop_task is None or lc.stop_task.done():
        lc.stop_task = asyncio.ensure_future(_do_stop(lc, reason))
    return lc.stop_task


async def _do_start(lc: ModelLife) -> Outcome:
    if lc.delegated():
        return await delegate(lc, "start", AWAKE)
    async with lc.lock:
        if lc.state in HOLDING_GPU or lc.state == SLEEPING:
            return Outcome(True, f"model {lc.model!r} is {lc.state}, not stopped")
        if not lc.stoppable:
            return Outcome(False, f"model {lc.model!r} cannot be started by the router: its engines are "
                                  "not run by this router's supervisord", 409)
        began = lc.clock()
        refused = await lc.room(START)
        if refused is not None:
            return refused
        up_from = lc.clock()
        failure = await _bring_up(lc, began)
        if failure is not None:
            lc.start_failures += 1
            lc.last_error = failure
            lc.machine.fire(START_FAILED)
            lc.events.publish("model", "start_failed", lc.model, error=failure)
            log.warning("model %s: start failed: %s", lc.model, failure)
            return Outcome(False, failure, 503)
        now = lc.clock()
        lc.last_wake_at = now
        lc.last_start_seconds = now - began
        lc.start_count += 1
        lc.measured(START_COST, now - up_from, lc.members())
        lc.machine.fire(STARTED)
        log.info("model %s is up after %.3fs", lc.model, now - began)
        return Outcome(True, f"model {lc.model!r} is up after {now - began:.3f}s")


async def _bring_up(lc: ModelLife, began: float) -> Optional[str]:
    """Start every replica's program and wait for each to pass its health check; None when all did,
    else why not (naming the instance, its process state and the last lines of its log)."""
    pending = list(lc.members())
    try:
        for replica in pending:
            replica.mark_asleep(False)
            await lc.control.start_program(replica)
    except EngineCallError as e:
        return str(e)
    timeout = max((r.instance.start_timeout_seconds or lc.start_timeout) for r in pending)
    while pending:
        for replica in list(pending):
            process = replica.process
            if process is not None and process.state in START_FAILED_PROCESS:
                await lc.control.stop_program(replica)  # no more retries by supervisord
                lines = "\n".join(process.log_tail(LOG_LINES))
                return (f"instance {replica.name} went {process.state} while starting ({process.description}); "
                        f"log {process.logfile}:\n{lines}")
            ok, _ = await lc.control.probe(replica, START_POLL_SECONDS * 4)
            if ok:
                replica.record_probe(True, _HEALTHY_AT_ONCE)
                pending.remove(replica)
        if pending and lc.clock() - began > timeout:
            for replica in pending:
                await lc.control.stop_program(replica)
            return (f"instance {', '.join(r.name for r in pending)} did not pass its health check within "
                    f"{timeout:g}s of its start (start_timeout_seconds)")
        if pending:
            await asyncio.sleep(START_POLL_SECONDS)
    return None


async def _do_stop(lc: ModelLife, reason: str) -> Outcome:
    if lc.delegated():
        return await delegate(lc, "stop", STOPPED)
    async with lc.lock:
        return await stop_locked(lc, reason)


async def stop_locked(lc: ModelLife, reason: str) -> Outcome:
    """The stop itself, under the lock the caller holds."""
    if lc.state in (STOPPED, FAILED):
        return Outcome(True, f"model {lc.model!r} is already stopped")
    if not lc.stoppable:
        return Outcome(False, f"model {lc.model!r} cannot be stopped by the router: its engines are not run "
                              "by this router's supervisord", 409)
    back = STOP_ABORTED_ASLEEP if lc.state == SLEEPING else STOP_ABORTED
    refused = await lc.drain(DRAIN_STOP, back, "stopped")
    if refused is not None:
        return refused
    errors: dict[str, str] = {}
    for replica in lc.members():
        try:
            await lc.control.stop_program(replica)
            replica.mark_asleep(False)
        except EngineCallError as e:
            errors[replica.name] = str(e)
    if errors:
        lc.machine.fire(back)
        return lc.failed("stop", errors)
    lc.stop_count += 1
    lc.machine.fire(STOPPED_EVENT)
    log.info("model %s is stopped (%s)", lc.model, reason)
    return Outcome(True, f"model {lc.model!r} is stopped")
