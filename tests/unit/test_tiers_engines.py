"""Each engine module owns its sleep tiers: the call that enters each level and the wake steps, in
order, that bring it back with right answers; and what a tier needs of the engine's flags."""
from __future__ import annotations

import pytest

from router.engines import ENGINES, MODEL_PATH, Call

VLLM, SGLANG, OPENAI = ENGINES["vllm"], ENGINES["sglang"], ENGINES["openai"]


def shown(calls: tuple[Call, ...]) -> list[str]:
    return [str(c) for c in calls]


@pytest.mark.parametrize("level", [1, 2])
def test_vllm_sleeps_at_the_level_asked_with_its_mode(level: int) -> None:
    call, timeout = VLLM.sleep_request(level, "abort", 30.0, 120.0)
    assert call is not None and (call.method, call.path, dict(call.params)) == ("POST", "/sleep",
                                                                                {"level": str(level), "mode": "abort"})
    assert timeout == 30.0


def test_vllm_level_1_wakes_with_one_call_and_level_2_reloads_in_the_documented_order() -> None:
    assert shown(VLLM.wake_sequence(1, "m")) == ["POST /wake_up"]
    assert shown(VLLM.wake_sequence(2, "m")) == [
        "POST /wake_up?tags=weights", "POST /collective_rpc reload_weights", "POST /wake_up?tags=kv_cache",
        "POST /reset_prefix_cache"]
    assert VLLM.wake_sequence(2, "m")[1].json == {"method": "reload_weights"}


@pytest.mark.parametrize("level", [1, 2])
def test_sglang_releases_at_both_levels_without_a_mode(level: int) -> None:
    call, timeout = SGLANG.sleep_request(level, "wait", 30.0, 120.0)
    assert call == Call("POST", "/release_memory_occupation", json={}) and timeout == 120.0


def test_sglang_level_2_resumes_then_reloads_from_the_model_path_then_flushes() -> None:
    assert shown(SGLANG.wake_sequence(1, "org/m")) == ["POST /resume_memory_occupation"]
    steps = SGLANG.wake_sequence(2, "org/m")
    assert shown(steps) == ["POST /resume_memory_occupation", "POST /update_weights_from_disk", "POST /flush_cache"]
    assert steps[1].json == {"model_path": "org/m"}
    assert MODEL_PATH not in str(steps)


def test_an_engine_without_a_sleep_api_has_no_tier() -> None:
    assert OPENAI.sleep_request(1, "wait", 1.0, 2.0) == (None, 2.0)
    assert OPENAI.wake_sequence(1, "m") == () and OPENAI.tier_missing(1, []) == {}
    assert VLLM.wake_sequence(3, "m") == () and VLLM.sleep_request(3, "wait", 1.0, 2.0)[0] is None


def test_sglang_level_1_needs_the_cpu_backup_only_where_the_memory_saver_frees_the_weights() -> None:
    saver = ["--port=9001", "--enable-memory-saver"]
    assert list(SGLANG.tier_missing(1, saver)) == ["--enable-weights-cpu-backup"]
    assert SGLANG.tier_missing(1, [*saver, "--enable-weights-cpu-backup"]) == {}
    assert SGLANG.tier_missing(2, saver) == {}
    assert SGLANG.tier_missing(1, ["--port=9001"]) == {}  # without the saver a release frees nothing
    assert VLLM.tier_missing(1, []) == VLLM.tier_missing(2, []) == {}


def test_a_call_without_the_placeholder_is_kept_as_is() -> None:
    call = Call("POST", "/x", json={"a": 1})
    assert call.for_model("m") is call and str(Call("POST", "/y", {"a": "1", "b": "2"})) == "POST /y?a=1&b=2"
