"""Sleep tiers through the running router over loopback HTTP: a sleep at the instance's
`sleep_level`, and a wake that runs that level's steps in order so the first answer is right.

Engines: the project's simulated vLLM and SGLang engines (router/sim), which answer garbage
after a wake that skipped a reload or a cache reset; and `RecordingSglang`, a small aiohttp
server speaking SGLang's memory API that records every call and can refuse one, for the
order of the calls and what a failed step does.
"""
from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import Any, Iterator, Optional

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web
from helpers import LoopbackApp, free_port, wait_for
from router_support import LoopThread, RouterServer, loop  # noqa: F401  (fixture)

from router.config import load_config
from router.sim import SimEngine, SimOptions, textgen

MODEL = "org/tiered"
PROMPT = {"model": MODEL, "prompt": "Hello", "max_tokens": 6}
RIGHT = textgen.generate("Hello", 6)


class RecordingSglang(LoopbackApp):
    """SGLang's release/resume, weight reload and cache flush, recording each call (path and JSON body);
    `refuse` makes the calls to one path answer 400 (SGLang's ``{"success": false}``)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, Any]] = []
        self.refuse: Optional[str] = None

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/health", lambda r: web.Response(status=200))
        for path in ("/release_memory_occupation", "/resume_memory_occupation", "/update_weights_from_disk",
                     "/flush_cache"):
            app.router.add_post(path, self.control)
        app.router.add_post("/v1/completions", self.complete)

    async def control(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.calls.append((request.path, orjson.loads(raw) if raw else None))
        if request.path == self.refuse:
            return web.json_response({"success": False, "message": "Failed to load weights: disk full"}, status=400)
        return web.json_response(None)

    async def complete(self, request: web.Request) -> web.Response:
        self.calls.append((request.path, None))
        return web.json_response({"id": "c", "object": "text_completion", "created": 1, "model": MODEL,
                                  "choices": [{"index": 0, "text": "ok", "finish_reason": "stop", "logprobs": None}],
                                  "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})


def started_router(loop: LoopThread, tmp: Path, instances: list[dict[str, Any]], **top: Any) -> RouterServer:
    """A real router over `instances` (engines started elsewhere, on loopback)."""
    doc = {"router": {"router_port": free_port(), "access_log": False, "health_check_interval_seconds": 30},
           "sleep_manager": {"check_interval_seconds": 60, "min_sleep_duration": 0, "wake_timeout_seconds": 10},
           "instances": [{"launch": False, **i} for i in instances], **top}
    path = tmp / "tiers.yaml"
    path.write_text(yaml.safe_dump(doc))
    return RouterServer(loop, load_config(path, sim=True)).start()


def at(engine: Any, *args: str) -> list[str]:
    return ["--host", "127.0.0.1", "--port", str(engine.port), *args]


class Tiered:
    """One engine serving MODEL behind a real router, with the instance keys given."""

    def __init__(self, loop: LoopThread, router: RouterServer, engine: Any = None) -> None:
        self.loop, self.router, self.engine = loop, router, engine

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async def go() -> tuple[int, Any]:
            async with aiohttp.ClientSession() as s:
                async with s.request(method, self.router.url + path, json=body) as r:
                    raw = await r.read()
                    return r.status, orjson.loads(raw) if raw else None
        return self.loop.run(go())

    def sleep(self, model: str = MODEL) -> None:
        status, body = self.call("POST", f"/action/sleep/{urllib.parse.quote(model, safe='')}")
        assert status == 200 and body["state"] == "sleeping", body

    def complete(self) -> tuple[int, Any]:
        return self.call("POST", "/v1/completions", PROMPT)

    def state(self) -> str:
        return self.call("GET", "/sleep/status")[1]["models"][MODEL]["state"]


@pytest.fixture
def tiered(loop: LoopThread, tmp_path: Path) -> Iterator[Any]:  # noqa: F811  (the fixture it uses)
    made: list[Tiered] = []

    def make(engine: Any, kind: str, args: list[str], **inst: Any) -> Tiered:
        loop.run(engine.start())
        inst = {"name": "t", "model": MODEL, "engine": kind, "engine_args": at(engine, *args), **inst}
        made.append(Tiered(loop, started_router(loop, tmp_path, [inst]), engine))
        return made[-1]
    yield make
    for t in made:
        t.router.stop()
        loop.run(t.engine.stop())


def sim(engine: str, **options: Any) -> SimEngine:
    return SimEngine(SimOptions(engine=engine, model=MODEL, port=0, **options))


def answer(t: Tiered) -> str:
    status, body = t.complete()
    assert status == 200, body
    return body["choices"][0]["text"]


def test_vllm_level_2_sleeps_at_level_2_and_a_request_runs_the_reload_sequence_in_order(tiered) -> None:
    t = tiered(sim("vllm"), "vllm", [], sleep_level=2)
    assert answer(t) == RIGHT
    t.sleep()
    assert t.engine.sleep_level == 2
    assert answer(t) == RIGHT  # not garbage: the weights were read again and the cache reset
    assert t.engine.calls == ["sleep level=2", "wake_up tags=weights", "collective_rpc reload_weights",
                              "wake_up tags=kv_cache", "reset_prefix_cache"]
    assert t.engine.core.memory.answers_right and t.state() == "awake"


def test_vllm_level_1_keeps_its_one_call_wake(tiered) -> None:
    t = tiered(sim("vllm"), "vllm", [])
    t.sleep()
    assert t.engine.sleep_level == 1
    assert answer(t) == RIGHT and t.engine.calls == ["sleep level=1", "wake_up"]


def test_sglang_level_2_without_backup_reloads_from_the_model_path_and_flushes(tiered) -> None:
    t = tiered(sim("sglang", memory_saver=True), "sglang", ["--enable-memory-saver"], sleep_level=2)
    t.sleep()
    assert answer(t) == RIGHT
    assert t.engine.calls == ["release_memory_occupation", "resume_memory_occupation", "update_weights_from_disk",
                              "flush_cache"]


def test_sglang_level_1_with_the_cpu_backup_resumes_right_with_no_reload(tiered) -> None:
    t = tiered(sim("sglang", memory_saver=True, weights_cpu_backup=True), "sglang",
               ["--enable-memory-saver", "--enable-weights-cpu-backup"])
    t.sleep()
    assert answer(t) == RIGHT
    assert t.engine.calls == ["release_memory_occupation", "resume_memory_occupation"]


def test_a_recording_sglang_server_sees_the_level_2_calls_in_order_with_the_model_path(tiered) -> None:
    t = tiered(RecordingSglang(), "sglang", ["--enable-memory-saver"], sleep_level=2)
    t.sleep()
    assert t.complete()[0] == 200
    assert t.engine.calls == [("/release_memory_occupation", {}), ("/resume_memory_occupation", {}),
                              ("/update_weights_from_disk", {"model_path": MODEL}), ("/flush_cache", None),
                              ("/v1/completions", None)]


def test_a_failed_wake_step_stops_the_wake_keeps_the_model_asleep_and_names_the_step(tiered) -> None:
    t = tiered(RecordingSglang(), "sglang", ["--enable-memory-saver"], sleep_level=2)
    t.sleep()
    t.engine.refuse = "/update_weights_from_disk"
    status, body = t.complete()
    message = body["error"]["message"]
    assert status == 503 and "step 2 of 3 (POST /update_weights_from_disk) failed" in message, message
    assert "disk full" in message
    assert [p for p, _ in t.engine.calls] == ["/release_memory_occupation", "/resume_memory_occupation",
                                              "/update_weights_from_disk"]  # no flush, no generation
    assert t.state() == "sleeping"
    t.engine.refuse, t.engine.calls = None, []
    assert t.complete()[0] == 200  # the next request runs the whole sequence again
    assert [p for p, _ in t.engine.calls] == ["/resume_memory_occupation", "/update_weights_from_disk", "/flush_cache",
                                              "/v1/completions"]


def test_residency_and_metrics_show_the_measured_wake_of_its_tier(tiered) -> None:
    t = tiered(sim("vllm", reload_s=0.2), "vllm", [], sleep_level=2)
    t.sleep()
    assert answer(t) == RIGHT
    costs = t.call("GET", "/residency")[1]["models"][MODEL]["costs"]
    assert costs["wake_2"]["samples"] == 1 and costs["wake_2"]["seconds"] >= 0.2  # the simulated reload's time
    assert costs["sleep"]["samples"] == 1 and costs["wake_1"]["samples"] == costs["start"]["samples"] == 0

    async def metrics() -> str:
        async with aiohttp.ClientSession() as s:
            async with s.get(t.router.url + "/metrics") as r:
                return await r.text()
    text = t.loop.run(metrics())
    assert f'router_model_wake_seconds_count{{model="{MODEL}",tier="2"}} 1.0' in text
    assert f'router_model_wake_seconds_bucket{{le="0.1",model="{MODEL}",tier="2"}} 0.0' in text


def test_a_host_budget_too_small_for_two_level_1_sleepers_deepens_the_older_one_instead_of_stopping_it(
        loop: LoopThread, tmp_path: Path) -> None:  # noqa: F811
    engines = {name: SimEngine(SimOptions(engine="vllm", model=name, port=0)) for name in ("org/older", "org/newer")}
    for e in engines.values():
        loop.run(e.start())
    instances = [{"model": name, "engine": "vllm", "host_memory_gb": 10, "engine_args": at(e)} for name, e in engines.items()]
    router = started_router(loop, tmp_path, instances, residency={"host_memory_gb": 15})
    t = Tiered(loop, router)
    try:
        for name in engines:
            t.sleep(name)
        older, newer = engines["org/older"], engines["org/newer"]
        assert older.calls == ["sleep level=1", "sleep level=2"] and older.sleep_level == 2
        assert newer.calls == ["sleep level=1"] and newer.sleep_level == 1
        residency = t.call("GET", "/residency")[1]
        assert residency["host"]["used_gb"] == 10.0 and residency["models"]["org/older"]["host_gb"] == 0.0
        assert [(e["model"], e["action"], e["reason"]) for e in residency["evictions"]] == [
            ("org/older", "deepen", "host_budget")]  # nothing stopped
        assert all(state["state"] == "sleeping" for state in residency["models"].values())
        status, body = t.call("POST", "/v1/completions", {"model": "org/older", "prompt": "Hello", "max_tokens": 6})
        assert status == 200 and body["choices"][0]["text"] == RIGHT
        assert older.calls[2:] == ["wake_up tags=weights", "collective_rpc reload_weights", "wake_up tags=kv_cache",
                                   "reset_prefix_cache"]
    finally:
        router.stop()
        for e in engines.values():
            loop.run(e.stop())


def test_idle_deep_sleep_seconds_deepens_a_level_1_sleeper_and_its_wake_reloads(loop: LoopThread,  # noqa: F811
                                                                                 tmp_path: Path) -> None:
    engine = sim("vllm")
    loop.run(engine.start())
    router = started_router(loop, tmp_path, [{"model": MODEL, "engine": "vllm", "engine_args": at(engine)}],
                            sleep_manager={"check_interval_seconds": 0.05, "idle_deep_sleep_seconds": 0.3})
    t = Tiered(loop, router, engine)
    try:
        t.sleep()
        wait_for(lambda: engine.sleep_level == 2, 10, "the idle loop to deepen the sleeper to level 2")
        assert engine.calls == ["sleep level=1", "sleep level=2"]
        assert answer(t) == RIGHT and engine.calls[2:] == ["wake_up tags=weights", "collective_rpc reload_weights",
                                                           "wake_up tags=kv_cache", "reset_prefix_cache"]
    finally:
        router.stop()
        loop.run(engine.stop())
