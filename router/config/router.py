"""The ``router`` block: the router's address and behaviour, and the kinds only it uses
(keys given inline or from the environment or a file; nameserver addresses)."""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from router.config.keys import ApiKey, ApiKeys, OneKey
from router.config.kinds import COUNT, HOST, NON_NEGATIVE, POSITIVE, Choice, Flag, Number, Text
from router.config.problems import Reading
from router.config.schema import Kind, Section, setting

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
LOG_FORMATS = ("text", "json")


NAMESERVER = re.compile(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?|([0-9.]+)(?::(\d+))?|([0-9A-Fa-f:]+)")


@dataclass(frozen=True)
class Nameservers(Kind[tuple[tuple[str, int], ...]]):
    """``["10.96.0.10", "127.0.0.1:5353", "[fd00::a]:53"]`` -> ((address, port), ...), port 53 by default."""

    @property
    def label(self) -> str:
        return "list of IP addresses, each with an optional port"

    def read(self, value: object, where: str, reading: Reading) -> Optional[tuple[tuple[str, int], ...]]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items:
            reading.error(where, f"must be a list of nameserver addresses, each an IP with an optional port "
                                 f"(e.g. [\"10.96.0.10\", \"127.0.0.1:5353\"]), not {value!r}")
            return None
        out = []
        for i, item in enumerate(items):
            m = NAMESERVER.fullmatch(item.strip() if isinstance(item, str) else "")
            address, port = (m.group(1) or m.group(3) or m.group(5), m.group(2) or m.group(4) or "53") if m else ("", "")
            try:
                ipaddress.ip_address(address)
                ok = 1 <= int(port) <= 65535
            except ValueError:
                ok = False
            if not ok:
                reading.error(f"{where}[{i}]", f"{item!r} is not a nameserver: give an IP address with an optional port "
                                               "(10.96.0.10, 127.0.0.1:5353, [fd00::a]:53); names are not resolved here")
                continue
            out.append((address, int(port)))
        return tuple(out) if len(out) == len(items) else None


@dataclass(frozen=True)
class LogPath(Kind[str]):
    """A file the router writes; a relative path is from the config file's folder."""

    @property
    def label(self) -> str:
        return "a file path"

    def read(self, value: object, where: str, reading: Reading) -> Optional[str]:
        if not isinstance(value, str) or not value.strip():
            reading.error(where, f"must be the path of a file to write, not {value!r}")
            return None
        path = Path(value.strip()).expanduser()
        path = path if path.is_absolute() else reading.base / path
        if path.is_dir():
            reading.error(where, f"{path} is a folder; give the path of a file in it (`{path}/activity.jsonl`)")
            return None
        return str(path)


#: An OTLP/HTTP receiver: a collector's base URL or its full traces URL.
OTLP_URL = Text("an http:// or https:// URL", r"https?://[^\s/?#]+(/\S*)?", strip=True,
                problem="must be {what} of an OTLP/HTTP receiver (`http://collector:4318`), not {value!r}")


@dataclass(frozen=True)
class TracingSettings:
    """OpenTelemetry traces (router/observe/tracing.py). Each key left out falls back on the standard
    ``OTEL_*`` environment variable, so a process configured the usual way needs no block."""

    otlp_endpoint: Optional[str] = setting(OTLP_URL, None, (
        "where spans go over OTLP/HTTP: a collector's base URL (`http://collector:4318`, `/v1/traces` is added) or "
        "the full URL of its traces path; tracing is on when this or the environment gives one (needs "
        "`pip install 'kvrouter[tracing]'`)"),
        shown="`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else `OTEL_EXPORTER_OTLP_ENDPOINT`, else none: tracing off")
    sample_ratio: Optional[float] = setting(Number(0, 1), None, (
        "share of new traces kept; a request that comes with a `traceparent` follows its caller's choice"),
        shown="`OTEL_TRACES_SAMPLER`/`OTEL_TRACES_SAMPLER_ARG`, else `1`")
    service_name: Optional[str] = setting(Text("a service name", strip=True), None, "the `service.name` of the spans",
                                          shown="`OTEL_SERVICE_NAME`, else `kvrouter`")


@dataclass(frozen=True)
class RouterSettings:
    enable_router: bool = setting(Flag(), True, "render the `router` program and the `kvcached-frontend` tmux session")
    host: str = setting(HOST, "127.0.0.1", "address the router listens on (`0.0.0.0` for other hosts; then set `api_keys`)",
                        key="router_host")
    port: int = setting(Number(1, 65535, whole=True), 8080, "its port; no engine may use it", key="router_port")
    connect_timeout_seconds: float = setting(POSITIVE, 5.0, "connecting to an engine")
    request_timeout_seconds: float = setting(POSITIVE, 600.0, "whole non-streaming request")
    stream_idle_timeout_seconds: float = setting(POSITIVE, 120.0, "longest silence between two chunks of a stream")
    health_check_interval_seconds: float = setting(POSITIVE, 5.0, "how often each engine's `/health` is probed")
    health_check_timeout_seconds: float = setting(POSITIVE, 2.0, "one probe")
    unhealthy_threshold: int = setting(COUNT, 3, "failed probes in a row before an engine is skipped")
    healthy_threshold: int = setting(COUNT, 2, "good probes in a row before it is used again")
    eject_seconds: float = setting(NON_NEGATIVE, 10.0, (
        "an engine that failed a request (refused the connection, gave no status in time, answered 502/503/504, broke a "
        "stream) is skipped this long: its circuit breaker opens, doubling on each failed trial up to "
        "`breaker_max_seconds` (see \"Retries and the circuit breaker\")"))
    max_request_bytes: int = setting(COUNT, 16 * 1024 * 1024, "larger request bodies get 413")
    queue_timeout_seconds: float = setting(POSITIVE, 30.0, "longest wait for a `max_concurrency` slot, then 429")
    shutdown_grace_seconds: float = setting(NON_NEGATIVE, 30.0, (
        "on SIGTERM, in-flight requests get this long to finish; supervisord waits this plus 10 s before killing the router"))
    access_log: bool = setting(Flag(), True, "one line per request in the router's log")
    activity_log: Optional[str] = setting(LogPath(), None, (
        "a file that gets one JSON line per request (time, key name, model, instance, status, tokens, latency, TTFT, "
        "retries; never a key or text), rotated at 100 MB, 5 kept (see \"Usage and tokens\"); relative to the "
        "config file"))
    log_level: str = setting(Choice(LOG_LEVELS), "info", "how much the router logs")
    log_format: str = setting(Choice(LOG_FORMATS), "text", (
        "`json`: every line of the router's log is one JSON object with stable field names (see \"Monitoring\"); "
        "changing it needs a restart"))
    replicas: int = setting(COUNT, 1, "router pods in Kubernetes, each keeping its own state (see \"More than one node\")")
    workers: int = setting(COUNT, 1, (
        "proxy processes sharing the router's port beside one controller process that owns every model's lifecycle "
        "(see \"Every core: proxy workers\"); changing it needs a restart"))
    node: Optional[str] = setting(HOST, None, "the node whose `render --node` renders the router; none: every node's "
                                              "(see \"More than one node\")")
    api_keys: tuple[ApiKey, ...] = setting(ApiKeys(), (), (
        "keys clients must send as `Authorization: Bearer <key>`: a list of keys (full access), `{env: VAR}` "
        "(comma-separated) or `{file: PATH}` (one per line), and records that scope, limit and rank a key (see "
        "\"Tenants\")"), secret=True)
    admin_api_key: Optional[str] = setting(OneKey(), None, (
        "key for the admin endpoints (`/action/*`, `/upstream/*`, `/logs/*`); without it they answer loopback clients "
        "only. Same forms"), secret=True)
    default_model: Optional[str] = setting(Text("a model name", strip=True), None, (
        "where a request without `model` goes when more than one model is served (with one model, it goes there)"))
    retries: int = setting(Number(0, 100, whole=True), 2, (
        "tries on other replicas for a request whose engine failed before any byte reached the client (see \"Retries "
        "and the circuit breaker\")"))
    breaker_max_seconds: float = setting(POSITIVE, 300.0, (
        "the longest a replica's circuit breaker stays open (`eject_seconds` doubles on each reopening)"))
    loading_progress: bool = setting(Flag(), False, (
        "a streamed request waiting for a start or wake gets SSE comment lines every 2 s (`: waiting for M: starting, "
        "12 s`) and an SSE error event if it fails"))
    dns_servers: tuple[tuple[str, int], ...] = setting(Nameservers(), (), (
        "nameservers that resolve instances' `dns_name`: IP addresses with an optional port, "
        "`[\"10.96.0.10\", \"127.0.0.1:5353\", \"[fd00::a]:53\"]`"), shown="the system's (`/etc/resolv.conf`)")
    dns_refresh_seconds: float = setting(POSITIVE, 5.0, "how often each `dns_name` is resolved again")
    tracing: TracingSettings = setting(Section(TracingSettings), TracingSettings(), (
        "OpenTelemetry traces of every request, sent to an OTLP/HTTP receiver (see \"Monitoring\")"), shown="see below")
