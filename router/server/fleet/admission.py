"""How a model lets requests in, and the counts of those in flight and waiting.

The proxy calls ``await lifecycle.admit()`` before picking a replica and
``lifecycle.release()`` when the request (or stream) has ended. While the model
is awake `admit` is a state check and a counter increment, with no await and
no allocation, so the hot path pays nothing for sleep and residency support.

Two strategies share the counts and that hot path; a model's lifecycle is built
with one of them:

- `LocalAdmission` (the process that owns the model): a request arriving at a
  model that is not awake starts it or wakes it (one start, one wake however
  many requests arrive, router/server/fleet/startstop.py and sleepwake.py) or
  waits for the transition under way, and is refused with `ModelUnavailable`
  (503 + Retry-After) when that fails.
- `RemoteAdmission` (a proxy worker, router/server/workers/remote.py): asks the
  controller, which runs `LocalAdmission.ready` for it.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Callable, Protocol

from router.config import SleepSettings
from router.server.fleet.machine import Machine
from router.server.fleet.outcome import RETRY_AFTER_SECONDS, ModelUnavailable, Outcome
from router.util.states import AWAKE, DRAINING, FAILED, SLEEPING, STARTING, STOPPED, STOPPING, WAKING

if TYPE_CHECKING:
    from router.server.fleet.replica import Replica


class Transitions(Protocol):
    """What admission needs of a model's lifecycle (router/server/fleet/lifecycle.py)."""

    model: str
    machine: Machine
    settings: SleepSettings
    clock: Callable[[], float]
    members: Callable[[], "tuple[Replica, ...]"]

    @property
    def startable(self) -> bool: ...

    def begin_start(self) -> "asyncio.Task[Outcome]": ...

    def begin_wake(self) -> "asyncio.Task[Outcome]": ...

    async def settled(self) -> None: ...


class Admission:
    """The counts of one model's requests; subclasses say how one gets in when the model is not awake."""

    __slots__ = ("lifecycle", "machine", "clock", "in_flight", "waiting", "last_end", "drained", "wait_starts")

    def __init__(self, lifecycle: Transitions):
        self.lifecycle = lifecycle
        self.machine = lifecycle.machine
        self.clock = lifecycle.clock
        #: Requests admitted and not finished (including those queued for a replica slot).
        self.in_flight = 0
        #: Requests held while the model starts, drains, sleeps or wakes.
        self.waiting = 0
        #: When the last request ended (clock time); creation counts as one.
        self.last_end = self.clock()
        #: Set when the last request in flight ends during a drain.
        self.drained = asyncio.Event()
        #: When each request held now began to wait (clock times), for the contention policy.
        self.wait_starts: list[float] = []

    async def admit(self) -> None:
        raise NotImplementedError

    def release(self) -> None:
        self.count(-1)

    def count(self, delta: int) -> None:
        """`delta` more requests in flight (here or, at the controller, in a proxy worker);
        fewer means some ended now."""
        self.in_flight += delta
        if delta < 0:
            self.last_end = self.clock()
            if self.in_flight == 0 and self.machine.state in (DRAINING, STOPPING):
                self.drained.set()

    def touch(self) -> None:
        """Used now, by a request another process served (its idle time starts again)."""
        self.last_end = max(self.last_end, self.clock())


class LocalAdmission(Admission):
    """This process owns the model: it starts or wakes it for the requests that find it down."""

    __slots__ = ()

    async def admit(self) -> None:
        """Let one request in, starting or waking the model first if needed."""
        if self.machine.state == AWAKE:
            self.in_flight += 1
            return
        await self.ready()
        self.in_flight += 1

    async def ready(self) -> None:
        """Return once the model is awake, starting or waking it first as needed; ModelUnavailable
        when it cannot be. Nothing awaits between the last check and the return, so the caller's
        admission (or a proxy worker's, told at once) happens while the model is still awake."""
        lc = self.lifecycle
        machine = self.machine
        self.waiting += 1
        began = self.clock()
        self.wait_starts.append(began)
        try:
            while machine.state != AWAKE:
                state = machine.state
                if state in (STOPPED, FAILED, STARTING, STOPPING) and lc.startable:
                    # One start for all; made after a stop under way ends (it waits for the lock).
                    outcome = await asyncio.shield(lc.begin_start())
                    if not outcome.ok:
                        raise ModelUnavailable(outcome.message, RETRY_AFTER_SECONDS)
                    continue
                if state in (STOPPED, FAILED, STOPPING):
                    raise ModelUnavailable(f"model {lc.model!r} is stopped; start it with "
                                           f"POST /action/start/{lc.model}", RETRY_AFTER_SECONDS)
                if not lc.settings.wakeup_on_request and state != WAKING:
                    if state == SLEEPING:
                        raise ModelUnavailable(
                            f"model {lc.model!r} is asleep and wakeup_on_request is off; wake it with "
                            f"POST /action/wakeup/{lc.model}", RETRY_AFTER_SECONDS)
                    await lc.settled()  # draining or falling asleep: let the transition finish
                    continue
                outcome = await asyncio.shield(lc.begin_wake())
                if not outcome.ok:
                    raise ModelUnavailable(outcome.message, RETRY_AFTER_SECONDS)
        finally:
            self.waiting -= 1
            self.wait_starts.remove(began)


#: Makes a model's admission strategy from its lifecycle.
AdmissionFactory = Callable[[Transitions], Admission]
