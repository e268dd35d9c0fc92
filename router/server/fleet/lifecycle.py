"""One model's life, as one object for its callers: admission, sleep and wake, start and stop.

`Lifecycle` is a façade over single-idea modules that share one `ModelLife`
(router/server/fleet/life.py):

- machine.py: the states' table of legal moves, and its one writer;
- admission.py: how a request gets in (a state check and an increment while
  awake), locally or by asking the controller (a proxy worker);
- sleepwake.py: drain, sleep, wake, rollback and back-off, reconciling with
  the engines' own word;
- startstop.py: start (single-flight, health-checked) and stop;
- eviction.py: sleep or stop to make room for another model;
- follow.py: the leading router's word and supervisord's view of the processes.

The engines' sleep APIs, as verified, are described in router/engines/vllm.py
and router/engines/sglang.py.
"""
from __future__ import annotations

import asyncio
import time
from typing import Callable, Mapping, Optional

from router.config import SleepSettings
from router.observe.events import Events
from router.server.fleet import eviction, sleepwake, startstop
from router.server.fleet.admission import AdmissionFactory, LocalAdmission
from router.server.fleet.control import EngineControl
from router.server.fleet.costs import Costs
from router.server.fleet.follow import follow as follow_leader
from router.server.fleet.follow import process_changed
from router.server.fleet.life import Authority, ModelLife, NoPeers, NoPlacement, Peers, Placement, SleepCheck
from router.server.fleet.outcome import RETRY_AFTER_SECONDS, ModelUnavailable, Outcome
from router.server.fleet.replica import Replica
from router.util.states import AWAKE, HOLDING_GPU, SLEEPING

__all__ = ["AWAKE", "HOLDING_GPU", "RETRY_AFTER_SECONDS", "SLEEPING", "Authority", "Lifecycle", "ModelUnavailable",
           "NoPeers", "NoPlacement", "Outcome", "Peers", "Placement", "SleepCheck"]


class Lifecycle(ModelLife):
    """Sleep state, residency and admission of one model (all its replicas).

    `admit`, `release` and `count` are the admission strategy's own bound
    methods, so a request pays no extra call for the façade.
    """

    def __init__(self, model: str, members: Callable[[], tuple[Replica, ...]], settings: SleepSettings,
                 control: EngineControl, events: Events, placement: Placement = NoPlacement(),
                 start_timeout: float = 900.0, clock: Callable[[], float] = time.monotonic,
                 peers: Peers = NoPeers(), authority: Optional[Authority] = None,
                 admission: AdmissionFactory = LocalAdmission, costs: Optional[Costs] = None):
        super().__init__(model, members, settings, control, events, placement, start_timeout, clock, peers,
                         authority, costs)
        self.admission = admission(self)
        self.admit = self.admission.admit
        self.release = self.admission.release
        self.count = self.admission.count

    async def ready(self) -> None:
        """Return once the model is awake (the controller's answer to a proxy worker's `ready`)."""
        assert isinstance(self.admission, LocalAdmission), "only the model's owner makes it ready"
        await self.admission.ready()

    def begin_start(self) -> "asyncio.Task[Outcome]":
        return startstop.begin_start(self)

    def begin_wake(self) -> "asyncio.Task[Outcome]":
        return sleepwake.begin_wake(self)

    async def sleep(self, check: Optional[SleepCheck] = None) -> Outcome:
        """Put every replica to sleep (drained first); with `check`, the idle loop asks."""
        outcome = await asyncio.shield(sleepwake.begin_sleep(self, check))
        if check is None and outcome.ok and self.state == SLEEPING:
            # An operator's sleep that joined the idle loop's, already under way, is still the operator's.
            self.manual = True
        return outcome

    async def wake(self) -> Outcome:
        """Wake every sleeping replica (shares a wake already under way)."""
        return await asyncio.shield(self.begin_wake())

    async def start(self) -> Outcome:
        """Start the model's stopped engines (one start however many ask) and wait until they are healthy."""
        return await asyncio.shield(self.begin_start())

    async def stop(self, reason: str = "manual") -> Outcome:
        """Stop the model's engines (drained first); a request then starts them again if on demand."""
        return await asyncio.shield(startstop.begin_stop(self, reason))

    async def evict(self, stop: bool, reason: str, drain: bool = False, why: Optional[Mapping[str, object]] = None) -> Outcome:
        return await eviction.evict(self, stop, reason, drain, why)

    async def deepen(self, reason: str, why: Optional[Mapping[str, object]] = None) -> Outcome:
        """A level-1 sleep taken to level 2 (its weights leave host RAM), in the caller's task."""
        return await eviction.deepen(self, reason, why)

    async def reconcile(self) -> None:
        await sleepwake.reconcile(self)

    def process_changed(self) -> None:
        process_changed(self)

    def follow(self, state: str) -> None:
        follow_leader(self, state)

    def mirror(self, state: str) -> None:
        """A proxy worker's view takes the controller's state (router/server/workers/worker_end.py)."""
        self.machine.mirror(state)

    def _sleep_failed(self) -> float:
        return sleepwake.sleep_failed(self)

    async def close(self) -> None:
        """Cancel transitions still running (router shutdown, or the model removed by a reload)."""
        for task in (self.sleep_task, self.wake_task, self.start_task, self.stop_task):
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
