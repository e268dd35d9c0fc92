"""Health probes of every replica, in the background and on demand.

Probes hit each engine's health path, never a generation, so they cost the
engine nothing. Not probed: a model whose engines are asleep (asleep is not
unhealthy, and some engines hold requests while asleep) and a replica whose
process supervisord reports as not running (nothing there to answer).
The checker reads the live table at every round, so a reload's replicas are
probed from the next round on.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from router.config import RouterSettings
from router.server.fleet.control import EngineControl
from router.server.fleet.models import Model, ModelTable
from router.server.fleet.replica import Replica
from router.util.periodic import Periodic
from router.util.states import AWAKE

log = logging.getLogger("router.health")

#: How long an engine's /v1/models entry is trusted before the probes read it again.
CARD_SECONDS = 60.0


def probed(model: Model) -> list[Replica]:
    """The replicas a probe round asks: those of an awake model whose process runs."""
    if model.lifecycle.state != AWAKE:
        return []
    return [r for r in model.replicas if r.running]


async def probe_and_record(control: EngineControl, model: Model, replica: Replica,
                           settings: RouterSettings) -> tuple[bool, str]:
    """Probe one replica now and record the result; a replica that turned
    routable goes at once to requests queued for a slot (`Model.dispatch`).
    A healthy replica's model card is read again when it is missing or
    older than `CARD_SECONDS` (a restarted engine may report new limits)."""
    ok, detail = await control.probe(replica, settings.health_check_timeout_seconds)
    replica.record_probe(ok, settings)
    model.dispatch()
    now = time.monotonic()
    if ok and (replica.card is None or now - replica.card_at > CARD_SECONDS):
        card = await control.model_card(replica, settings.health_check_timeout_seconds)
        if card is not None:
            replica.set_card(card, now)
    return ok, detail


class HealthChecker:
    """Probes every replica each `health_check_interval_seconds`, in one task."""

    def __init__(self, control: EngineControl, table: Callable[[], ModelTable],
                 settings: Callable[[], RouterSettings]):
        self._control = control
        self._table = table
        self._settings = settings
        self._loop = Periodic("router-health", self.check_all, lambda: settings().health_check_interval_seconds, log)

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    async def check_all(self) -> None:
        settings = self._settings()
        probes = [probe_and_record(self._control, m, r, settings) for m in self._table() for r in probed(m)]
        if probes:
            await asyncio.gather(*probes)
