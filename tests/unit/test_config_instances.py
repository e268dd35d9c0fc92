"""The instance keys are read by their declarations too: every key refuses a value its kind does
not take, at its own path, and the reference's list of instance keys is what the parser knows."""
from __future__ import annotations

import pytest
import yaml

from router.config import INSTANCE_KEYS, ConfigError, parse_config
from router.config.instances import COMMAND_KEYS, INSTANCE
from router.config.shaping import Fields

BASE = {"model": "m", "engine": "vllm", "engine_args": ["--port=9001"]}
INSTANCE_BY_NAME = {k.name: k for k in INSTANCE}


def problems(instance: dict[str, object]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(yaml.safe_dump({"instances": [instance]}), "c.yaml", sim=True)
    return info.value.problems


@pytest.mark.parametrize("key", [k.name for k in INSTANCE])
def test_every_instance_key_refuses_a_value_of_no_kind_at_its_own_path(key: str) -> None:
    # A mapping of request fields takes any mapping of JSON values: a list is what it refuses.
    found = problems({**BASE, key: ["a value"] if isinstance(INSTANCE_BY_NAME[key].kind, Fields) else {"not": ["a value"]}})
    assert any(p.startswith((f"instances[0].{key}:", f"instances[0].{key}.")) for p in found), found


def test_the_keys_the_parser_knows_are_the_declared_ones() -> None:
    assert set(INSTANCE_KEYS) | set(COMMAND_KEYS) == {k.name for k in INSTANCE}
    cfg = parse_config(yaml.safe_dump({"instances": [{**BASE, "enigne": "vllm"}]}), "c.yaml", sim=True)
    assert cfg.warnings == ("c.yaml: instances[0].enigne: unknown key, ignored; did you mean 'engine'?",)


def test_null_leaves_a_key_without_a_default_unset() -> None:
    (inst,) = parse_config(yaml.safe_dump({"instances": [{**BASE, "name": None, "node": None, "max_concurrency": None}]}),
                           "c.yaml").instances
    assert (inst.name, inst.node, inst.max_concurrency, inst.max_queue) == ("m", None, None, 0)
