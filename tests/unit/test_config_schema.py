"""The declaration machinery of router/config: kinds check bounds and types and say what a value
must be, blocks are read from their declarations, unknown keys get a did-you-mean."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional

import pytest

from router.config import RouterSettings, SleepSettings
from router.config.kinds import COUNT, NON_NEGATIVE, PORT, POSITIVE, Choice, Flag, Number, Strings, Text, Words
from router.config.kubernetes import KubernetesSettings
from router.config.problems import Reading
from router.config.residency import ResidencySettings
from router.config.router import TracingSettings
from router.config.schema import REQUIRED, Key, Kind, keys_of, read_keys, read_section, setting
from router.config.top import Config


def read(kind: Kind, value: object) -> tuple[object, list[str]]:
    reading = Reading()
    got = kind.read(value, "block.key", reading)
    return got, reading.errors


# -- kinds: bounds and types --------------------------------------------------

@pytest.mark.parametrize("kind, value, expected", [
    (POSITIVE, 0.5, 0.5), (POSITIVE, 3, 3.0), (NON_NEGATIVE, 0, 0.0),
    (COUNT, 1, 1), (COUNT, 2**31, 2**31), (PORT, 65535, 65535),
    (Number(0, 100, whole=True), 0, 0), (Number(0, 100, whole=True), 100, 100),
])
def test_numbers_within_bounds_are_kept(kind: Number, value: object, expected: object) -> None:
    got, errors = read(kind, value)
    assert (got, type(got), errors) == (expected, type(expected), [])


@pytest.mark.parametrize("kind, value, message", [
    (POSITIVE, 0, "must be a number > 0, not 0"),
    (POSITIVE, -1.5, "must be a number > 0, not -1.5"),
    (NON_NEGATIVE, -0.1, "must be a number >= 0, not -0.1"),
    (POSITIVE, math.inf, "must be a number > 0, not inf"),
    (POSITIVE, math.nan, "must be a number > 0, not nan"),
    (POSITIVE, "5", "must be a number > 0, not '5'"),
    (POSITIVE, True, "must be a number > 0, not True"),  # YAML's true is not 1
    (COUNT, 0, "must be a whole number from 1 to 2147483648, not 0"),
    (COUNT, 2**31 + 1, "must be a whole number from 1 to 2147483648, not 2147483649"),
    (COUNT, 2.0, "must be a whole number from 1 to 2147483648, not 2.0"),
    (Number(0, whole=True), -1, "must be a whole number >= 0, not -1"),
    (Number(1, 10), 10.5, "must be a number from 1 to 10, not 10.5"),
    (PORT, 70000, "70000 is not a port number (1-65535)"),
    (PORT, "9001", "'9001' is not a port number (1-65535)"),
    (POSITIVE, 10**400, "must be a number > 0, not " + str(10**400)),
])
def test_numbers_out_of_bounds_or_of_another_type_say_what_they_must_be(kind: Number, value: object, message: str) -> None:
    got, errors = read(kind, value)
    assert got is None and errors == [f"block.key: {message}"]


def test_flags_take_only_yaml_booleans() -> None:
    assert read(Flag(), False) == (False, [])
    for value in ("yes", 1, None):
        assert read(Flag(), value) == (None, [f"block.key: must be true or false, not {value!r}"])


def test_choices_ignore_case_and_follow_aliases() -> None:
    kind = Choice(("vllm", "sglang"), (("sgl", "sglang"),))
    assert read(kind, " SGLang ") == ("sglang", [])
    assert read(kind, "sgl") == ("sglang", [])
    assert read(kind, "tgi") == (None, ["block.key: must be one of vllm, sglang, not 'tgi'"])
    assert read(kind, 3) == (None, ["block.key: must be one of vllm, sglang, not 3"])


def test_text_must_match_its_whole_pattern() -> None:
    kind = Text("a word", r"[a-z]+", "{value!r} is not {what}")
    assert read(kind, "abc") == ("abc", [])
    assert read(kind, "abc1") == (None, ["block.key: 'abc1' is not a word"])
    assert read(kind, ["abc"]) == (None, ["block.key: ['abc'] is not a word"])
    assert read(Text("a name", strip=True), "  m ") == ("m", [])
    assert read(Text("a name"), "   ")[0] is None


def test_lists_of_strings_and_command_words() -> None:
    assert read(Strings(), ["a", 7]) == (("a", "7"), [])
    assert read(Strings(named=True), ["a", " "]) == (None, ["block.key[1]: must not be empty"])
    assert read(Words(), ["--port 9001", "--name 'a b'"]) == (("--port", "9001", "--name", "a b"), [])
    assert read(Words(), "'open")[1][0].endswith("check the quotes")


# -- blocks read from their declarations --------------------------------------

@dataclass(frozen=True)
class Demo:
    size: int = setting(COUNT, REQUIRED, "how many")
    port: int = setting(PORT, 8080, "where", key="demo_port")
    limit: Optional[float] = setting(POSITIVE, None, "at most")


def test_keys_of_names_each_key_and_the_field_it_fills() -> None:
    assert [(k.name, k.field, k.required) for k in keys_of(Demo)] == [
        ("size", "size", True), ("demo_port", "port", False), ("limit", "limit", False)]
    assert [k.default_text for k in keys_of(Demo)] == ["required", "`8080`", "none"]


def test_a_block_is_read_into_its_dataclass_by_key() -> None:
    reading = Reading()
    assert read_section(Demo, {"size": 2, "demo_port": 9000, "limit": None}, "demo", reading) == Demo(2, 9000, None)
    assert reading.errors == [] and reading.warnings == []


def test_every_problem_of_a_block_is_reported_and_a_missing_required_key_leaves_none() -> None:
    reading = Reading()
    assert read_section(Demo, {"demo_port": 0, "limit": -1}, "demo", reading) is None
    assert reading.errors == ["demo.size: must be a whole number from 1 to 2147483648, not None",
                              "demo.demo_port: 0 is not a port number (1-65535)",
                              "demo.limit: must be a number > 0, not -1"]
    reading = Reading()
    assert read_section(Demo, [1], "demo", reading) is None
    assert reading.errors == ["demo: must be a mapping (size, demo_port, limit)"]


def test_unknown_keys_are_warned_with_the_closest_key_or_the_list() -> None:
    reading = Reading()
    values = read_keys(keys_of(Demo), {"size": 1, "demo_prot": 1, "zzz": 2}, "demo", reading)
    assert values == {"size": 1}
    assert reading.warnings == ["demo.demo_prot: unknown key, ignored; did you mean 'demo_port'?",
                                "demo.zzz: unknown key, ignored; known keys: size, demo_port, limit"]


SETTINGS = (RouterSettings, TracingSettings, SleepSettings, ResidencySettings, KubernetesSettings)


@pytest.mark.parametrize("cls", SETTINGS)
def test_every_declared_setting_is_read_and_checked_by_its_declaration(cls: type) -> None:
    """A value no kind accepts is refused at each key's own path, and each default reads back as itself."""
    reading = Reading()
    keys = keys_of(cls)
    # A nested block (router.tracing) takes any mapping, warning about unknown keys: it refuses a non-mapping.
    read_section(cls, {k.name: "not a block" if k.kind.keys else {"not": ["a value"]} for k in keys}, "block", reading)
    for key in keys:
        assert reading.failed(f"block.{key.name}"), key.name
    assert all(any(e.startswith((f"block.{k.name}:", f"block.{k.name}.")) for k in keys) for e in reading.errors)
    assert [f.name for f in fields(cls)] == [k.field for k in keys]  # every field is a declared key
    plain = {k.name: getattr(cls(), k.field) for k in keys if isinstance(getattr(cls(), k.field), (bool, int, float, str))}
    reading = Reading()
    assert read_section(cls, plain, "block", reading) == cls() and reading.errors == []


def test_every_key_has_a_doc_and_a_kind_that_says_what_it_must_be() -> None:
    from router.config.instances import INSTANCE
    keys: list[Key] = [*keys_of(Config), *INSTANCE, *(k for cls in SETTINGS for k in keys_of(cls))]
    for key in keys:
        assert key.doc.strip() and key.kind.label.strip(), key.name
