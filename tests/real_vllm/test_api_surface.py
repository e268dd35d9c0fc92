"""Every client API vLLM serves, through the router and straight to the engine, compared.

The router routes each client path vLLM serves by the body's `model`; the
simulator cannot tell whether what it relays is what a real client parses.
So each test here sends the same request (greedy, so the text is the same
too) through the router, with the official SDK a client would use, and
directly to the real engine, and requires the same status and the same shape
(every key, at every depth). The router of this module checks client keys
(``router.api_keys``), as a deployment exposed to coding agents does: the
OpenAI SDK sends its key as a Bearer token, the Anthropic SDK as
``x-api-key``; the engine itself has no key.

The stack (the `stack` fixture) and the HTTP helpers are in ``conftest.py``.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import pytest

pytestmark = pytest.mark.real_engine

REQUIRED = os.environ.get("REAL_VLLM_REQUIRED") == "1"
try:
    import anthropic
    import openai
    from conftest import MAX_MODEL_LEN, MODEL, SERVED, VENV, Stack, http_get, http_post
except ImportError as e:  # the test extra is not installed
    if REQUIRED:
        raise
    pytest.skip(f"REAL vLLM ENGINE TESTS NEED the test extra: {e}", allow_module_level=True)

CLIENT_KEY = "sk-real-vllm-client"
#: Merged into the router section of this module's stack (see conftest.py).
ROUTER_SETTINGS = {"api_keys": [CLIENT_KEY]}
AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "responses_bench.sh"
GREEDY = {"temperature": 0}
#: The same for the Anthropic SDK, which (2.x) no longer takes sampling parameters as arguments.
ANTHROPIC_GREEDY = {"extra_body": GREEDY}

T = TypeVar("T")


# --------------------------------------------------------------------------- helpers

def shape(value: Any) -> Any:
    """The skeleton of a JSON value: every key at every depth, and each leaf's type (not its value)."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value]
    return type(value).__name__


def on_both(stack: Stack, call: Callable[["openai.OpenAI"], T]) -> tuple[T, T]:
    """`call` with the OpenAI SDK on the router (with the client key), then on the engine directly."""
    return call(stack.client(api_key=CLIENT_KEY)), call(stack.client(stack.engine))


def anthropic_client(base: str, api_key: str = CLIENT_KEY) -> "anthropic.Anthropic":
    """The Anthropic SDK on `base` (it appends /v1/messages), sending `api_key` as x-api-key; no retries,
    so the first answer's status is the one seen."""
    return anthropic.Anthropic(base_url=base, api_key=api_key, max_retries=0, timeout=90)


def anthropic_on_both(stack: Stack, call: Callable[["anthropic.Anthropic"], T]) -> tuple[T, T]:
    """`call` with the Anthropic SDK on the router, then on the engine directly."""
    return call(anthropic_client(stack.router)), call(anthropic_client(stack.engine, "unused"))


def post_both(stack: Stack, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """POST `body` to `path` through the router (with the client key) and to the engine (naming the model
    by the one name vLLM serves): both JSON answers, after checking both are 200."""
    direct = {**body, "model": SERVED}
    (rs, rb), (ds, db) = http_post(stack.router + path, body, headers=AUTH), http_post(stack.engine + path, direct)
    assert (rs, ds) == (200, 200), (path, rs, rb[:500], ds, db[:500])
    return json.loads(rb), json.loads(db)


def assert_same_shape(via_router: Any, direct: Any) -> None:
    assert shape(via_router) == shape(direct), (
        f"the router's answer differs in shape from the engine's:\nrouter: {json.dumps(via_router)[:3000]}\n"
        f"engine: {json.dumps(direct)[:3000]}")


def response_text(response: dict[str, Any]) -> str:
    """The output text of a Responses API answer (JSON), as the SDK's `output_text` joins it."""
    return "".join(part["text"] for item in response["output"] if item["type"] == "message"
                   for part in item["content"] if part["type"] == "output_text")


def tokens_used(response: dict[str, Any]) -> tuple[int, int]:
    """(input, output) tokens of a Responses answer; cached-token counts differ with the prefix cache."""
    return response["usage"]["input_tokens"], response["usage"]["output_tokens"]


# --------------------------------------------------------------------------- /v1/models, /upstream

def test_models_carry_the_engines_max_model_len(stack: Stack):
    direct = json.loads(http_get(stack.engine + "/v1/models")[1])["data"]
    assert [m["id"] for m in direct] == [SERVED] and direct[0]["max_model_len"] == MAX_MODEL_LEN

    def listed() -> dict[str, dict[str, Any]]:
        status, body = http_get(stack.router + "/v1/models", headers=AUTH)
        assert status == 200, body
        return {m["id"]: m for m in json.loads(body)["data"]}

    # The router reads the engine's card with its health probes (every second here).
    deadline = time.monotonic() + 15
    while "max_model_len" not in listed().get(SERVED, {}) and time.monotonic() < deadline:
        time.sleep(0.5)
    models = listed()
    for name in (SERVED, str(MODEL)):
        assert models[name]["max_model_len"] == direct[0]["max_model_len"], models[name]
        assert models[name]["root"] == direct[0]["root"] and models[name]["owned_by"] == "vllm", models[name]
        # Every key the engine reports is there.
        assert set(models[name]) >= set(direct[0]), sorted(set(direct[0]) - set(models[name]))
    # The SDK's retrieve: the same entry.
    one = stack.client(api_key=CLIENT_KEY).models.retrieve(SERVED)
    assert one.id == SERVED and one.model_dump().get("max_model_len") == MAX_MODEL_LEN
    assert http_get(f"{stack.router}/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401


def test_upstream_reaches_the_engines_own_api_from_loopback(stack: Stack):
    # vLLM's GET /version, which the router does not serve itself; loopback needs no admin key.
    via_router = http_get(f"{stack.router}/upstream/{SERVED}/version")
    assert via_router == http_get(stack.engine + "/version")
    assert via_router[0] == 200 and json.loads(via_router[1])["version"].startswith("0.")


# --------------------------------------------------------------------------- Responses API

def test_responses_create(stack: Stack):
    kwargs = dict(model=SERVED, input="Hello router", max_output_tokens=6, **GREEDY)
    raw_router, raw_direct = on_both(stack, lambda c: c.responses.with_raw_response.create(**kwargs))
    assert raw_router.status_code == raw_direct.status_code == 200
    r, d = raw_router.http_response.json(), raw_direct.http_response.json()
    assert_same_shape(r, d)
    assert r["object"] == "response" and r["id"].startswith("resp_") and r["model"] == SERVED
    assert response_text(r) == response_text(d) and response_text(r)
    assert tokens_used(r) == tokens_used(d) and tokens_used(r)[1] <= 6
    # The SDK parses the router's answer as it parses the engine's.
    assert raw_router.parse().output_text == raw_direct.parse().output_text


def stream_events(client: "openai.OpenAI", **kwargs: Any) -> list[dict[str, Any]]:
    """Every event of a streamed Responses call, as JSON-able dicts."""
    return [e.model_dump() for e in client.responses.create(stream=True, **kwargs)]


def event_kinds(events: list[dict[str, Any]]) -> list[str]:
    """The event types in order, a run of one type counted once: vLLM merges the tokens a slow reader has
    not taken yet into one delta, so how many deltas a stream has depends on timing, not on the router."""
    kinds: list[str] = []
    for e in events:
        if not kinds or kinds[-1] != e["type"]:
            kinds.append(e["type"])
    return kinds


def final_response(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The response the terminal event (completed or incomplete) of a stream carries."""
    terminal = [e for e in events if e["type"] in ("response.completed", "response.incomplete")]
    assert len(terminal) == 1, [e["type"] for e in events]
    return terminal[0]["response"]


def test_responses_stream(stack: Stack):
    kwargs = dict(model=SERVED, input="Hello router", max_output_tokens=6, **GREEDY)
    r, d = on_both(stack, lambda c: stream_events(c, **kwargs))
    assert event_kinds(r) == event_kinds(d)
    assert r[0]["type"] == "response.created" and r[0]["response"]["id"].startswith("resp_")
    text = "".join(e["delta"] for e in r if e["type"] == "response.output_text.delta")
    assert text and text == "".join(e["delta"] for e in d if e["type"] == "response.output_text.delta")
    assert response_text(final_response(r)) == text == response_text(final_response(d))
    assert_same_shape(final_response(r), final_response(d))


def test_responses_follow_up_with_previous_response_id(stack: Stack):
    """A follow-up names the first response: the engine prepends that conversation, so it sees more input."""
    first = dict(model=SERVED, input="My name is Ada.", max_output_tokens=4, **GREEDY)
    then = dict(model=SERVED, input="What is my name?", max_output_tokens=4, **GREEDY)

    def conversation(client: "openai.OpenAI") -> tuple[Any, Any]:
        made = client.responses.create(**first)
        return made, client.responses.create(previous_response_id=made.id, **then)

    (r1, r2), (d1, d2) = on_both(stack, conversation)
    alone = stack.client(api_key=CLIENT_KEY).responses.create(**then)
    assert r2.previous_response_id == r1.id and d2.previous_response_id == d1.id
    assert r2.usage.input_tokens == d2.usage.input_tokens > alone.usage.input_tokens
    assert r2.output_text == d2.output_text
    assert_same_shape(r2.model_dump(), d2.model_dump())


def test_responses_follow_up_of_a_streamed_response(stack: Stack):
    """The router learns a streamed response's id from its response.created event."""
    client = stack.client(api_key=CLIENT_KEY)
    events = stream_events(client, model=SERVED, input="My name is Ada.", max_output_tokens=4, **GREEDY)
    made = final_response(events)
    follow = client.responses.create(model=SERVED, input="What is my name?", previous_response_id=made["id"],
                                     max_output_tokens=4, **GREEDY)
    assert follow.previous_response_id == made["id"] and follow.status in ("completed", "incomplete")
    assert client.responses.retrieve(made["id"]).id == made["id"]


def test_responses_retrieve(stack: Stack):
    client = stack.client(api_key=CLIENT_KEY)
    made = client.responses.create(model=SERVED, input="Hello router", max_output_tokens=5, store=True, **GREEDY)
    got, direct = on_both(stack, lambda c: c.responses.with_raw_response.retrieve(made.id))
    assert got.status_code == direct.status_code == 200
    # The same stored response, read through the router and from the engine.
    assert got.http_response.json() == direct.http_response.json()
    assert got.parse().id == made.id and got.parse().output_text == made.output_text


def test_responses_cancel_of_a_finished_response_is_the_engines_answer(stack: Stack):
    made = stack.client(api_key=CLIENT_KEY).responses.create(model=SERVED, input="Hi", max_output_tokens=2, **GREEDY)
    path = f"/v1/responses/{made.id}/cancel"
    via_router = http_post(stack.router + path, headers=AUTH)
    assert via_router == http_post(stack.engine + path), via_router


def test_responses_background_run_is_cancelled(stack: Stack):
    """A background response still generating (450 tokens, ~1.5 s) is cancelled through the router
    as it is directly, and then reads back as cancelled."""
    def start_and_cancel(client: "openai.OpenAI") -> tuple[Any, Any, Any]:
        made = client.responses.create(model=SERVED, input="Hello router", max_output_tokens=450, background=True,
                                       store=True, extra_body={"ignore_eos": True})
        cancelled = client.responses.with_raw_response.cancel(made.id)
        return made, cancelled, client.responses.retrieve(made.id)

    (r_made, r_cancel, r_after), (d_made, d_cancel, d_after) = on_both(stack, start_and_cancel)
    assert r_made.status == d_made.status and r_made.status in ("queued", "in_progress"), r_made.status
    assert r_cancel.status_code == d_cancel.status_code == 200
    assert_same_shape(r_cancel.http_response.json(), d_cancel.http_response.json())
    assert r_cancel.parse().status == d_cancel.parse().status == "cancelled"
    assert r_after.status == d_after.status == "cancelled"


UNKNOWN_RESPONSE = "resp_0000000000000000"


@pytest.mark.parametrize("call", [
    lambda c: c.responses.retrieve(UNKNOWN_RESPONSE),
    lambda c: c.responses.create(model=SERVED, input="x", max_output_tokens=1, previous_response_id=UNKNOWN_RESPONSE),
], ids=["retrieve", "previous_response_id"])
def test_responses_unknown_id_is_a_404_like_the_engines(stack: Stack, call: Callable[["openai.OpenAI"], Any]):
    """The router answers an id it never saw itself (no replica to pin): with the engine's status and the
    OpenAI error shape."""
    def error_of(client: "openai.OpenAI") -> "openai.APIStatusError":
        with pytest.raises(openai.APIStatusError) as exc:
            call(client)
        return exc.value

    via_router, direct = on_both(stack, error_of)
    assert via_router.status_code == direct.status_code == 404, (via_router.body, direct.body)
    assert set(via_router.body) == set(direct.body), (via_router.body, direct.body)


# --------------------------------------------------------------------------- Anthropic Messages API

MESSAGES = [{"role": "user", "content": "Hello router"}]


def test_anthropic_messages_create(stack: Stack):
    kwargs = dict(model=SERVED, max_tokens=6, messages=MESSAGES, **ANTHROPIC_GREEDY)
    raw_router, raw_direct = anthropic_on_both(stack, lambda c: c.messages.with_raw_response.create(**kwargs))
    assert raw_router.status_code == raw_direct.status_code == 200
    r, d = raw_router.http_response.json(), raw_direct.http_response.json()
    assert_same_shape(r, d)
    assert r["type"] == "message" and r["role"] == "assistant" and r["model"] == SERVED
    assert r["content"] == d["content"] and r["content"][0]["text"]
    assert r["usage"] == d["usage"] and r["stop_reason"] == d["stop_reason"] == "max_tokens"


def test_anthropic_messages_stream(stack: Stack):
    def streamed(client: "anthropic.Anthropic") -> tuple[list[str], Any]:
        with client.messages.stream(model=SERVED, max_tokens=6, messages=MESSAGES, **ANTHROPIC_GREEDY) as s:
            kinds = event_kinds([{"type": event.type} for event in s])
            return kinds, s.get_final_message()

    (r_kinds, r_final), (d_kinds, d_final) = anthropic_on_both(stack, streamed)
    assert r_kinds == d_kinds and r_kinds[0] == "message_start" and r_kinds[-1] == "message_stop"
    assert r_final.content[0].text == d_final.content[0].text and r_final.content[0].text
    assert r_final.usage.output_tokens == d_final.usage.output_tokens
    assert r_final.stop_reason == d_final.stop_reason


def test_anthropic_count_tokens(stack: Stack):
    r, d = anthropic_on_both(stack, lambda c: c.messages.count_tokens(model=SERVED, messages=MESSAGES))
    assert r.input_tokens == d.input_tokens > 0


def test_anthropic_bearer_key_is_accepted_too(stack: Stack):
    """The SDK's `auth_token` sends Authorization: Bearer, which every client path accepts."""
    client = anthropic.Anthropic(base_url=stack.router, auth_token=CLIENT_KEY, max_retries=0, timeout=90)
    assert client.messages.create(model=SERVED, max_tokens=2, messages=MESSAGES).content[0].text


def test_anthropic_wrong_key_is_an_anthropic_401(stack: Stack):
    with pytest.raises(anthropic.AuthenticationError) as exc:
        anthropic_client(stack.router, "sk-wrong").messages.create(model=SERVED, max_tokens=2, messages=MESSAGES)
    assert exc.value.status_code == 401
    body = exc.value.body
    assert body["type"] == "error" and body["error"]["type"] == "authentication_error", body
    assert CLIENT_KEY not in json.dumps(body)


def test_anthropic_unknown_model_is_an_anthropic_404(stack: Stack):
    with pytest.raises(anthropic.NotFoundError) as exc:
        anthropic_client(stack.router).messages.create(model="no-such-model", max_tokens=2, messages=MESSAGES)
    body = exc.value.body
    assert body["type"] == "error" and body["error"]["type"] == "not_found_error", body
    assert "no-such-model" in body["error"]["message"]


# --------------------------------------------------------------------------- other vLLM paths

@pytest.mark.parametrize("name", [SERVED, str(MODEL)], ids=["served-name", "model-path"])
def test_tokenize_detokenize_round_trip(stack: Stack, name: str):
    # By the model path the router rewrites the name to the one vLLM serves: the same tokens.
    r, d = post_both(stack, "/tokenize", {"model": name, "prompt": "Hello router"})
    assert r == d
    assert r["count"] == len(r["tokens"]) > 0 and r["max_model_len"] == MAX_MODEL_LEN
    back_router, back_direct = post_both(stack, "/detokenize", {"model": name, "tokens": r["tokens"]})
    assert back_router == back_direct
    assert back_router["prompt"].strip() == "Hello router", back_router


def test_chat_completions_batch(stack: Stack):
    body = {"model": SERVED, "max_tokens": 4, "messages": [[{"role": "user", "content": "hi"}],
                                                           [{"role": "user", "content": "Hello router"}]], **GREEDY}
    r, d = post_both(stack, "/v1/chat/completions/batch", body)
    assert_same_shape(r, d)
    assert [c["index"] for c in r["choices"]] == [0, 1]
    assert [c["message"]["content"] for c in r["choices"]] == [c["message"]["content"] for c in d["choices"]]
    assert r["usage"]["completion_tokens"] == d["usage"]["completion_tokens"]


@pytest.mark.parametrize("body", [
    {"prompt": "Hello router", "max_tokens": 4},
    {"messages": [{"role": "user", "content": "Hello router"}], "max_tokens": 4},
], ids=["completion", "chat"])
def test_invocations(stack: Stack, body: dict[str, Any]):
    """SageMaker's /invocations: vLLM picks the API by the body's fields."""
    r, d = post_both(stack, "/invocations", {"model": SERVED, **body, **GREEDY})
    assert_same_shape(r, d)
    assert r["object"] == d["object"] == ("text_completion" if "prompt" in body else "chat.completion")
    assert [choice_text(c) for c in r["choices"]] == [choice_text(c) for c in d["choices"]]


def choice_text(choice: dict[str, Any]) -> str:
    """A completion choice's text or a chat choice's message content."""
    return choice["text"] if "text" in choice else choice["message"]["content"]


def test_client_paths_need_the_client_key(stack: Stack):
    for path, body in (("/tokenize", {"model": SERVED, "prompt": "x"}),
                       ("/v1/responses", {"model": SERVED, "input": "x", "max_output_tokens": 1})):
        status, raw = http_post(stack.router + path, body, headers={"Authorization": "Bearer sk-wrong"})
        assert status == 401, (path, status, raw)
        assert json.loads(raw)["error"]["type"] == "authentication_error"


# --------------------------------------------------------------------------- vLLM's own benchmark

def test_vllm_bench_serve_openai_responses_through_the_router(stack: Stack):
    """`vllm bench serve --backend openai-responses`: vLLM's own client streams 20 Responses through the
    router, 4 at a time, and counts every one completed (benchmarks/responses_bench.sh)."""
    env = {**os.environ, "VENV": str(VENV), "OPENAI_API_KEY": CLIENT_KEY, "NUM_PROMPTS": "20"}
    t0 = time.monotonic()
    r = subprocess.run(["bash", str(BENCH), stack.router, SERVED, str(MODEL)], env=env, capture_output=True,
                       text=True, timeout=240)
    stack.timings["bench_s"] = time.monotonic() - t0
    summary = r.stdout[r.stdout.find("Serving Benchmark Result"):] if "Serving Benchmark Result" in r.stdout else ""
    print(summary)
    assert r.returncode == 0, f"bench failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"

    def figure(label: str) -> float:
        found = re.search(rf"^{re.escape(label)}\s+([\d.]+)", r.stdout, re.MULTILINE)
        assert found, f"no '{label}' in the bench output:\n{r.stdout[-3000:]}"
        return float(found.group(1))

    assert figure("Successful requests:") == 20, summary
    assert figure("Failed requests:") == 0, summary
    assert figure("Total generated tokens:") == 20 * 16, summary
    stack.timings["bench_req_per_s"] = figure("Request throughput (req/s):")
