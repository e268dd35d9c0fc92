"""Admission strategies: the owner's (local) and a proxy worker's (asking the controller)."""
from __future__ import annotations

import asyncio

import pytest
from fakes import make, settle

from router.server.fleet.admission import LocalAdmission
from router.server.fleet.outcome import ModelUnavailable
from router.server.workers.remote import RemoteAdmission


class FakeLink:
    """The worker's end of the link as RemoteAdmission uses it: counts reported, `ready` answered."""

    def __init__(self) -> None:
        self.changes: list[int] = []
        self.asked: list[str] = []
        self.answer: asyncio.Future[None] | None = None

    def changed(self, lc: RemoteAdmission) -> None:
        self.changes.append(lc.in_flight)

    async def ready(self, lc: RemoteAdmission) -> None:
        self.asked.append(lc.model)
        self.answer = asyncio.get_running_loop().create_future()
        await self.answer
        lc.admitted()  # what ControllerLink does when the controller's answer arrives


def test_the_hot_path_is_a_state_check_and_an_increment() -> None:
    async def test() -> None:
        lc, control, clock, _, _ = make()
        assert isinstance(lc.admission, LocalAdmission)
        # The façade hands out the strategy's own bound methods: no extra call per request.
        assert lc.admit == lc.admission.admit and lc.release == lc.admission.release
        coro = lc.admit()
        with pytest.raises(StopIteration):  # finished at its first step: no await happened
            coro.send(None)
        assert lc.in_flight == 1 and control.calls == []
        clock.advance(7)
        lc.release()
        assert lc.in_flight == 0 and lc.last_end == clock() and lc.idle_seconds() == 0
        clock.advance(3)
        assert lc.idle_seconds() == 3
    asyncio.run(test())


def test_a_model_stopped_and_not_on_demand_refuses_with_how_to_start_it() -> None:
    async def test() -> None:
        lc, _, _, _, _ = make()
        lc.machine.mirror("stopped")
        with pytest.raises(ModelUnavailable, match="POST /action/start/m"):
            await lc.admit()
        assert lc.waiting == 0 and lc.in_flight == 0
    asyncio.run(test())


def test_a_workers_admission_is_local_while_awake_and_asks_the_controller_otherwise() -> None:
    async def test() -> None:
        link = FakeLink()
        lc, control, _, _, _ = make(admission=RemoteAdmission.factory(link))  # type: ignore[arg-type]
        assert isinstance(lc.admission, RemoteAdmission)
        await lc.admit()
        assert lc.in_flight == 1 and link.changes == [1] and link.asked == []
        lc.mirror("sleeping")  # the controller's word
        held = asyncio.ensure_future(lc.admit())
        await settle()
        assert link.asked == ["m"] and lc.waiting == 1 and not held.done()
        lc.mirror("waking")
        lc.mirror("awake")
        assert link.answer is not None
        link.answer.set_result(None)
        await held
        assert lc.in_flight == 2 and lc.waiting == 0 and link.changes == [1, 2]
        lc.release()
        assert lc.in_flight == 1 and link.changes == [1, 2, 1]
        assert control.calls == []  # a worker never calls an engine's control API itself
    asyncio.run(test())
