"""The simulated engine's client paths beyond completions and chat, in each dialect:
vLLM's Responses (store, retrieve, cancel, follow-ups, background), Anthropic
Messages (whole, streamed, errors), tokenizer, batch chat, invocations, multipart
audio and its 404 pooling paths; SGLang's paths; and that every path the router
routes to an engine (router/engines) is one its simulator serves.

Field-by-field shapes against real vLLM are checked by
tests/real_vllm/test_sim_matches_captured.py; these tests pin behaviour and text.
"""
from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest
from helpers import wait_for_async
from test_sim import CHAT, Sim, anyio_backend, make_sim  # noqa: F401  (fixtures)

from router.engines import ENGINES
from router.sim import textgen

pytestmark = pytest.mark.anyio
HELLO = {"model": "tiny", "input": "Hello", "max_output_tokens": 4}
MESSAGES = {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
#: vLLM mounts these only for a pooling model; the simulated model is generative (404, as real vLLM).
VLLM_POOLING = {"/v1/embeddings", "/pooling", "/classify", "/score", "/v1/score", "/rerank", "/v1/rerank", "/v2/rerank"}


def named_events(body: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event, data) of each ``event:``/``data:`` pair of an SSE body."""
    out = []
    for block in body.split(b"\n\n"):
        if block.strip():
            head, data = block.split(b"\n", 1)
            assert head.startswith(b"event: ") and data.startswith(b"data: "), block
            out.append((head[7:].decode(), orjson.loads(data[6:])))
    return out


def text_of(response: dict[str, Any]) -> str:
    return "".join(part["text"] for item in response["output"] for part in item["content"])


async def json_post(sim: Sim, path: str, body: Any) -> tuple[int, Any]:
    status, _, raw = await sim.post(path, body)
    return status, orjson.loads(raw)


# ------------------------------------------------------------------ Responses
async def test_responses_are_stored_retrieved_and_continued(make_sim) -> None:
    sim = await make_sim()
    status, first = await json_post(sim, "/v1/responses", HELLO)
    assert status == 200 and first["id"].startswith("resp_") and first["object"] == "response"
    assert text_of(first) == textgen.generate("user: Hello", 4)
    assert (first["status"], first["incomplete_details"]) == ("incomplete", {"reason": "max_output_tokens"})
    assert first["usage"]["input_tokens"] == 2 and first["usage"]["output_tokens"] == 4
    status, _, raw = await sim.get(f"/v1/responses/{first['id']}")
    assert status == 200 and orjson.loads(raw) == first
    # A finished (synchronous) response cannot be cancelled, as in vLLM.
    status, err = await json_post(sim, f"/v1/responses/{first['id']}/cancel", None)
    assert status == 400 and err["error"] == {"message": "Cannot cancel a synchronous response.",
                                              "type": "invalid_request_error", "param": "response_id", "code": 400}
    # A follow-up continues the stored conversation: its prompt holds the first turn and its answer.
    status, second = await json_post(sim, "/v1/responses", {**HELLO, "input": "More", "previous_response_id": first["id"]})
    prompt = f"user: Hello\nassistant: {text_of(first)}\nuser: More"
    assert status == 200 and second["previous_response_id"] == first["id"]
    assert text_of(second) == textgen.generate(prompt, 4)
    # store=false: answered, never retrievable.
    _, unstored = await json_post(sim, "/v1/responses", {**HELLO, "store": False})
    assert (await sim.get(f"/v1/responses/{unstored['id']}"))[0] == 404


async def test_unknown_response_ids_are_404_in_vllm_words(make_sim) -> None:
    sim = await make_sim()
    want = {"message": "Response with id 'resp_nope' not found.", "type": "invalid_request_error",
            "param": "response_id", "code": 404}
    for status, body in (await json_post(sim, "/v1/responses/resp_nope/cancel", None),
                         await json_post(sim, "/v1/responses", {**HELLO, "previous_response_id": "resp_nope"})):
        assert (status, body["error"]) == (404, want)
    status, _, raw = await sim.get("/v1/responses/resp_nope")
    assert status == 404 and orjson.loads(raw)["error"] == want
    assert (await sim.get("/v1/responses/a/b"))[0] == 404


async def test_responses_stream_events_and_the_streamed_response_is_stored(make_sim) -> None:
    sim = await make_sim()
    status, headers, raw = await sim.post("/v1/responses", {**HELLO, "stream": True})
    assert status == 200 and headers["Content-Type"] == "text/event-stream; charset=utf-8"
    events = named_events(raw)
    assert [name for name, _ in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        *["response.output_text.delta"] * 4, "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed"]
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    text = "".join(data["delta"] for name, data in events if name == "response.output_text.delta")
    assert text == textgen.generate("user: Hello", 4) == events[-4][1]["text"]
    rid = events[0][1]["response"]["id"]
    status, _, got = await sim.get(f"/v1/responses/{rid}")
    assert status == 200 and orjson.loads(got) == events[-1][1]["response"]


async def test_background_responses_run_after_the_answer_and_can_be_cancelled(make_sim) -> None:
    sim = await make_sim(itl_ms=20)
    _, queued = await json_post(sim, "/v1/responses", {**HELLO, "background": True, "max_output_tokens": 200})
    assert queued["status"] == "queued" and queued["output"] == []
    status, cancelled = await json_post(sim, f"/v1/responses/{queued['id']}/cancel", None)
    assert status == 200 and cancelled["status"] == "cancelled"
    _, _, raw = await sim.get(f"/v1/responses/{queued['id']}")
    assert orjson.loads(raw)["status"] == "cancelled"
    _, short = await json_post(sim, "/v1/responses", {**HELLO, "background": True, "max_output_tokens": 2})

    async def done() -> bool:
        return orjson.loads((await sim.get(f"/v1/responses/{short['id']}"))[2])["status"] == "incomplete"

    await wait_for_async(done)
    status, err = await json_post(sim, "/v1/responses", {**HELLO, "background": True, "store": False})
    assert status == 400 and err["error"]["param"] == "background"


# ------------------------------------------------------------------ Messages
async def test_anthropic_messages_whole_and_stop_sequences(make_sim) -> None:
    sim = await make_sim()
    status, got = await json_post(sim, "/v1/messages", {**MESSAGES, "system": "be brief"})
    prompt = "system: be brief\nuser: hi"
    assert status == 200 and got["id"].startswith("chatcmpl-") and got["type"] == "message"
    assert got["content"] == [{"type": "text", "text": textgen.generate(prompt, 4)}]
    assert (got["stop_reason"], got["usage"]) == ("max_tokens", {"input_tokens": 5, "output_tokens": 4})
    assert "stop_sequence" not in got  # vLLM drops nulls from a whole answer
    stop = textgen.generate(prompt, 3).split()[-1]
    _, got = await json_post(sim, "/v1/messages", {**MESSAGES, "system": "be brief", "stop_sequences": [stop]})
    assert (got["stop_reason"], got["stop_sequence"]) == ("stop_sequence", stop)
    status, count = await json_post(sim, "/v1/messages/count_tokens", {"model": "tiny", "messages": MESSAGES["messages"]})
    assert status == 200 and count == {"input_tokens": 2, "context_management": {"original_input_tokens": 2}}


async def test_anthropic_stream_is_anthropics_event_sequence(make_sim) -> None:
    sim = await make_sim()
    _, _, raw = await sim.post("/v1/messages", {**MESSAGES, "max_tokens": 3, "stream": True})
    events = named_events(raw)
    assert [name for name, _ in events] == ["message_start", "content_block_start", *["content_block_delta"] * 3,
                                            "content_block_stop", "message_delta", "message_stop"]
    assert all(data["type"] == name for name, data in events)
    assert events[0][1]["message"]["usage"] == {"input_tokens": 2, "output_tokens": 0}
    assert "".join(d["delta"]["text"] for _, d in events[2:5]) == textgen.generate("user: hi", 3)
    assert events[6][1]["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert events[6][1]["usage"] == {"input_tokens": 2, "output_tokens": 3}
    assert b"[DONE]" not in raw


async def test_anthropic_errors_engine_ones_anthropic_shaped_validation_ones_openai_shaped(make_sim) -> None:
    sim = await make_sim()
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        status, err = await json_post(sim, path, {**MESSAGES, "model": "nope", "stream": True})
        assert status == 404 and err == {"type": "error", "error": {
            "type": "NotFoundError", "message": "The model `nope` does not exist. Valid aliases: tiny."}}
    status, err = await json_post(sim, "/v1/messages", {**MESSAGES, "max_tokens": 10**6})
    assert status == 400 and err["error"]["type"] == "BadRequestError" and "max_completion_tokens" in err["error"]["message"]
    status, err = await json_post(sim, "/v1/messages", {"model": "tiny", "messages": MESSAGES["messages"]})
    assert status == 400 and err["error"]["type"] == "Bad Request" and err["error"]["param"] == "body.max_tokens"


# ------------------------------------------- tokenizer, batch, invocations
async def test_tokenize_detokenize_round_trip_generated_text(make_sim) -> None:
    sim = await make_sim()
    text = textgen.generate("x", 5)
    status, got = await json_post(sim, "/tokenize", {"model": "tiny", "prompt": text, "return_token_strs": True})
    assert status == 200 and got["count"] == 5 and got["max_model_len"] == 4096 and got["token_strs"] == text.split()
    _, back = await json_post(sim, "/detokenize", {"model": "tiny", "tokens": got["tokens"]})
    assert back == {"prompt": text}
    _, chat = await json_post(sim, "/tokenize", {"messages": MESSAGES["messages"]})
    assert chat["count"] == 2 and chat["token_strs"] is None
    assert (await json_post(sim, "/detokenize", {"tokens": "x"}))[1]["error"]["param"] == "body.tokens"
    assert (await json_post(sim, "/tokenize", {"model": "nope", "prompt": "a"}))[0] == 404


async def test_chat_batch_answers_each_conversation_and_invocations_dispatch_by_body(make_sim) -> None:
    sim = await make_sim()
    convs = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "yo"}]]
    status, got = await json_post(sim, "/v1/chat/completions/batch", {"model": "tiny", "messages": convs,
                                                                      "max_tokens": 2, "stream": True})
    assert status == 200 and got["object"] == "chat.completion"
    assert [c["message"]["content"] for c in got["choices"]] == [textgen.generate("user: hi", 2),
                                                                 textgen.generate("user: yo", 2)]
    status, err = await json_post(sim, "/v1/chat/completions/batch", CHAT)
    assert status == 400 and err["error"]["param"] == "body.messages.0"
    _, chat = await json_post(sim, "/invocations", CHAT)
    _, completion = await json_post(sim, "/invocations", {"prompt": "Hello", "max_tokens": 2})
    assert (chat["object"], completion["object"]) == ("chat.completion", "text_completion")
    status, err = await json_post(sim, "/invocations", {"input": "x"})
    assert status == 400 and err["error"]["message"] == ("Either prompt or prompt_embeds must be provided and "
                                                         "non-empty. (parameter=prompt)")


# --------------------------------------------------------------------- audio
async def _audio(sim: Sim, path: str, fields: dict[str, Any]) -> tuple[int, Any]:
    form = aiohttp.FormData(default_to_multipart=True)
    for name, value in fields.items():
        if isinstance(value, bytes):
            form.add_field(name, value, filename="a.wav", content_type="audio/wav")
        else:
            form.add_field(name, value)
    async with sim.http.post(sim.url + path, data=form) as r:
        return r.status, orjson.loads(await r.read())


async def test_audio_transcriptions_and_translations_read_multipart_forms(make_sim) -> None:
    sim = await make_sim()
    audio = bytes(range(256)) * 300  # 76,800 bytes: 76 words capped at 64, 3 seconds
    text, seconds = textgen.transcript(audio)
    assert (len(text.split()), seconds) == (64, 3)
    status, got = await _audio(sim, "/v1/audio/transcriptions", {"model": "tiny", "file": audio})
    assert status == 200 and got == {"text": text, "usage": {"type": "duration", "seconds": 3}}
    status, got = await _audio(sim, "/v1/audio/translations", {"file": audio, "model": "tiny"})
    assert status == 200 and got == {"text": text}
    status, got = await _audio(sim, "/v1/audio/transcriptions", {"model": "nope", "file": audio})
    assert status == 404 and got["error"]["type"] == "NotFoundError"
    status, got = await _audio(sim, "/v1/audio/transcriptions", {"model": "tiny"})
    assert status == 400 and got["error"]["param"] == "body.file"
    status, _, _ = await sim.post("/v1/audio/transcriptions", {"model": "tiny"})  # JSON, not a form
    assert status == 400


# ----------------------------------------------------------- paths per engine
@pytest.mark.parametrize("engine", sorted(n for n in ENGINES if n != "openai"))
async def test_every_routed_client_path_is_served(make_sim, engine: str) -> None:
    """Each path the router sends to an engine answers something other than FastAPI's 404,
    but for vLLM's pooling paths, which a generative vLLM does not mount (404 as real vLLM)."""
    sim = await make_sim(engine)
    for path in ENGINES[engine].client_paths:
        status, _, raw = await sim.post(path, {"model": "tiny"})
        unmounted = raw == b'{"detail":"Not Found"}'
        assert unmounted == (engine == "vllm" and path in VLLM_POOLING), (engine, path, status, raw[:200])


async def test_openai_dialect_serves_no_extra_paths(make_sim) -> None:
    sim = await make_sim("openai")
    for path in ("/v1/responses", "/v1/messages", "/tokenize"):
        assert (await sim.post(path, HELLO))[0] == 404


async def test_sglang_paths(make_sim) -> None:
    sim = await make_sim("sglang")
    status, response = await json_post(sim, "/v1/responses", HELLO)
    assert status == 200 and text_of(response) == textgen.generate("user: Hello", 4)
    assert (await sim.get(f"/v1/responses/{response['id']}"))[0] == 200
    for prefix in ("", "/v1"):
        _, got = await json_post(sim, f"{prefix}/tokenize", {"prompt": "alpha bravo"})
        assert got == {"tokens": [0, 1], "count": 2, "max_model_len": 4096}
        _, got = await json_post(sim, f"{prefix}/detokenize", {"tokens": [0, 1]})
        assert got == {"text": " alpha bravo"}
    _, got = await json_post(sim, "/v1/score", {"query": "q", "items": ["a", "b"], "label_token_ids": [1, 2]})
    assert got["object"] == "scoring" and len(got["scores"]) == 2
    assert all(len(s) == 2 and abs(sum(s) - 1) < 1e-9 for s in got["scores"])
    _, ranked = await json_post(sim, "/v1/rerank", {"query": "q", "documents": ["a", "b", "c"]})
    assert sorted(r["index"] for r in ranked) == [0, 1, 2]
    assert [r["score"] for r in ranked] == sorted((r["score"] for r in ranked), reverse=True)
    _, classified = await json_post(sim, "/v1/classify", {"input": ["a", "b"]})
    assert [d["index"] for d in classified["data"]] == [0, 1] and classified["data"][0]["num_classes"] == 2
    _, chat = await json_post(sim, "/invocations", CHAT)
    assert chat["object"] == "chat.completion"
    _, embedded = await json_post(sim, "/v1/embeddings", {"input": "a"})
    assert len(embedded["data"][0]["embedding"]) == textgen.EMBEDDING_DIMS
