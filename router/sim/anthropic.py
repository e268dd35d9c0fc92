"""Anthropic Messages answers (``/v1/messages``) as vLLM 0.32 words them.

From tests/real_vllm/captured/messages*.http: vLLM reuses its chat id
(``chatcmpl-<hex>``), drops null fields from a whole answer (no
``stop_sequence`` unless one matched), streams ``event: <type>`` /
``data: {...}`` pairs (message_start, content_block_start, one
content_block_delta per token, content_block_stop, message_delta,
message_stop; no ``[DONE]``), and words engine errors (unknown model,
max_tokens too large) ``{"type":"error","error":{"type","message"}}`` while
request-validation errors keep its OpenAI shape.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import orjson

from .dialects import Choice

_STOP_REASONS = {"length": "max_tokens", "abort": "end_turn"}


def error(err_type: str, message: str) -> bytes:
    return orjson.dumps({"type": "error", "error": {"type": err_type, "message": message}})


def messages_prompt(body: dict[str, Any]) -> object:
    """The request's ``system`` (a string or text blocks) and ``messages`` as chat messages; ``messages``
    as given when it is no list, for the chat validation to refuse in the engine's words."""
    system = body.get("system")
    messages = body.get("messages")
    head = [] if system is None else [{"role": "system", "content": system}]
    return head + messages if isinstance(messages, list) else messages


def stop_reason(finish: Optional[str], matched: Optional[str]) -> str:
    if matched is not None:
        return "stop_sequence"
    return _STOP_REASONS.get(finish or "stop", "end_turn")


class MessagesShape:
    """One Messages answer, whole or streamed."""

    def __init__(self, mid: str, model: str, prompt_tokens: int):
        self.mid = mid
        self.model = model
        self.prompt_tokens = prompt_tokens

    def whole(self, choices: Sequence[Choice], prompt_tokens: int, completion_tokens: int) -> bytes:
        c = choices[0]
        body: dict[str, Any] = {"id": self.mid, "type": "message", "role": "assistant",
                                "content": [{"type": "text", "text": c.text}], "model": self.model,
                                "stop_reason": stop_reason(c.finish_reason, c.stop_reason)}
        if c.stop_reason is not None:
            body["stop_sequence"] = c.stop_reason
        body["usage"] = {"input_tokens": prompt_tokens, "output_tokens": completion_tokens}
        return orjson.dumps(body)

    def stream(self) -> "MessagesStream":
        return MessagesStream(self)


class MessagesStream:
    """Anthropic's SSE event sequence for one text block."""

    def __init__(self, shape: MessagesShape):
        self._shape = shape
        self._finish: Optional[str] = None
        self._matched: Optional[str] = None

    @staticmethod
    def _event(kind: str, fields: dict[str, Any]) -> bytes:
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **fields}) + b"\n\n"

    def opening(self, choices: int) -> list[bytes]:
        s = self._shape
        message: dict[str, Any] = {"id": s.mid, "type": "message", "role": "assistant", "content": [], "model": s.model,
                   "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": s.prompt_tokens, "output_tokens": 0}}
        return [self._event("message_start", {"message": message}),
                self._event("content_block_start", {"content_block": {"type": "text", "text": ""}, "index": 0})]

    def token(self, index: int, text: str, finish: Optional[str] = None, stop: Optional[str] = None) -> bytes:
        self._finish, self._matched = finish, stop
        return self._event("content_block_delta", {"delta": {"type": "text_delta", "text": text}, "index": 0})

    def closing(self, prompt_tokens: int, completion_tokens: int) -> list[bytes]:
        delta = {"stop_reason": stop_reason(self._finish, self._matched), "stop_sequence": self._matched}
        return [self._event("content_block_stop", {"index": 0}),
                self._event("message_delta", {"delta": delta, "usage": {"input_tokens": prompt_tokens,
                                                                        "output_tokens": completion_tokens}}),
                self._event("message_stop", {})]
