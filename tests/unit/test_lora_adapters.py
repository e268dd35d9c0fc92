"""LoRA adapters: their config, the replica's record of what its engine holds, and the loader's
single-flight loads, least-recently-used unloads and failures, over a fake engine control and clock."""
from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Awaitable, Callable, Optional

import pytest
from fakes import Clock, instance, process

from router.config import ConfigError, parse_config
from router.config.adapters import LoraAdapter
from router.engines import ENGINES, Call
from router.observe.events import Events
from router.server.fleet.adapters import AdapterLoader, AdapterUnavailable
from router.server.fleet.control import EngineCallError
from router.server.fleet.replica import Replica


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 10))


class LoraEngine:
    """Engine control that records each adapter call as (replica, "load"|"unload", adapter name);
    `hold()` keeps loads waiting until `go()`, `refuse` answers each load with the engine's words."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []
        self.refuse: Optional[str] = None
        self._gate: Optional[asyncio.Event] = None

    def hold(self) -> None:
        self._gate = asyncio.Event()

    def go(self) -> None:
        assert self._gate is not None
        self._gate.set()

    async def call(self, replica: Replica, call: Call, timeout: float) -> None:
        assert call.json is not None
        kind = "load" if "load_lora" in call.path and "unload" not in call.path else "unload"
        self.calls.append((replica.name, kind, str(call.json["lora_name"])))
        if kind == "load" and self._gate is not None:
            await self._gate.wait()
        if kind == "load" and self.refuse is not None:
            raise EngineCallError(f"{replica.name}: {call.method} {call.path} answered 400: {self.refuse}")

    def loads(self) -> list[str]:
        return [name for _, kind, name in self.calls if kind == "load"]


ADAPTERS = tuple(LoraAdapter(n, f"/loras/{n}") for n in ("a", "b", "c"))


def replica(name: str = "r1", max_loras: Optional[int] = None, at_start: tuple[LoraAdapter, ...] = ()) -> Replica:
    args = ("--enable-lora", *(("--max-loras", str(max_loras)) if max_loras else ()))
    inst = replace(instance(name, lora_adapters=(*at_start, *ADAPTERS)), engine_args=args)
    return Replica(inst, Events())


def test_thirty_waiting_requests_cause_one_load() -> None:
    async def test() -> None:
        engine, clock = LoraEngine(), Clock()
        loader, r = AdapterLoader(engine, clock), replica()
        engine.hold()
        waits = [asyncio.ensure_future(loader.ensure(r, "a")) for _ in range(30)]
        await asyncio.sleep(0)
        assert r.loras.holds("a") and "a" not in r.loras.loaded  # loading: later requests come here
        engine.go()
        await asyncio.gather(*waits)
        assert engine.loads() == ["a"]
        assert "a" in r.loras.loaded and not r.loras.loading
        await loader.ensure(r, "a")  # held: no call at all
        assert engine.loads() == ["a"]
    run(test)


def test_a_full_engine_unloads_its_least_recently_used_idle_adapter() -> None:
    async def test() -> None:
        engine, clock = LoraEngine(), Clock()
        loader, r = AdapterLoader(engine, clock), replica(max_loras=2)
        await loader.ensure(r, "a")
        clock.advance(1)
        await loader.ensure(r, "b")
        clock.advance(1)
        r.loras.begin("a", clock())  # a used after b: b is the least recently used
        r.loras.end("a", clock())
        await loader.ensure(r, "c")
        assert engine.calls[-2:] == [("r1", "unload", "b"), ("r1", "load", "c")]
        assert set(r.loras.loaded) == {"a", "c"}
    run(test)


def test_an_adapter_in_use_is_not_unloaded_even_if_least_recently_used() -> None:
    async def test() -> None:
        engine, clock = LoraEngine(), Clock()
        loader, r = AdapterLoader(engine, clock), replica(max_loras=2)
        r.loras.begin("a", clock())  # a request for a, in flight from before its load
        await loader.ensure(r, "a")
        clock.advance(1)
        await loader.ensure(r, "b")
        await loader.ensure(r, "c")
        assert ("r1", "unload", "b") in engine.calls and "a" in r.loras.loaded
        r.loras.begin("c", clock())
        with pytest.raises(AdapterUnavailable) as info:  # a and c both in use: no room for b
            await loader.ensure(r, "b")
        assert info.value.status == 503 and "--max-loras 2" in info.value.message
        assert not r.loras.holds("b")
    run(test)


def test_vllm_holds_one_adapter_by_default() -> None:
    async def test() -> None:
        engine = LoraEngine()
        loader, r = AdapterLoader(engine, Clock()), replica()
        await loader.ensure(r, "a")
        await loader.ensure(r, "b")
        assert engine.calls == [("r1", "load", "a"), ("r1", "unload", "a"), ("r1", "load", "b")]
    run(test)


def test_a_failed_load_names_the_adapter_and_the_engines_words_and_the_next_request_tries_again() -> None:
    async def test() -> None:
        engine = LoraEngine()
        loader, r = AdapterLoader(engine, Clock()), replica()
        engine.refuse = "Loading lora a failed: No adapter found for /loras/a"
        waits = [asyncio.ensure_future(loader.ensure(r, "a")) for _ in range(5)]
        results = await asyncio.gather(*waits, return_exceptions=True)
        assert all(isinstance(e, AdapterUnavailable) for e in results)
        error = results[0]
        assert isinstance(error, AdapterUnavailable)
        assert error.status == 502
        assert "'a'" in error.message and "No adapter found for /loras/a" in error.message
        assert engine.loads() == ["a"] and not r.loras.holds("a")
        engine.refuse = None
        await loader.ensure(r, "a")
        assert engine.loads() == ["a", "a"] and "a" in r.loras.loaded
    run(test)


def test_an_engine_that_already_holds_the_adapter_counts_as_loaded() -> None:
    async def test() -> None:
        engine = LoraEngine()
        loader, r = AdapterLoader(engine, Clock()), replica()
        engine.refuse = "The lora adapter 'a' has already been loaded."
        await loader.ensure(r, "a")
        assert "a" in r.loras.loaded
    run(test)


def test_loads_of_two_adapters_on_one_engine_run_one_at_a_time_within_its_bound() -> None:
    async def test() -> None:
        engine = LoraEngine()
        loader, r = AdapterLoader(engine, Clock()), replica()
        await asyncio.gather(loader.ensure(r, "a"), loader.ensure(r, "b"))
        assert engine.calls == [("r1", "load", "a"), ("r1", "unload", "a"), ("r1", "load", "b")]
        assert list(r.loras.loaded) == ["b"]
    run(test)


def test_a_restart_forgets_loaded_adapters_but_not_those_the_engine_flags_load() -> None:
    started = LoraAdapter("s", "/loras/s", at_start=True)
    r = replica(at_start=(started,))
    assert list(r.loras.loaded) == ["s"]
    r.loras.load_started("a")
    r.loras.load_ended("a", True, 5.0)
    r.set_process(process("r1", "EXITED"))
    assert list(r.loras.loaded) == ["s"]


def test_config_reads_declared_adapters_and_those_the_engine_flags_load() -> None:
    text = """
instances:
  - model: base/m
    engine: vllm
    engine_args:
      - --port 8001 --enable-lora --max-loras 2
      - "--lora-modules s=/l/s '{\\"name\\": \\"j\\", \\"path\\": \\"/l/j\\"}'"
    lora_adapters:
      - {name: sql, path: /l/sql}
"""
    cfg = parse_config(text)
    inst = cfg.instances[0]
    assert [(a.name, a.path, a.at_start) for a in inst.lora_adapters] == [
        ("s", "/l/s", True), ("j", "/l/j", True), ("sql", "/l/sql", False)]
    assert cfg.routes["sql"] == "base/m" and cfg.routes["s"] == "base/m"
    assert inst.lora_env == (("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True"),)
    assert ENGINES["vllm"].lora is not None and ENGINES["vllm"].lora.capacity(inst.engine_args) == 2
    assert cfg.warnings == ()


def test_check_warns_without_enable_lora_and_refuses_an_adapter_named_like_a_model() -> None:
    text = """
instances:
  - {model: m, engine: vllm, engine_args: "--port 8001", lora_adapters: [{name: sql, path: /l/sql}]}
  - {model: n, engine: sglang, engine_args: "--port 8002 --lora-paths x=/l/x"}
"""
    cfg = parse_config(text)
    assert any("instances[0].engine_args: lora_adapters is set but the engine is not started with --enable-lora" in w
               for w in cfg.warnings), cfg.warnings
    assert not any("instances[1]" in w for w in cfg.warnings)  # --lora-paths enables SGLang's adapters
    clash = text.replace("name: sql", "name: n")
    with pytest.raises(ConfigError, match="adapter name 'n' is already a name of model 'n'"):
        parse_config(clash)
    with pytest.raises(ConfigError, match="lora_adapters\\[0\\].path"):
        parse_config(text.replace("path: /l/sql", "path: ''"))


def test_the_render_lets_a_vllm_engine_with_adapters_load_them_at_run_time(tmp_path) -> None:
    from router.render.files import render_files
    text = """
instances:
  - {model: m, engine: vllm, engine_args: "--port 8001 --enable-lora", lora_adapters: [{name: sql, path: /l/sql}]}
  - {model: n, engine: vllm, engine_args: "--port 8002", engine_env: ["VLLM_ALLOW_RUNTIME_LORA_UPDATING=False"]}
"""
    files = render_files(parse_config(text, str(tmp_path / "c.yaml")), tmp_path / "out")
    with_adapters, without = files["engines/m.sh"][0], files["engines/n.sh"][0]
    assert "export VLLM_ALLOW_RUNTIME_LORA_UPDATING=True\n" in with_adapters
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" not in without  # no adapters: the engine's own default


@pytest.mark.parametrize("level,kept", [(1, ["s", "a"]), (2, ["s"])])
def test_a_level_2_wake_forgets_the_adapters_the_router_loaded_and_a_level_1_wake_keeps_them(
        level: int, kept: list[str]) -> None:
    from fakes import FakeControl

    from router.config import SleepSettings
    from router.server.fleet.lifecycle import Lifecycle
    started = LoraAdapter("s", "/loras/s", at_start=True)
    r = Replica(replace(instance("r1", lora_adapters=(started, *ADAPTERS), sleep_level=level),
                        engine_args=("--enable-lora", "--max-loras", "2")), Events())
    r.loras.load_started("a")
    r.loras.load_ended("a", True, 1.0)
    lc = Lifecycle("m", lambda: (r,), SleepSettings(), FakeControl(), Events())  # type: ignore[arg-type]

    async def test() -> None:
        assert (await lc.sleep()).ok
        assert (await lc.wake()).ok
    run(test)
    assert list(r.loras.loaded) == kept


def test_the_table_routes_an_adapter_to_its_base_and_a_pick_prefers_the_replica_holding_it() -> None:
    from fakes import FakeControl

    from router.config import SleepSettings
    from router.observe.metrics import ModelMetrics
    from router.server.fleet.lifecycle import Lifecycle
    from router.server.fleet.models import ModelTable
    text = """
instances:
  - {name: a, model: m, engine: vllm, engine_args: "--port 8001 --enable-lora", lora_adapters: [{name: sql, path: /l/sql}]}
  - {name: b, model: m, engine: vllm, engine_args: "--port 8002 --enable-lora", lora_adapters: [{name: sql, path: /l/sql}]}
  - {name: c, model: m, engine: vllm, engine_args: "--port 8003"}
"""
    events = Events()

    def lifecycles(name: str, members: Callable[[], tuple[Replica, ...]]) -> Lifecycle:
        return Lifecycle(name, members, SleepSettings(), FakeControl(), events)  # type: ignore[arg-type]
    table = ModelTable.build(parse_config(text), events, ModelMetrics, lifecycles)
    model = table.get("sql")
    assert model is not None and model is table.get("m") and table.aliases(model) == []
    adapter = table.adapter("sql")
    assert adapter is not None and adapter.path == "/l/sql" and table.adapter("m") is None
    a, b, c = model.replicas
    b.loras.load_started("sql")
    b.take_slot(0.0)  # busier than a, but loading the adapter: requests for it join that load
    assert model.pick(0.0, adapter="sql") is b
    assert model.pick(0.0) is a  # a plain request: the least loaded
    for r in (a, b, c):
        while r.outstanding:
            r.release_slot()
    picked = {model.pick(0.0, adapter="sql").name for _ in range(3)}
    assert "c" not in picked  # c does not declare the adapter

    b.loras.load_ended("sql", True, 1.0)
    again = ModelTable.build(parse_config(text.replace("[{name: sql, path: /l/sql}]",
                                                       "[{name: sql, path: /l/sql}, {name: chat, path: /l/chat}]")),
                             events, ModelMetrics, lifecycles, previous=table)
    model2 = again.get("chat")
    assert model2 is model and model2.replicas[1] is b  # a changed adapter list keeps the replica and its state
    assert "sql" in b.loras.loaded and "chat" in b.loras.known


def test_a_key_scope_names_an_adapter_by_its_own_name_not_its_base() -> None:
    from fakes import FakeControl

    from router.config import SleepSettings
    from router.config.keys import ApiKey
    from router.observe.metrics import ModelMetrics
    from router.server.fleet.lifecycle import Lifecycle
    from router.server.fleet.models import ModelTable
    from router.server.proxy.tenants import allowed_models
    text = """
router: {api_keys: [{name: base, key: sk-b, models: [m]}, {name: sql, key: sk-s, models: ["sq*"]}]}
instances:
  - {name: a, model: m, engine: vllm, engine_args: "--port 8001 --enable-lora", lora_adapters: [{name: sql, path: /l/sql}]}
"""
    events = Events()
    config = parse_config(text)

    def lifecycles(name: str, members: Callable[[], tuple[Replica, ...]]) -> Lifecycle:
        return Lifecycle(name, members, SleepSettings(), FakeControl(), events)  # type: ignore[arg-type]
    table = ModelTable.build(config, events, ModelMetrics, lifecycles)
    keys: tuple[ApiKey, ...] = config.router.api_keys
    base, sql = (allowed_models(k, table) for k in keys)
    assert base == frozenset({"m"}) and sql == frozenset({"sql"})
    assert not [w for w in config.warnings if "api_keys" in w]  # "sq*" matches the adapter: no warning
