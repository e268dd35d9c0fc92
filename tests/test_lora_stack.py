"""LoRA adapters share their base model's life, on a rendered --sim stack under a real supervisord:
a request for an adapter starts the stopped on-demand base engine, and after the engine was stopped
and started again (it forgot what the router loaded) the next request loads the adapter again."""
from __future__ import annotations

import json
import tempfile
import urllib.request
from pathlib import Path

import pytest
from helpers import ROUTER_MODES, distinct_ports, get_json, post_json, wait_for
from supervised import sim_stack

pytestmark = pytest.mark.timeout(180)


def listening(url: str) -> bool:
    try:
        urllib.request.urlopen(f"{url}/health", timeout=1).close()
        return True
    except OSError:
        return False


def lora_state(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/sim/state", timeout=5) as r:
        return json.loads(r.read())["lora"]


@pytest.mark.slow  # a supervised stack per mode; tests/test_lora.py covers loading over loopback in the fast suite
@pytest.mark.parametrize("workers", ROUTER_MODES)
def test_an_adapter_request_starts_its_stopped_base_and_loads_again_after_a_restart(workers: int) -> None:
    router_port, port = distinct_ports(2)
    with tempfile.TemporaryDirectory() as loras:
        (Path(loras) / "sql").mkdir()
        doc = {"router": {"router_port": router_port, "health_check_interval_seconds": 0.5, "workers": workers},
               "instances": [{"name": "a", "model": "m/a", "engine": "vllm", "on_demand": True,
                              "engine_args": [f"--port={port}", "--enable-lora"], "sim_args": ["--startup-s 1"],
                              "lora_adapters": [{"name": "sql", "path": f"{loras}/sql"}]}]}
        with sim_stack(doc) as sup:
            url = f"http://127.0.0.1:{router_port}"
            wait_for(lambda: sup.status().get("router") == "RUNNING", 30, "the router")
            wait_for(lambda: listening(url), 30, "the router's API")
            wait_for(lambda: get_json(f"{url}/residency")[1]["models"]["m/a"]["state"] != "awake", 10,
                     "the router to see the on-demand engine stopped")
            assert sup.status()["a"] == "STOPPED"

            def ask() -> tuple[int, dict]:
                return post_json(f"{url}/v1/completions", {"model": "sql", "prompt": "hi", "max_tokens": 2})
            status, body = ask()
            assert status == 200, (body, sup.log("router"))
            assert body["choices"][0]["text"].startswith("[sql] ")
            assert lora_state(port)["calls"] == ["load sql"]

            status, _ = post_json(f"{url}/action/stop/m/a", {})
            assert status == 200 and sup.status()["a"] == "STOPPED"
            status, body = ask()  # starts it again; the new engine holds nothing the router loaded
            assert status == 200 and body["choices"][0]["text"].startswith("[sql] "), body
            assert lora_state(port)["calls"] == ["load sql"]  # the new process's own record
            assert sup.log("supervisord", tail=10**7).count("spawned: 'a'") == 2
