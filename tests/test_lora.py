"""LoRA adapters through the router over loopback, against the simulated vLLM and SGLang engines
(their load and unload endpoints and --max-loras bound, router/sim/lora.py)."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from helpers import Proc, free_port, start_sim, wait_http
from router_support import Stack, instance, loop, stack  # noqa: F401  (fixtures)


def adapters(tmp: Path, *names: str) -> list[dict[str, str]]:
    """Adapter folders the simulated engine can load (it checks only that they exist)."""
    out = []
    for name in names:
        (tmp / name).mkdir()
        out.append({"name": name, "path": str(tmp / name)})
    return out


def post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """(status, the JSON answer; a plain-text one as {"text": ...}: vLLM's LoRA endpoints answer so)."""
    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            status, data = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, data = e.code, e.read()
    try:
        return status, json.loads(data)
    except ValueError:
        return status, {"text": data.decode()}


def get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def complete(router: str, model: str) -> tuple[int, dict[str, Any]]:
    return post(router + "/v1/completions", {"model": model, "prompt": "select", "max_tokens": 3})


def lora_state(port: int) -> dict[str, Any]:
    return get(f"http://127.0.0.1:{port}/sim/state")["lora"]


@pytest.mark.parametrize("workers", [1, pytest.param(2, id="two-workers", marks=pytest.mark.slow)])  # single flight under workers: the thirty below
def test_an_adapter_is_loaded_on_first_request_listed_with_its_parent_and_swapped_within_max_loras(
        stack: Stack, sims, tmp_path: Path, workers: int) -> None:
    port = sims("vllm", "base", "--enable-lora", "--max-loras", "1")
    r = stack.router([instance("base", port, "--enable-lora", "--max-loras", "1",
                               lora_adapters=adapters(tmp_path, "sql", "chat"))], workers=workers)
    listed = {m["id"]: m for m in get(r.url + "/v1/models")["data"]}
    assert listed["sql"]["parent"] == "base" and listed["sql"]["root"] == str(tmp_path / "sql")
    assert listed["base"].get("parent") is None
    assert lora_state(port)["loaded"] == []

    status, body = complete(r.url, "sql")
    assert status == 200, body
    assert body["model"] == "sql" and body["choices"][0]["text"].startswith("[sql] ")
    assert lora_state(port)["calls"] == ["load sql"]
    status, body = complete(r.url, "sql")  # held: no second load
    assert status == 200 and lora_state(port)["calls"] == ["load sql"]
    status, body = complete(r.url, "base")  # the base model still answers as itself
    assert status == 200 and not body["choices"][0]["text"].startswith("[")

    status, body = complete(r.url, "chat")  # --max-loras 1: sql is unloaded first
    assert status == 200 and body["choices"][0]["text"].startswith("[chat] ")
    state = lora_state(port)
    assert state["calls"] == ["load sql", "unload sql", "load chat"] and state["loaded"] == ["chat"]
    health = get(r.url + "/health/base")
    assert [e["lora_adapters"] for e in health["endpoints"]] == [{"loaded": ["chat"], "loading": []}]


@pytest.mark.parametrize("workers", [1, 2])
def test_thirty_concurrent_first_requests_cause_one_load(stack: Stack, sims, tmp_path: Path, workers: int) -> None:
    # Two replicas: the requests that come while the load is under way go to the replica loading it.
    ports = [sims("vllm", "base", "--enable-lora", "--lora-load-s", "0.5") for _ in range(2)]
    declared = adapters(tmp_path, "sql")
    r = stack.router([instance("base", p, "--enable-lora", name=f"base{i}", lora_adapters=declared)
                      for i, p in enumerate(ports)], workers=workers)
    with ThreadPoolExecutor(30) as pool:
        results = list(pool.map(lambda _: complete(r.url, "sql"), range(30)))
    assert [s for s, _ in results] == [200] * 30
    assert all(b["choices"][0]["text"].startswith("[sql] ") for _, b in results)
    assert sum(lora_state(p)["loads"] for p in ports) == 1


def test_a_failed_load_is_a_502_naming_the_adapter_and_the_engines_words(stack: Stack, sims, tmp_path: Path) -> None:
    port = sims("vllm", "base", "--enable-lora")
    missing = str(tmp_path / "nowhere")
    r = stack.router([instance("base", port, "--enable-lora", lora_adapters=[{"name": "sql", "path": missing}])])
    status, body = complete(r.url, "sql")
    assert status == 502
    message = body["error"]["message"]
    assert "'sql'" in message and f"No adapter found for {missing}" in message
    assert complete(r.url, "base")[0] == 200  # the base model is not harmed


def test_sglang_adapters_load_through_its_own_endpoint(stack: Stack, sims, tmp_path: Path) -> None:
    port = sims("sglang", "base", "--enable-lora")
    r = stack.router([instance("base", port, "--enable-lora", engine="sglang",
                               lora_adapters=adapters(tmp_path, "sql"))])
    status, body = complete(r.url, "sql")
    assert status == 200 and body["choices"][0]["text"].startswith("[sql] ")
    assert lora_state(port)["loaded"] == ["sql"]


def test_the_simulator_refuses_an_unknown_adapter_and_sglang_a_load_beyond_its_bound(sims, tmp_path: Path) -> None:
    port = sims("vllm", "base", "--enable-lora", "--lora-modules", f"one={tmp_path}")
    url = f"http://127.0.0.1:{port}"
    status, body = complete(url, "two")
    assert status == 404 and "two" in body["error"]["message"]
    assert complete(url, "one")[0] == 200  # --lora-modules: loaded at start
    listed = {m["id"]: m for m in get(url + "/v1/models")["data"]}
    assert listed["one"]["parent"] == "base" and listed["one"]["root"] == str(tmp_path)
    # vLLM 0.32 loads beyond --max-loras (1 by default), answering plain text, as measured on the real engine.
    req = urllib.request.Request(url + "/v1/load_lora_adapter", json.dumps(
        {"lora_name": "two", "lora_path": str(tmp_path)}).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.read() == b"Success: LoRA adapter 'two' added successfully."
    assert complete(url, "two")[0] == 200
    status, body = post(url + "/v1/load_lora_adapter", {"lora_name": "two", "lora_path": str(tmp_path)})
    assert status == 400 and "has already been loaded" in body["error"]["message"]
    status, body = post(url + "/v1/load_lora_adapter", {"lora_name": "three", "lora_path": str(tmp_path / "no")})
    assert status == 404 and f"No adapter found for {tmp_path / 'no'}" in body["error"]["message"]
    status, body = post(url + "/v1/unload_lora_adapter", {"lora_name": "nope"})
    assert status == 404 and "cannot be found" in body["error"]["message"]

    sport = sims("sglang", "base", "--lora-paths", f"one={tmp_path}", "--max-loaded-loras", "1")
    status, body = post(f"http://127.0.0.1:{sport}/load_lora_adapter", {"lora_name": "two", "lora_path": str(tmp_path)})
    assert status == 400 and "maximum number of loaded LoRA adapters (1)" in body["error"]["message"]


def test_the_base_models_shaping_applies_to_its_adapters_requests(stack: Stack, sims, tmp_path: Path) -> None:
    port = sims("vllm", "base", "--enable-lora")
    r = stack.router([instance("base", port, "--enable-lora", lora_adapters=adapters(tmp_path, "sql"),
                               request_overrides={"max_tokens": 2})])
    status, body = complete(r.url, "sql")  # asks for 3 tokens
    assert status == 200 and body["model"] == "sql" and body["usage"]["completion_tokens"] == 2
    assert body["choices"][0]["text"].startswith("[sql] ")


@pytest.mark.parametrize("workers", [1, pytest.param(2, id="two-workers", marks=pytest.mark.slow)])
def test_an_engine_that_lost_a_loaded_adapter_gets_it_loaded_again(stack: Stack, sims, tmp_path: Path,
                                                                  workers: int) -> None:
    port = sims("vllm", "base", "--enable-lora")
    r = stack.router([instance("base", port, "--enable-lora", lora_adapters=adapters(tmp_path, "sql"))],
                     workers=workers)
    assert complete(r.url, "sql")[0] == 200
    # Behind the router's back (as an engine restarted between two looks of supervisord would be):
    assert post(f"http://127.0.0.1:{port}/v1/unload_lora_adapter", {"lora_name": "sql"})[0] == 200
    status, body = complete(r.url, "sql")  # the engine's 404 makes the router load it again, once
    assert status == 200 and body["choices"][0]["text"].startswith("[sql] "), body
    assert lora_state(port)["calls"] == ["load sql", "unload sql", "load sql"]
