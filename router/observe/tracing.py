"""OpenTelemetry traces of the proxied requests (``router.tracing``), exported over OTLP/HTTP.

One trace per client request: a root span (SERVER) from the request's arrival
to its last byte, with the model, the instance that answered, the status and
the retries; children for what it waited for (``queue wait`` for a
`max_concurrency` slot, ``wake`` or ``start`` of its model) and one
``upstream`` span (CLIENT) per try on an engine, with an ``upstream first
byte`` child up to the engine's first byte (a stream's first chunk, an
answer's status line). The engine gets a ``traceparent`` naming its
``upstream`` span, so vLLM's own spans (``--otlp-traces-endpoint``) join the
trace; an incoming ``traceparent`` is continued. The root span also carries the
client key's name (``kvrouter.key``, never the key) and the engine's token
usage (``gen_ai.usage.input_tokens``, ``gen_ai.usage.output_tokens``, the
OpenTelemetry GenAI names) when the answer reported it.

The SDK and its exporter are an extra (``pip install 'kvrouter[tracing]'``),
imported only when tracing is on. Spans are handed to a `BatchSpanProcessor`,
whose thread encodes and sends them: the event loop only creates and ends
them. When tracing is off, `tracing_for` returns None and the proxy's hot path
checks that one value and does nothing else.
"""
from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Awaitable, Iterable, Mapping, Optional, Protocol, TypeVar
from urllib.parse import urlsplit

import router
from router.config.router import TracingSettings

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer

log = logging.getLogger("router.tracing")

#: What to install for tracing.
EXTRA = "kvrouter[tracing]"
#: The packages the extra installs, as imported.
PACKAGES = ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http.trace_exporter")
#: The service name when neither the config nor OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES gives one.
DEFAULT_SERVICE = "kvrouter"
#: The OTLP/HTTP path of traces under a collector's base URL.
TRACES_PATH = "/v1/traces"

#: Names of the spans (the root span is named ``METHOD /path``).
QUEUE = "queue wait"
UPSTREAM = "upstream"
FIRST_BYTE = "upstream first byte"

T = TypeVar("T")


class Answer(Protocol):
    """An engine's answer, as far as a span needs it."""

    @property
    def status(self) -> int: ...


A = TypeVar("A", bound=Answer)


class Headers:
    """OpenTelemetry's Getter over ASGI request headers (a list of lower-case byte pairs)."""

    @staticmethod
    def get(carrier: Iterable[tuple[bytes, bytes]], key: str) -> Optional[list[str]]:
        name = key.encode("latin-1")
        values = [v.decode("latin-1") for k, v in carrier if k == name]
        return values or None

    @staticmethod
    def keys(carrier: Iterable[tuple[bytes, bytes]]) -> list[str]:
        return [k.decode("latin-1") for k, _ in carrier]


def switched_off(environ: Mapping[str, str]) -> bool:
    """The standard switches for the whole SDK, or for trace export, say no."""
    return (environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
            or environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none")


def endpoint(settings: TracingSettings, environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """The URL spans are sent to, or None when tracing is off: ``router.tracing.otlp_endpoint``
    (``/v1/traces`` added to a URL without a path), else the standard environment variables
    (the traces URL as given, or ``/v1/traces`` under the base URL)."""
    if switched_off(environ):
        return None
    if settings.otlp_endpoint:
        url = settings.otlp_endpoint
        return url.rstrip("/") + TRACES_PATH if urlsplit(url).path in ("", "/") else url
    traces = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if traces:
        return traces
    base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    return base.rstrip("/") + TRACES_PATH if base else None


def missing_packages() -> list[str]:
    """The extra's modules that cannot be imported."""
    import importlib
    missing = []
    for name in PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def problem(settings: TracingSettings, environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """Why the tracing asked for cannot run, naming the extra to install; None when it can or is off."""
    url = endpoint(settings, environ)
    if url is None or not missing_packages():
        return None
    source = "router.tracing.otlp_endpoint" if settings.otlp_endpoint else "OTEL_EXPORTER_OTLP_*ENDPOINT"
    return (f"router.tracing: traces to {url} (from {source}) need the OpenTelemetry SDK and its OTLP/HTTP exporter, "
            f"which are not installed; install them with: pip install '{EXTRA}'")


class Tracing:
    """One tracer provider exporting to one endpoint, in batches, from the SDK's own thread."""

    def __init__(self, settings: TracingSettings, url: str):
        from opentelemetry import propagate, trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; the config's name wins.
        resource = Resource.create({SERVICE_NAME: settings.service_name} if settings.service_name else {})
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE}))
        resource = resource.merge(Resource({SERVICE_VERSION: router.__version__}))
        # No ratio in the config: the SDK's sampler from OTEL_TRACES_SAMPLER(_ARG), by default every trace.
        sampler = None if settings.sample_ratio is None else ParentBased(TraceIdRatioBased(settings.sample_ratio))
        #: Flushed by the SDK at the process's exit (shutdown_on_exit); never made global, so several
        #: configs (a reload, the tests' in-process stacks) each keep their own.
        self.provider = TracerProvider(sampler=sampler, resource=resource)
        # The exporter reads the other OTEL_EXPORTER_OTLP_* variables (headers, timeout, compression,
        # certificates); the processor the OTEL_BSP_* ones (batch size, delay, queue size).
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
        self.tracer: Tracer = self.provider.get_tracer("router.observe.tracing", router.__version__)
        self.url = url
        #: OTEL_PROPAGATORS' choice; W3C trace context and baggage by default.
        self.propagator = propagate.get_global_textmap()
        #: The OpenTelemetry API (imported here only: the router runs without it while tracing is off).
        self.api = trace
        #: The request headers the router sets itself on the way to an engine (a client's are replaced).
        self.headers = frozenset(f.encode("latin-1") for f in self.propagator.fields)

    def failed(self, span: Span, why: str = "") -> None:
        """Mark `span` as an error, saying `why`."""
        span.set_status(self.api.Status(self.api.StatusCode.ERROR, why or None))

    def begin(self, scope: Mapping[str, object], start: float, model: str) -> RequestTrace:
        """The trace of one client request that arrived at `start` (time.perf_counter) for `model`."""
        return RequestTrace(self, scope, start, model)


#: One per distinct settings, for the life of the process (a reload with the same block keeps it).
_made: dict[TracingSettings, Tracing] = {}


def tracing_for(settings: TracingSettings) -> Optional[Tracing]:
    """The process's tracing for `settings`, or None when off (no endpoint, or switched off by the
    environment). Without the packages it logs why (the router's start already refused) and is off."""
    url = endpoint(settings)
    if url is None:
        return None
    made = _made.get(settings)
    if made is None or made.url != url:
        try:
            made = _made[settings] = Tracing(settings, url)
        except ImportError:
            log.error("%s; tracing is off", problem(settings))
            return None
    return made


class RequestTrace:
    """The spans of one client request; made by `Tracing.begin`, ended by `end`.

    Times are the proxy's time.perf_counter() values, mapped once onto the
    wall clock OTLP wants.
    """

    __slots__ = ("tracing", "tracer", "root", "context", "start", "wall", "upstream", "sent", "answered", "tries")

    def __init__(self, tracing: Tracing, scope: Mapping[str, object], start: float, model: str):
        self.tracing = tracing
        self.tracer = tracing.tracer
        self.start = start
        self.wall = time.time_ns() - int((time.perf_counter() - start) * 1e9)
        caller = tracing.propagator.extract(scope["headers"], getter=Headers)  # type: ignore[arg-type]
        self.root: Span = self.tracer.start_span(
            f"{scope['method']} {scope['path']}", context=caller, kind=tracing.api.SpanKind.SERVER,
            start_time=self.wall, attributes={"http.request.method": str(scope["method"]),
                                              "url.path": str(scope["path"]), "kvrouter.model": model})
        #: The children's parent (with the caller's baggage, passed on to the engine).
        self.context: Context = tracing.api.set_span_in_context(self.root, caller)
        self.upstream: Optional[Span] = None
        self.sent = 0.0
        self.answered: Optional[float] = None
        self.tries = 0

    def ns(self, t: float) -> int:
        """A perf_counter time as OTLP's nanoseconds since the epoch (one clock for all the trace's spans)."""
        return self.wall + int((t - self.start) * 1e9)

    def now(self) -> int:
        return self.ns(time.perf_counter())

    async def waited(self, name: str, waiting: Awaitable[T], attributes: Optional[Mapping[str, str]] = None) -> T:
        """`waiting` awaited inside a child span `name` (a queue wait, a wake or start), which
        records how it failed, if it did."""
        span = self.tracer.start_span(name, context=self.context, attributes=attributes, start_time=self.now())
        try:
            return await waiting
        except Exception as e:
            self.tracing.failed(span, f"{type(e).__name__}: {e}")
            raise
        finally:
            span.end(self.now())

    def attempt(self, instance: str, url: str) -> bytes:
        """Open the span of one try on an engine (closing the previous try's); the header lines that
        make the engine's spans its children."""
        self.close_attempt(None, None)
        self.tries += 1
        self.sent = time.perf_counter()
        span = self.upstream = self.tracer.start_span(
            UPSTREAM, context=self.context, kind=self.tracing.api.SpanKind.CLIENT, start_time=self.ns(self.sent),
            attributes={"kvrouter.instance": instance, "server.address": url, "kvrouter.try": self.tries})
        self.answered = None
        carrier: dict[str, str] = {}
        self.tracing.propagator.inject(carrier, context=self.tracing.api.set_span_in_context(span, self.context))
        return "".join(f"{k}: {v}\r\n" for k, v in carrier.items()).encode("latin-1")

    async def exchange(self, sending: Awaitable[A]) -> A:
        """The engine's answer to the open try, its status recorded; a try that got none is closed
        with the error."""
        try:
            answer = await sending
        except BaseException as e:
            if self.upstream is not None:
                self.tracing.failed(self.upstream, f"{type(e).__name__}: {e}")
                self.upstream.end(self.now())
                self.upstream = None
            raise
        self.answered = time.perf_counter()
        if self.upstream is not None:
            self.upstream.set_attribute("http.response.status_code", answer.status)
            if answer.status >= 400:  # a client span's error, as OpenTelemetry's HTTP conventions say
                self.tracing.failed(self.upstream)
        return answer

    def close_attempt(self, first_byte: Optional[float], ended: Optional[float]) -> None:
        """End the open try's span: at `ended`, or (a try left for another engine) when its answer came;
        its first-byte child ends at `first_byte`, or at the answer's status line."""
        span = self.upstream
        if span is None:
            return
        self.upstream = None
        first = first_byte if first_byte is not None else self.answered
        if first is not None:
            self.tracer.start_span(FIRST_BYTE, context=self.tracing.api.set_span_in_context(span, self.context),
                                   start_time=self.ns(self.sent)).end(self.ns(first))
        end = ended if ended is not None else self.answered
        span.end(self.ns(end if end is not None else time.perf_counter()))

    def end(self, instance: Optional[str], status: int, retries: int, stream: bool, ttfb: Optional[float],
            key: str = "anonymous", prompt: Optional[int] = None, completion: Optional[int] = None) -> None:
        """The request is over: `status` as the client got it, `ttfb` (seconds after the start) its first
        byte, `key` the client key's name, `prompt` and `completion` the engine's usage."""
        now = time.perf_counter()
        self.close_attempt(self.start + ttfb if stream and ttfb is not None else None, now)
        root = self.root
        if instance is not None:
            root.set_attribute("kvrouter.instance", instance)
        root.set_attribute("http.response.status_code", status)
        root.set_attribute("kvrouter.retries", retries)
        root.set_attribute("kvrouter.stream", stream)
        root.set_attribute("kvrouter.key", key)
        if prompt is not None:
            root.set_attribute("gen_ai.usage.input_tokens", prompt)
        if completion is not None:
            root.set_attribute("gen_ai.usage.output_tokens", completion)
        if status >= 500:
            self.tracing.failed(root)
        root.end(self.ns(now))
