"""How engines word their answers: bodies, ids, errors, stream chunks, metric names.

Only the shapes live here, field by field and in the engines' key order, with
the few behaviours that differ by engine as class flags; the behaviour common
to all lives in core.py, and each dialect's routes in its *_api.py module, which
names its answers' class here. Each engine module names its dialect
(`EngineSpec.sim_dialect`), a key of DIALECTS. The vLLM shapes are what real
vLLM 0.32.0 sent (tests/real_vllm/captured/, summarised in
tests/real_vllm/FINDINGS.md); the SGLang ones follow SGLang's protocol.py and
serving code (current main); the plain OpenAI one is vLLM's without vLLM's
extras in the model list, standing for any OpenAI-compatible server.
"""
from __future__ import annotations

import itertools
import os
import time
import zlib
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Sequence

import orjson

from .options import SimOptions


@dataclass(frozen=True)
class Choice:
    """One finished (or cut-off) output of a request."""

    index: int
    text: str
    finish_reason: Optional[str]
    stop_reason: Optional[str] = None


class EventStream(Protocol):
    """The SSE events of one streamed answer, whatever its API: what opens it, one
    event per token of choice `index`, and what closes it."""

    def opening(self, choices: int) -> list[bytes]: ...
    def token(self, index: int, text: str, finish: Optional[str] = None, stop: Optional[str] = None) -> bytes: ...
    def closing(self, prompt_tokens: int, completion_tokens: int) -> list[bytes]: ...


class Shape(Protocol):
    """How one API words a generation's answer: whole, or as an EventStream."""

    def whole(self, choices: Sequence[Choice], prompt_tokens: int, completion_tokens: int) -> bytes: ...
    def stream(self) -> EventStream: ...


class Stream:
    """The SSE chunks of one streamed completion or chat; each chunk is head + choice + tail."""

    __slots__ = ("_d", "chat", "include_usage", "_head", "_id_fields")

    def __init__(self, dialect: "Dialect", chat: bool, include_usage: bool, rid: str, created: int, model: str):
        self._d = dialect
        self.chat = chat
        self.include_usage = include_usage
        self._id_fields = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                           "created": created, "model": model}
        self._head = b"data: " + orjson.dumps(self._id_fields)[:-1] + b',"choices":['

    def opening(self, choices: int) -> list[bytes]:
        """Chat opens with a role chunk per choice; completions with nothing."""
        return [self.role(k) for k in range(choices)] if self.chat else []

    def closing(self, prompt_tokens: int, completion_tokens: int) -> list[bytes]:
        usage = [self.usage(prompt_tokens, completion_tokens)] if self.include_usage else []
        return usage + [b"data: [DONE]\n\n"]

    def role(self, index: int) -> bytes:
        return self._head + orjson.dumps(self._d.role_choice(index)) + b"]" + self._d.role_tail + b"}\n\n"

    def token(self, index: int, text: str, finish: Optional[str] = None, stop: Optional[str] = None) -> bytes:
        d = self._d
        tail = d.final_tail(self.chat, self.include_usage) if finish is not None else d.token_tail
        return self._head + orjson.dumps(d.token_choice(self.chat, index, text, finish, stop)) + b"]" + tail + b"}\n\n"

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        body = {**self._id_fields, "choices": [], "usage": self._d.stream_usage(prompt_tokens, completion_tokens),
                **self._d.usage_extras}
        return b"data: " + orjson.dumps(body) + b"\n\n"


class CompletionShape:
    """/v1/completions and /v1/chat/completions answers, in the dialect's words."""

    def __init__(self, dialect: "Dialect", chat: bool, include_usage: bool, model: str):
        self._d, self._chat, self._include_usage, self._model = dialect, chat, include_usage, model

    def whole(self, choices: Sequence[Choice], prompt_tokens: int, completion_tokens: int) -> bytes:
        return self._d.response(self._chat, self._d.new_id(self._chat), int(time.time()), self._model, choices,
                                prompt_tokens, completion_tokens)

    def stream(self) -> Stream:
        return self._d.stream(self._chat, self._include_usage, self._d.new_id(self._chat), int(time.time()),
                              self._model)


class Dialect:
    """What every engine shares; subclasses fill in their own fields."""

    #: The key of this dialect in DIALECTS.
    name = ""
    #: A request for a model the engine does not serve gets 404 (vLLM) rather than an answer.
    checks_model = False
    #: Whether LoRA load and unload answer plain text (vLLM 0.32: ``Success: LoRA adapter 'x' added
    #: successfully.``, no content type) rather than JSON.
    lora_text = False
    #: A generation arriving asleep waits for the wake (vLLM) rather than failing (SGLang).
    holds_while_asleep = True
    owned_by = ""
    metric_running = ""
    metric_waiting = ""
    metric_prompt_tokens = ""
    metric_generation_tokens = ""
    #: `type` of request-validation errors (bad JSON, wrong field type).
    validation_type = "BadRequestError"
    id_prefixes = {False: "cmpl-", True: "chatcmpl-"}
    role_tail = b""
    token_tail = b""
    usage_extras: dict[str, Any] = {}

    def __init__(self, options: SimOptions):
        self.options = options
        self._ids = itertools.count(1)
        self._id_base = os.urandom(4).hex()

    def key_guards(self, path: str) -> bool:
        """Whether --api-key guards `path`: vLLM checks only its /v1 routes."""
        return path.startswith("/v1")

    # -- ids and errors
    def hex_id(self) -> str:
        """16 hex digits, unique per process and cheap: a random half and a counter half."""
        return f"{self._id_base}{next(self._ids) & 0xFFFFFFFF:08x}"

    def new_id(self, chat: bool) -> str:
        return self.id_prefixes[chat] + self.hex_id()

    def error(self, status: int, message: str, err_type: str, param: Optional[str] = None) -> bytes:
        return orjson.dumps({"error": {"message": message, "type": err_type, "param": param, "code": status}})

    # -- /v1/models
    def model_card(self, name: str, created: int) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": self.owned_by,
                "root": self.options.model, "parent": None, "max_model_len": self.options.max_model_len}

    def models(self, created: int) -> bytes:
        return orjson.dumps({"object": "list", "data": [self.model_card(n, created) for n in self.options.names]})

    def embeddings(self, model: str, vectors: Sequence[Sequence[float]], prompt_tokens: int) -> bytes:
        """The OpenAI embeddings answer, one vector per input in order."""
        return orjson.dumps({
            "object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": list(v)} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}})

    # -- tokenizer
    def tokenized(self, ids: list[int], text: str, body: dict[str, Any]) -> dict[str, Any]:
        """/tokenize's answer (vLLM's words; ``token_strs`` when the request asks them)."""
        return {"count": len(ids), "max_model_len": self.options.max_model_len, "tokens": ids,
                "token_strs": text.split() if body.get("return_token_strs") else None}

    def detokenized(self, text: str) -> dict[str, Any]:
        return {"prompt": text}

    # -- whole responses
    def response(self, chat: bool, rid: str, created: int, model: str, choices: Sequence[Choice],
                 prompt_tokens: int, completion_tokens: int) -> bytes:
        raise NotImplementedError

    # -- stream pieces
    def stream(self, chat: bool, include_usage: bool, rid: str, created: int, model: str) -> Stream:
        return Stream(self, chat, include_usage, rid, created, model)

    def role_choice(self, index: int) -> dict[str, Any]:
        raise NotImplementedError

    def token_choice(self, chat: bool, index: int, text: str, finish: Optional[str], stop: Optional[str]) -> dict[str, Any]:
        raise NotImplementedError

    def final_tail(self, chat: bool, include_usage: bool) -> bytes:
        return self.token_tail

    def stream_usage(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
                "completion_tokens": completion_tokens}

    # -- /metrics
    def metric_labels(self) -> str:
        return f'model_name="{self.options.public_name}"'


class VllmDialect(Dialect):
    name = "vllm"
    checks_model = True
    lora_text = True
    owned_by = "vllm"
    metric_running = "vllm:num_requests_running"
    metric_waiting = "vllm:num_requests_waiting"
    metric_prompt_tokens = "vllm:prompt_tokens_total"
    metric_generation_tokens = "vllm:generation_tokens_total"
    # FastAPI request-validation errors carry the HTTP phrase as their type.
    validation_type = "Bad Request"
    role_tail = b',"prompt_token_ids":null,"prompt_text":null'
    fingerprint_prefix = "vllm-0.32.0"

    def __init__(self, options: SimOptions):
        super().__init__(options)
        self.fingerprint = f"{self.fingerprint_prefix}-{zlib.crc32(options.model.encode()):08x}"
        self._fingerprint_tail = b',"system_fingerprint":' + orjson.dumps(self.fingerprint)
        self.usage_extras = {"system_fingerprint": self.fingerprint}

    def model_card(self, name: str, created: int) -> dict[str, Any]:
        card = super().model_card(name, created)
        card["permission"] = [{
            "id": f"modelperm-{self.hex_id()}", "object": "model_permission",
            "created": created, "allow_create_engine": False, "allow_sampling": True,
            "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
            "allow_fine_tuning": False, "organization": "*", "group": None, "is_blocking": False}]
        return card

    def response(self, chat: bool, rid: str, created: int, model: str, choices: Sequence[Choice],
                 prompt_tokens: int, completion_tokens: int) -> bytes:
        if chat:
            out = [{"index": c.index, "message": {
                        "role": "assistant", "content": c.text, "refusal": None, "annotations": None,
                        "audio": None, "function_call": None, "reasoning": None},
                    "logprobs": None, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                    "token_ids": None, "routed_experts": None} for c in choices]
        else:
            out = [{"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason, "token_ids": None, "prompt_logprobs": None,
                    "prompt_token_ids": None, "routed_experts": None} for c in choices]
        body: dict[str, Any] = {
            "id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": out, "service_tier": None, "system_fingerprint": self.fingerprint,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
                      "completion_tokens": completion_tokens, "prompt_tokens_details": None,
                      "completion_tokens_details": None}}
        if chat:
            body.update(prompt_logprobs=None, prompt_token_ids=None, prompt_text=None)
        body.update(kv_transfer_params=None, ec_transfer_params=None, metrics=None)
        return orjson.dumps(body)

    def role_choice(self, index: int) -> dict[str, Any]:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def token_choice(self, chat: bool, index: int, text: str, finish: Optional[str], stop: Optional[str]) -> dict[str, Any]:
        if not chat:
            return {"index": index, "text": text, "logprobs": None, "finish_reason": finish,
                    "stop_reason": stop, "prompt_token_ids": None, "token_ids": None}
        if finish is None:
            return {"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": None,
                    "token_ids": None}
        return {"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": finish,
                "stop_reason": stop, "token_ids": None}

    def final_tail(self, chat: bool, include_usage: bool) -> bytes:
        # vLLM puts the fingerprint on a completion stream's last chunk: the usage
        # chunk when there is one, else the last text chunk; chat text chunks never.
        return b"" if chat or include_usage else self._fingerprint_tail

    def metric_labels(self) -> str:
        return f'engine="0",model_name="{self.options.public_name}"'


class SglangDialect(Dialect):
    name = "sglang"
    holds_while_asleep = False
    owned_by = "sglang"
    metric_running = "sglang:num_running_reqs"
    metric_waiting = "sglang:num_queue_reqs"
    metric_prompt_tokens = "sglang:prompt_tokens_total"
    metric_generation_tokens = "sglang:generation_tokens_total"
    role_tail = b',"usage":null'
    token_tail = b',"usage":null'

    def key_guards(self, path: str) -> bool:
        """SGLang checks every route but its health and metrics ones."""
        return path not in ("/health", "/metrics")

    def tokenized(self, ids: list[int], text: str, body: dict[str, Any]) -> dict[str, Any]:
        """SGLang's TokenizeResponse (approximated)."""
        return {"tokens": ids, "count": len(ids), "max_model_len": self.options.max_model_len}

    def detokenized(self, text: str) -> dict[str, Any]:
        return {"text": text}  # approximated

    def response(self, chat: bool, rid: str, created: int, model: str, choices: Sequence[Choice],
                 prompt_tokens: int, completion_tokens: int) -> bytes:
        if chat:
            out = [{"index": c.index, "message": {"role": "assistant", "content": c.text,
                                                   "reasoning_content": None, "tool_calls": None},
                    "logprobs": None, "finish_reason": c.finish_reason, "matched_stop": c.stop_reason}
                   for c in choices]
        else:
            out = [{"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason,
                    "matched_stop": c.stop_reason} for c in choices]
        return orjson.dumps({
            "id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": out,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
                      "completion_tokens": completion_tokens, "prompt_tokens_details": None}})

    def role_choice(self, index: int) -> dict[str, Any]:
        return {"index": index, "delta": {"role": "assistant", "content": "", "reasoning_content": None,
                                          "tool_calls": None},
                "logprobs": None, "finish_reason": None, "matched_stop": None}

    def token_choice(self, chat: bool, index: int, text: str, finish: Optional[str], stop: Optional[str]) -> dict[str, Any]:
        if chat:
            return {"index": index, "delta": {"role": None, "content": text, "reasoning_content": None,
                                              "tool_calls": None},
                    "logprobs": None, "finish_reason": finish, "matched_stop": stop}
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish, "matched_stop": stop}

    def stream_usage(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return {**super().stream_usage(prompt_tokens, completion_tokens), "prompt_tokens_details": None}


class OpenaiDialect(VllmDialect):
    """Any OpenAI-compatible server: vLLM's answers (the fullest OpenAI shapes), the plain
    OpenAI model list and metric names of the simulator's own."""

    name = "openai"
    owned_by = "system"
    metric_running = "sim:num_requests_running"
    metric_waiting = "sim:num_requests_waiting"
    metric_prompt_tokens = "sim:prompt_tokens_total"
    metric_generation_tokens = "sim:generation_tokens_total"
    fingerprint_prefix = "fp"

    def model_card(self, name: str, created: int) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": self.owned_by}

    metric_labels = Dialect.metric_labels  # no engine label: that one is vLLM's


DIALECTS: dict[str, type[Dialect]] = {d.name: d for d in (VllmDialect, SglangDialect, OpenaiDialect)}
