"""The sleep manager through the running router over HTTP.

Engines: the project's simulated vLLM engine where the test is about normal
behaviour, and `ControlEngine` (a small aiohttp server speaking vLLM's sleep
API) where a test needs a precise misbehaviour: a slow sleep call, a wake
that fails or hangs. Both are real HTTP servers on loopback.
"""
from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
from pathlib import Path
from typing import Any, Optional

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web
from helpers import ROUTER_MODES, free_port, in_both_modes, wait_for, wait_for_async
from router_support import LoopThread, RouterServer

from router.config import SleepSettings, load_config
from router.observe.events import Events
from router.server.fleet.control import EngineControl
from router.server.fleet.lifecycle import Lifecycle
from router.sim import SimEngine, SimOptions

MODEL = "org/sleepy-model"
ENC = urllib.parse.quote(MODEL, safe="")


class ControlEngine:
    """vLLM's sleep API and completions; a request sent while asleep is held until woken, as real vLLM does."""

    def __init__(self, sleep_delay: float = 0.0, wake_delay: float = 0.0, wake_status: int = 200,
                 gen_delay: float = 0.0, asleep: bool = False, sleep_status: int = 200, hold_wake: bool = False):
        self.port = free_port()
        self.sleep_delay = sleep_delay
        self.wake_delay = wake_delay
        self.wake_status = wake_status
        self.sleep_status = sleep_status
        self.gen_delay = gen_delay
        self.asleep = asleep
        self.awake_event = asyncio.Event()
        #: /wake_up answers only once this is set (`hold_wake` leaves it to the test).
        self.wake_gate = asyncio.Event()
        self.hold_wake = hold_wake
        self.log: list[str] = []
        self.sleep_params: list[dict[str, str]] = []
        self.runner: Optional[web.AppRunner] = None

    def count(self, what: str) -> int:
        return self.log.count(what)

    async def start(self) -> None:
        if not self.asleep:
            self.awake_event.set()
        if not self.hold_wake:
            self.wake_gate.set()
        app = web.Application()
        app.router.add_get("/health", lambda r: web.Response(status=200))
        app.router.add_post("/sleep", self.sleep)
        app.router.add_post("/wake_up", self.wake)
        app.router.add_get("/is_sleeping", lambda r: web.json_response({"is_sleeping": self.asleep}))
        app.router.add_post("/v1/completions", self.generate)
        self.runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.2)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def sleep(self, request: web.Request) -> web.Response:
        self.log.append("sleep")
        self.sleep_params.append(dict(request.query))
        await asyncio.sleep(self.sleep_delay)
        if self.sleep_status != 200:
            return web.json_response({"error": "sleep mode is not enabled"}, status=self.sleep_status)
        self.asleep = True
        self.awake_event.clear()
        self.log.append("asleep")
        return web.Response(status=200)

    async def wake(self, request: web.Request) -> web.Response:
        self.log.append("wake")
        await self.wake_gate.wait()
        await asyncio.sleep(self.wake_delay)
        if self.wake_status != 200:
            return web.json_response({"error": "cannot allocate memory"}, status=self.wake_status)
        self.asleep = False
        self.awake_event.set()
        return web.Response(status=200)

    async def generate(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.log.append("generate")
        await self.awake_event.wait()
        await asyncio.sleep(self.gen_delay)
        return web.json_response({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": body["model"],
                                  "choices": [{"index": 0, "text": "ok", "finish_reason": "stop", "logprobs": None}],
                                  "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})


def sim(engine: str = "vllm") -> SimEngine:
    return SimEngine(SimOptions(engine=engine, model=MODEL, port=0))


def write_config(tmp: Path, engines: list[Any], settings: dict[str, Any], router: Optional[dict[str, Any]] = None,
                 **inst: Any) -> Path:
    """One model served by `engines` (replicas r0, r1, ...); `inst` adds keys to r0."""
    instances = []
    for i, e in enumerate(engines):
        kind = e.options.engine if isinstance(e, SimEngine) else "vllm"
        instances.append({"name": f"r{i}", "model": MODEL, "engine": kind, "launch": False,
                          "engine_args": ["--host", "127.0.0.1", "--port", str(e.port)], **(inst if i == 0 else {})})
    doc = {
        "router": {"router_port": free_port(), "access_log": False, "health_check_interval_seconds": 30,
                   **(router or {})},
        "sleep_manager": {"auto_sleep_enabled": False, "check_interval_seconds": 0.05, "idle_threshold_seconds": 300,
                          "min_sleep_duration": 0, "wake_timeout_seconds": 5, **settings},
        "instances": instances,
    }
    path = tmp / f"config-{engines[0].port}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
def loop():
    lt = LoopThread()
    yield lt
    lt.close()


class Stack:
    """Engines (replicas of MODEL) and a router on the loop thread; HTTP helpers run on that loop too."""

    def __init__(self, loop: LoopThread, tmp: Path, engines: list[Any], settings: dict[str, Any],
                 router: Optional[dict[str, Any]] = None, **inst: Any):
        self.loop = loop
        self.engines = engines
        self.engine = engines[0]
        for e in engines:
            loop.run(e.start())
        self.config_path = write_config(tmp, engines, settings, router, **inst)
        self.router = RouterServer(loop, load_config(self.config_path, sim=True)).start()

    def restart_router(self) -> None:
        self.router.stop()
        self.router = RouterServer(self.loop, load_config(self.config_path, sim=True)).start()

    def close(self) -> None:
        self.router.stop()
        for e in self.engines:
            self.loop.run(e.stop())

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any, dict[str, str]]:
        return self.loop.run(self._call(method, self.router.url + path, body))

    async def _call(self, method: str, url: str, body: Any = None) -> tuple[int, Any, dict[str, str]]:
        async with aiohttp.ClientSession() as s:
            async with s.request(method, url, data=orjson.dumps(body) if body is not None else None,
                                 headers={"content-type": "application/json"}) as r:
                raw = await r.read()
                return r.status, orjson.loads(raw) if raw else None, dict(r.headers)

    async def model_status(self) -> dict[str, Any]:
        """The model's entry in GET /sleep/status."""
        return (await self._call("GET", f"{self.router.url}/sleep/status"))[1]["models"][MODEL]

    def completions(self, n: int) -> list[tuple[int, Any, dict[str, str]]]:
        """`n` completions sent at once; their (status, body, headers)."""
        async def go() -> list[tuple[int, Any, dict[str, str]]]:
            url = self.router.url + "/v1/completions"
            body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
            return list(await asyncio.gather(*(self._call("POST", url, body) for _ in range(n))))
        return self.loop.run(go())

    def requests_held_by_a_wake(self, n: int, release: bool) -> list[tuple[int, Any, dict[str, str]]]:
        """Send `n` completions to the sleeping model; once all `n` wait on the wake, open the engine's
        wake gate (if `release`); their (status, body, headers)."""
        async def go() -> list[tuple[int, Any, dict[str, str]]]:
            body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
            reqs = [asyncio.ensure_future(self._call("POST", f"{self.router.url}/v1/completions", body))
                    for _ in range(n)]
            async def all_waiting() -> bool:
                return (await self.model_status())["waiting"] >= n
            await wait_for_async(all_waiting, 10, f"{n} requests waiting on the wake", interval=0.01)
            if release:
                self.engine.wake_gate.set()
            return list(await asyncio.gather(*reqs))
        return self.loop.run(go())

    async def _text(self, url: str) -> str:
        async with aiohttp.ClientSession() as s:
            async with s.get(url) as r:
                return await r.text()

    def state(self) -> str:
        return self.call("GET", "/sleep/status")[1]["models"][MODEL]["state"]


@pytest.fixture(params=ROUTER_MODES)
def stack(loop, tmp_path, request):
    """Makes stacks whose router is one process, or (``router.workers: 2``) a controller and two
    proxy workers: every lifecycle test runs against both (the second in the slow suite, unless
    the test is marked `in_both_modes`)."""
    made: list[Stack] = []

    def make(*engines: Any, settings: Optional[dict[str, Any]] = None, router: Optional[dict[str, Any]] = None,
             **inst: Any) -> Stack:
        st = Stack(loop, tmp_path, list(engines) or [sim()], settings or {}, {"workers": request.param, **(router or {})},
                   **inst)
        made.append(st)
        return st
    yield make
    for st in made:
        st.close()


def test_vllm_sleep_mode_and_timeout_come_from_sleep_manager(stack):
    st = stack(ControlEngine(sleep_delay=0.5), settings={"vllm_sleep_mode": "abort", "vllm_sleep_timeout_seconds": 0.2})
    status, body, _ = st.call("POST", f"/action/sleep/{ENC}")
    assert status == 502 and "no answer within 0.2s" in body["error"]["message"]  # the sleep call's own limit
    assert st.engine.sleep_params == [{"level": "1", "mode": "abort"}]


def test_auto_sleep_after_idle_threshold(stack):
    st = stack(ControlEngine(), settings={"auto_sleep_enabled": True, "idle_threshold_seconds": 0.4})
    t0 = time.monotonic()
    assert st.completions(1)[0][0] == 200
    wait_for(lambda: st.state() == "sleeping", 5)
    assert time.monotonic() - t0 >= 0.4
    assert st.engine.count("sleep") == 1 and st.engine.asleep
    assert st.engine.sleep_params == [{"level": "1", "mode": "wait"}]
    status, health, _ = st.call("GET", "/health/all")
    assert status == 200 and health["models"][MODEL]["status"] == "sleeping"
    assert health["models"][MODEL]["sleep"]["sleep_count"] == 1 and health["status"] == "healthy"


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_auto_sleep_then_many_concurrent_requests_make_one_wake_call(stack, engine):
    st = stack(sim(engine), settings={"auto_sleep_enabled": True, "idle_threshold_seconds": 0.2,
                                      "min_sleep_duration": 30})
    wait_for(lambda: st.state() == "sleeping", 5)
    assert st.engine.asleep and st.engine.counters.sleep_calls == 1
    results = st.completions(50)
    assert [r[0] for r in results] == [200] * 50
    assert all(r[1]["choices"][0]["text"] for r in results)
    assert st.engine.counters.wake_calls == 1 and not st.engine.asleep
    status = st.call("GET", "/sleep/status")[1]["models"][MODEL]
    assert status["state"] == "awake" and status["wake_count"] == 1 and status["sleep_count"] == 1
    assert status["last_wake_seconds"] is not None


@in_both_modes("stack")
def test_fifty_requests_waiting_on_a_wake_share_one_wake_call(stack):
    st = stack(ControlEngine(hold_wake=True))
    assert st.call("POST", f"/action/sleep/{ENC}")[0] == 200
    results = st.requests_held_by_a_wake(50, release=True)
    assert [r[0] for r in results] == [200] * 50
    assert st.engine.count("wake") == 1 and st.engine.count("generate") == 50
    assert st.engine.log.index("wake") < st.engine.log.index("generate")


def test_a_long_request_is_never_idle(stack):
    st = stack(ControlEngine(gen_delay=1.0), settings={"auto_sleep_enabled": True, "idle_threshold_seconds": 0.3,
                                                       "min_sleep_duration": 0})

    async def go() -> tuple[int, str, dict[str, Any], float]:
        req = asyncio.ensure_future(st._call("POST", f"{st.router.url}/v1/completions",
                                             {"model": MODEL, "prompt": "x", "max_tokens": 1}))
        await asyncio.sleep(0.7)  # well past the idle threshold, mid-request
        _, cands, _ = await st._call("GET", f"{st.router.url}/sleep/candidates")
        _, status, _ = await st._call("GET", f"{st.router.url}/sleep/status")
        status_code = (await req)[0]
        return status_code, cands["candidate_details"][MODEL]["reason"], status["models"][MODEL], time.monotonic()
    code, reason, during, ended = st.loop.run(go())
    assert code == 200 and "1 requests in flight" in reason
    assert during["state"] == "awake" and during["in_flight"] == 1 and during["idle_seconds"] == 0
    assert st.engine.count("sleep") == 0
    wait_for(lambda: st.state() == "sleeping", 5)
    assert time.monotonic() - ended >= 0.3  # idle counted from the end of the request


def test_a_failing_auto_sleep_backs_off_and_never_refuses_requests(stack):
    """An engine without its sleep API: the idle loop retries after 2, 4, 8... check intervals, not every one."""
    st = stack(ControlEngine(sleep_status=404), settings={"auto_sleep_enabled": True, "idle_threshold_seconds": 0,
                                                          "check_interval_seconds": 0.05})
    def failures() -> int:  # the router's count: it has seen the engine's answer
        return st.call("GET", "/sleep/status")[1]["models"][MODEL]["sleep_failures"]
    wait_for(lambda: failures() >= 1, 5)
    t0 = time.monotonic()
    codes = []
    while failures() < 4 and time.monotonic() - t0 < 10:
        codes.append(st.completions(1)[0][0])
        time.sleep(0.02)
    # Without back-off 3 more tries take 3 checks (0.15s); with it 0.1 + 0.2 + 0.4s, then a pause of 0.8s.
    assert set(codes) == {200} and time.monotonic() - t0 >= 0.6
    status = st.call("GET", "/sleep/status")[1]["models"][MODEL]
    assert status["state"] == "awake" and status["sleep_failures"] == 4 == st.engine.count("sleep")
    assert status["sleep_retry_in_seconds"] > 0.5 and "404" in status["last_error"]
    _, cands, _ = st.call("GET", "/sleep/candidates")
    assert cands["sleep_candidates"] == [] and "next try in" in cands["candidate_details"][MODEL]["reason"]
    st.engine.sleep_status = 200  # a manual sleep ignores the back-off, and its success ends it
    assert st.call("POST", f"/action/sleep/{ENC}")[0] == 200
    assert st.call("GET", "/sleep/status")[1]["models"][MODEL]["sleep_retry_in_seconds"] is None


def test_sleep_back_off_doubles_up_to_an_hour_on_a_fake_clock():
    now = [1000.0]
    lc = Lifecycle(MODEL, lambda: (), SleepSettings(check_interval_seconds=60), EngineControl(), Events(), clock=lambda: now[0])
    assert [lc._sleep_failed() for _ in range(7)] == [120, 240, 480, 960, 1920, 3600, 3600]
    assert lc.sleep_retry_at == 4600 and lc.sleep_failures_in_row == 7
    lc.settings = SleepSettings(check_interval_seconds=7200)  # never more often than the interval
    assert lc._sleep_failed() == 7200
    lc.sleep_failures_in_row = 5000  # months of failures: no overflow
    assert lc._sleep_failed() == 7200


def test_last_activity_is_now_while_a_request_runs(stack):
    """Idle time 0 and a last activity long ago would contradict each other."""
    st = stack(ControlEngine(gen_delay=1.0))

    async def go() -> tuple[float, dict[str, Any]]:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
        await st._call("POST", f"{st.router.url}/v1/completions", body)  # ends 0.5s before the next starts
        await asyncio.sleep(0.5)
        sent = time.time()
        req = asyncio.ensure_future(st._call("POST", f"{st.router.url}/v1/completions", body))
        await wait_for_async(lambda: "generate" in st.engine.log[1:], what="the request at the engine")
        _, stats, _ = await st._call("GET", f"{st.router.url}/traffic/stats/{ENC}")
        await req
        return sent, stats["model_stats"]
    sent, stats = st.loop.run(go())
    assert stats["in_flight_requests"] == 1 and stats["idle_time_seconds"] == 0
    assert stats["last_activity_time"] >= sent


def test_replicas_sleep_and_wake_together(stack):
    st = stack(sim(), sim())
    assert st.call("POST", f"/action/sleep/{ENC}")[0] == 200
    assert all(e.asleep and e.counters.sleep_calls == 1 for e in st.engines)
    assert st.call("GET", "/sleep/status")[1]["models"][MODEL]["replicas"] == {"r0": "asleep", "r1": "asleep"}
    assert [r[0] for r in st.completions(8)] == [200] * 8
    assert all(not e.asleep and e.counters.wake_calls == 1 for e in st.engines)


def test_a_failed_sleep_on_one_replica_is_rolled_back(stack):
    st = stack(ControlEngine(), ControlEngine(sleep_status=500))
    status, body, _ = st.call("POST", f"/action/sleep/{ENC}")
    assert status == 502 and "r1" in body["error"]["message"] and "500" in body["error"]["message"]
    assert st.engines[0].log == ["sleep", "asleep", "wake"] and not st.engines[0].asleep
    assert st.state() == "awake"
    assert [r[0] for r in st.completions(4)] == [200] * 4


@in_both_modes("stack")
def test_manual_sleep_and_wake_endpoints(stack):
    st = stack()
    status, body, _ = st.call("POST", f"/action/sleep/{MODEL}")  # raw slash
    assert status == 200 and body["success"] and body["state"] == "sleeping"
    assert st.engine.asleep
    status, body, _ = st.call("GET", "/sleep/status")
    assert body["sleeping_models"] == [MODEL] and body["models"][MODEL]["manual"] is True
    status, body, _ = st.call("POST", f"/action/sleep/{ENC}")  # encoded; already asleep: no second call
    assert status == 200 and st.engine.counters.sleep_calls == 1
    status, body, _ = st.call("POST", f"/action/wakeup/{ENC}")
    assert status == 200 and body["state"] == "awake" and not st.engine.asleep
    assert st.engine.counters.wake_calls == 1
    status, body, _ = st.call("POST", "/action/wakeup/no%2Fsuch")
    assert status == 404 and body["error"]["param"] == "model" and "no/such" in body["error"]["message"]
    metrics = st.loop.run(st._text(st.router.url + "/metrics"))
    assert f'router_model_sleeps_total{{model="{MODEL}"}} 1.0' in metrics
    assert f'router_model_wakes_total{{model="{MODEL}"}} 1.0' in metrics


def test_the_idle_loop_never_wakes_a_manually_slept_model(stack):
    st = stack(settings={"auto_sleep_enabled": True, "idle_threshold_seconds": 0.1, "check_interval_seconds": 0.05})
    assert st.call("POST", f"/action/sleep/{ENC}")[0] == 200
    time.sleep(0.5)  # ten checks, each asking the engine /is_sleeping
    status = st.call("GET", "/sleep/status")[1]["models"][MODEL]
    assert status["state"] == "sleeping" and status["manual"] is True
    assert st.engine.asleep and st.engine.counters.wake_calls == 0 and st.engine.counters.sleep_calls == 1
    assert st.completions(1)[0][0] == 200 and st.engine.counters.wake_calls == 1  # a request does wake it


def test_sleep_opt_out_is_refused(stack):
    st = stack(settings={"auto_sleep_enabled": True, "idle_threshold_seconds": 0}, sleep=False)
    status, body, _ = st.call("POST", f"/action/sleep/{ENC}")
    assert status == 409 and "sleep: false" in body["error"]["message"]
    _, cands, _ = st.call("GET", "/sleep/candidates")
    assert cands["sleep_candidates"] == [] and "sleep: false" in cands["candidate_details"][MODEL]["reason"]
    assert st.engine.counters.sleep_calls == 0


def test_min_sleep_duration_keeps_a_woken_model_awake(stack):
    st = stack(settings={"auto_sleep_enabled": True, "idle_threshold_seconds": 0.1, "min_sleep_duration": 1.2})
    wait_for(lambda: st.state() == "sleeping", 5)  # never used since start: idle from start-up
    assert st.completions(1)[0][0] == 200  # wakes it
    woke = time.monotonic()
    time.sleep(0.4)  # idle well past the threshold, yet kept awake
    _, cands, _ = st.call("GET", "/sleep/candidates")
    assert "min_sleep_duration" in cands["candidate_details"][MODEL]["reason"]
    assert st.state() == "awake"
    wait_for(lambda: st.state() == "sleeping", 5)
    assert time.monotonic() - woke >= 1.2
    assert st.engine.counters.sleep_calls == 2 and st.engine.counters.wake_calls == 1


def test_request_during_sleep_call_waits_then_wakes(stack):
    st = stack(ControlEngine(sleep_delay=0.5))

    async def race() -> tuple[Any, Any]:
        sleeper = asyncio.ensure_future(st._call("POST", f"{st.router.url}/action/sleep/{ENC}"))
        await wait_for_async(lambda: "sleep" in st.engine.log, what="the sleep call at the engine", interval=0.005)
        req = asyncio.ensure_future(st._call("POST", f"{st.router.url}/v1/completions",
                                             {"model": MODEL, "prompt": "x", "max_tokens": 1}))
        return await sleeper, await req
    slept, served = st.loop.run(race())
    assert slept[0] == 200 and served[0] == 200
    # The request reached the engine only after the sleep finished and the wake ran.
    assert st.engine.log == ["sleep", "asleep", "wake", "generate"]


def test_drain_before_sleep_holds_new_requests(stack):
    st = stack(ControlEngine(gen_delay=0.4))

    async def race() -> tuple[Any, Any, Any]:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
        first = asyncio.ensure_future(st._call("POST", f"{st.router.url}/v1/completions", body))
        await wait_for_async(lambda: "generate" in st.engine.log, what="the request at the engine", interval=0.005)
        sleeper = asyncio.ensure_future(st._call("POST", f"{st.router.url}/action/sleep/{ENC}"))
        async def draining() -> bool:
            return (await st.model_status())["state"] == "draining"
        await wait_for_async(draining, what="the model to drain", interval=0.005)
        held = asyncio.ensure_future(st._call("POST", f"{st.router.url}/v1/completions", body))
        return await first, await sleeper, await held
    first, slept, held = st.loop.run(race())
    assert first[0] == 200 and slept[0] == 200 and held[0] == 200
    assert st.engine.log == ["generate", "sleep", "asleep", "wake", "generate"]


@pytest.mark.parametrize("release, words", [(True, "answered 500"), (False, "within 1.5s")])
def test_wake_failure_gives_503_to_every_waiter(stack, release, words):
    """A wake that fails (500), or never answers within wake_timeout_seconds."""
    st = stack(ControlEngine(wake_status=500, hold_wake=True), settings={"wake_timeout_seconds": 1.5})
    assert st.call("POST", f"/action/sleep/{ENC}")[0] == 200
    results = st.requests_held_by_a_wake(10, release)
    assert st.engine.count("wake") == 1
    for status, body, headers in results:
        assert status == 503 and headers["Retry-After"].isdigit()
        assert words in body["error"]["message"] and body["error"]["type"] == "service_unavailable"
    status = st.call("GET", "/sleep/status")[1]["models"][MODEL]
    assert status["state"] == "sleeping" and status["wake_failures"] == 1 and status["waiting"] == 0
    assert "generate" not in st.engine.log


def test_wakeup_on_request_off_answers_503_with_how_to_wake(stack):
    st = stack(settings={"wakeup_on_request": False})
    assert st.call("POST", f"/action/sleep/{ENC}")[0] == 200
    status, body, headers = st.completions(1)[0]
    assert status == 503 and "Retry-After" in headers and f"/action/wakeup/{MODEL}" in body["error"]["message"]
    assert st.engine.counters.wake_calls == 0
    assert st.call("POST", f"/action/wakeup/{ENC}")[0] == 200
    assert st.completions(1)[0][0] == 200


def test_router_restart_rediscovers_a_sleeping_engine(stack):
    st = stack()
    assert st.call("POST", f"/action/sleep/{ENC}")[0] == 200
    st.restart_router()
    assert st.state() == "sleeping"  # asked the engine at start-up, before any request
    assert st.completions(1)[0][0] == 200
    assert st.engine.counters.wake_calls == 1 and st.state() == "awake"


def test_engine_woken_elsewhere_is_seen_awake(stack):
    st = stack(ControlEngine(), settings={"check_interval_seconds": 0.05})
    assert st.call("POST", f"/action/sleep/{ENC}")[0] == 200
    st.engine.asleep = False
    st.engine.awake_event.set()
    wait_for(lambda: st.state() == "awake", 3)


def test_engine_found_asleep_under_a_request_is_woken_for_it(stack):
    """Slept behind the router's back: the held request is not left hanging."""
    st = stack(ControlEngine(), settings={"check_interval_seconds": 0.5})
    st.engine.asleep = True
    st.engine.awake_event.clear()
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    status, _, _ = st.loop.run(st._call("POST", f"{st.router.url}/v1/completions", body), timeout=10)
    assert status == 200 and st.engine.count("wake") == 1 and not st.engine.asleep


def test_events_stream_the_sleep_and_the_wake_in_order(stack):
    st = stack(sim())

    async def follow(n: int, opened: asyncio.Event) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        async with aiohttp.ClientSession() as s:
            async with s.get(st.router.url + "/events") as r:
                assert r.headers["content-type"].startswith("text/event-stream")
                opened.set()
                async for line in r.content:
                    if line.startswith(b"data: "):
                        got.append(orjson.loads(line[6:]))
                        if len(got) == n:
                            return got
        return got

    async def go() -> list[dict[str, Any]]:
        opened = asyncio.Event()
        watcher = asyncio.ensure_future(follow(6, opened))
        # The stream is open; the history it sends first holds whatever came before it subscribed.
        await asyncio.wait_for(opened.wait(), 10)
        assert (await st._call("POST", f"{st.router.url}/action/sleep/{ENC}"))[0] == 200
        assert (await st._call("POST", f"{st.router.url}/action/wakeup/{ENC}"))[0] == 200
        return await asyncio.wait_for(watcher, 10)
    events = st.loop.run(go())
    model_events = [(e["kind"], e["state"], e["model"]) for e in events if e["kind"] == "model"]
    assert model_events == [("model", s, MODEL) for s in ("draining", "falling_asleep", "sleeping", "waking", "awake")]
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and all(e["time"] > 0 for e in events)


@pytest.mark.parametrize("wake_status", [200, pytest.param(500, marks=pytest.mark.slow)])  # a failed wake: slow
def test_loading_progress_comments_while_a_stream_waits_for_a_wake(stack, wake_status):
    st = stack(ControlEngine(wake_delay=4.5, wake_status=wake_status), router={"loading_progress": True})
    assert st.call("POST", f"/action/sleep/{ENC}")[0] == 200

    async def go() -> tuple[int, list[str]]:
        async with aiohttp.ClientSession() as s:
            body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "stream": True}
            async with s.post(st.router.url + "/v1/completions", json=body) as r:
                lines = [line.decode().rstrip("\n") async for line in r.content if line.strip()]
                return r.status, lines
    status, lines = st.loop.run(go())
    assert status == 200
    comments = [line for line in lines if line.startswith(":")]
    assert comments[:2] == [f": waiting for {MODEL}: waking, 2 s", f": waiting for {MODEL}: waking, 4 s"], lines
    data = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    if wake_status == 200:
        assert data and data[0]["choices"][0]["text"] == "ok"  # the engine's answer follows the comments
    else:
        assert data[-1]["error"]["code"] == 503 and "could not wake" in data[-1]["error"]["message"]
