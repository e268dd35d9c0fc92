"""In-memory fakes for the unit tests of a model's life: an engine control that records its calls
(and can hold or fail them), supervisord's process states, a clock that moves only when told."""
from __future__ import annotations

import asyncio
from typing import Any, Callable, Optional

from router.config import Instance, SleepSettings
from router.engines import Call
from router.observe.events import Event, Events
from router.server.fleet.admission import AdmissionFactory, LocalAdmission
from router.server.fleet.control import EngineCallError
from router.server.fleet.lifecycle import Lifecycle
from router.server.fleet.replica import Replica
from router.supervision.processes import ProcessState


class Clock:
    """Monotonic time that moves only through `advance`."""

    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def process(name: str, state: str) -> ProcessState:
    """supervisord's word on one program."""
    return ProcessState(name=name, state=state, pid=4242 if state == "RUNNING" else None, description=state.lower(),
                        started_at=None, logfile=f"/tmp/{name}.log")


def instance(name: str, model: str = "m", engine: str = "vllm", **extra: Any) -> Instance:
    return Instance(name=name, model=model, engine=engine, engine_args=(), env=(), venv_path=None, host="127.0.0.1",
                    port=9000, health_path="/health", **extra)


class FakeControl:
    """The engine and supervisord calls a lifecycle makes, recorded as (kind, instance, detail).

    `hold(kind)` makes calls of that kind wait until `release(kind)`; names in `refuse`
    fail their calls; `start_state` is the process state a start leaves behind."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []
        self.refuse: set[str] = set()
        self.refuse_stop: set[str] = set()
        self.start_state = "RUNNING"
        self.asleep: dict[str, Optional[bool]] = {}
        self.can_start = True
        self.is_open = True
        self._gates: dict[str, asyncio.Event] = {}

    def hold(self, kind: str) -> None:
        self._gates[kind] = asyncio.Event()

    def release(self, kind: str) -> None:
        self._gates.pop(kind).set()

    def count(self, kind: str, detail: Optional[str] = None) -> int:
        return sum(1 for k, _, d in self.calls if k == kind and (detail is None or d == detail))

    async def _enter(self, kind: str, name: str, detail: str = "") -> None:
        self.calls.append((kind, name, detail))
        gate = self._gates.get(kind)
        if gate is not None:
            await gate.wait()

    async def call(self, replica: Replica, call: Call, timeout: float) -> None:
        await self._enter("call", replica.name, call.path)
        if replica.name in self.refuse:
            raise EngineCallError(f"{replica.name}: {call.method} {call.path} answered 500: refused")

    async def start_program(self, replica: Replica) -> None:
        await self._enter("start", replica.name)
        replica.set_process(process(replica.name, self.start_state))

    async def stop_program(self, replica: Replica) -> None:
        await self._enter("stop", replica.name)
        if replica.name in self.refuse_stop:
            raise EngineCallError(f"{replica.name}: supervisord could not stop it: refused")
        replica.set_process(process(replica.name, "STOPPED"))

    async def probe(self, replica: Replica, timeout: float) -> tuple[bool, str]:
        await self._enter("probe", replica.name)
        return True, "HTTP 200"

    async def is_sleeping(self, replica: Replica, path: str) -> Optional[bool]:
        await self._enter("is_sleeping", replica.name, path)
        return self.asleep.get(replica.name)


class Recorder:
    """The model events published, as (state, detail) pairs, in order."""

    def __init__(self, events: Events):
        self.seen: list[Event] = []
        events.listen(self.seen.append)

    def states(self, kind: str = "model") -> list[str]:
        return [e.state for e in self.seen if e.kind == kind]


def make(names: tuple[str, ...] = ("m-0",), settings: Optional[SleepSettings] = None,
         admission: AdmissionFactory = LocalAdmission, engine: str = "vllm",
         **extra: Any) -> tuple[Lifecycle, FakeControl, Clock, Recorder, tuple[Replica, ...]]:
    """A lifecycle over fake replicas: (lifecycle, control, clock, recorder, replicas)."""
    events = Events()
    replicas = tuple(Replica(instance(n, engine=engine, **extra), events) for n in names)
    control = FakeControl()
    clock = Clock()
    recorder = Recorder(events)
    members: Callable[[], tuple[Replica, ...]] = lambda: replicas  # noqa: E731
    lc = Lifecycle("m", members, settings or SleepSettings(drain_timeout_seconds=5.0), control,  # type: ignore[arg-type]
                   events, clock=clock, admission=admission)
    return lc, control, clock, recorder, replicas


def stopped(lc: Lifecycle, replicas: tuple[Replica, ...]) -> None:
    """supervisord reports every engine of the model down: the model is stopped."""
    for r in replicas:
        r.set_process(process(r.name, "STOPPED"))
    lc.process_changed()
    assert lc.state == "stopped"


async def settle() -> None:
    """Let every task that is ready run until none is (the fakes answer at once unless held)."""
    for _ in range(50):
        await asyncio.sleep(0)
