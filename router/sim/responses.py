"""The OpenAI Responses API answers (``/v1/responses``) as vLLM 0.32 words them, and their store.

Shapes are those of tests/real_vllm/captured/responses*.http: the response
object (vLLM adds penalties, transfer params and ``input_messages``/``output_messages``),
and a stream of ``event: <type>`` / ``data: {...}`` pairs numbered by
``sequence_number``: created, in_progress, output_item.added,
content_part.added, one output_text.delta per token, output_text.done,
content_part.done, output_item.done, completed (also when the status is
``incomplete``). There is no ``data: [DONE]``.

Real vLLM 0.32 stores responses only when started with
``VLLM_ENABLE_RESPONSES_API_STORE=1`` (else GET answers 404 for every id); the
simulator always stores them, unless the request says ``"store": false``,
since the router's pinning of retrieve/cancel/follow-ups is what it tests.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import orjson

from .dialects import Choice

#: Stored responses kept (oldest dropped first), so a long benchmark cannot fill memory.
STORE_LIMIT = 10_000
_STATUS = {"length": "incomplete", "stop": "completed", "abort": "cancelled"}


@dataclass
class ResponseRequest:
    """What a response echoes of its request, and the conversation it continues."""

    rid: str
    model: str
    max_output_tokens: int
    #: The conversation so far as chat messages (previous turns included), for follow-ups.
    messages: list[dict[str, Any]]
    instructions: Optional[str] = None
    previous_response_id: Optional[str] = None
    temperature: float = 1.0
    top_p: float = 1.0
    background: bool = False
    store: bool = True
    created_at: int = field(default_factory=lambda: int(time.time()))


class ResponsesShape:
    """One response's JSON and SSE wording; `body` is its latest state (for the store)."""

    def __init__(self, request: ResponseRequest, msg_id: str, store: "ResponseStore"):
        self.request = request
        self.msg_id = msg_id
        self.store = store
        self.body = self._response("queued" if request.background else "in_progress", None, None)

    # -- the response object
    def _response(self, status: str, text: Optional[str], usage: Optional[tuple[int, int]],
                  incomplete: bool = False) -> dict[str, Any]:
        r = self.request
        output = [] if text is None else [self.message(text, "completed")]
        return {
            "id": r.rid, "created_at": r.created_at,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": r.instructions, "metadata": None, "model": r.model, "object": "response",
            "output": output, "parallel_tool_calls": True, "temperature": r.temperature, "tool_choice": "none",
            "tools": [], "top_p": r.top_p, "background": r.background, "max_output_tokens": r.max_output_tokens,
            "max_tool_calls": None, "previous_response_id": r.previous_response_id, "prompt": None,
            "reasoning": None, "service_tier": "auto", "status": status, "text": None, "top_logprobs": None,
            "truncation": "disabled", "usage": None if usage is None else _usage(*usage), "user": None,
            "presence_penalty": 0.0, "frequency_penalty": 0.0, "kv_transfer_params": None,
            "ec_transfer_params": None, "input_messages": None, "output_messages": None}

    def message(self, text: str, status: str) -> dict[str, Any]:
        content = [] if status == "in_progress" else [_text_part(text, None)]
        return {"id": self.msg_id, "content": content, "role": "assistant", "status": status, "type": "message",
                "phase": None}

    def finish(self, choice: Choice, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """The final response; stored unless the request said store=false."""
        status = _STATUS.get(choice.finish_reason or "stop", "completed")
        self.body = self._response(status, choice.text, (prompt_tokens, completion_tokens),
                                   incomplete=status == "incomplete")
        self.store.put(self)
        return self.body

    # -- Shape
    def whole(self, choices: Sequence[Choice], prompt_tokens: int, completion_tokens: int) -> bytes:
        return orjson.dumps(self.finish(choices[0], prompt_tokens, completion_tokens))

    def stream(self) -> "ResponsesStream":
        return ResponsesStream(self)


class ResponsesStream:
    """The Responses SSE events of one answer (one output message)."""

    def __init__(self, shape: ResponsesShape):
        self._shape = shape
        self._seq = 0
        self._text: list[str] = []
        self._finish: Optional[str] = None

    def _event(self, kind: str, fields: dict[str, Any]) -> bytes:
        # vLLM's event models happen to list their fields alphabetically.
        data = dict(sorted({**fields, "sequence_number": self._seq, "type": kind}.items()))
        self._seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

    def _at(self) -> dict[str, Any]:
        return {"content_index": 0, "item_id": self._shape.msg_id}

    def opening(self, choices: int) -> list[bytes]:
        s = self._shape
        s.store.put(s)  # retrievable (in progress) while it streams, as in vLLM
        return [self._event("response.created", {"response": s.body}),
                self._event("response.in_progress", {"response": s.body}),
                self._event("response.output_item.added",
                            {"item": s.message("", "in_progress"), "output_index": 0}),
                self._event("response.content_part.added",
                            {**self._at(), "output_index": 0, "part": _text_part("", [])})]

    def token(self, index: int, text: str, finish: Optional[str] = None, stop: Optional[str] = None) -> bytes:
        self._text.append(text)
        self._finish = finish
        return self._event("response.output_text.delta",
                           {**self._at(), "delta": text, "logprobs": [], "output_index": 0})

    def closing(self, prompt_tokens: int, completion_tokens: int) -> list[bytes]:
        s, text = self._shape, "".join(self._text)
        body = s.finish(Choice(0, text, self._finish), prompt_tokens, completion_tokens)
        return [self._event("response.output_text.done",
                            {**self._at(), "logprobs": [], "output_index": 0, "text": text}),
                self._event("response.content_part.done",
                            {**self._at(), "output_index": 0, "part": _text_part(text, None)}),
                self._event("response.output_item.done", {"item": s.message(text, "completed"), "output_index": 0}),
                self._event("response.completed", {"response": body})]


class ResponseStore:
    """Responses by id, bounded; each keeps the conversation a follow-up continues."""

    def __init__(self, limit: int = STORE_LIMIT):
        self._items: OrderedDict[str, ResponsesShape] = OrderedDict()
        self._limit = limit

    def put(self, shape: ResponsesShape) -> None:
        if not shape.request.store:
            return
        self._items[shape.request.rid] = shape
        self._items.move_to_end(shape.request.rid)
        while len(self._items) > self._limit:
            self._items.popitem(last=False)

    def get(self, rid: str) -> Optional[ResponsesShape]:
        return self._items.get(rid)


def conversation(shape: ResponsesShape) -> list[dict[str, Any]]:
    """A stored response's messages followed by its answer: what a follow-up continues."""
    text = "".join(p["text"] for item in shape.body["output"] for p in item["content"])
    return [*shape.request.messages, {"role": "assistant", "content": text}]


def input_messages(value: Any) -> list[dict[str, Any]]:
    """The ``input`` of a request as chat messages; raises ValueError on a malformed one.

    A string is one user message; a list holds messages (``role`` + ``content``
    as a string or parts of type ``input_text``/``output_text``/``text``).
    """
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise ValueError("input must be a string or a non-empty list of messages")
    messages = []
    for k, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("role"), str):
            raise ValueError(f"input[{k}] must be a message with a string 'role'")
        content = item.get("content")
        if isinstance(content, list):
            content = [{"type": "text", "text": p.get("text")} if isinstance(p, dict) else p for p in content]
        messages.append({"role": item["role"], "content": content})
    return messages


def _text_part(text: str, logprobs: Optional[list[Any]]) -> dict[str, Any]:
    return {"annotations": [], "text": text, "type": "output_text", "logprobs": logprobs}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {"input_tokens": prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0, "input_tokens_per_turn": [],
                                     "cached_tokens_per_turn": []},
            "output_tokens": completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0, "tool_output_tokens": 0, "output_tokens_per_turn": [],
                                      "tool_output_tokens_per_turn": []},
            "total_tokens": prompt_tokens + completion_tokens}
