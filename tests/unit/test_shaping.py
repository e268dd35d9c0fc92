"""Request shaping: the merge (defaults vs overrides vs strip), the body each replica gets, and
the config's checks (types, routed fields, one field in one key, replicas of a model alike)."""
from __future__ import annotations

from typing import Any

import orjson
import pytest
import yaml
from fakes import instance

from router.config import ConfigError, parse_config
from router.config.shaping import Shaping
from router.observe.events import Events
from router.server.fleet.replica import Replica
from router.server.proxy.request import Outgoing


def shaping(defaults: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None,
            strip: tuple[str, ...] = ()) -> Shaping:
    return Shaping(defaults or {}, overrides or {}, strip)


def test_defaults_fill_only_what_the_client_left_out_or_null() -> None:
    s = shaping(defaults={"temperature": 0.2, "max_tokens": 64, "top_p": 0.9})
    out = s.apply({"model": "m", "temperature": 1.0, "max_tokens": None})
    assert out == {"model": "m", "temperature": 1.0, "max_tokens": 64, "top_p": 0.9}


def test_overrides_replace_the_clients_values_and_strip_removes_fields() -> None:
    s = shaping(overrides={"max_tokens": 16}, strip=("logit_bias", "seed"))
    payload = {"model": "m", "max_tokens": 4000, "seed": 7, "logit_bias": {"1": 2}, "n": 1}
    assert s.apply(payload) == {"model": "m", "max_tokens": 16, "n": 1}
    assert payload["seed"] == 7 and payload["max_tokens"] == 4000  # the client's body is not touched


def test_nested_values_are_replaced_whole_not_merged() -> None:
    s = shaping(defaults={"stream_options": {"include_usage": True}},
                overrides={"chat_template_kwargs": {"enable_thinking": False}})
    out = s.apply({"stream_options": {"continuous_usage_stats": True}, "chat_template_kwargs": {"x": 1}})
    assert out == {"stream_options": {"continuous_usage_stats": True},
                   "chat_template_kwargs": {"enable_thinking": False}}


def replica(**extra: Any) -> Replica:
    return Replica(instance("a-0", model="m", served_names=("m", "m-served"), **extra), Events())


def test_a_replica_without_shaping_gets_the_clients_bytes() -> None:
    body = b'{"model":  "m", "messages": [], "temperature": 1}'
    out = Outgoing("m", orjson.loads(body), body, False)
    out.shaped = True
    assert out.data_for(replica()) is body


def test_shaping_and_the_model_rewrite_make_one_body() -> None:
    body = b'{"messages": [], "seed": 1}'
    s = shaping(defaults={"temperature": 0.2}, strip=("seed",))
    out = Outgoing(None, orjson.loads(body), body, False)  # no model: the default one, rewritten
    out.shaped = True
    assert orjson.loads(out.data_for(replica(shaping=s))) == {"messages": [], "temperature": 0.2, "model": "m"}
    # A name the engine serves is kept as the client gave it.
    served = Outgoing("m-served", {"model": "m-served"}, b'{"model": "m-served"}', False)
    served.shaped = True
    assert orjson.loads(served.data_for(replica(shaping=s))) == {"model": "m-served", "temperature": 0.2}


def test_a_path_that_is_not_shaped_keeps_the_clients_bytes() -> None:
    body = b'{"model": "m", "input": "x"}'
    out = Outgoing("m", orjson.loads(body), body, False)  # e.g. /v1/embeddings: `shaped` stays False
    assert out.data_for(replica(shaping=shaping(overrides={"max_tokens": 1}))) is body


BASE = {"engine": "vllm", "launch": False}


def load(*instances: dict[str, Any]) -> Any:
    return parse_config(yaml.safe_dump({"instances": [{**BASE, **i} for i in instances]}), "c.yaml", sim=True)


def problems(*instances: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(*instances)
    return info.value.problems


def test_the_config_reads_the_three_keys_into_one_shaping() -> None:
    (inst,) = load({"model": "m", "engine_args": "--port 9001", "request_defaults": {"temperature": 0.2},
                    "request_overrides": {"max_tokens": 8}, "request_strip": ["seed"]}).instances
    assert inst.shaping == shaping({"temperature": 0.2}, {"max_tokens": 8}, ("seed",))
    (plain,) = load({"model": "m", "engine_args": "--port 9001"}).instances
    assert plain.shaping is None


def test_bad_shaping_is_an_error_naming_its_field() -> None:
    found = problems({"model": "m", "engine_args": "--port 9001", "request_defaults": [1],
                      "request_overrides": {"stream": True}, "request_strip": ["model"]})
    assert any(p.startswith("instances[0].request_defaults: must be a mapping") for p in found), found
    assert any(p.startswith("instances[0].request_overrides.stream: 'stream' is the router's") for p in found), found
    assert any(p.startswith("instances[0].request_strip[0]: 'model' is the router's") for p in found), found
    found = problems({"model": "m", "engine_args": "--port 9001", "request_defaults": {"seed": 1},
                      "request_strip": ["seed"]})
    assert found == ["instances[0].request_strip: field 'seed' is also in request_defaults; a field is defaulted, "
                     "overridden or stripped, so give it in one of them"]


def test_replicas_of_a_model_must_shape_and_fall_back_alike() -> None:
    found = problems({"model": "m", "name": "a", "engine_args": "--port 9001", "request_overrides": {"n": 1},
                      "fallbacks": ["o"]},
                     {"model": "m", "name": "b", "engine_args": "--port 9002"},
                     {"model": "o", "engine_args": "--port 9003"})
    assert any(p.startswith("instances[1].request_defaults: model 'm' is shaped otherwise by instance 'a'")
               for p in found), found
    assert any(p.startswith("instances[1].fallbacks: instance 'a' of model 'm' gives ['o']") for p in found), found


def test_fallbacks_name_other_models_the_config_routes() -> None:
    found = problems({"model": "m", "engine_args": "--port 9001", "fallbacks": ["nope", "m"]},
                     {"model": "o", "engine_args": "--port 9002"})
    assert found[0].startswith("instances[0].fallbacks[0]: 'nope' is not a model, alias or served name")
    assert found[1].startswith("instances[0].fallbacks[1]: 'm' is this instance's own model")
    # Models may fall back to each other: a request still visits each once (router/server/proxy/fallback.py).
    cfg = load({"model": "m", "engine_args": "--port 9001", "fallbacks": ["o"]},
               {"model": "o", "engine_args": "--port 9002", "aliases": ["oo"], "fallbacks": ["m"]})
    assert [i.fallbacks for i in cfg.instances] == [("o",), ("m",)]
