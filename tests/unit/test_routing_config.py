"""`routing` and `routing_prefix_chars`: read per instance, the same on every instance of a model."""
from __future__ import annotations

import pytest
import yaml

from router.config import ConfigError, parse_config


def inst(port: int, model: str = "m", **extra: object) -> dict[str, object]:
    return {"model": model, "engine": "vllm", "name": f"{model}-{port}", "engine_args": [f"--port={port}"], **extra}


def config(*instances: dict[str, object]):  # type: ignore[no-untyped-def]
    return parse_config(yaml.safe_dump({"instances": list(instances)}), "c.yaml", sim=True)


def test_defaults_and_given_values() -> None:
    a, b = config(inst(9001), inst(9002, "n", routing="Prefix", routing_prefix_chars=512)).instances
    assert (a.routing, a.routing_prefix_chars) == ("least_outstanding", 2048)
    assert (b.routing, b.routing_prefix_chars) == ("prefix", 512)


def test_an_unknown_routing_names_the_choices() -> None:
    with pytest.raises(ConfigError) as info:
        config(inst(9001, routing="sticky"))
    assert any(p.startswith("instances[0].routing:") and "least_outstanding, session, prefix" in p
               for p in info.value.problems), info.value.problems


@pytest.mark.parametrize("key, first, second", [("routing", "session", "prefix"),
                                                ("routing_prefix_chars", 1024, 4096)])
def test_instances_of_one_model_must_route_alike(key: str, first: object, second: object) -> None:
    extra = {"routing": "prefix"} if key == "routing_prefix_chars" else {}
    with pytest.raises(ConfigError) as info:
        config(inst(9001, **extra, **{key: first}), inst(9002, "other", routing="session"),
               inst(9003, **extra, **{key: second}))
    (problem,) = info.value.problems
    assert problem.startswith(f"instances[2].{key}:")
    assert "instances[0] (m-9001)" in problem and f"same {key}" in problem


def test_different_models_may_route_differently() -> None:
    cfg = config(inst(9001, routing="session"), inst(9002, routing="session"), inst(9003, "n"))
    assert [i.routing for i in cfg.instances] == ["session", "session", "least_outstanding"]
