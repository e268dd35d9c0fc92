"""Relaying an engine's answer to the client: a body whole, a stream chunk by chunk.

Kept apart from the routing in forward.py because this is the per-chunk path:
whatever reads an answer as it passes (the Responses API's owners, and
anything that must see a stream's last event) hooks in here, and nowhere else
touches the bytes between the engine and the client.
"""
from __future__ import annotations

import time
from typing import Callable

from router.config import RouterSettings
from router.server.fleet.models import Model
from router.server.fleet.upstream import Response, UpstreamError, UpstreamTimeout
from router.server.proxy.affinity import ResponseOwners
from router.server.proxy.errors import ANTHROPIC_PATHS, error_body_for
from router.server.proxy.exchange import Exchange
from router.server.proxy.reply import STREAM_HEADERS, Reply
from router.server.proxy.request import Unserved, relay_headers
from router.server.proxy.tokens import COMPLETIONS_PATH, StreamUsage, body_usage

#: On every answer an engine gave: the model that answered (the one asked, or its fallback).
MODEL_HEADER = b"x-kvrouter-model"


def upstream_failure(model: Model, e: UpstreamError) -> Unserved:
    """A failure before anything reached the client, as the error to answer (or to fall back from)."""
    model.metrics.upstream_error(e.kind)
    if isinstance(e, UpstreamTimeout):
        return Unserved(504, f"The engine of model '{model.name}' timed out: {e}.")
    return Unserved(502, f"The engine of model '{model.name}' failed: {e}.")


async def relay_body(reply: Reply, resp: Response, start: float, ex: Exchange, model: Model,
                     owners: ResponseOwners, learn: bool) -> None:
    """The engine's whole answer to the client; a Responses answer teaches `owners` who holds it."""
    try:
        data = await resp.read()
    except UpstreamError as e:
        raise upstream_failure(model, e) from None
    ex.status = resp.status
    ex.model_answered = model.name
    if learn and resp.status == 200 and ex.replica is not None:
        owners.learn_from_body(data, model, ex.replica)
    if resp.status == 200:
        ex.prompt_tokens, ex.completion_tokens = body_usage(data)
    await reply.whole(resp.status, relay_headers(resp, [(MODEL_HEADER, model.name.encode())]), data)
    ex.ttfb = time.perf_counter() - start
    ex.nbytes = len(data)


async def relay_stream(reply: Reply, resp: Response, start: float, ex: Exchange, model: Model,
                       owners: ResponseOwners, learn: bool, idle_timeout: float, settings: RouterSettings,
                       strip_usage: bool = False) -> None:
    """The engine's stream to the client as it comes, its usage counted on the way (and the usage
    chunk the router asked for removed: `strip_usage`); a stream the engine breaks ends with an error
    event in the client's API shape and counts against the replica's breaker."""
    resp.stream(idle_timeout)
    ex.status = resp.status
    ex.model_answered = model.name
    await reply.head(resp.status, relay_headers(resp, [*STREAM_HEADERS, (MODEL_HEADER, model.name.encode())]))
    usage = StreamUsage(strip_usage, ex.path == COMPLETIONS_PATH)
    nbytes = 0
    tail = b""
    # A reply on a connection of ours takes the chunks from the engine connection's callback.
    piped = None if learn else getattr(reply, "pipe_sink", None)
    try:
        if piped is not None:
            try:
                await resp.pipe(_counting(piped(resp), usage))
            finally:
                nbytes = resp.relayed - usage.stripped
                if resp.first_relayed_at is not None:
                    ex.ttfb = resp.first_relayed_at - start
                ex.prompt_tokens, ex.completion_tokens = usage.counts
            if ex.ttfb is None:
                ex.ttfb = time.perf_counter() - start
            ex.nbytes = nbytes
            return await reply.end(usage.end())
        chunk = await resp.next_chunk()
        ex.ttfb = time.perf_counter() - start
        while chunk:
            if learn and ex.replica is not None:
                learn = not owners.learn_from_stream(chunk, model, ex.replica)
            nbytes += len(chunk)
            if strip_usage:
                chunk = usage.feed(chunk)
                if chunk:
                    await reply.chunk(chunk)
            else:
                usage.scan(chunk)
                await reply.chunk(chunk)
            chunk = await resp.next_chunk()
        nbytes -= usage.stripped
        tail = usage.end()
    except UpstreamError as e:
        model.metrics.upstream_error(e.kind)
        if ex.replica is not None:  # a stream the engine broke counts against its breaker
            model.failed(ex.replica, time.monotonic(), settings)
        ex.status = 504 if isinstance(e, UpstreamTimeout) else 502
        message = f"The engine of model '{model.name}' stopped the stream: {e}."
        event = b"event: error\n" if ex.path in ANTHROPIC_PATHS else b""
        tail = usage.end() + event + b"data: " + error_body_for(ex.path, ex.status, message) + b"\n\n"
    ex.prompt_tokens, ex.completion_tokens = usage.counts
    ex.nbytes = nbytes
    await reply.end(tail)


def _counting(sink: Callable[[bytes], bool], usage: StreamUsage) -> Callable[[bytes], bool]:
    """`sink` with the stream's usage read on the way (and, when the router asked for it, its
    usage chunk removed): the fast server's piped path."""
    if not usage.strip:
        scan = usage.scan

        def scanning(data: bytes) -> bool:
            scan(data)
            return sink(data)
        return scanning
    feed = usage.feed

    def stripping(data: bytes) -> bool:
        data = feed(data)
        return sink(data) if data else True
    return stripping
