"""Traces end to end: the real router (router.tracing pointed at a test OTLP/HTTP receiver) in front of
real engines over loopback. The receiver decodes what the SDK's exporter sends (OTLP protobuf); each
test finds its trace by the id the engine got in its `traceparent` (or the one the client sent) and
waits for that trace's root span, which the router ends last."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import aiohttp
import pytest
from aiohttp import web
from helpers import LoopbackApp, free_port, get_json, post_json
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from router_support import LoopThread, RouterServer, Stack, config_from, instance

from router.sim import SimEngine, SimOptions

SERVER, CLIENT = ProtoSpan.SPAN_KIND_SERVER, ProtoSpan.SPAN_KIND_CLIENT
ERROR = 2  # Status.STATUS_CODE_ERROR


@dataclass(frozen=True)
class Span:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: int
    attributes: dict[str, Any]
    error: bool
    start: int
    end: int
    service: str


def values(pairs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in pairs:
        assert isinstance(kv, KeyValue)
        which = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, which) if which else None
    return out


class Receiver(LoopbackApp):
    """An OTLP/HTTP trace receiver: POST /v1/traces with an ExportTraceServiceRequest."""

    def __init__(self) -> None:
        super().__init__()
        self.spans: list[Span] = []
        self.posts = 0
        self.arrived = asyncio.Event()

    def routes(self, app: web.Application) -> None:
        self.arrived = asyncio.Event()  # on the loop thread's loop
        app.router.add_post("/v1/traces", self.traces)

    async def traces(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        export = ExportTraceServiceRequest()
        export.ParseFromString(await request.read())
        self.posts += 1
        for rs in export.resource_spans:
            service = values(rs.resource.attributes)["service.name"]
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.spans.append(Span(s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.name, s.kind,
                                           values(s.attributes), s.status.code == ERROR, s.start_time_unix_nano,
                                           s.end_time_unix_nano, service))
        self.arrived.set()
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf")

    async def roots(self, trace_ids: list[str], timeout: float = 30.0) -> None:
        """Return once the root span of every trace in `trace_ids` has arrived."""
        async def all_there() -> None:
            while not all(any(s.trace_id == t and s.kind == SERVER for s in self.spans) for t in trace_ids):
                self.arrived.clear()
                await self.arrived.wait()
        await asyncio.wait_for(all_there(), timeout)

    async def first(self, name: str) -> Span:
        """The first span named `name`, once it has arrived."""
        while not any(s.name == name for s in self.spans):
            self.arrived.clear()
            await self.arrived.wait()
        return next(s for s in self.spans if s.name == name)

    def trace(self, trace_id: str) -> list[Span]:
        return [s for s in self.spans if s.trace_id == trace_id]


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    # The SDK's batch processor reads OTEL_BSP_* when made: export 50 ms after a span ends, not 5 s.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        lt = LoopThread()
        yield lt
        lt.close()


@pytest.fixture(scope="module")
def receiver(loop: LoopThread) -> Iterator[Receiver]:
    r = loop.run(Receiver().start())
    yield r
    loop.run(r.stop())


@pytest.fixture
def stack(loop: LoopThread, tmp_path: Path) -> Iterator[Stack]:
    s = Stack(loop, tmp_path)
    yield s
    s.close()


def traced(stack: Stack, receiver: Receiver, instances: list[dict[str, Any]], **router: Any) -> RouterServer:
    return stack.router(instances, tracing={"otlp_endpoint": receiver.url}, **router)


def traceparent(headers: Any) -> tuple[str, str]:
    """(trace id, parent span id) of a W3C traceparent header."""
    version, trace_id, span_id, flags = headers["traceparent"].split("-")
    assert version == "00" and int(flags, 16) & 1 and len(trace_id) == 32 and len(span_id) == 16  # sampled
    return trace_id, span_id


def wait_for_traces(loop: LoopThread, receiver: Receiver, *trace_ids: str) -> None:
    loop.run(receiver.roots(list(trace_ids)), timeout=40)


def children(spans: list[Span], parent: Span) -> list[Span]:
    return sorted((s for s in spans if s.parent_id == parent.span_id), key=lambda s: s.start)


def root_of(spans: list[Span]) -> Span:
    roots = [s for s in spans if s.kind == SERVER]
    assert len(roots) == 1, spans
    return roots[0]


def test_a_request_is_one_trace_whose_upstream_span_the_engine_continues(stack: Stack, receiver: Receiver) -> None:
    e = stack.engine()
    r = traced(stack, receiver, [instance("m", e.port, name="m-0")])
    before = len(receiver.spans)
    assert post_json(f"{r.url}/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]})[0] == 200
    trace_id, parent = traceparent(e.headers[-1])
    wait_for_traces(stack.loop, receiver, trace_id)
    assert {s.trace_id for s in receiver.spans[before:]} == {trace_id}  # one trace for the one request
    spans = receiver.trace(trace_id)
    root = root_of(spans)
    assert root.name == "POST /v1/chat/completions" and root.parent_id == "" and root.service == "kvrouter"
    assert root.attributes == {"http.request.method": "POST", "url.path": "/v1/chat/completions", "kvrouter.model": "m",
                               "kvrouter.instance": "m-0", "http.response.status_code": 200, "kvrouter.retries": 0,
                               "kvrouter.stream": False, "kvrouter.key": "anonymous", "gen_ai.usage.input_tokens": 1,
                               "gen_ai.usage.output_tokens": 2}
    assert not root.error
    # Nothing was waited for: the one child is the exchange with the engine, whose span the engine was told.
    upstream, = children(spans, root)
    assert upstream.name == "upstream" and upstream.kind == CLIENT and upstream.span_id == parent
    assert upstream.attributes["kvrouter.instance"] == "m-0" and upstream.attributes["http.response.status_code"] == 200
    first_byte, = children(spans, upstream)
    assert first_byte.name == "upstream first byte"
    assert root.start <= upstream.start <= first_byte.start and first_byte.end <= upstream.end <= root.end
    assert len(spans) == 3
    assert get_json(f"{r.url}/get_server_info")[1]["router"]["tracing"] == {
        "otlp_endpoint": receiver.url, "sample_ratio": None, "service_name": None}


def test_a_proxy_worker_traces_the_requests_it_serves(stack: Stack, receiver: Receiver) -> None:
    """With router.workers: 2 the requests are served by spawned proxy processes, each with its own exporter."""
    e = stack.engine()
    r = traced(stack, receiver, [instance("m", e.port)], workers=2)
    assert post_json(f"{r.url}/v1/completions", {"model": "m", "prompt": "x"})[0] == 200
    trace_id, parent = traceparent(e.headers[-1])
    wait_for_traces(stack.loop, receiver, trace_id)
    spans = receiver.trace(trace_id)
    root = root_of(spans)
    assert root.attributes["kvrouter.model"] == "m" and root.attributes["http.response.status_code"] == 200
    upstream, = children(spans, root)
    assert upstream.span_id == parent


def test_an_incoming_traceparent_is_continued_and_replaced_on_the_way_to_the_engine(stack: Stack,
                                                                                       receiver: Receiver) -> None:
    e = stack.engine()
    r = traced(stack, receiver, [instance("m", e.port)])
    caller_trace, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    status, _ = post_json(f"{r.url}/v1/completions", {"model": "m", "prompt": "x"},
                          headers={"traceparent": f"00-{caller_trace}-{caller_span}-01", "tracestate": "caller=1"})
    assert status == 200
    trace_id, parent = traceparent(e.headers[-1])
    assert trace_id == caller_trace and parent != caller_span  # the router's own span is the engine's parent
    assert e.headers[-1].getall("traceparent") == [e.headers[-1]["traceparent"]]  # the client's was not passed too
    assert e.headers[-1].get("tracestate") == "caller=1"  # the caller's vendor state carries on
    wait_for_traces(stack.loop, receiver, caller_trace)
    spans = receiver.trace(caller_trace)
    root = root_of(spans)
    assert root.parent_id == caller_span
    upstream, = children(spans, root)
    assert upstream.span_id == parent


def test_a_stream_s_first_byte_comes_before_its_end(stack: Stack, receiver: Receiver) -> None:
    e = stack.engine(chunks=4, interval=0.2)
    r = traced(stack, receiver, [instance("m", e.port)])

    async def stream() -> bytes:
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{r.url}/v1/completions", json={"model": "m", "prompt": "x", "stream": True}) as resp:
                assert resp.status == 200
                return await resp.read()
    assert stack.loop.run(stream()).endswith(b"data: [DONE]\n\n")
    trace_id, _ = traceparent(e.headers[-1])
    wait_for_traces(stack.loop, receiver, trace_id)
    spans = receiver.trace(trace_id)
    root = root_of(spans)
    assert root.attributes["kvrouter.stream"] is True
    upstream, = children(spans, root)
    first_byte, = children(spans, upstream)
    # Three more chunks came 0.2 s apart after the first one.
    assert upstream.end - first_byte.end >= 0.5e9


def test_a_request_that_waited_for_a_slot_has_a_queue_child(stack: Stack, receiver: Receiver) -> None:
    e = stack.engine(interval=0.5)  # each answer takes 0.5 s: the second request waits for the first's slot
    r = traced(stack, receiver, [instance("m", e.port, max_concurrency=1, max_queue=1)])

    async def two() -> list[int]:
        async with aiohttp.ClientSession() as s:
            async def one() -> int:
                async with s.post(f"{r.url}/v1/completions", json={"model": "m", "prompt": "x"}) as resp:
                    return resp.status
            return list(await asyncio.gather(one(), one()))
    assert stack.loop.run(two()) == [200, 200]
    ids = [traceparent(h)[0] for h in e.headers]
    wait_for_traces(stack.loop, receiver, *ids)
    queued = []
    for trace_id in ids:
        spans = receiver.trace(trace_id)
        root = root_of(spans)
        names = [s.name for s in children(spans, root)]
        assert names in (["upstream"], ["queue wait", "upstream"])
        queued += [s for s in children(spans, root) if s.name == "queue wait"]
    wait, = queued
    assert wait.end - wait.start >= 0.3e9  # it waited for the first answer


def test_a_sleeping_model_s_request_has_a_wake_child_before_its_upstream(stack: Stack, receiver: Receiver) -> None:
    sim = SimEngine(SimOptions(engine="vllm", model="m", port=0))
    stack.loop.run(sim.start())
    stack.engines.append(sim)  # type: ignore[arg-type]  # stopped at the end like the others
    r = traced(stack, receiver, [instance("m", sim.port, "--enable-sleep-mode")])
    assert post_json(f"{r.url}/action/sleep/m", {})[0] == 200
    assert sim.asleep
    status, body = post_json(f"{r.url}/v1/completions", {"model": "m", "prompt": "x", "max_tokens": 2})
    assert status == 200, body
    assert not sim.asleep
    # The engine is the simulator, which keeps no headers: the trace is found by its wake span.
    wake = stack.loop.run(receiver.first("wake"), timeout=40)
    wait_for_traces(stack.loop, receiver, wake.trace_id)
    spans = receiver.trace(wake.trace_id)
    root = root_of(spans)
    assert wake.parent_id == root.span_id and wake.attributes == {"kvrouter.model_state": "sleeping"} and not wake.error
    names = [s.name for s in children(spans, root)]
    assert names == ["wake", "upstream"]
    upstream = children(spans, root)[1]
    assert upstream.start >= wake.end
    assert root.attributes["http.response.status_code"] == 200


def test_a_retry_is_a_second_upstream_child_and_counted_on_the_root(stack: Stack, receiver: Receiver) -> None:
    bad, good = stack.engine(behaviour="error503"), stack.engine()
    r = traced(stack, receiver, [instance("m", bad.port, name="bad"), instance("m", good.port, name="good")],
               health_check_interval_seconds=60)
    assert post_json(f"{r.url}/v1/completions", {"model": "m", "prompt": "x"})[0] == 200
    (trace_id, first), (again, second) = traceparent(bad.headers[-1]), traceparent(good.headers[-1])
    assert again == trace_id and first != second
    wait_for_traces(stack.loop, receiver, trace_id)
    spans = receiver.trace(trace_id)
    root = root_of(spans)
    assert root.attributes["kvrouter.retries"] == 1 and root.attributes["kvrouter.instance"] == "good"
    tries = children(spans, root)
    assert [(s.span_id, s.attributes["kvrouter.instance"], s.attributes["http.response.status_code"], s.error)
            for s in tries] == [(first, "bad", 503, True), (second, "good", 200, False)]
    assert tries[0].end <= tries[1].start


def test_tracing_off_passes_the_client_s_traceparent_through(stack: Stack) -> None:
    e = stack.engine()
    r = stack.router([instance("m", e.port)])
    assert r.app.state.proxy.tracing is None
    sent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert post_json(f"{r.url}/v1/completions", {"model": "m", "prompt": "x"}, headers={"traceparent": sent})[0] == 200
    assert e.headers[-1]["traceparent"] == sent


def test_a_config_naming_a_bad_endpoint_is_refused(tmp_path: Path) -> None:
    from router.config import ConfigError
    with pytest.raises(ConfigError) as e:
        config_from(tmp_path, [instance("m", 8001)], {"tracing": {"otlp_endpoint": "collector:4318"}})
    assert "router.tracing.otlp_endpoint: must be an http:// or https:// URL of an OTLP/HTTP receiver" in str(e.value.problems)
