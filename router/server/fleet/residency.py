"""Which models are awake, asleep or stopped, decided by memory budgets.

Before a start or a wake, the model's lifecycle asks `Residency.make_room`:
on each GPU the model uses, what the models holding it (awake, starting,
waking, draining) hold plus what this one needs must fit the GPU's budget,
and at most one member of an exclusive group may be awake. Room is made by
evicting idle models that are not pinned, the one expected to cost least to
bring back first (its measured wake or start over its idle time,
router/server/fleet/victims.py): put to sleep (a slept vLLM wakes in
seconds) when the host budget can take its weights, else stopped (a stopped
engine loads for minutes). Before a sleep, `make_host_room` deepens or stops
sleeping models, chosen the same way, until the weights fit in host memory
(the idle loop and a manual sleep ask first).
The idle loop's stops (``idle_stop_seconds``) go through `stop_idle`, under
the same lock, and are recorded as evictions (reason ``idle_stop``) like the
others. One lock orders all placement decisions, and each is computed from the
owners' state at that moment, never from a copy. A model waiting for room
still counts as holding nothing (it is asleep or stopped until it gets it),
so no decision ever waits on a model that waits for the lock.

When the place a model needs is held by a busy model (an exclusive group's
awake member; under ``policy: cost_aware`` also a full GPU budget whose
holders all have work), the scheduler's decision says when the resident
gives way (router/server/fleet/contention.py): ``fifo`` once it has been
awake ``min_sleep_duration`` (a full budget of busy models refuses at once),
``cost_aware`` once it has no queued work, the waiting requests' accumulated
wait outweighs the measured switch, or the oldest has waited
``max_wait_seconds``. The decision is asked again every `poll_seconds`;
then the resident is drained and put to sleep (or stopped), and its new
requests wait and, in turn, ask for the place back. When several models ask
for the same place, the one asking under the lock is not necessarily next:
``cost_aware`` gives the place to the one `contention.next_in_line` names
(past ``max_wait_seconds`` first, else the most accumulated wait), and an
asker that is not next lets the lock go to the others (queued on it in the
order they asked) and asks again after them.
"""
from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from typing import Callable, Optional

from router.config import ResidencySettings
from router.server.fleet.contention import COST_AWARE, Verdict, Waits, decide, line_reason, next_in_line
from router.server.fleet.costs import SLEEP, START, Costs, wake_kind
from router.server.fleet.life import DEEP_LEVEL, ModelLife
from router.server.fleet.models import Model, ModelTable
from router.server.fleet.outcome import RETRY_AFTER_SECONDS, ModelUnavailable, Outcome
from router.server.fleet.victims import Candidate, cheapest, explain
from router.util.states import AWAKE, HOLDING_GPU, SLEEPING

#: Evictions remembered for GET /residency.
RECENT_EVICTIONS = 50
#: The eviction reason of a stop by ``idle_stop_seconds``.
IDLE_STOP = "idle_stop"
#: How often a model waiting for a busy resident's place asks the scheduler again.
SWAP_POLL_SECONDS = 0.1
#: Eviction actions.
SLEEP_ACTION, STOP_ACTION, DEEPEN_ACTION = "sleep", "stop", "deepen"


class _Behind(Exception):
    """The place being made goes to another model asking for it first (contention.next_in_line)."""


def gpu_need(model: Model) -> dict[str, float]:
    """GPU -> the GB the model's replicas hold there while awake."""
    need: dict[str, float] = {}
    for r in model.replicas:
        for gpu in r.instance.gpus:
            need[gpu] = need.get(gpu, 0.0) + (r.instance.gpu_memory_gb or 0.0)
    return need


def host_need(model: Model) -> float:
    """The GB the model's weights hold in host RAM while asleep: those of its replicas at level 1
    (asleep there, or to sleep there next); a level-2 sleeper holds none."""
    lc = model.lifecycle
    return sum(r.instance.host_memory_gb or 0.0 for r in model.replicas if lc.held_level(r) < DEEP_LEVEL)


def gpu_asleep(model: Model) -> dict[str, float]:
    """GPU -> the GB the model's replicas still hold there while asleep (`gpu_sleeping_gb`: CUDA contexts)."""
    held: dict[str, float] = {}
    for r in model.replicas:
        for gpu in r.instance.gpus:
            held[gpu] = held.get(gpu, 0.0) + r.instance.gpu_sleeping_gb
    return held


class Residency:
    """The one owner of placement decisions over the live table."""

    def __init__(self, table: Callable[[], ModelTable], settings: Callable[[], ResidencySettings],
                 min_awake: Callable[[], float], costs: Optional[Costs] = None):
        self._table = table
        #: The measured start, sleep and wake times, shown per model.
        self.costs = costs or Costs()
        self._settings = settings
        self._min_awake = min_awake
        self._lock: Optional[asyncio.Lock] = None
        self.evictions: deque[dict[str, object]] = deque(maxlen=RECENT_EVICTIONS)
        self.eviction_counts: Counter[str] = Counter()
        #: How often a model waiting for a busy resident asks the scheduler again (tests: 0).
        self.poll_seconds = SWAP_POLL_SECONDS
        #: The scheduler's last answer to a waiting model (GET /residency).
        self.last_decision: Optional[dict[str, object]] = None
        #: The models asking for room now (queued on the placement lock or holding it) -> when they asked.
        self._asking: dict[str, float] = {}

    def _placement_lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def _model_of(self, lc: ModelLife) -> Model:
        model = next((m for m in self._table() if m.lifecycle is lc), None)
        if model is None:
            raise ModelUnavailable(f"model {lc.model!r} was removed by a reload")
        return model

    # ------------------------------------------------------------------ decisions

    async def make_room(self, lc: ModelLife) -> None:
        began = lc.clock()
        self._asking[lc.model] = began
        try:
            while True:
                async with self._placement_lock():
                    # Proxy workers report counts within milliseconds: fence them, so a model whose last
                    # request just ended there is not taken for busy (and one just admitted is not idle).
                    await lc.peers.fence()
                    model = self._model_of(lc)
                    try:
                        await self._swap_out_group(model, began)
                        for gpu in gpu_need(model):
                            await self._fit_gpu(model, gpu, began)
                        return
                    except _Behind:
                        pass
                # The lock is released to the model next in line, which is queued on it; ask again after it.
        finally:
            self._asking.pop(lc.model, None)

    async def make_host_room(self, model: Model) -> None:
        """Before `model` sleeps: stop the least recently used sleeping models until its weights fit."""
        async with self._placement_lock():
            await self._fit_host(model)

    async def _fit_host(self, model: Model) -> None:
        """The ladder: the least recently used sleeper that can go deeper goes to level 2 (its weights leave host
        RAM, its engine stays up); only when none can is the least recently used one stopped."""
        budget = self._settings().host_memory_gb
        if budget is None:
            return
        need = host_need(model)
        while self.host_used(exclude=model) + need > budget:
            sleepers = [m for m in self._table() if m is not model and m.lifecycle.state == SLEEPING
                        and not m.lifecycle.pinned and not m.lifecycle.busy and host_need(m) > 0]
            deeper = [m for m in sleepers if m.lifecycle.deepenable]
            stoppable = [m for m in sleepers if m.lifecycle.stoppable]
            if deeper:
                victim, why = self._choose(deeper, lambda m: DEEPEN_ACTION)
                await self._deepen(victim, "host_budget", why)
            elif stoppable:
                victim, why = self._choose(stoppable, lambda m: STOP_ACTION)
                await self._evict(victim, stop=True, reason="host_budget", why=why)
            else:
                raise ModelUnavailable(
                    f"no host memory for the weights of model {model.name!r} ({need:g} GB; "
                    f"{self.host_used(exclude=model):g} of {budget:g} GB held by sleeping models that are "
                    "pinned or can neither sleep deeper nor be stopped)", RETRY_AFTER_SECONDS)

    async def _fit_gpu(self, model: Model, gpu: str, began: float) -> None:
        budget = self._settings().gpu_budget(gpu)
        if budget is None:
            return
        need = gpu_need(model)[gpu]
        while self.gpu_used(gpu, exclude=model) + need > budget:
            holders = [m for m in self._table() if m is not model and m.lifecycle.state in HOLDING_GPU
                       and gpu in gpu_need(m)]
            movable = [m for m in holders if m.lifecycle.state == AWAKE and not m.lifecycle.pinned
                       and not m.lifecycle.busy and (m.lifecycle.sleepable or m.lifecycle.stoppable)]
            victims = [m for m in movable if not m.lifecycle.in_flight and not m.lifecycle.waiting]
            if victims:
                victim, why = self._choose(victims, self._action)
                await self._evict(victim, stop=not await self._may_sleep(victim), reason="gpu_budget", why=why)
                continue
            if not movable or self._settings().policy != COST_AWARE:
                held = ", ".join(f"{m.name} ({gpu_need(m)[gpu]:g} GB, {self._why_kept(m)})" for m in holders)
                raise ModelUnavailable(
                    f"no room on GPU {gpu} for model {model.name!r} ({need:g} GB of a {budget:g} GB budget); "
                    f"held by: {held}", RETRY_AFTER_SECONDS)
            # Every holder that could go is busy: the scheduler says when the cheapest one gives way.
            resident, why = self._choose(movable, self._action)
            verdict = self._turn(resident, model, began, lambda m: gpu in gpu_need(m))
            if verdict.switch:
                await self._evict(resident, stop=not await self._may_sleep(resident), reason="gpu_budget",
                                  drain=True, why=f"{verdict.reason}; {why}")
            else:
                await asyncio.sleep(self.poll_seconds)

    async def _may_sleep(self, victim: Model) -> bool:
        """Whether to put `victim` to sleep rather than stop it: it can sleep, and its weights fit in host
        memory (stopping older sleepers if need be); a model that can do neither is stopped."""
        if not victim.lifecycle.sleepable:
            return False
        try:
            await self._fit_host(victim)
        except ModelUnavailable:
            if victim.lifecycle.stoppable:
                return False
            raise
        return True

    async def _swap_out_group(self, model: Model, began: float) -> None:
        """Sleep (or stop) the awake members of the model's exclusive groups, fairly (see the module doc)."""
        names = {r.name for r in model.replicas}
        for group in self._settings().groups:
            if not group.exclusive or not names & set(group.members):
                continue
            def exclusive(m: Model, members: tuple[str, ...] = group.members) -> bool:
                return any(r.name in members for r in m.replicas)

            for other in self._group_members(group.members, model):
                while other.lifecycle.state in HOLDING_GPU:
                    lc = other.lifecycle
                    verdict = self._turn(other, model, began, exclusive) if lc.state == AWAKE and not lc.busy else None
                    if verdict is not None and verdict.switch:
                        await self._evict(other, stop=not await self._may_sleep(other), reason="group_swap",
                                          drain=True, why=verdict.reason)
                    else:
                        await asyncio.sleep(self.poll_seconds)

    async def enforce_groups(self) -> None:
        """Members of an exclusive group that came up together (started with supervisord, or by hand):
        the idle ones beyond the most recently used are put to sleep (or stopped). Run by the idle loop."""
        for group in self._settings().groups:
            if not group.exclusive:
                continue
            members = [m for m in self._group_members(group.members, None) if m.lifecycle.state in HOLDING_GPU]
            if len(members) < 2:
                continue
            keep = max(members, key=lambda m: m.lifecycle.last_used)
            async with self._placement_lock():
                for other in members:
                    lc = other.lifecycle
                    if other is not keep and lc.state == AWAKE and not (lc.busy or lc.in_flight or lc.waiting):
                        await self._evict(other, stop=not await self._may_sleep(other), reason="group_swap",
                                          why="members came up together; the most recently used one stays")

    def _turn(self, resident: Model, newcomer: Model, began: float, rival: Callable[[Model], bool]) -> Verdict:
        """The scheduler's word (router/server/fleet/contention.py): does `resident` give way now, and to
        whom? The place goes to the model next in line among `newcomer` and the other models asking for room
        that want the same place (`rival`); when that is another one and the resident gives way to it,
        `_Behind` is raised, so the caller lets the placement lock go to it. A wake or start that no request
        waits for (an operator's, or its clients left) counts as one request waiting since it asked (`began`),
        so it too gets its turn. Remembered for GET /residency."""
        settings = self._settings()
        now = newcomer.lifecycle.clock()
        asking = {m.name: m for m in self._table() if m is newcomer or (m.name in self._asking and rival(m))}
        waiting = {name: self._waits(m, self._asking.get(name, began), now) for name, m in asking.items()}
        first = next_in_line(settings.policy, waiting, settings.max_wait_seconds)
        chosen = asking[first] if first else newcomer
        switch = self._switch_seconds(resident, chosen)
        r = resident.lifecycle
        verdict = decide(settings.policy, Waits.since(r.in_flight, r.admission.wait_starts, now, r.idle_seconds(now)),
                         waiting[chosen.name],
                         switch, settings.max_wait_seconds,
                         float("inf") if r.last_wake_at is None else now - r.last_wake_at, self._min_awake())
        if chosen is not newcomer and verdict.switch:
            raise _Behind()
        if first is not None and len(waiting) > 1:
            asked_first = min(waiting, key=lambda name: self._asking.get(name, began))
            verdict = Verdict(verdict.switch, f"{verdict.reason}; {line_reason(first, waiting, asked_first)}")
        self.last_decision = {"time": time.time(), "resident": resident.name, "waiting": chosen.name,
                              "switch": verdict.switch, "switch_seconds": round(switch, 3), "reason": verdict.reason}
        return verdict

    @staticmethod
    def _waits(model: Model, began: float, now: float) -> Waits:
        lc = model.lifecycle
        return Waits.since(lc.in_flight, lc.admission.wait_starts or [began], now)

    def _switch_seconds(self, resident: Model, newcomer: Model) -> float:
        """A switch's measured seconds: the resident's sleep (a stop is not measured) and the newcomer's
        wake from its tier, or its start."""
        out = self._estimate(resident, SLEEP) if resident.lifecycle.sleepable else 0.0
        lc = newcomer.lifecycle
        if lc.state == SLEEPING:
            return out + max(self._estimate(newcomer, wake_kind(lc.wake_level(r))) for r in newcomer.replicas)
        return out + self._estimate(newcomer, START)

    def _estimate(self, model: Model, kind: str) -> float:
        return max((self.costs.estimate(r.name, kind).seconds for r in model.replicas), default=self.costs.guess(kind))

    def _action(self, model: Model) -> str:
        """How an awake model would be evicted: put to sleep if it can, else stopped."""
        return SLEEP_ACTION if model.lifecycle.sleepable else STOP_ACTION

    def _candidate(self, model: Model, action: str) -> Candidate:
        """`model` evicted by `action`, and the measured transition that would bring it back."""
        if action == STOP_ACTION:
            kind = START
        elif action == DEEPEN_ACTION:
            kind = wake_kind(DEEP_LEVEL)
        else:
            kind = wake_kind(max((model.lifecycle.held_level(r) for r in model.replicas), default=1))
        return Candidate(model.name, action, kind, self._estimate(model, kind), model.lifecycle.idle_seconds())

    def _choose(self, models: list[Model], action: Callable[[Model], str]) -> tuple[Model, str]:
        """The model whose eviction is expected to cost least (router/server/fleet/victims.py), and why."""
        candidates = [self._candidate(m, action(m)) for m in models]
        chosen = cheapest(candidates)
        return next(m for m in models if m.name == chosen.model), explain(chosen, candidates)

    def _group_members(self, members: tuple[str, ...], model: Optional[Model]) -> list[Model]:
        wanted = set(members)
        return [m for m in self._table() if m is not model and any(r.name in wanted for r in m.replicas)]

    async def _deepen(self, victim: Model, reason: str, why: str) -> None:
        cost = self._candidate(victim, DEEPEN_ACTION)
        outcome = await victim.lifecycle.deepen(reason, self._explained(cost, why))
        if not outcome.ok:
            raise ModelUnavailable(f"could not make room: {outcome.message}", RETRY_AFTER_SECONDS)
        self._record(victim, DEEPEN_ACTION, reason, cost, why)

    async def _evict(self, victim: Model, stop: bool, reason: str, why: str, drain: bool = False) -> None:
        cost = self._candidate(victim, STOP_ACTION if stop else SLEEP_ACTION)
        outcome = await victim.lifecycle.evict(stop=stop, reason=reason, drain=drain, why=self._explained(cost, why))
        if not outcome.ok:
            raise ModelUnavailable(f"could not make room: {outcome.message}", RETRY_AFTER_SECONDS)
        self._record(victim, cost.action, reason, cost, why)

    @staticmethod
    def _explained(cost: Candidate, why: str) -> dict[str, object]:
        """What an eviction's event and record say about its choice: what bringing it back costs, and why."""
        return {"cost_kind": cost.cost_kind, "cost_seconds": round(cost.cost_seconds, 3), "why": why}

    async def stop_idle(self, model: Model, due: Callable[[], bool]) -> Outcome:
        """A stop by a policy (the idle loop's ``idle_stop_seconds``), made as every eviction is: under the
        placement lock, so no decision for room races it, and recorded (reason ``idle_stop``) in the last
        evictions and their counts. `due` is asked again under the lock: a request that came while it
        waited keeps the model."""
        async with self._placement_lock():
            if not due():
                return Outcome(False, f"model {model.name!r} is no longer idle", 409)
            cost, why = self._candidate(model, STOP_ACTION), "idle past idle_stop_seconds"
            outcome = await model.lifecycle.evict(stop=True, reason=IDLE_STOP, why=self._explained(cost, why))
            if outcome.ok:
                self._record(model, STOP_ACTION, IDLE_STOP, cost, why)
            return outcome

    def _record(self, victim: Model, action: str, reason: str, cost: Candidate, why: str) -> None:
        self.eviction_counts[reason] += 1
        self.evictions.append({"time": time.time(), "model": victim.name, "action": action, "reason": reason,
                               **self._explained(cost, why)})

    @staticmethod
    def _why_kept(model: Model) -> str:
        lc = model.lifecycle
        if lc.pinned:
            return "pinned"
        if lc.state != AWAKE:
            return lc.state
        if lc.in_flight or lc.waiting or lc.busy:
            return f"busy: {lc.in_flight} in flight, {lc.waiting} waiting"
        return "cannot sleep or stop"

    # ------------------------------------------------------------------ accounting

    def gpu_used(self, gpu: str, exclude: Optional[Model] = None) -> float:
        """What the models hold on `gpu`: all of it while they hold their memory, `gpu_sleeping_gb` asleep."""
        return sum(gpu_need(m).get(gpu, 0.0) if m.lifecycle.state in HOLDING_GPU else
                   gpu_asleep(m).get(gpu, 0.0) if m.lifecycle.state == SLEEPING else 0.0
                   for m in self._table() if m is not exclude)

    def host_used(self, exclude: Optional[Model] = None) -> float:
        return sum(host_need(m) for m in self._table() if m is not exclude and m.lifecycle.state == SLEEPING)

    def report(self) -> dict[str, object]:
        """GET /residency: budgets, what each GPU and host RAM holds, the queue, the last evictions."""
        settings = self._settings()
        table = list(self._table())
        gpus = sorted({g for m in table for g in gpu_need(m)})
        return {
            "gpus": {gpu: {"budget_gb": settings.gpu_budget(gpu), "used_gb": self.gpu_used(gpu),
                           "models": [m.name for m in table if m.lifecycle.state in HOLDING_GPU and gpu in gpu_need(m)]}
                     for gpu in gpus},
            "host": {"budget_gb": settings.host_memory_gb, "used_gb": self.host_used(),
                     "models": [m.name for m in table if m.lifecycle.state == SLEEPING]},
            "models": {m.name: {"state": m.lifecycle.state, "pinned": m.lifecycle.pinned,
                                "on_demand": m.lifecycle.startable, "gpu_gb": gpu_need(m), "host_gb": host_need(m),
                                "waiting": m.lifecycle.waiting, "in_flight": m.lifecycle.in_flight,
                                "idle_seconds": m.lifecycle.idle_seconds(),
                                "costs": self.costs.of_model(r.name for r in m.replicas)} for m in table},
            "queue": {m.name: m.lifecycle.waiting for m in table if m.lifecycle.waiting},
            "groups": [{"name": g.name, "members": list(g.members), "exclusive": g.exclusive} for g in settings.groups],
            "scheduler": {"policy": settings.policy, "max_wait_seconds": settings.max_wait_seconds,
                          "last_decision": self.last_decision},
            "evictions": list(self.evictions),
            "eviction_counts": dict(self.eviction_counts),
        }
