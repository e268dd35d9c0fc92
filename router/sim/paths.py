"""The client paths beyond completions and chat: Responses, Anthropic Messages, tokenizer,
batch chat, SageMaker invocations, audio, and SGLang's scoring paths.

Each handler validates in the engine's words and hands generation to
`SimCore.run` with a `Shape` of its own API, so timing, faults, the sleep
gate and the queue behave as for chat. What real vLLM 0.32 answers for each
path is in tests/real_vllm/FINDINGS.md; the SGLang shapes are approximations
of SGLang's serving code (noted where they are guesses). Which dialect serves
which path is the dialect's own choice (its routes in *_api.py).
"""
from __future__ import annotations

import asyncio
import time
import zlib
from typing import Any, Awaitable, Callable, Optional

import orjson

from . import anthropic, textgen
from .core import SimCore
from .errors import ApiError
from .forms import FormError, parse_form
from .http import Request, Responder
from .responses import ResponseRequest, ResponsesShape, ResponseStore, conversation, input_messages

Route = Callable[[Request, Responder], Awaitable[None]]
RESPONSES_PREFIX = "/v1/responses/"


class Detached:
    """The Responder of a background response: nobody reads it; cancel() stops its generation."""

    started = finished = False

    def __init__(self) -> None:
        self._cancelled = asyncio.get_running_loop().create_future()

    @property
    def disconnected(self) -> bool:
        return self._cancelled.done()

    def wait_disconnect(self) -> "asyncio.Future[None]":
        return self._cancelled

    def cancel(self) -> None:
        if not self._cancelled.done():
            self._cancelled.set_result(None)

    def send(self, status: int, body: bytes, *args: Any, **kwargs: Any) -> None:
        self.started = self.finished = True


class PathApis:
    """The handlers of the client paths beyond completions and chat, over one engine; a dialect's
    routes pick the ones it serves."""

    def __init__(self, core: SimCore):
        self.engine = core
        self.store = ResponseStore()
        self._background: dict[str, Detached] = {}

    def prefixed(self, method: str, path: str) -> Optional[Callable[[Request, Responder], Awaitable[None]]]:
        """GET /v1/responses/{id} and POST /v1/responses/{id}/cancel, for a dialect serving /v1/responses."""
        if not path.startswith(RESPONSES_PREFIX):
            return None
        rest = path[len(RESPONSES_PREFIX):]
        if method == "GET" and rest and "/" not in rest:
            return lambda req, resp: self.retrieve(rest, resp)
        if method == "POST" and rest.endswith("/cancel") and rest.count("/") == 1:
            return lambda req, resp: self.cancel(rest[:-len("/cancel")], resp)
        return None

    # ------------------------------------------------------------ Responses
    def _stored(self, rid: str) -> ResponsesShape:
        shape = self.store.get(rid)
        if shape is None:
            raise ApiError(404, f"Response with id '{rid}' not found.", "invalid_request_error", "response_id")
        return shape

    async def responses(self, req: Request, resp: Responder) -> None:
        e = self.engine
        e.counters.requests += 1
        body = e.reader.json_body(req)
        model = e.reader.model(body)
        if "input" not in body:
            raise e.reader.invalid("body.input", "missing", "Field required", f"<dict of {len(body)} items>")
        store, background = body.get("store") is not False, body.get("background") is True
        if background and not store:
            raise ApiError(400, "background can only be used when `store` is true (parameter=background)",
                           param="background")
        previous = body.get("previous_response_id")
        try:
            messages = input_messages(body["input"])
        except ValueError as err:
            raise ApiError(400, str(err), param="input") from None
        if isinstance(previous, str):
            messages = conversation(self._stored(previous)) + messages
        instructions = body.get("instructions")
        system = [{"role": "system", "content": instructions}] if isinstance(instructions, str) else []
        gen = e.reader.generation({"model": model, "messages": system + messages, "stream": body.get("stream"),
                           "max_output_tokens": body.get("max_output_tokens")}, chat=True, max_key="max_output_tokens")
        request = ResponseRequest(
            rid="resp_" + e.dialect.hex_id(), model=model, max_output_tokens=gen.max_tokens, messages=messages,
            instructions=instructions, previous_response_id=previous, temperature=_number(body, "temperature"),
            top_p=_number(body, "top_p"), background=background, store=store)
        gen.shape = shape = ResponsesShape(request, "msg_" + e.dialect.hex_id(), self.store)
        if not background or gen.stream:
            await e.run(gen, resp)
            return
        self.store.put(shape)  # queued, answered now; generated in the background
        detached = self._background[request.rid] = Detached()
        task = asyncio.ensure_future(e.run(gen, detached))  # type: ignore[arg-type]
        task.add_done_callback(lambda _: self._background.pop(request.rid, None))
        resp.send(200, orjson.dumps(shape.body))

    async def retrieve(self, rid: str, resp: Responder) -> None:
        resp.send(200, orjson.dumps(self._stored(rid).body))

    async def cancel(self, rid: str, resp: Responder) -> None:
        """vLLM cancels only a background response still queued or running; others answer 400."""
        shape = self._stored(rid)
        if shape.body["status"] not in ("queued", "in_progress"):
            raise ApiError(400, "Cannot cancel a synchronous response.", "invalid_request_error", "response_id")
        shape.body = {**shape.body, "status": "cancelled"}
        detached = self._background.pop(rid, None)
        if detached is not None:
            detached.cancel()
        resp.send(200, orjson.dumps(shape.body))

    # ------------------------------------------------------------ Messages
    async def messages(self, req: Request, resp: Responder) -> None:
        e = self.engine
        e.counters.requests += 1
        body = e.reader.json_body(req)
        if "max_tokens" not in body:
            raise e.reader.invalid("body.max_tokens", "missing", "Field required", f"<dict of {len(body)} items>")
        stops = body.get("stop_sequences")
        async with self._anthropic_errors(resp):
            gen = e.reader.generation({"model": body.get("model"), "messages": anthropic.messages_prompt(body),
                               "max_completion_tokens": body["max_tokens"], "stop": stops,
                               "stream": body.get("stream")}, chat=True)
            gen.shape = anthropic.MessagesShape(e.dialect.new_id(True), gen.model, gen.prompt_tokens)
            await e.run(gen, resp)

    async def count_tokens(self, req: Request, resp: Responder) -> None:
        e = self.engine
        body = e.reader.json_body(req)
        async with self._anthropic_errors(resp):
            e.reader.model(body)
            n = textgen.count_tokens(self._chat_text(anthropic.messages_prompt(body)))
            resp.send(200, orjson.dumps({"input_tokens": n, "context_management": {"original_input_tokens": n}}))

    def _anthropic_errors(self, resp: Responder) -> "AnthropicErrors":
        return AnthropicErrors(self.engine.dialect.validation_type, resp)

    # ------------------------------------------------------------ tokenizer
    def _chat_text(self, messages: Any) -> str:
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list", param="messages")
        try:
            return textgen.chat_prompt(messages)
        except ValueError as err:
            raise ApiError(400, str(err), param="messages") from None

    async def tokenize(self, req: Request, resp: Responder) -> None:
        """vLLM and SGLang: ``count``, ``max_model_len``, ``tokens`` (vLLM adds ``token_strs``)."""
        e = self.engine
        body = e.reader.json_body(req)
        e.reader.model(body)
        if "messages" in body:
            text = self._chat_text(body["messages"])
        elif isinstance(body.get("prompt"), str):
            text = body["prompt"]
        else:
            raise ApiError(400, "prompt must be a string (or give messages)", param="prompt")
        resp.send(200, orjson.dumps(e.dialect.tokenized(textgen.token_ids(text), text, body)))

    async def detokenize(self, req: Request, resp: Responder) -> None:
        """vLLM answers ``{"prompt": text}``; SGLang ``{"text": text}`` (approximated)."""
        e = self.engine
        body = e.reader.json_body(req)
        e.reader.model(body)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise e.reader.invalid("body.tokens", "list_type", "Input should be a valid list", tokens)
        resp.send(200, orjson.dumps(e.dialect.detokenized(textgen.detokenize(tokens))))

    # ----------------------------------------------- batch chat, invocations
    async def chat_batch(self, req: Request, resp: Responder) -> None:
        """One chat.completion whose choice i answers conversation i; ``stream`` is ignored (as vLLM)."""
        e = self.engine
        e.counters.requests += 1
        body = e.reader.json_body(req)
        convs = body.get("messages")
        if not isinstance(convs, list) or not convs:
            raise e.reader.invalid("body.messages", "list_type", "Input should be a valid list", convs)
        for k, conv in enumerate(convs):
            if not isinstance(conv, list):
                shown = f"<dict of {len(conv)} items>" if isinstance(conv, dict) else conv
                raise e.reader.invalid(f"body.messages.{k}", "list_type", "Input should be a valid list", shown)
        prompts = [self._chat_text(conv) for conv in convs]
        gen = e.reader.generation({**body, "messages": convs[0], "stream": False, "stream_options": None}, chat=True)
        gen.prompts = prompts
        gen.prompt_tokens = sum(textgen.count_tokens(p) for p in prompts)
        await e.run(gen, resp)

    async def invocations(self, req: Request, resp: Responder) -> None:
        """vLLM's SageMaker entry: chat when the body has ``messages``, else a completion."""
        await self._invoke(req, resp, lambda body: "messages" in body)

    async def invocations_chat(self, req: Request, resp: Responder) -> None:
        """SGLang's SageMaker entry: its chat completions."""
        await self._invoke(req, resp, lambda body: True)

    async def _invoke(self, req: Request, resp: Responder, chat: Callable[[dict[str, Any]], bool]) -> None:
        e = self.engine
        e.counters.requests += 1
        body = e.reader.json_body(req)
        await e.run(e.reader.generation(body, chat(body)), resp)

    # ---------------------------------------------------------------- audio
    async def transcriptions(self, req: Request, resp: Responder) -> None:
        await self._audio(req, resp, with_usage=True)

    async def translations(self, req: Request, resp: Responder) -> None:
        await self._audio(req, resp, with_usage=False)

    async def _audio(self, req: Request, resp: Responder, with_usage: bool) -> None:
        """``{"text"}`` from the file's bytes (textgen.transcript); transcriptions add
        ``usage: {"type": "duration", "seconds"}`` as vLLM's TranscriptionResponse does."""
        e = self.engine
        try:
            form = parse_form(req.headers.get("content-type", ""), req.body)
        except FormError as err:
            raise ApiError(400, str(err), param="file") from None
        model = form.get("model")
        e.reader.model({} if model is None else {"model": model.decode("utf-8", "replace")})
        if "file" not in form:
            raise e.reader.invalid("body.file", "missing", "Field required", None)
        text, seconds = textgen.transcript(form["file"])
        answer: dict[str, Any] = {"text": text}
        if with_usage:
            answer["usage"] = {"type": "duration", "seconds": seconds}
        resp.send(200, orjson.dumps(answer))

    # ------------------------------------------------------- SGLang scoring
    async def sglang_score(self, req: Request, resp: Responder) -> None:
        """SGLang's decoder-only scoring (approximated): per item, one probability per
        ``label_token_ids`` entry, drawn from textgen.embedding of query + item."""
        e = self.engine
        body = e.reader.json_body(req)
        query, items, labels = body.get("query"), body.get("items"), body.get("label_token_ids")
        if isinstance(items, str):
            items = [items]
        if not isinstance(query, str) or not isinstance(items, list) or not isinstance(labels, list) or not labels:
            raise ApiError(400, "score needs query, items and label_token_ids", param="items")
        scores = [_probabilities(query + str(item), len(labels)) for item in items]
        resp.send(200, orjson.dumps({"scores": scores, "model": e.reader.model(body), "usage": None, "object": "scoring"}))

    async def sglang_rerank(self, req: Request, resp: Responder) -> None:
        """SGLang's /v1/rerank (approximated): documents best first as ``{score, document, index, meta_info}``."""
        e = self.engine
        body = e.reader.json_body(req)
        query, docs = body.get("query"), body.get("documents")
        if not isinstance(query, str) or not isinstance(docs, list) or not all(isinstance(d, str) for d in docs):
            raise ApiError(400, "rerank needs a query string and a list of document strings", param="documents")
        ranked = sorted(((_probabilities(query + d, 1)[0], d, i) for i, d in enumerate(docs)), key=lambda r: -r[0])
        resp.send(200, orjson.dumps([{"score": s, "document": d, "index": i,
                                      "meta_info": {"prompt_tokens": textgen.count_tokens(query + " " + d)}}
                                     for s, d, i in ranked]))

    async def sglang_classify(self, req: Request, resp: Responder) -> None:
        """SGLang's /v1/classify, shaped like vLLM's classify answer (approximated): two classes."""
        e = self.engine
        body = e.reader.json_body(req)
        model = e.reader.model(body)
        inputs = e.reader.prompts(body.get("input"), "input")
        data = []
        for i, text in enumerate(inputs):
            probs = _probabilities(text, 2)
            data.append({"index": i, "label": f"LABEL_{probs.index(max(probs))}", "probs": probs, "num_classes": 2})
        tokens = sum(textgen.count_tokens(t) for t in inputs)
        resp.send(200, orjson.dumps({
            "id": f"classify-{e.dialect.hex_id()}", "object": "list", "created": int(time.time()), "model": model,
            "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                                    "prompt_tokens_details": None}}))


class AnthropicErrors:
    """Re-words the engine's own errors (not request validation) raised inside it the Anthropic way."""

    def __init__(self, validation_type: str, resp: Responder):
        self._validation_type = validation_type
        self._resp = resp

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, kind: Any, err: Any, tb: Any) -> bool:
        if not isinstance(err, ApiError) or err.err_type == self._validation_type:
            return False
        self._resp.send(err.status, anthropic.error(err.err_type, err.message))
        return True


def _number(body: dict[str, Any], key: str) -> float:
    value = body.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 1.0


def _probabilities(text: str, n: int) -> list[float]:
    """n numbers in (0, 1) summing to 1, fixed by `text`."""
    weights = [1.0 + ((zlib.crc32(f"{k}:{text}".encode()) % 1000) / 1000.0) for k in range(n)]
    total = sum(weights)
    return [w / total for w in weights]
