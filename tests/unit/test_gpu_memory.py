"""An instance's gpu_memory_gb from its engine's share flag and the GPU budget (router/config/gpu_memory.py)."""
from __future__ import annotations

from typing import Any

import pytest
import yaml

from router.config import Config, ConfigError, parse_config


def load(*instances: dict[str, Any], budget: Any = 80) -> Config:
    return parse_config(yaml.safe_dump({"residency": {"gpu_memory_gb": budget}, "instances": list(instances)}), sim=True)


def vllm(name: str, port: int, *args: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "model": f"org/{name}", "engine": "vllm", "engine_args": [f"--port {port}", *args], **extra}


def sglang(name: str, port: int, *args: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "model": f"org/{name}", "engine": "sglang", "engine_args": [f"--port {port}", *args], **extra}


def sizes(cfg: Config) -> dict[str, float | None]:
    return {i.name: i.gpu_memory_gb for i in cfg.instances}


def test_the_share_flag_times_the_budget_is_the_default() -> None:
    cfg = load(vllm("a", 8001, "--gpu-memory-utilization 0.35"), sglang("b", 8002, "--mem-fraction-static=0.25"),
               vllm("c", 8003, "--gpu-memory-utilization 0.3", engine_env=["CUDA_VISIBLE_DEVICES=1"]),
               budget={0: 80, 1: 40})
    assert sizes(cfg) == {"a": 28.0, "b": 20.0, "c": 12.0}
    assert not [w for w in cfg.warnings if "gpu_memory_gb" in w]


def test_an_engine_on_several_gpus_is_sized_by_the_largest_budget() -> None:
    cfg = load(vllm("a", 8001, "--gpu-memory-utilization 0.5", engine_env=["CUDA_VISIBLE_DEVICES=0,1"]),
               budget={0: 80, 1: 40})
    assert sizes(cfg) == {"a": 40.0}


@pytest.mark.parametrize("declared, warned", [(28, False), (30.8, False), (25.2, False), (31, True), (25, True), (5, True)])
def test_a_declared_size_more_than_ten_percent_off_is_a_warning(declared: float, warned: bool) -> None:
    cfg = load(vllm("a", 8001, "--gpu-memory-utilization 0.35", gpu_memory_gb=declared))
    assert sizes(cfg) == {"a": declared}  # the declared value stands; the warning says which to fix
    found = [w for w in cfg.warnings if "instances[0].gpu_memory_gb" in w]
    assert bool(found) == warned
    if warned:
        assert f"{declared:g} GB, but the engine takes --gpu-memory-utilization 0.35 of GPU 0's 80 GB budget = 28 GB" \
               in found[0]


def test_nothing_is_derived_without_a_flag_a_budget_or_under_kvcached() -> None:
    cfg = load(vllm("flagless", 8001, gpu_memory_gb=10),
               vllm("kv", 8002, "--gpu-memory-utilization 0.35", gpu_memory_gb=5, kvcached_env=["ENABLE_KVCACHED=true"]),
               vllm("other", 8003, "--gpu-memory-utilization 0.35", gpu_memory_gb=7,
                    engine_env=["CUDA_VISIBLE_DEVICES=3"]),
               budget={0: 80, 3: 20})
    assert sizes(cfg) == {"flagless": 10, "kv": 5, "other": 7}
    # kv's flag says nothing under kvcached; other's 7 GB is 0.35 of GPU 3's own 20 GB budget.
    assert not [w for w in cfg.warnings if ".gpu_memory_gb" in w]
    plain = parse_config(yaml.safe_dump({"instances": [vllm("a", 8001, "--gpu-memory-utilization 0.35")]}), sim=True)
    assert sizes(plain) == {"a": None}


def test_without_the_flag_a_budget_still_needs_the_size_and_says_so() -> None:
    with pytest.raises(ConfigError) as e:
        load(vllm("a", 8001))
    assert any(p.startswith("instances[0].gpu_memory_gb: missing") and "--gpu-memory-utilization" in p
               for p in e.value.problems)
