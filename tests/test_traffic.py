"""The traffic monitor's endpoints through the running router against the simulated engine
(its arithmetic on a fake clock: tests/unit/test_traffic_counts.py)."""
from __future__ import annotations

import urllib.parse
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from helpers import free_port
from router_support import LoopThread, RouterServer

from router.config import load_config
from router.observe.traffic import MAX_WINDOW_SECONDS
from router.sim import SimEngine, SimOptions

MODEL = "org/busy-model"
QUIET = "quiet"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    """One router for the module: only the known-sequence test sends generations."""
    tmp_path = tmp_path_factory.mktemp("traffic")
    loop = LoopThread()
    engines = [SimEngine(SimOptions(engine="vllm", model=m, port=0)) for m in (MODEL, QUIET)]
    for e in engines:
        loop.run(e.start())
    doc = {"router": {"router_port": free_port(), "access_log": False},
           "sleep_manager": {"idle_threshold_seconds": 300},
           "instances": [{"model": e.options.model, "engine": "vllm", "launch": False,
                          "engine_args": ["--host", "127.0.0.1", "--port", str(e.port)]} for e in engines]}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc))
    router = RouterServer(loop, load_config(path, sim=True)).start()
    yield loop, router
    router.stop()
    for e in engines:
        loop.run(e.stop())
    loop.close()


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url) as r:
        return r.status, orjson.loads(await r.read())


async def _post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> int:
    async with session.post(url, json=body) as r:
        await r.read()
        return r.status


def test_endpoints_report_a_known_sequence(stack):
    loop, router = stack
    base = router.url

    async def go() -> dict[str, Any]:
        async with aiohttp.ClientSession() as s:
            url = base + "/v1/completions"
            ok = {"model": MODEL, "prompt": "hello there", "max_tokens": 3}
            statuses = [await _post(s, url, ok) for _ in range(5)]
            statuses += [await _post(s, url, {**ok, "max_tokens": 10**6}) for _ in range(2)]  # engine's 400
            statuses += [await _post(s, url, {**ok, "stream": True}) for _ in range(3)]
            assert statuses == [200] * 5 + [400] * 2 + [200] * 3
            out = {}
            for key, path in [("all", "/traffic/stats?window=60"), ("raw", f"/traffic/stats/{MODEL}"),
                              ("enc", f"/traffic/stats/{urllib.parse.quote(MODEL, safe='')}?window=30"),
                              ("idle0", "/models/idle?threshold=0"), ("idle", "/models/idle"),
                              ("active", "/models/active?threshold=3600&window=60")]:
                out[key] = await _get(s, base + path)
            return out
    out = loop.run(go())
    status, body = out["all"]
    assert status == 200 and body["window_seconds"] == 60
    busy, quiet = body["traffic_stats"][MODEL], body["traffic_stats"][QUIET]
    assert (busy["total_requests"], busy["successful_requests"], busy["failed_requests"]) == (10, 8, 2)
    assert (busy["requests_in_window"], busy["failed_in_window"], busy["streams"]) == (10, 2, 3)
    assert busy["request_rate"] == pytest.approx(10 / 60)
    assert busy["in_flight_requests"] == 0 and busy["last_activity_time"] > 0 and not busy["is_idle"]
    assert 0 < busy["p50_response_time"] <= busy["p99_response_time"] and busy["p50_ttfb"] > 0
    assert quiet["total_requests"] == 0 and quiet["request_rate"] == 0 and quiet["last_activity_time"] is None
    for key, window in (("raw", 60), ("enc", 30)):
        status, body = out[key]
        assert status == 200 and body["window_seconds"] == window
        assert body["model_stats"]["model_name"] == MODEL and body["model_stats"]["total_requests"] == 10
    assert out["idle0"][1]["idle_models_count"] == 2
    assert out["idle0"][1]["idle_model_details"][MODEL]["total_requests"] == 10
    assert out["idle"][1] == {"idle_models": [], "idle_threshold_seconds": 300, "idle_model_details": {},
                              "idle_models_count": 0}
    active = out["active"][1]
    assert active["active_models"] == [MODEL, QUIET] and active["active_model_details"][MODEL]["total_requests"] == 10


@pytest.mark.parametrize("path, status, param", [
    ("/traffic/stats?window=abc", 400, "window"),
    ("/traffic/stats?window=-5", 400, "window"),
    ("/traffic/stats?window=0", 400, "window"),
    (f"/traffic/stats?window={MAX_WINDOW_SECONDS + 1}", 400, "window"),
    ("/traffic/stats?window=nan", 400, "window"),
    ("/models/idle?threshold=-1", 400, "threshold"),
    ("/models/active?threshold=x", 400, "threshold"),
    ("/models/active?window=inf", 400, "window"),
    ("/traffic/stats/no%2Fsuch", 404, "model"),
    ("/traffic/stats/no/such?window=5", 404, "model"),
    ("/traffic/stats/org/busy-model?window=", 400, "window"),
])
def test_bad_queries_and_unknown_models_get_openai_errors(stack, path, status, param):
    loop, router = stack

    async def go() -> tuple[int, Any]:
        async with aiohttp.ClientSession() as s:
            return await _get(s, router.url + path)
    got, body = loop.run(go())
    assert got == status
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["param"] == param
    assert param in body["error"]["message"]
