"""``router.api_keys`` records: today's forms keep their meaning, a bad record is refused naming its
field, and the Guard finds which key a request sent without its time saying which."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from router.config import ConfigError, RouterSettings, parse_config
from router.config.keys import ApiKey
from router.server.proxy.auth import KEY, Guard
from router.server.proxy.request import Outgoing
from router.server.proxy.tenants import DEFAULT_COMPLETION_BOUND, bound_of, duration, ratelimit_headers
from router.tenants.quota import Standing

SHA = hashlib.sha256(b"sk-hashed").hexdigest()


def keys(value: Any, tmp: Path = Path(".")) -> tuple[ApiKey, ...]:
    doc = {"router": {"api_keys": value}, "instances": [
        {"model": "a", "engine": "vllm", "engine_args": ["--port=9001"], "aliases": ["alpha"]},
        {"model": "b", "engine": "vllm", "engine_args": ["--port=9002"]}]}
    return parse_config(yaml.safe_dump(doc), str(tmp / "c.yaml")).router.api_keys


def problems(value: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        keys(value)
    return info.value.problems


def test_todays_forms_are_full_access_keys_named_by_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVR_KEYS", "sk-e1,sk-e2")
    (tmp_path / "keys").write_text("sk-f1\n")
    (tmp_path / "keys").chmod(0o600)
    got = keys(["sk-one", {"env": "KVR_KEYS"}, {"file": "keys"}], tmp_path)
    assert [(k.name, k.key) for k in got] == [("key-1", "sk-one"), ("key-2", "sk-e1"), ("key-3", "sk-e2"),
                                              ("key-4", "sk-f1")]
    assert all(k.plain and k.models is None and k.priority == "normal" for k in got)
    assert [k.key for k in keys({"env": "KVR_KEYS"})] == ["sk-e1", "sk-e2"]


def test_a_record_holds_scope_limits_and_class_and_never_shows_its_key() -> None:
    chat, batch, plain = keys([
        {"name": "chat", "key": "sk-chat", "models": ["a*", "b"], "rpm": 600, "tpm": 2000, "max_concurrency": 4,
         "priority": "HIGH"},
        {"name": "batch", "key_sha256": SHA.upper(), "priority": "low"},
        "sk-plain"])
    assert (chat.name, chat.models, chat.rpm, chat.tpm, chat.max_concurrency, chat.priority) == \
        ("chat", ("a*", "b"), 600, 2000, 4, "high")
    assert chat.limited and not chat.plain and type(chat.rpm) is int
    assert batch.key is None and batch.digest == hashlib.sha256(b"sk-hashed").digest() and not batch.limited
    assert plain.name == "key-3"
    assert "sk-chat" not in repr(chat) and SHA.lower() not in repr(batch).lower()


@pytest.mark.parametrize("record, field, fragment", [
    ({"key": "sk-x"}, "router.api_keys[0].name", "must be a name"),
    ({"name": "has space", "key": "sk-x"}, "router.api_keys[0].name", "a name of letters"),
    ({"name": "x", "key": "sk-x", "rpm": 0}, "router.api_keys[0].rpm", "whole number"),
    ({"name": "x", "key": "sk-x", "tpm": 1.5}, "router.api_keys[0].tpm", "whole number"),
    ({"name": "x", "key": "sk-x", "priority": "urgent"}, "router.api_keys[0].priority", "high, normal, low"),
    ({"name": "x", "key": "sk-x", "models": []}, "router.api_keys[0].models", "could use no model"),
    ({"name": "x"}, "router.api_keys[0].key", "exactly one of `key` and `key_sha256` (neither"),
    ({"name": "x", "key": "sk-x", "key_sha256": SHA}, "router.api_keys[0].key", "(both given)"),
    ({"name": "x", "key_sha256": "abc"}, "router.api_keys[0].key_sha256", "64 hex digits"),
    ({"name": "x", "key": {"env": "KVR_NOT_SET_ANYWHERE"}}, "router.api_keys[0].key", "is not set"),
])
def test_a_bad_record_is_refused_naming_its_field(record: dict[str, Any], field: str, fragment: str) -> None:
    found = [p for p in problems([record]) if p.startswith(field + ":")]
    assert found and fragment in found[0], problems([record])
    assert not any("sk-x" in p for p in problems([record]))  # never the key


def test_names_and_keys_are_unique() -> None:
    found = problems([{"name": "key-2", "key": "sk-a"}, "sk-b"])
    assert any(p.startswith("router.api_keys[0].name:") or p.startswith("router.api_keys[1].name:") for p in found)
    found = problems(["sk-a", {"name": "x", "key_sha256": hashlib.sha256(b"sk-a").hexdigest()}])
    assert any(p.startswith("router.api_keys[1]:") and "the same key as router.api_keys[0]" in p for p in found)
    assert not any("sk-a" in p for p in found)


def scope(token: bytes, path: str = "/v1/chat/completions", header: bytes = b"authorization") -> dict[str, Any]:
    value = b"Bearer " + token if header == b"authorization" else token
    return {"type": "http", "path": path, "method": "POST", "headers": [(header, value)], "client": ("1.2.3.4", 5)}


@pytest.mark.parametrize("hashed", [False, True])
def test_the_guard_names_the_key_a_request_sent(hashed: bool) -> None:
    records = keys(["sk-one", {"name": "two", "key": "sk-two"},
                    *([{"name": "h", "key_sha256": SHA}] if hashed else [])])
    guard = Guard(RouterSettings(api_keys=records), frozenset())
    assert guard.hashed is hashed
    for token, name in ((b"sk-one", "key-1"), (b"sk-two", "two")) + (((b"sk-hashed", "h"),) if hashed else ()):
        s = scope(token)
        assert guard.check(s) is None and s[KEY].name == name
    s = scope(b"sk-two", "/v1/messages", b"x-api-key")
    assert guard.check(s) is None and s[KEY].name == "two"
    for wrong in (b"sk-on", b"sk-one2", b"", b"two"):
        s = scope(wrong)
        denied = guard.check(s)
        assert denied is not None and denied.status == 401 and KEY not in s


def test_the_token_bound_is_the_body_estimate_plus_its_cap() -> None:
    def out(payload: dict[str, Any]) -> Outgoing:
        return Outgoing("m", payload, orjson.dumps(payload), False)
    body = {"model": "m", "prompt": "x" * 400, "max_tokens": 10}
    assert bound_of(out(body)) == len(orjson.dumps(body)) // 4 + 10
    chat = {"model": "m", "messages": [], "max_completion_tokens": 7}
    assert bound_of(out(chat)) == len(orjson.dumps(chat)) // 4 + 7
    bare = {"model": "m", "max_tokens": "many"}
    assert bound_of(out(bare)) == len(orjson.dumps(bare)) // 4 + DEFAULT_COMPLETION_BOUND


def test_headers_are_openais_and_only_for_the_limits_a_key_has() -> None:
    both = dict(ratelimit_headers(Standing(5, 3, 12.5, 100, 40, 61.0)))
    assert both == {b"x-ratelimit-limit-requests": b"5", b"x-ratelimit-remaining-requests": b"3",
                    b"x-ratelimit-reset-requests": b"12.5s", b"x-ratelimit-limit-tokens": b"100",
                    b"x-ratelimit-remaining-tokens": b"40", b"x-ratelimit-reset-tokens": b"1m1s"}
    assert [k for k, _ in ratelimit_headers(Standing(None, 0, 0.0, 100, 0, 0.0))] == [
        b"x-ratelimit-limit-tokens", b"x-ratelimit-remaining-tokens", b"x-ratelimit-reset-tokens"]
    assert duration(0.0) == b"0s" and duration(360.0) == b"6m0s"


def test_a_glob_that_matches_no_model_is_warned() -> None:
    doc = {"router": {"api_keys": [{"name": "k", "key": "sk-k", "models": ["alph?", "Qwen/*"]}]}, "instances": [
        {"model": "a", "engine": "vllm", "engine_args": ["--port=9001"], "aliases": ["alpha"]}]}
    warnings = parse_config(yaml.safe_dump(doc), "c.yaml").warnings
    assert [w for w in warnings if "router.api_keys" in w] == [
        "c.yaml: router.api_keys: key 'k': models glob 'Qwen/*' matches no model name or alias, so the key cannot "
        "use it; models: a"]
