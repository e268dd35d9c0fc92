"""The sleep-tier keys: each instance's `sleep_level` and `gpu_sleeping_gb`, and
`sleep_manager.idle_deep_sleep_seconds`, read with their defaults and refused out of bounds."""
from __future__ import annotations

import pytest
import yaml

from router.config import ConfigError, parse_config

BASE = {"model": "m", "engine": "vllm", "engine_args": ["--port=9001"]}


def problems(doc: dict[str, object]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(yaml.safe_dump(doc), "c.yaml", sim=True)
    return info.value.problems


def test_defaults_are_level_1_nothing_held_asleep_and_never_deepened() -> None:
    cfg = parse_config(yaml.safe_dump({"instances": [BASE]}), "c.yaml", sim=True)
    (inst,) = cfg.instances
    assert (inst.sleep_level, inst.gpu_sleeping_gb, cfg.sleep.idle_deep_sleep_seconds) == (1, 0.0, None)


def test_the_keys_are_read_where_they_are_declared() -> None:
    doc = {"sleep_manager": {"idle_deep_sleep_seconds": 600},
           "instances": [{**BASE, "sleep_level": 2, "gpu_sleeping_gb": 1.5}]}
    cfg = parse_config(yaml.safe_dump(doc), "c.yaml", sim=True)
    (inst,) = cfg.instances
    assert (inst.sleep_level, inst.gpu_sleeping_gb, cfg.sleep.idle_deep_sleep_seconds) == (2, 1.5, 600.0)


@pytest.mark.parametrize("level", [0, 3, 1.5, "2"])
def test_a_sleep_level_other_than_1_or_2_is_refused_at_its_path(level: object) -> None:
    (p,) = problems({"instances": [{**BASE, "sleep_level": level}]})
    assert p.startswith("instances[0].sleep_level: must be a whole number from 1 to 2"), p


def test_negative_sizes_and_times_are_refused() -> None:
    found = problems({"sleep_manager": {"idle_deep_sleep_seconds": 0},
                      "instances": [{**BASE, "gpu_sleeping_gb": -1}]})
    assert any(p.startswith("instances[0].gpu_sleeping_gb: must be a number >= 0") for p in found), found
    assert any(p.startswith("sleep_manager.idle_deep_sleep_seconds: must be a number > 0") for p in found), found
