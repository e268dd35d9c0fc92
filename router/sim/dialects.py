"""How vLLM and SGLang word their answers: response bodies, ids, errors, metric names.

Only the shapes live here (field by field as the real servers send them); the
behaviour that is the same for both engines lives in engine.py. The vLLM shapes
follow what real vLLM 0.32 sent on this project's machines
(tests/real_vllm/captured/); the SGLang ones follow SGLang's protocol.py and
serving code (current main).
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import orjson

from .options import SimOptions


@dataclass(frozen=True)
class Choice:
    """One finished (or cut-off) output of a request."""

    index: int
    text: str
    finish_reason: Optional[str]
    stop_reason: Optional[str] = None


class Dialect:
    """Response shapes shared by both engines; subclasses override what differs."""

    name = ""
    owned_by = ""
    metric_running = ""
    metric_waiting = ""
    metric_prompt_tokens = ""
    metric_generation_tokens = ""
    #: The key SGLang uses where vLLM says `stop_reason`.
    stop_key = "stop_reason"
    id_prefixes = {False: "cmpl-", True: "chatcmpl-"}

    def __init__(self, options: SimOptions):
        self.options = options
        self._ids = itertools.count(1)
        self._id_base = os.urandom(8).hex()

    # -- ids and errors
    def new_id(self, chat: bool) -> str:
        """Unique per process, cheap: a random per-engine half and a counter half (32 hex)."""
        return f"{self.id_prefixes[chat]}{self._id_base}{next(self._ids):016x}"

    def error(self, status: int, message: str, err_type: str, param: Optional[str] = None) -> bytes:
        return orjson.dumps({"error": {"message": message, "type": err_type, "param": param, "code": status}})

    # -- /v1/models
    def model_card(self, name: str, created: int) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": self.owned_by,
                "root": self.options.model, "parent": None, "max_model_len": self.options.max_model_len}

    def models(self, created: int) -> bytes:
        return orjson.dumps({"object": "list", "data": [self.model_card(n, created) for n in self.options.names]})

    # -- complete responses
    def usage(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
                "completion_tokens": completion_tokens, "prompt_tokens_details": None}

    def completion_choice(self, c: Choice) -> dict[str, Any]:
        return {"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason,
                self.stop_key: c.stop_reason}

    def chat_choice(self, c: Choice) -> dict[str, Any]:
        return {"index": c.index, "message": {"role": "assistant", "content": c.text},
                "logprobs": None, "finish_reason": c.finish_reason, self.stop_key: c.stop_reason}

    def response(self, chat: bool, rid: str, created: int, model: str, choices: Sequence[Choice],
                 usage: dict[str, Any]) -> bytes:
        make = self.chat_choice if chat else self.completion_choice
        return orjson.dumps({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": created, "model": model, "choices": [make(c) for c in choices],
                             "usage": usage, **self.response_extras(chat)})

    def response_extras(self, chat: bool) -> dict[str, Any]:
        return {}

    # -- streams: each chunk is prefix + one choice (JSON) + suffix
    def stream_frame(self, chat: bool, rid: str, created: int, model: str) -> tuple[bytes, bytes]:
        head = orjson.dumps({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                             "created": created, "model": model})
        return b"data: " + head[:-1] + b',"choices":[', b"]" + self.chunk_tail(chat) + b"}\n\n"

    def chunk_tail(self, chat: bool) -> bytes:
        return b""

    def role_delta(self, index: int) -> dict[str, Any]:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def stream_choice(self, chat: bool, index: int, text: str, finish: Optional[str], stop: Optional[str]) -> dict[str, Any]:
        if chat:
            out: dict[str, Any] = {"index": index, "delta": {"content": text}, "logprobs": None,
                                   "finish_reason": finish}
            if finish is not None:
                out[self.stop_key] = stop
            return out
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish, self.stop_key: stop}

    def usage_chunk(self, chat: bool, rid: str, created: int, model: str, usage: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps({
            "id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": model, "choices": [], "usage": usage}) + b"\n\n"

    # -- /metrics
    def metric_labels(self) -> str:
        return f'model_name="{self.options.public_name}"'


class VllmDialect(Dialect):
    name = "vllm"
    owned_by = "vllm"
    metric_running = "vllm:num_requests_running"
    metric_waiting = "vllm:num_requests_waiting"
    metric_prompt_tokens = "vllm:prompt_tokens_total"
    metric_generation_tokens = "vllm:generation_tokens_total"

    def model_card(self, name: str, created: int) -> dict[str, Any]:
        card = super().model_card(name, created)
        card["permission"] = [{
            "id": f"modelperm-{self._id_base}{next(self._ids):016x}", "object": "model_permission",
            "created": created, "allow_create_engine": False, "allow_sampling": True,
            "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
            "allow_fine_tuning": False, "organization": "*", "group": None, "is_blocking": False}]
        return card

    def chat_choice(self, c: Choice) -> dict[str, Any]:
        out = super().chat_choice(c)
        out["message"] = {"role": "assistant", "content": c.text, "refusal": None, "annotations": None,
                          "audio": None, "function_call": None, "tool_calls": [], "reasoning_content": None}
        return out

    def response_extras(self, chat: bool) -> dict[str, Any]:
        extras: dict[str, Any] = {"system_fingerprint": None, "service_tier": None, "kv_transfer_params": None}
        if chat:
            extras["prompt_logprobs"] = None
        return extras

    def metric_labels(self) -> str:
        return f'engine="0",model_name="{self.options.public_name}"'


class SglangDialect(Dialect):
    name = "sglang"
    owned_by = "sglang"
    metric_running = "sglang:num_running_reqs"
    metric_waiting = "sglang:num_queue_reqs"
    metric_prompt_tokens = "sglang:prompt_tokens_total"
    metric_generation_tokens = "sglang:generation_tokens_total"
    stop_key = "matched_stop"

    def chat_choice(self, c: Choice) -> dict[str, Any]:
        out = super().chat_choice(c)
        out["message"] = {"role": "assistant", "content": c.text, "reasoning_content": None, "tool_calls": None}
        return out

    def role_delta(self, index: int) -> dict[str, Any]:
        out = super().role_delta(index)
        out["delta"] = {"role": "assistant", "content": "", "reasoning_content": None, "tool_calls": None}
        out[self.stop_key] = None
        return out

    def stream_choice(self, chat: bool, index: int, text: str, finish: Optional[str], stop: Optional[str]) -> dict[str, Any]:
        out = super().stream_choice(chat, index, text, finish, stop)
        out[self.stop_key] = stop
        return out

    def chunk_tail(self, chat: bool) -> bytes:
        return b',"usage":null'


DIALECTS: dict[str, type[Dialect]] = {"vllm": VllmDialect, "sglang": SglangDialect}
