"""The ``residency`` block: memory budgets and groups that decide which models are awake,
asleep or stopped."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from router.config.kinds import POSITIVE, Choice, Flag, Text
from router.config.problems import Reading
from router.config.schema import REQUIRED, Kind, ListOf, setting

#: How a model that needs another's place gets it (router/server/fleet/contention.py).
POLICIES = ("fifo", "cost_aware")


@dataclass(frozen=True)
class Members(Kind[tuple[str, ...]]):
    @property
    def label(self) -> str:
        return "list of at least two instance names"

    def read(self, value: object, where: str, reading: Reading) -> Optional[tuple[str, ...]]:
        if isinstance(value, list) and len(value) >= 2 and all(isinstance(m, str) for m in value):
            return tuple(value)
        reading.error(where, "must list at least two instance names")
        return None


@dataclass(frozen=True)
class GpuBudgets(Kind[tuple[tuple[str, float], ...]]):
    """One budget for every GPU (``"*"``), or a mapping by GPU index or UUID."""

    @property
    def label(self) -> str:
        return "number > 0, or a mapping of GPU to number > 0"

    def read(self, value: object, where: str, reading: Reading) -> Optional[tuple[tuple[str, float], ...]]:
        if isinstance(value, dict):
            items = ((str(k), POSITIVE.read(v, f"{where}.{k}", reading)) for k, v in value.items())
            return tuple((k, n) for k, n in items if n is not None)
        n = POSITIVE.read(value, where, reading)
        return (("*", n),) if n is not None else None


@dataclass(frozen=True)
class Group:
    """Instances that share a GPU in turns: with `exclusive`, at most one member is awake."""

    name: str = setting(Text("a name for the group", problem="must be {what}"), REQUIRED, "the group's name")
    members: tuple[str, ...] = setting(Members(), REQUIRED, "the instances in the group")
    exclusive: bool = setting(Flag(), True, "at most one member is awake at a time")


@dataclass(frozen=True)
class ResidencySettings:
    """Memory budgets that decide which models are awake, asleep or stopped (top-level ``residency``)."""

    #: GPU memory per GPU (by CUDA device index/UUID, "*" for every GPU not named); None: no GPU budget.
    gpu_memory_gb: Optional[tuple[tuple[str, float], ...]] = setting(GpuBudgets(), None, (
        "the budget of each GPU: one number for all, or a map by GPU (`{0: 80, 1: 40}`, `\"*\"` for the rest); GPUs come "
        "from each instance's `CUDA_VISIBLE_DEVICES` (GPU `0` when none)"), shown="none (no GPU budget)")
    host_memory_gb: Optional[float] = setting(POSITIVE, None, "host RAM for the weights of sleeping engines",
                                              shown="none (no host budget)")
    start_timeout_seconds: float = setting(POSITIVE, 900.0, (
        "longest wait for a started engine to pass its health check (real models load for minutes)"))
    groups: tuple[Group, ...] = setting(ListOf(Group, "{name, members: [instance names], exclusive: true}"), (), (
        "`[{name, members: [instance names], exclusive: true}]`: at most one member of an exclusive group is awake at "
        "a time"))
    policy: str = setting(Choice(POLICIES), "cost_aware", (
        "when a waiting model needs the place of a busy one (an exclusive group, or a full GPU budget): `cost_aware` "
        "keeps serving the resident while it has queued work and switches when the waiting requests' accumulated wait "
        "outweighs the measured switch cost, or the oldest has waited `max_wait_seconds`; `fifo` switches in arrival "
        "order (a group member after `min_sleep_duration`; a full budget of busy models refuses with 503)"))
    max_wait_seconds: float = setting(POSITIVE, 30.0, (
        "with `policy: cost_aware`, the longest a request waits for a busy resident before the switch to its model "
        "begins"))

    def gpu_budget(self, gpu: str) -> Optional[float]:
        if self.gpu_memory_gb is None:
            return None
        budgets = dict(self.gpu_memory_gb)
        return budgets.get(gpu, budgets.get("*"))
