"""Reading a request body into a `Generation`, refusing bad input in the engine's own words.

Every path that generates (completions, chat, Responses, Messages, batch chat,
invocations) goes through `RequestReader.generation`, so the limits and errors
are the same wherever a request comes in.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import orjson

from . import textgen
from .dialects import Dialect, Shape
from .errors import ApiError
from .http import Request
from .options import SimOptions


@dataclass
class Generation:
    """A validated generation request."""

    chat: bool
    model: str
    prompts: list[str]
    prompt_tokens: int
    n: int
    max_tokens: int
    stop: list[str]
    stream: bool
    include_usage: bool
    echo: bool
    #: How the answer is worded (None: the dialect's completion or chat answer).
    shape: Optional[Shape] = None
    choices: list[list[str]] = field(default_factory=list)
    finish: list[str] = field(default_factory=list)
    stop_reason: list[Optional[str]] = field(default_factory=list)


class RequestReader:
    """Validation of request bodies as one engine (its options, its dialect's error words) does it."""

    def __init__(self, options: SimOptions, dialect: Dialect, adapters: Optional[Mapping[str, str]] = None):
        self.options = options
        self.dialect = dialect
        #: The LoRA adapters loaded now (the engine's, router/sim/lora.py): model names too.
        self.adapters: Mapping[str, str] = adapters if adapters is not None else {}

    def invalid(self, loc: str, kind: str, msg: str, value: Any, ctx: str = "") -> ApiError:
        """A request-validation error worded as FastAPI/pydantic word it in the engines."""
        shown = value if isinstance(value, str) else f"<{type(value).__name__}>"
        return ApiError(400, f"1 validation error:\n  {{'type': '{kind}', 'loc': '{loc}', 'msg': {msg!r}, "
                             f"'input': {shown!r}{ctx}}}", self.dialect.validation_type, loc)

    def json_body(self, req: Request, allow_empty: bool = False) -> dict[str, Any]:
        if allow_empty and not req.body.strip():
            return {}
        try:
            body = orjson.loads(req.body)
        except orjson.JSONDecodeError as e:
            raise self.invalid(f"body.{e.pos}", "json_invalid", "JSON decode error", "<dict of 0 items>",
                               f", 'ctx': {{'error': {e.msg!r}}}") from None
        if not isinstance(body, dict):
            size = f" of {len(body)} items" if isinstance(body, list) else ""
            raise self.invalid("body", "model_attributes_type",
                               "Input should be a valid dictionary or object to extract fields from",
                               f"<{type(body).__name__}{size}>")
        return body

    def model(self, body: dict[str, Any]) -> str:
        """The request's model: the engine's when absent; 404 where the dialect checks it."""
        o = self.options
        model = body.get("model")
        if model is None:
            return o.public_name
        if not isinstance(model, str):
            raise self.invalid("body.model", "string_type", "Input should be a valid string", model)
        if self.dialect.checks_model and model not in o.names and model not in self.adapters:
            raise ApiError(404, f"The model `{model}` does not exist. Valid aliases: {', '.join(o.names)}.",
                           "NotFoundError", "model")
        return model

    def generation(self, body: dict[str, Any], chat: bool, max_key: Optional[str] = None) -> Generation:
        """A generation from a completions/chat body; `max_key` names its output-token limit where
        another API (Responses: max_output_tokens) spells it otherwise."""
        o = self.options
        model = self.model(body)
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise ApiError(400, "messages must be a non-empty list", param="messages")
            try:
                prompts = [textgen.chat_prompt(messages)]
            except ValueError as e:
                raise ApiError(400, str(e), param="messages") from None
        elif not body.get("prompt"):
            raise ApiError(400, "Either prompt or prompt_embeds must be provided and non-empty. (parameter=prompt)",
                           param="prompt")
        else:
            prompts = self.prompts(body.get("prompt"), "prompt")
        n = self.integer(body, "n", 1, 1) or 1  # never None: the default is 1
        echo = bool(body.get("echo")) and not chat
        stream = body.get("stream") is True
        stream_options = body.get("stream_options")
        if stream_options is not None and not stream:
            raise ApiError(400, "Stream options can only be defined when `stream=True`.", param="stream_options")
        include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
        stop = body.get("stop")
        if stop is None:
            stops: list[str] = []
        elif isinstance(stop, str):
            stops = [stop] if stop else []
        elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
            stops = [s for s in stop if s]
        else:
            raise ApiError(400, "stop must be a string or a list of strings", param="stop")
        counts = [textgen.count_tokens(p) for p in prompts]
        longest = max(counts)
        key = max_key or ("max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens")
        max_tokens = self.integer(body, key, None, 1)
        if max_tokens is not None and max_tokens > o.max_model_len:
            raise ApiError(400, f"{key}={max_tokens} cannot be greater than max_model_len={o.max_model_len}. "
                                f"Please request fewer output tokens. (parameter={key}, value={max_tokens})", param=key)
        if longest + (max_tokens or 1) > o.max_model_len:
            raise ApiError(400, f"This model's maximum context length is {o.max_model_len} tokens. However, you "
                                f"requested {longest + (max_tokens or 1)} tokens ({longest} in the input, "
                                f"{max_tokens or 1} in the output). Please reduce the length of the input or output.",
                           param="input_tokens")
        if max_tokens is None:
            max_tokens = o.max_model_len - longest
        return Generation(chat=chat, model=model, prompts=prompts, prompt_tokens=sum(counts), n=n,
                          max_tokens=max_tokens, stop=stops, stream=stream, include_usage=include_usage, echo=echo)

    def integer(self, body: dict[str, Any], key: str, default: Optional[int], least: int) -> Optional[int]:
        value = body.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.invalid(f"body.{key}", "int_parsing",
                               "Input should be a valid integer, unable to parse string as an integer", value)
        if value < least:
            raise ApiError(400, f"{key} must be at least {least}, got {value}.", param=key)
        return value

    @staticmethod
    def prompts(prompt: Any, key: str) -> list[str]:
        if isinstance(prompt, str):
            return [prompt]
        if isinstance(prompt, list) and prompt:
            if all(isinstance(p, str) for p in prompt):
                return list(prompt)
            if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                return [" ".join(map(str, prompt))]
            if all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt):
                return [" ".join(map(str, p)) for p in prompt]
        raise ApiError(400, f"{key} must be a string, a list of strings, or a list of token ids", param=key)
