"""launch_order: which engine waits for which at its first start (router/render/start_order.py), its
default, and the wait itself on a fake clock (router/render/wait_healthy.py)."""
from __future__ import annotations

from typing import Any, Optional

import yaml

from router.config import Config, parse_config
from router.render.start_order import turns
from router.render.wait_healthy import POLL_SECONDS, STOPPED_FOR_SECONDS, wait


def load(*instances: dict[str, Any], **top: Any) -> Config:
    return parse_config(yaml.safe_dump({**top, "instances": list(instances)}), sim=True)


def engine(name: str, port: int, gpus: Optional[str] = None, **extra: Any) -> dict[str, Any]:
    env = {"engine_env": [f"CUDA_VISIBLE_DEVICES={gpus}"]} if gpus is not None else {}
    return {"name": name, "model": f"org/{name}", "engine": "vllm", "engine_args": [f"--port {port}"], **env, **extra}


def after(cfg: Config) -> dict[str, list[str]]:
    return {name: [p.name for p in turn.after] for name, turn in turns(cfg).items()}


def test_launch_order_defaults_to_delay_only_where_a_delay_is_set() -> None:
    assert load(engine("a", 8001)).launch_order == "healthy"
    assert load(engine("a", 8001), launch_delay_seconds=0).launch_order == "healthy"
    assert load(engine("a", 8001), launch_delay_seconds=5).launch_order == "delay"
    assert load(engine("a", 8001), launch_delay_seconds=5, launch_order="healthy").launch_order == "healthy"


def test_engines_on_one_gpu_wait_one_after_another_and_unset_is_gpu_0() -> None:
    cfg = load(engine("a", 8001), engine("b", 8002, "0"), engine("c", 8003))
    assert after(cfg) == {"a": [], "b": ["a"], "c": ["b"]}


def test_engines_on_other_gpus_or_nodes_start_together() -> None:
    cfg = load(engine("a", 8001, "0"), engine("b", 8002, "1"), engine("c", 8003, "0"), engine("d", 8004, "1"),
               engine("e", 8005, "0", node="other"))
    assert after(cfg) == {"a": [], "b": [], "c": ["a"], "d": ["b"], "e": []}


def test_an_engine_on_two_gpus_waits_for_the_last_engine_on_each() -> None:
    cfg = load(engine("a", 8001, "0"), engine("b", 8002, "1"), engine("c", 8003, "0,1"), engine("d", 8004, "1"))
    assert after(cfg) == {"a": [], "b": [], "c": ["a", "b"], "d": ["c"]}


def test_engines_started_on_demand_or_elsewhere_are_not_in_the_queue() -> None:
    cfg = load(engine("a", 8001), engine("lazy", 8002, on_demand=True), engine("far", 8003, launch=False),
               engine("b", 8004))
    assert after(cfg) == {"a": [], "b": ["a"]}


def test_the_longest_wait_is_the_chain_of_start_timeouts_ahead() -> None:
    cfg = load(engine("a", 8001, start_timeout_seconds=100), engine("b", 8002), engine("c", 8003),
               residency={"start_timeout_seconds": 30})
    assert {n: t.timeout for n, t in turns(cfg).items()} == {"a": 0, "b": 100, "c": 130}


class Fake:
    """A clock that only moves when the waiter pauses, and engines that turn healthy or change state at given times."""

    def __init__(self, healthy_at: dict[str, float], states: Optional[dict[str, list[tuple[float, str]]]] = None) -> None:
        self.now = 0.0
        self.healthy_at = healthy_at
        self.states = states or {}

    def clock(self) -> float:
        return self.now

    def pause(self, seconds: float) -> None:
        self.now += seconds

    def probe(self, url: str) -> bool:
        return self.now >= self.healthy_at.get(url, float("inf"))

    def state(self, name: str) -> Optional[str]:
        seen = [s for t, s in self.states.get(name, []) if t <= self.now]
        return seen[-1] if seen else None

    def wait(self, engines: dict[str, str], timeout: float) -> dict[str, str]:
        return wait(engines, timeout, self.state, self.probe, self.clock, self.pause)


def test_the_wait_ends_when_each_engine_ahead_is_healthy() -> None:
    fake = Fake({"ua": 3.0, "ub": 5.0})
    assert fake.wait({"a": "ua", "b": "ub"}, 100) == {"a": "healthy", "b": "healthy"}
    assert 5.0 <= fake.now < 5.0 + 2 * POLL_SECONDS


def test_an_engine_that_failed_is_not_waited_for() -> None:
    fake = Fake({}, {"a": [(0, "STARTING"), (4, "BACKOFF")]})
    assert fake.wait({"a": "ua"}, 100) == {"a": "BACKOFF"}
    assert fake.now < 4 + 2 * POLL_SECONDS


def test_stopped_is_given_up_only_once_it_lasts_since_supervisord_spawns_in_turn() -> None:
    spawned = Fake({"ua": 2.0}, {"a": [(0, "STOPPED"), (1, "STARTING")]})
    assert spawned.wait({"a": "ua"}, 100) == {"a": "healthy"}
    stopped = Fake({}, {"a": [(0, "STOPPED")]})
    assert stopped.wait({"a": "ua"}, 100) == {"a": "STOPPED"}
    assert STOPPED_FOR_SECONDS <= stopped.now < STOPPED_FOR_SECONDS + 2 * POLL_SECONDS


def test_the_wait_ends_at_the_timeout_without_supervisord() -> None:
    fake = Fake({})
    assert fake.wait({"a": "ua"}, 10) == {"a": "timeout"}
    assert 10 <= fake.now < 10 + 2 * POLL_SECONDS
