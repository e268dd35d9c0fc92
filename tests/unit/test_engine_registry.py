"""The engine registry: every module of router/engines but `spec` is one engine and is
registered by being there; nothing outside router/engines and router/sim names an engine."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from router.engines import ENGINE_ALIASES, ENGINES, NOT_ENGINES, engine_modules
from router.sim.dialects import DIALECTS

ROUTER = Path(__file__).resolve().parent.parent.parent / "router"
#: What the router routes today; every engine serves them.
ROUTED = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings")


def test_every_engine_module_is_registered_by_being_there() -> None:
    on_disk = sorted(p.stem for p in (ROUTER / "engines").glob("*.py") if p.stem not in {"__init__", *NOT_ENGINES})
    assert engine_modules() == on_disk == ["openai", "sglang", "vllm"]
    for module in on_disk:
        spec = importlib.import_module(f"router.engines.{module}").SPEC
        assert ENGINES[spec.name] is spec
    assert list(ENGINES) == ["vllm", "sglang", "openai"]  # common ones first in messages


def test_each_spelling_names_one_engine() -> None:
    assert ENGINE_ALIASES == {"vllm": "vllm", "sglang": "sglang", "sgl": "sglang", "openai": "openai"}


@pytest.mark.parametrize("name", list(ENGINES))
def test_each_spec_is_complete(name: str) -> None:
    spec = ENGINES[name]
    assert spec.client_paths[:3] == ROUTED
    assert all(p.startswith("/") for p in spec.client_paths) and len(set(spec.client_paths)) == len(spec.client_paths)
    assert spec.health_path.startswith("/")
    assert spec.sim_dialect in DIALECTS
    assert spec.has_sleep_api == bool(spec.tiers)
    if spec.launcher is not None:  # the simulator stands in for it without being told a port
        assert spec.default_port is not None


def test_openai_has_no_sleep_api_and_reads_no_flag_for_gpu_or_names() -> None:
    spec = ENGINES["openai"]
    assert (spec.launcher, dict(spec.tiers), spec.is_sleeping_path) == (None, {}, None)
    assert (spec.gpu_fraction_flag, spec.served_name_flag, spec.args_key) == (None, None, "command")
    assert not spec.has_sleep_api and ENGINES["vllm"].has_sleep_api and ENGINES["sglang"].has_sleep_api


def test_nothing_outside_the_engine_modules_and_the_simulator_names_an_engine() -> None:
    """A new engine needs no change elsewhere: no other module compares with, or
    writes, an engine's name (docstrings and comments may mention them)."""
    names = set(ENGINE_ALIASES)
    found = []
    for path in sorted(ROUTER.rglob("*.py")):
        rel = path.relative_to(ROUTER)
        if rel.parts[0] in ("engines", "sim"):
            continue
        source = path.read_text()
        found += [f"{rel}: 'engine == \"'" for _ in range(source.count('engine == "') + source.count("engine == '"))]
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.lower() in names:
                found.append(f"{rel}:{node.lineno}: {node.value!r}")
    assert found == []
