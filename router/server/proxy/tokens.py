"""The engine's token `usage` of one answer, read as the answer passes.

A whole answer is one JSON body: its ``usage`` holds the counts, under the
OpenAI names (``prompt_tokens``, ``completion_tokens``: chat, completions,
embeddings) or the Anthropic and Responses ones (``input_tokens``,
``output_tokens``). A stream carries them in its events: OpenAI's last chunk
(``choices: []`` and ``usage``, sent when the request asks with
``stream_options.include_usage``), the Responses API's ``response.completed``
(``response.usage``), Anthropic's ``message_start`` (``message.usage``) then
``message_delta`` (``usage``). The last count seen wins: each is cumulative.

`StreamUsage` scans a stream cut anywhere into pieces: only complete events
(ended by a blank line, ``\\n\\n`` or ``\\r\\n\\r\\n``) are looked at, and only those holding ``"usage"`` are
parsed. When the router asked for the usage chunk itself (the client did not),
`StreamUsage` also removes that chunk, so the client gets the stream it would
have got without the router's question (on a completions stream, vLLM moves the
`system_fingerprint` from the last text chunk to the usage chunk: it is moved
back).
"""
from __future__ import annotations

import re
from typing import Any, Optional

import orjson

#: Where the router asks an OpenAI engine for a stream's usage chunk.
USAGE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
COMPLETIONS_PATH = "/v1/completions"

EVENT_END = b"\n\n"
#: An event's end as servers on CRLF lines write it (SSE allows both).
CRLF_EVENT_END = b"\r\n\r\n"
#: An unfinished event longer than this is not waited for any more (a stream that is not SSE).
MAX_PENDING = 1 << 20
#: One whole event, ended either way.
EVENT = re.compile(rb".*?(?:\n\n|\r\n\r\n)", re.S)
USAGE = b'"usage"'
NO_USAGE = b'"usage":null'
FINISHED = b'"finish_reason":"'
FINGERPRINT = b'"system_fingerprint"'

#: (prompt tokens, completion tokens); either None when the answer did not say.
Counts = tuple[Optional[int], Optional[int]]


def _count(value: object) -> Optional[int]:
    return value if type(value) is int and value >= 0 else None


def counts_of(usage: object) -> Counts:
    """(prompt, completion) from a ``usage`` object in any of the shapes the engines send."""
    if not isinstance(usage, dict):
        return None, None
    prompt = _count(usage.get("prompt_tokens", usage.get("input_tokens")))
    completion = _count(usage.get("completion_tokens", usage.get("output_tokens")))
    if prompt is not None and completion is None and "total_tokens" in usage:
        completion = 0  # embeddings and scores: the prompt is all there is
    return prompt, completion


def usage_in(message: object) -> object:
    """The ``usage`` of a whole answer or a stream event, wherever its shape keeps it."""
    if not isinstance(message, dict):
        return None
    usage = message.get("usage")
    if usage is None:
        for holder in ("response", "message"):  # Responses' response.completed; Anthropic's message_start
            inner = message.get(holder)
            if isinstance(inner, dict) and inner.get("usage") is not None:
                return inner["usage"]
    return usage


def body_usage(body: bytes) -> Counts:
    """(prompt, completion) of a whole JSON answer; (None, None) when it has none or is not JSON.

    Only the ``usage`` object is parsed, not the answer (whose text may be
    long): in JSON the bytes ``"usage"`` followed by a colon can only be a key
    (a quote inside a string is escaped), and the last one holding an object is
    the answer's own (a Responses or Anthropic answer nests nothing else under
    that name). A usage object holds numbers, nulls and objects of numbers, no
    string with a brace, so its end is found by counting braces.
    """
    end = len(body)
    while True:
        at = body.rfind(USAGE, 0, end)
        if at < 0:
            return None, None
        start = _object_after_key(body, at + len(USAGE))
        if start >= 0:
            close = body.find(b"}", start)
            inner = body.find(b"{", start + 1, close)
            while inner >= 0 and close >= 0:  # each object inside needs one more closing brace
                close = body.find(b"}", close + 1)
                inner = body.find(b"{", inner + 1, close)
            if close < 0:
                return None, None
            try:
                return counts_of(orjson.loads(body[start:close + 1]))
            except orjson.JSONDecodeError:
                return None, None
        end = at


def _object_after_key(body: bytes, i: int) -> int:
    """Where the object a key's colon leads to starts (`i`: just after the key), or -1."""
    n = len(body)
    while i < n and body[i] in b" \t\r\n":
        i += 1
    if i >= n or body[i] != 58:  # ':'
        return -1
    i += 1
    while i < n and body[i] in b" \t\r\n":
        i += 1
    return i if i < n and body[i] == 123 else -1  # '{'


def _no_usage(data: bytes) -> bool:
    """Whether `data` holds no usage to count: no ``"usage"`` key, or only ``"usage":null`` ones (what
    every chunk of a stream asked for its usage carries until the last): two byte counts, not a parse."""
    return USAGE not in data or data.count(USAGE) == data.count(NO_USAGE)


def event_data(event: bytes) -> Optional[Any]:
    """The JSON of an SSE event's ``data:`` line(s), or None."""
    parts = [line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")]
    if not parts:
        return None
    try:
        return orjson.loads(b"\n".join(parts))
    except orjson.JSONDecodeError:
        return None


class StreamUsage:
    """The usage of one stream, fed its pieces as they come; with `strip`, what the client gets.

    Without `strip`, `feed` only reads (the caller relays the pieces as they
    are). With `strip`, `feed` returns the bytes to relay: the complete events
    that came, without the usage chunk; an event's start waits for its end
    (the engines send whole events per write, so in practice nothing waits),
    and on a completions stream the last finished chunk waits for the next
    piece (the usage chunk follows it at once).
    """

    __slots__ = ("strip", "completions", "prompt", "completion", "_rest", "_held", "stripped")

    def __init__(self, strip: bool = False, completions: bool = False):
        self.strip = strip
        self.completions = strip and completions
        self.prompt: Optional[int] = None
        self.completion: Optional[int] = None
        #: Bytes after the last complete event.
        self._rest = b""
        #: A completions stream's last finished chunk, held until the next piece (strip only).
        self._held = b""
        #: Bytes removed from the stream (strip only).
        self.stripped = 0

    def feed(self, data: bytes) -> bytes:
        """Scan `data`; with `strip`, the bytes to relay now (maybe b""); without, b"" (the caller
        relays `data` itself)."""
        rest = self._rest
        if (not rest and not self._held and data.endswith(EVENT_END) and _no_usage(data)
                and not (self.completions and FINISHED in data)):
            return data if self.strip else b""  # whole events, nothing to count or hold: as they came
        if rest:
            data = rest + data
        end = _events_end(data)
        if end < 0:
            if self.strip and len(data) > MAX_PENDING:  # not SSE after all: relayed as it comes, unread
                self._rest = b""
                return data
            self._rest = data
            return b""
        whole = data[:end]
        self._rest = data[end:]
        if USAGE in whole:
            if self.strip:
                whole = self._read(whole, True)
            else:
                self._read(whole, False)
        if not self.strip:
            return b""
        if self.completions:
            whole = self._held + whole
            self._held = b""
            last = max(0, _events_end(whole[:-2]))
            if FINISHED in whole[last:]:
                self._held = whole[last:]
                whole = whole[:last]
        return whole

    def scan(self, data: bytes) -> None:
        """Read `data` (relayed by the caller unchanged): a scan-only `feed`, cheap when the piece
        is whole events without a usage."""
        if not self._rest and data.endswith(EVENT_END) and _no_usage(data):
            return
        self.feed(data)

    def end(self) -> bytes:
        """What is left to relay when the stream ends (an event cut short, a held chunk)."""
        left = self._held + self._rest if self.strip else b""
        self._held = self._rest = b""
        return left

    @property
    def counts(self) -> Counts:
        return self.prompt, self.completion

    def _read(self, whole: bytes, strip: bool) -> bytes:
        """Count the usage events of `whole`; with `strip`, `whole` without the OpenAI usage chunk."""
        kept: list[bytes] = []
        for event in EVENT.findall(whole):
            if USAGE in event and not (NO_USAGE in event and event.count(USAGE) == 1):
                message = event_data(event)
                prompt, completion = counts_of(usage_in(message))
                if prompt is not None:
                    self.prompt = prompt
                if completion is not None:
                    self.completion = completion
                if strip and isinstance(message, dict) and message.get("choices") == [] and (
                        prompt is not None or completion is not None):
                    self.stripped += len(event)
                    if self.completions:
                        self._give_back(message, kept)
                    continue
            kept.append(event)
        return b"".join(kept) if strip else whole

    def _give_back(self, usage_chunk: dict[str, Any], kept: list[bytes]) -> None:
        """vLLM's completions stream carries `system_fingerprint` on its last text chunk, or on the
        usage chunk when there is one: put it back on that last chunk (`kept`'s last, or the held one)."""
        fingerprint = usage_chunk.get("system_fingerprint")
        last = kept[-1] if kept else self._held
        if fingerprint is None or not last or FINGERPRINT in last:
            return
        close = last.rfind(b"}")
        if close > 0:
            splice = b',"system_fingerprint":' + orjson.dumps(fingerprint)
            last = last[:close] + splice + last[close:]
            self.stripped -= len(splice)
            if kept:
                kept[-1] = last
            else:
                self._held = last


def _events_end(data: bytes) -> int:
    """Where the last whole event of `data` ends (just past its blank line), or -1."""
    end = data.rfind(EVENT_END)
    crlf = data.rfind(CRLF_EVENT_END)
    if end < 0 and crlf < 0:
        return -1
    return max(end + 2 if end >= 0 else -1, crlf + 4 if crlf >= 0 else -1)


def ask_usage(payload: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The request `payload` asking for a stream's usage chunk, or None when it asks already
    (or asks for usage on every chunk, which the router would not remove)."""
    options = payload.get("stream_options")
    if options is None:
        return {**payload, "stream_options": {"include_usage": True}}
    if not isinstance(options, dict) or options.get("include_usage") is True or options.get("continuous_usage_stats"):
        return None
    return {**payload, "stream_options": {**options, "include_usage": True}}
