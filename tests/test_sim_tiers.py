"""The simulated engine's sleep tiers over loopback HTTP (in this test's loop): what each tier
keeps, what a wake must redo for the answers to be right, and how long each step takes.

vLLM: level 1 keeps the weights in host RAM (wake in --wake-s); level 2 loses them, so a
wake without reload_weights answers garbage and the documented sequence answers right
(reload in --reload-s). SGLang: a release with --enable-memory-saver and no
--enable-weights-cpu-backup loses them until update_weights_from_disk and flush_cache;
with the backup (or without the saver) the answers are right on resume.
"""
from __future__ import annotations

import asyncio
import time

import orjson
import pytest
from helpers import Proc, free_port, get_json, http_status, post_json, start_sim, wait_for_async, wait_http
from test_sim import Sim, anyio_backend, make_sim  # noqa: F401  (fixtures)

from router.sim import parse_options, textgen
from router.sim.dialects import DIALECTS
from router.sim.engine import APIS
from router.sim.sglang_api import FLUSHED

pytestmark = pytest.mark.anyio
HELLO = {"model": "tiny", "prompt": "Hello", "max_tokens": 6}
RIGHT = textgen.generate("Hello", 6)
GARBAGE = {g.strip() for g in textgen.GARBAGE}
RELOAD = {"method": "reload_weights"}


async def text(sim: Sim, body: dict = HELLO) -> str:
    status, _, answer = await sim.post("/v1/completions", body)
    assert status == 200, answer
    return orjson.loads(answer)["choices"][0]["text"]


def garbage(got: str) -> bool:
    return len(got.split()) == 6 and all(w in GARBAGE for w in got.split())


async def timed(coro) -> tuple[float, tuple[int, dict, bytes]]:
    t0 = time.monotonic()
    out = await coro
    return time.monotonic() - t0, out


async def state(sim: Sim) -> dict:
    status, _, body = await sim.get("/sim/state")
    assert status == 200
    return orjson.loads(body)


# ------------------------------------------------------------------ vLLM
async def test_vllm_level2_wake_without_reload_answers_garbage_until_reload_and_cache_reset(make_sim) -> None:
    sim = await make_sim()
    assert await text(sim) == RIGHT
    await sim.post("/sleep?level=2", raw=b"")
    assert (await sim.post("/wake_up", raw=b""))[2] == b'{"status":"awake","tags":null}'
    got = await text(sim)
    assert got != RIGHT and garbage(got)
    assert await sim.metric("sim_answers_right") == 0
    # Reloading now is not enough: the garbage generation left its KV in the prefix cache.
    status, _, body = await sim.post("/collective_rpc", RELOAD)
    assert (status, body) == (200, b'{"results":[null]}')
    assert garbage(await text(sim))
    status, _, body = await sim.post("/reset_prefix_cache", raw=b"")
    assert (status, body) == (200, b"")
    assert await text(sim) == RIGHT and await sim.metric("sim_answers_right") == 1
    assert await sim.metric("sim_reload_calls_total") == 1 and await sim.metric("sim_cache_resets_total") == 1


async def test_vllm_level2_documented_wake_sequence_answers_right_after_its_reload_time(make_sim) -> None:
    # --wake-s is level 1's: a level-2 wake must not spend it (the test would take 30 s).
    sim = await make_sim(served_model_names=("tiny",), reload_s=0.3, wake_s=30.0)
    t0 = time.monotonic()
    await sim.post("/sleep?level=2&mode=abort", raw=b"")
    assert await sim.metric('vllm:engine_sleep_state{engine="0",model_name="tiny",sleep_state="discard_all"}') == 1
    held = asyncio.ensure_future(text(sim))
    assert (await sim.post("/wake_up?tags=weights", raw=b""))[2] == b'{"status":"sleeping","tags":["weights"]}'
    elapsed, (status, _, _) = await timed(sim.post("/collective_rpc", RELOAD))
    assert status == 200 and elapsed >= 0.3
    assert not held.done()  # still asleep: the KV cache is not back
    assert (await sim.post("/wake_up?tags=kv_cache", raw=b""))[2] == b'{"status":"awake","tags":["kv_cache"]}'
    assert await asyncio.wait_for(held, 5) == RIGHT
    assert time.monotonic() - t0 < 10
    expected = ["sleep level=2", "wake_up tags=weights", "collective_rpc reload_weights", "wake_up tags=kv_cache"]
    assert sim.engine.calls == expected
    got = await state(sim)
    assert got["calls"] == expected and got["answers_right"] and not got["asleep"]
    assert got["counters"]["reload_calls"] == 1 and got["counters"]["wake_calls"] == 2


async def test_vllm_level1_sleeps_and_wakes_in_its_own_times_and_keeps_the_weights(make_sim) -> None:
    sim = await make_sim(sleep_s=0.2, wake_s=0.3, reload_s=30.0)
    elapsed, (status, _, body) = await timed(sim.post("/sleep?level=1", raw=b""))
    assert status == 200 and elapsed >= 0.2 and body == b'{"status":"sleeping","level":1}'
    elapsed, (status, _, _) = await timed(sim.post("/wake_up", raw=b""))
    assert status == 200 and elapsed >= 0.3
    assert await text(sim) == RIGHT and await sim.metric("sim_reload_calls_total") == 0
    # Level 0 frees nothing: its wake spends no copy time.
    await sim.post("/sleep?level=0", raw=b"")
    elapsed, _ = await timed(sim.post("/wake_up", raw=b""))
    assert elapsed < 0.3 and await text(sim) == RIGHT


async def test_vllm_a_deeper_sleep_while_asleep_discards_the_offloaded_weights(make_sim) -> None:
    sim = await make_sim(served_model_names=("tiny",))
    await sim.post("/sleep?level=1", raw=b"")
    await sim.post("/sleep?level=2", raw=b"")
    await sim.post("/sleep?level=1", raw=b"")  # never lightens
    assert sim.engine.sleep_level == 2
    await sim.post("/wake_up", raw=b"")
    assert garbage(await text(sim))


async def test_vllm_reload_needs_awake_weights_and_a_method(make_sim) -> None:
    sim = await make_sim()
    await sim.post("/sleep?level=2", raw=b"")
    status, _, body = await sim.post("/collective_rpc", RELOAD)
    assert status == 500 and "wake_up?tags=weights" in orjson.loads(body)["error"]["message"]
    assert (await sim.post("/collective_rpc", raw=b"{"))[0] == 400
    assert (await sim.post("/collective_rpc", {"args": []}))[2] == b'{"detail":"Missing \'method\' in request body"}'
    status, _, body = await sim.post("/collective_rpc", {"method": "sleep"})
    assert status == 500 and "reload_weights" in orjson.loads(body)["error"]["message"]
    assert await sim.metric("sim_reload_calls_total") == 0


# ---------------------------------------------------------------- SGLang
async def test_sglang_release_without_backup_is_wrong_after_resume_until_reload_and_flush(make_sim) -> None:
    sim = await make_sim("sglang", model="org/m", memory_saver=True, reload_s=0.2)
    info = orjson.loads((await sim.get("/get_server_info"))[2])
    assert info["enable_memory_saver"] is True and info["enable_weights_cpu_backup"] is False
    assert await text(sim) == RIGHT
    assert (await sim.post("/release_memory_occupation", {}))[2] == b"null"
    status, _, body = await sim.post("/update_weights_from_disk", {"model_path": "org/m"})
    assert status == 400 and "resume_memory_occupation" in orjson.loads(body)["message"]
    assert (await sim.post("/resume_memory_occupation", {}))[2] == b"null"
    assert garbage(await text(sim))
    status, _, body = await sim.post("/update_weights_from_disk", {"model_path": "org/other"})
    assert status == 400 and orjson.loads(body)["success"] is False
    assert (await sim.post("/update_weights_from_disk", {}))[0] == 400
    elapsed, (status, _, body) = await timed(sim.post("/update_weights_from_disk", {"model_path": "org/m"}))
    assert status == 200 and orjson.loads(body)["success"] is True and elapsed >= 0.2
    assert garbage(await text(sim))  # the radix cache still holds the old KV
    status, _, body = await sim.post("/flush_cache", raw=b"")
    assert (status, body) == (200, FLUSHED)
    assert await text(sim) == RIGHT
    assert sim.engine.calls == ["release_memory_occupation", "update_weights_from_disk", "resume_memory_occupation",
                                "update_weights_from_disk", "update_weights_from_disk", "flush_cache"]


async def test_sglang_documented_wake_without_backup_answers_right_at_its_first_request(make_sim) -> None:
    sim = await make_sim("sglang", model="org/m", memory_saver=True)
    for path, body in (("/release_memory_occupation", {}), ("/resume_memory_occupation", {}),
                       ("/update_weights_from_disk", {"model_path": "org/m"})):
        assert (await sim.post(path, body))[0] == 200, path
    assert (await sim.get("/flush_cache"))[0] == 200
    assert await text(sim) == RIGHT
    got = await state(sim)
    assert got["counters"]["reload_calls"] == 1 and got["counters"]["cache_resets"] == 1


async def test_sglang_with_cpu_backup_is_right_at_once_after_its_copy_times(make_sim) -> None:
    sim = await make_sim("sglang", model="org/m", memory_saver=True, weights_cpu_backup=True,
                         sleep_s=0.2, wake_s=0.3, reload_s=30.0)
    elapsed, (status, _, _) = await timed(sim.post("/release_memory_occupation", {}))
    assert status == 200 and elapsed >= 0.2
    elapsed, (status, _, _) = await timed(sim.post("/resume_memory_occupation", {}))
    assert status == 200 and elapsed >= 0.3
    assert await text(sim) == RIGHT and await sim.metric("sim_reload_calls_total") == 0


async def test_sglang_without_memory_saver_frees_nothing_and_stays_right(make_sim) -> None:
    sim = await make_sim("sglang", model="org/m", wake_s=30.0)
    await sim.post("/release_memory_occupation", {})
    elapsed, _ = await timed(sim.post("/resume_memory_occupation", {}))
    assert elapsed < 10 and await text(sim) == RIGHT


async def test_sglang_flush_cache_is_refused_while_requests_run(make_sim) -> None:
    sim = await make_sim("sglang", model="org/m", itl_ms=30)
    running = asyncio.ensure_future(sim.post("/v1/completions", {"prompt": "x", "max_tokens": 10}))
    await wait_for_async(lambda: _running(sim))
    assert (await sim.post("/flush_cache", raw=b""))[0] == 400
    assert (await running)[0] == 200
    assert await sim.metric("sim_cache_resets_total") == 0


async def _running(sim: Sim) -> bool:
    return sim.engine.counters.running == 1


# ----------------------------------------------------- as its own process
def test_a_sim_process_takes_the_tier_flags_from_its_command_line(procs: list[Proc]) -> None:
    """What --sim renders: SGLang's own flags in the engine args, the state read over HTTP."""
    port = free_port()
    procs.append(start_sim("sglang", "org/m", port, "--enable-memory-saver", "--reload-s", "0.2"))
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/health", timeout=30)
    assert post_json(base + "/release_memory_occupation", {}) == (200, None)
    assert post_json(base + "/resume_memory_occupation", {}) == (200, None)
    status, body = post_json(base + "/v1/completions", HELLO)
    assert status == 200 and garbage(body["choices"][0]["text"])
    assert post_json(base + "/update_weights_from_disk", {"model_path": "org/m"})[0] == 200
    assert http_status(base + "/flush_cache", timeout=5) == 200
    assert post_json(base + "/v1/completions", HELLO)[1]["choices"][0]["text"] == RIGHT
    status, got = get_json(base + "/sim/state")
    assert status == 200 and got["answers_right"] and got["counters"]["reload_calls"] == 1
    assert got["calls"] == ["release_memory_occupation", "resume_memory_occupation", "update_weights_from_disk",
                            "flush_cache"]


# --------------------------------------------------------------- options
def test_tier_options_are_read_from_the_command_line() -> None:
    o = parse_options(["--engine", "sglang", "--model-path", "m", "--enable-memory-saver",
                       "--enable-weights-cpu-backup", "--sleep-s", "1.5", "--wake-s", "2", "--reload-s=8"])
    assert (o.memory_saver, o.weights_cpu_backup, o.sleep_s, o.wake_s, o.reload_s) == (True, True, 1.5, 2.0, 8.0)
    assert o.ignored_args == ()
    plain = parse_options(["--engine", "sglang", "--model-path", "m"])
    assert (plain.memory_saver, plain.weights_cpu_backup, plain.wake_s) == (False, False, 0.0)


def test_a_negative_tier_time_exits_2_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_options(["--engine", "vllm", "--model", "m", "--reload-s", "-1"])
    assert exit_.value.code == 2 and "--reload-s must not be negative" in capsys.readouterr().err


def test_every_dialect_has_its_routes_and_its_answers() -> None:
    assert set(APIS) == set(DIALECTS)
    assert all(api.wording is DIALECTS[name] for name, api in APIS.items())
