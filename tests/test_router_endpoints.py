"""The router's own endpoints: listings, health, server info, metrics, 404/405 shapes."""
from __future__ import annotations

import json
import urllib.parse

from helpers import free_port
from router_support import Stack, instance, loop, stack  # noqa: F401  (fixtures)
from test_router_proxy import assert_error, client, post

from router.server.fleet.machine import ENGINE_ASLEEP


def get(url: str) -> tuple[int, dict, bytes]:
    return post(url, None, method="GET")  # type: ignore[arg-type]


def test_model_listings(stack: Stack) -> None:
    a, b = stack.engine(), stack.engine()
    r = stack.router([instance("org/m1", a.port, "--served-model-name", "m1", name="r1", aliases=["fast"]),
                      instance("org/m1", b.port, "--served-model-name", "m1", name="r2"),
                      instance("other", free_port(), engine="sglang")])
    ids = [m.id for m in client(r.url).models.list().data]
    assert ids[0] == "org/m1" and sorted(ids) == ["fast", "m1", "org/m1", "other"]
    status, _, data = get(r.url + "/models")
    assert status == 200
    models = json.loads(data)["models"]
    assert models["org/m1"] == {"endpoint": a.url, "endpoints": [a.url, b.url], "state": "awake"}
    assert set(models) == {"org/m1", "other"}


def test_health_endpoints(stack: Stack) -> None:
    up, up2 = stack.engine(), stack.engine()
    down = free_port()
    r = stack.router([instance("org/up", up.port), instance("org/down", down), instance("org/half", up2.port, name="h1"),
                      instance("org/half", free_port(), name="h2")])
    assert json.loads(get(r.url + "/health")[2]) == {"status": "healthy"}
    for path in ("/health/org/up", "/health/" + urllib.parse.quote("org/up", safe="")):
        status, _, data = get(r.url + path)
        assert status == 200, path
        report = json.loads(data)
        assert report["status"] == "healthy" and report["endpoints"][0]["endpoint"] == up.url
    status, _, data = get(r.url + "/health/org/down")
    assert status == 503 and json.loads(data)["status"] == "unhealthy"
    assert json.loads(get(r.url + "/health/org/half")[2])["status"] == "degraded"
    status, _, data = get(r.url + "/health/all")
    report = json.loads(data)
    assert status == 200 and report["status"] == "degraded"
    assert {m: v["status"] for m, v in report["models"].items()} == {
        "org/up": "healthy", "org/down": "unhealthy", "org/half": "degraded"}
    for bad in ("/health/nope", "/health/../etc/passwd", "/health/%2e%2e%2fetc"):
        status, _, data = get(r.url + bad)
        assert_error(status, data, 404)


def test_sleeping_model_reported_as_sleeping(stack: Stack) -> None:
    e = stack.engine()
    r = stack.router([instance("m", e.port)])
    r.app.state.table.get("m").lifecycle.machine.fire(ENGINE_ASLEEP)
    probes = e.health_probes
    report = json.loads(get(r.url + "/health/all")[2])
    assert report["models"]["m"]["status"] == "sleeping" and report["status"] == "healthy"
    assert e.health_probes == probes  # a sleeping engine is not probed
    assert 'router_model_sleeping{model="m"} 1.0' in get(r.url + "/metrics")[2].decode()


def test_server_info_is_real_and_has_no_secrets(stack: Stack) -> None:
    e = stack.engine()
    r = stack.router([instance("m", e.port, aliases=["mm"])], api_keys=["sk-secret-1"], admin_api_key="adm-secret")
    status, _, data = get(r.url + "/get_server_info")
    assert status == 200
    assert b"secret" not in data
    info = json.loads(data)
    assert info["config_path"] == r.config.path and info["uptime_seconds"] >= 0
    assert info["router"]["api_keys_configured"] == 1 and info["router"]["admin_api_key_configured"] is True
    assert info["models"]["m"]["aliases"] == ["mm"]
    assert info["models"]["m"]["endpoints"][0]["endpoint"] == e.url


def test_metrics_count_requests_and_state(stack: Stack) -> None:
    e = stack.engine(chunks=3)
    r = stack.router([instance("m", e.port)])
    c = client(r.url)
    c.completions.create(model="m", prompt="x")
    list(c.completions.create(model="m", prompt="x", stream=True))
    post(r.url + "/v1/completions", b'{"model": "m", "stream": 1}')  # 400 before routing
    status, headers, data = get(r.url + "/metrics")
    text = data.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert 'router_requests_total{key="anonymous",model="m",status="200"} 2.0' in text
    assert 'router_request_duration_seconds_count{model="m"} 2.0' in text
    assert 'router_time_to_first_byte_seconds_count{model="m"} 2.0' in text
    assert 'router_in_flight_requests{model="m"} 0.0' in text
    assert f'router_backend_healthy{{endpoint="{e.url}",instance="m",model="m"}} 1.0' in text


def test_unknown_paths_and_methods_are_openai_shaped(stack: Stack) -> None:
    r = stack.router([instance("m", free_port())])
    assert_error(*get(r.url + "/v2/nothing")[::2], 404, "/v2/nothing")
    assert_error(*post(r.url + "/health", b"")[::2], 405)
    assert_error(*post(r.url + "/v1/embeddings", None, method="PUT")[::2], 405)  # type: ignore[arg-type]
