"""The usage scanner (router/server/proxy/tokens.py): counts from every answer shape, streams cut at
every byte boundary, and the include_usage chunk the router asked for removed byte for byte."""
from __future__ import annotations

from typing import NamedTuple

import orjson
import pytest

from router.server.proxy.request import Outgoing
from router.server.proxy.tokens import MAX_PENDING, StreamUsage, ask_usage, body_usage

FP = "vllm-0.32.0-abcd"


def chat_stream(include_usage: bool, usage_null: bool = False) -> tuple[bytes, bytes]:
    """(the stream, its usage chunk) of a small chat answer, as vLLM (or SGLang: `usage_null`) sends it."""
    tail = b',"usage":null' if usage_null else b""
    head = b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":['
    events = [head + b'{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]' + tail + b"}\n\n"]
    for word in ("Hello", " usage", " world"):  # a token that says "usage" is text, not a count
        events.append(head + b'{"index":0,"delta":{"content":"' + word.encode() + b'"},"finish_reason":null}]'
                      + tail + b"}\n\n")
    events.append(head + b'{"index":0,"delta":{"content":"!"},"finish_reason":"stop"}]' + tail + b"}\n\n")
    usage = (b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[],'
             b'"usage":{"prompt_tokens":7,"total_tokens":11,"completion_tokens":4},"system_fingerprint":"'
             + FP.encode() + b'"}\n\n')
    done = b"data: [DONE]\n\n"
    return b"".join(events) + (usage if include_usage else b"") + done, usage


def completions_stream(include_usage: bool) -> bytes:
    """A vLLM completions stream: the fingerprint on the usage chunk, or on the last text chunk."""
    head = b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":['
    last_tail = b"" if include_usage else b',"system_fingerprint":"' + FP.encode() + b'"'
    events = [head + b'{"index":0,"text":"a","finish_reason":null}]}\n\n',
              head + b'{"index":0,"text":"b","finish_reason":"length"}]' + last_tail + b"}\n\n"]
    if include_usage:
        events.append(b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":[],'
                      b'"usage":{"prompt_tokens":3,"total_tokens":5,"completion_tokens":2},"system_fingerprint":"'
                      + FP.encode() + b'"}\n\n')
    events.append(b"data: [DONE]\n\n")
    return b"".join(events)


def cuts(data: bytes, step: int) -> list[bytes]:
    return [data[i:i + step] for i in range(0, len(data), step)]


def run(usage: StreamUsage, pieces: list[bytes]) -> bytes:
    out = [usage.feed(p) for p in pieces] if usage.strip else [usage.scan(p) or p for p in pieces]
    return b"".join(out) + usage.end()


@pytest.mark.parametrize("usage_null", [False, True])
def test_a_stream_cut_anywhere_is_counted_and_relayed_as_it_came(usage_null: bool) -> None:
    stream, _ = chat_stream(True, usage_null)
    for step in range(1, len(stream) + 1):
        usage = StreamUsage()
        assert run(usage, cuts(stream, step)) == stream
        assert usage.counts == (7, 4), step


@pytest.mark.parametrize("usage_null", [False, True])
def test_the_usage_chunk_the_router_asked_for_is_removed_byte_for_byte(usage_null: bool) -> None:
    asked, _ = chat_stream(True, usage_null)
    plain, _ = chat_stream(False, usage_null)
    for step in (1, 2, 3, 7, 50, 64, 255, len(asked)):
        usage = StreamUsage(strip=True)
        assert run(usage, cuts(asked, step)) == plain, step
        assert usage.counts == (7, 4)
        assert usage.stripped == len(asked) - len(plain)


def test_a_stream_on_crlf_lines_is_read_and_stripped_the_same() -> None:
    asked, plain = (chat_stream(usage)[0].replace(b"\n", b"\r\n") for usage in (True, False))
    for step in range(1, len(asked) + 1, 3):
        usage = StreamUsage(strip=True)
        assert run(usage, cuts(asked, step)) == plain, step
        assert usage.counts == (7, 4)
        scanned = StreamUsage()
        assert run(scanned, cuts(asked, step)) == asked and scanned.counts == (7, 4)


def test_a_stream_that_is_not_sse_is_not_held_back() -> None:
    usage = StreamUsage(strip=True)
    assert usage.feed(b"x" * 1000) == b""  # an event's start waits for its end...
    big = b"y" * MAX_PENDING
    assert usage.feed(big) == b"x" * 1000 + big  # ...but not forever
    assert usage.feed(b"z\n\n") == b"z\n\n" and usage.end() == b""


def test_a_stream_without_usage_counts_nothing_and_passes_untouched() -> None:
    plain, _ = chat_stream(False)
    for strip in (False, True):
        usage = StreamUsage(strip=strip)
        assert run(usage, cuts(plain, 5)) == plain
        assert usage.counts == (None, None)


def test_a_completions_stream_gets_its_fingerprint_back_on_the_last_text_chunk() -> None:
    asked, plain = completions_stream(True), completions_stream(False)
    for step in range(1, len(asked) + 1):
        usage = StreamUsage(strip=True, completions=True)
        assert run(usage, cuts(asked, step)) == plain, step
        assert usage.counts == (3, 2)
        assert usage.stripped == len(asked) - len(plain)


def test_a_client_that_asked_for_usage_keeps_its_chunk() -> None:
    asked, usage_chunk = chat_stream(True)
    usage = StreamUsage()
    assert run(usage, [asked]) == asked and usage_chunk in asked
    assert usage.counts == (7, 4)


def test_responses_and_anthropic_streams_are_counted() -> None:
    responses = (b'event: response.created\ndata: {"type":"response.created","response":{"usage":null}}\n\n'
                 b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"usage"}\n\n'
                 b'event: response.completed\ndata: {"type":"response.completed","response":{"id":"r",'
                 b'"usage":{"input_tokens":9,"output_tokens":5,"total_tokens":14}}}\n\n')
    anthropic = (b'event: message_start\ndata: {"type":"message_start","message":{"id":"m",'
                 b'"usage":{"input_tokens":12,"output_tokens":0}}}\n\n'
                 b'event: content_block_delta\ndata: {"type":"content_block_delta","delta":{"text":"hi"}}\n\n'
                 b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},'
                 b'"usage":{"output_tokens":6}}\n\n'
                 b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    for stream, want in ((responses, (9, 5)), (anthropic, (12, 6))):
        for step in (1, 13, len(stream)):
            usage = StreamUsage()
            assert run(usage, cuts(stream, step)) == stream
            assert usage.counts == want


def test_whole_answers_are_counted_in_every_shape() -> None:
    assert body_usage(orjson.dumps({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 8,
                                                             "total_tokens": 11}})) == (3, 8)
    assert body_usage(orjson.dumps({"type": "message", "usage": {"input_tokens": 4, "output_tokens": 2}})) == (4, 2)
    assert body_usage(orjson.dumps({"object": "response", "usage": {"input_tokens": 5, "output_tokens": 1,
                                                                    "total_tokens": 6}})) == (5, 1)
    assert body_usage(orjson.dumps({"data": [], "usage": {"prompt_tokens": 6, "total_tokens": 6}})) == (6, 0)
    assert body_usage(orjson.dumps({"text": "hi", "usage": {"type": "duration", "seconds": 2}})) == (None, None)
    assert body_usage(b'{"usage": ') == (None, None)
    assert body_usage(b'{"choices": []}') == (None, None)


def test_the_question_is_asked_once_and_only_when_the_client_did_not() -> None:
    assert ask_usage({"stream": True}) == {"stream": True, "stream_options": {"include_usage": True}}
    assert ask_usage({"stream": True, "stream_options": {"include_usage": False}}) == {
        "stream": True, "stream_options": {"include_usage": True}}
    assert ask_usage({"stream": True, "stream_options": {"include_usage": True}}) is None
    assert ask_usage({"stream": True, "stream_options": {"continuous_usage_stats": True}}) is None
    body = b'{"model":"m","stream":true,"messages":[]}'
    same, renamed = Served(frozenset({"m"}), "m"), Served(frozenset({"org/m"}), "org/m")
    out = Outgoing("m", orjson.loads(body), body, True).asking_usage("/v1/chat/completions")
    assert out.strip_usage and out.body is body  # encoded once, when sent, with whatever else changes
    for replica, model in ((same, "m"), (renamed, "org/m")):
        sent = orjson.loads(out.data_for(replica))  # type: ignore[arg-type]
        assert sent == {"model": model, "stream": True, "messages": [], "stream_options": {"include_usage": True}}
    for path, stream in (("/v1/chat/completions", False), ("/v1/responses", True), ("/v1/messages", True)):
        kept = Outgoing("m", orjson.loads(body), body, stream).asking_usage(path)
        assert kept.data_for(same) is body and not kept.strip_usage  # type: ignore[arg-type]


class Served(NamedTuple):
    """What `Outgoing.data_for` reads of a replica (shaping is not asked for: `shaped` is False)."""
    served: frozenset[str]
    served_name: str
    ranks: bool = False
