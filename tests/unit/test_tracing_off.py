"""Tracing off costs the router nothing and needs no package: when it is on, and where spans go, is
decided by router.tracing and the standard OTEL_* variables; without an endpoint nothing of
OpenTelemetry is imported, and the engine gets the client's headers untouched."""
from __future__ import annotations

import importlib
import signal
import sys
from pathlib import Path

import pytest

from router.config.router import TracingSettings
from router.observe import tracing
from router.observe.tracing import EXTRA, endpoint, problem, tracing_for
from router.server.proxy.request import DROP_REQUEST_HEADERS, request_head

OTEL_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER")
ON = TracingSettings(otlp_endpoint="http://collector:4318")


@pytest.fixture
def no_otel_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in OTEL_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def without_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    """As in an install without the extra: importing OpenTelemetry fails."""
    for name in [n for n in sys.modules if n == "opentelemetry" or n.startswith("opentelemetry.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "opentelemetry", None)


def test_no_endpoint_anywhere_is_off() -> None:
    assert endpoint(TracingSettings(), {}) is None


@pytest.mark.parametrize("given, url", [
    ("http://collector:4318", "http://collector:4318/v1/traces"),
    ("http://collector:4318/", "http://collector:4318/v1/traces"),
    ("https://otel.example/ingest/traces", "https://otel.example/ingest/traces"),
])
def test_the_config_s_endpoint_gets_the_traces_path_only_when_it_has_none(given: str, url: str) -> None:
    assert endpoint(TracingSettings(otlp_endpoint=given), {}) == url


def test_the_standard_variables_turn_it_on_and_the_config_wins_over_them() -> None:
    assert endpoint(TracingSettings(), {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}) == "http://c:4318/v1/traces"
    both = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:9/x"}
    assert endpoint(TracingSettings(), both) == "http://t:9/x"  # the traces URL is taken as given
    assert endpoint(ON, both) == "http://collector:4318/v1/traces"


@pytest.mark.parametrize("switch", [{"OTEL_SDK_DISABLED": "true"}, {"OTEL_TRACES_EXPORTER": "none"}])
def test_the_standard_switches_turn_it_off(switch: dict[str, str]) -> None:
    assert endpoint(ON, switch) is None


def test_off_needs_no_package(no_otel_env: pytest.MonkeyPatch, without_packages: None) -> None:
    # The module and the proxy import without OpenTelemetry (it is imported when tracing starts).
    for name in ("router.observe.tracing", "router.server.proxy.exchange", "router.server.proxy.forward"):
        no_otel_env.delitem(sys.modules, name, raising=False)
    fresh = importlib.import_module("router.observe.tracing")
    importlib.import_module("router.server.proxy.forward")
    assert fresh.tracing_for(TracingSettings()) is None
    assert fresh.problem(TracingSettings()) is None


def test_on_without_the_packages_names_the_extra_and_the_router_runs_untraced(
        no_otel_env: pytest.MonkeyPatch, without_packages: None, caplog: pytest.LogCaptureFixture) -> None:
    settings = TracingSettings(otlp_endpoint="http://collector:4318/")
    why = problem(settings)
    assert why == ("router.tracing: traces to http://collector:4318/v1/traces (from router.tracing.otlp_endpoint) need "
                   "the OpenTelemetry SDK and its OTLP/HTTP exporter, which are not installed; install them with: "
                   f"pip install '{EXTRA}'")
    no_otel_env.setattr(tracing, "_made", {})
    assert tracing_for(settings) is None  # a reload turning it on: logged, not a crash
    assert why in caplog.text


def test_off_the_engine_gets_the_client_s_trace_headers_as_sent() -> None:
    scope = {"method": "POST", "query_string": b"", "headers": [
        (b"content-type", b"application/json"), (b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        (b"tracestate", b"a=1")]}
    head = request_head(scope, b"/v1/completions", b"e:8000", 2, DROP_REQUEST_HEADERS)
    assert head == (b"POST /v1/completions HTTP/1.1\r\nhost: e:8000\r\ncontent-length: 2\r\n"
                    b"content-type: application/json\r\n"
                    b"traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\ntracestate: a=1\r\n\r\n")
    # On, the router's own lines replace them (their names are dropped from the client's).
    traced = request_head(scope, b"/v1/completions", b"e:8000", 2, DROP_REQUEST_HEADERS | {b"traceparent"},
                          b"", b"traceparent: 00-mine\r\n")
    assert traced.count(b"traceparent") == 1 and b"traceparent: 00-mine\r\n" in traced and b"tracestate: a=1" in traced


def test_the_router_refuses_to_start_traced_without_the_packages(no_otel_env: pytest.MonkeyPatch, without_packages: None,
                                                                  tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from router import serve
    config = tmp_path / "config.yaml"
    config.write_text("router: {tracing: {otlp_endpoint: 'http://collector:4318'}}\n"
                      "instances: [{name: a, model: m, engine: vllm, launch: false, engine_args: ['--port=8001']}]\n")
    previous = signal.getsignal(signal.SIGTERM)  # main() installs its own
    try:
        assert serve.main(["--config", str(config)]) == 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert (f"error: {config}: router.tracing: traces to http://collector:4318/v1/traces (from "
            f"router.tracing.otlp_endpoint) need the OpenTelemetry SDK and its OTLP/HTTP exporter, which are not "
            f"installed; install them with: pip install '{EXTRA}'") in capsys.readouterr().err
