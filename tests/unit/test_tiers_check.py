"""`render --check` refuses an SGLang level-1 sleep that would answer garbage after its resume
(memory saver on, no weights backup), naming the flag and the alternative tier."""
from __future__ import annotations

import pytest
import yaml

from router.config import ConfigError, parse_config

SAVER = ["--port=9001", "--enable-memory-saver"]


def parse(instance: dict[str, object]) -> object:
    return parse_config(yaml.safe_dump({"instances": [{"model": "org/m", "engine": "sglang", **instance}]}), "c.yaml",
                        sim=True)


def test_sglang_level_1_without_the_backup_is_an_error_naming_the_flag_and_level_2() -> None:
    with pytest.raises(ConfigError) as info:
        parse({"engine_args": SAVER})
    (problem,) = info.value.problems
    assert problem.startswith("instances[0].sleep_level: sleep level 1 of this sglang engine needs "
                              "--enable-weights-cpu-backup in engine_args"), problem
    assert "add --enable-weights-cpu-backup, or set 'sleep_level: 2', or set 'sleep: false'" in problem


@pytest.mark.parametrize("instance", [
    {"engine_args": [*SAVER, "--enable-weights-cpu-backup"]},
    {"engine_args": SAVER, "sleep_level": 2},
    {"engine_args": SAVER, "sleep": False},
    {"engine_args": ["--port=9001"]},  # no saver: a release frees nothing (auto sleep would warn about the saver)
])
def test_each_way_out_is_accepted(instance: dict[str, object]) -> None:
    assert parse(instance) is not None
