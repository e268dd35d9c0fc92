"""router.log_format: json on a real `python -m router.serve`: every line of its log is one JSON object.

The router (one process, or a controller with two proxy workers) runs at trace
level, the most verbose, with client and admin keys, in front of a simulated
engine. Requests with good and wrong keys, a stream, a sleep and a wake later,
and after SIGTERM: every line of the log parses as JSON with the common
fields, the access lines carry the documented ones, the lifecycle's lines are
there, and no key appears anywhere.
"""
from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest
from helpers import PY, Proc, distinct_ports, start_sim, wait_http
from test_security import ADMIN_KEY, BODY, CLIENT_KEYS, GUESS, MODEL, bearer, call

pytestmark = pytest.mark.timeout(120)

ACCESS = {"model", "stream", "instance", "status", "bytes", "ttft_ms", "latency_ms", "retries", "key", "prompt_tokens",
          "completion_tokens"}


@pytest.mark.parametrize("workers", [pytest.param(1, id="one-process"), pytest.param(2, id="two-workers", marks=pytest.mark.slow)])
def test_every_line_of_the_router_log_is_json_and_no_key_is_in_it(tmp_path: Path, procs: list[Proc], workers: int) -> None:
    router_port, engine_port = distinct_ports(2)
    (tmp_path / "keys").write_text("\n".join(CLIENT_KEYS) + "\n")
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({
        "router": {"router_port": router_port, "api_keys": {"file": "keys"}, "admin_api_key": ADMIN_KEY,
                   "log_level": "trace", "log_format": "json", "access_log": True, "workers": workers,
                   "health_check_interval_seconds": 0.5, "no_such_setting": 1},
        "instances": [{"model": MODEL, "engine": "vllm", "launch": False, "engine_args": [f"--port={engine_port}"],
                       "engine_env": ["VLLM_SERVER_DEV_MODE=1"]}],
    }))
    procs.append(start_sim("vllm", MODEL, engine_port))
    log = tmp_path / "router.log"
    router = Proc([PY, "-m", "router.serve", "--config", str(config)], log=str(log))
    procs.append(router)
    wait_http(f"http://127.0.0.1:{engine_port}/health", timeout=20)
    wait_http(f"http://127.0.0.1:{router_port}/health", timeout=20)

    chat = orjson.dumps({"model": MODEL, "stream": True, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    answers = [
        call(router_port, "POST", "/v1/completions", BODY, bearer(CLIENT_KEYS[0])),
        call(router_port, "POST", "/v1/chat/completions", chat, bearer(CLIENT_KEYS[1])),
        call(router_port, "POST", "/v1/completions", BODY, bearer(GUESS)),
        call(router_port, "POST", f"/action/sleep/{MODEL}", None, bearer(ADMIN_KEY)),
        call(router_port, "POST", "/v1/completions", BODY, bearer(CLIENT_KEYS[0])),  # wakes it
    ]
    assert [a[0] for a in answers] == [200, 200, 401, 200, 200], answers
    router.stop()

    text = log.read_text()
    lines = [json.loads(line) for line in text.splitlines()]  # each one JSON, or this raises naming the line
    assert len(lines) > 10
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    access = [line for line in lines if line["logger"] == "router.access"]
    # (Two workers each write their own lines, in batches: the order across them is not the requests'.)
    assert sorted((a["status"], a["stream"]) for a in access) == [(200, False), (200, False), (200, True)], access
    assert all(set(a) >= ACCESS and a["model"] == MODEL and a["instance"] and a["latency_ms"] >= a["ttft_ms"] > 0
               for a in access)
    # The engine's usage, streamed (the router asked for it) or not; the key's name, never the key.
    assert all(a["prompt_tokens"] > 0 and a["completion_tokens"] > 0 and a["key"] not in CLIENT_KEYS for a in access)
    assert [a["completion_tokens"] for a in access if a["stream"]] == [2]
    said = [line["message"] for line in lines if line["logger"] == "router.lifecycle"]
    assert any("is asleep" in m for m in said) and any("is awake" in m for m in said), said
    # The state changes, each a line with its fields: the model slept and woke, the engine was found healthy.
    events = [(e["kind"], e["state"], e["model"]) for e in lines if e["logger"] == "router.events"]
    assert ("model", "sleeping", MODEL) in events and ("model", "awake", MODEL) in events, events
    assert ("health", "healthy", MODEL) in events, events
    # The config's warning, uvicorn's own lines (its ASGI trace among them) came as JSON too.
    assert any("no_such_setting" in line["message"] and line["level"] == "WARNING" for line in lines)
    assert any(line["logger"].startswith("uvicorn") for line in lines)
    for secret in (*CLIENT_KEYS, ADMIN_KEY, GUESS):
        assert secret not in text, secret
