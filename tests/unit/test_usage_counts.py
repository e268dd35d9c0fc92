"""What a finished request leaves behind for the operator: the usage windows (GET /usage), the token
counters (/metrics) and the activity log's lines and rotation; on a fake clock."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from helpers import metric_value
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from router.observe.activity import ActivityLog
from router.observe.metrics import Metrics
from router.observe.traffic import Traffic
from router.observe.usage import MAX_WINDOW_SECONDS, UsageWindows


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class NoState(Collector):
    def collect(self) -> Iterator[Metric]:
        return iter(())


def test_windows_count_by_key_and_by_model() -> None:
    w = UsageWindows()
    w.add(100.2, "a", "chat", 200, 10, 30)
    w.add(100.9, "a", "batch", 200, 5, None)  # a usage without completion tokens
    w.add(101.0, "b", "chat", 429, None, None)
    w.add(150.0, "b", "chat", 502, None, None)
    w.add(150.5, "a", "anonymous", 499, 3, 1)
    assert w.window(150.9, 1, "model") == {
        "a": {"requests": 1, "prompt_tokens": 3, "completion_tokens": 1, "errors": 1, "rate_limited": 0},
        "b": {"requests": 1, "prompt_tokens": 0, "completion_tokens": 0, "errors": 1, "rate_limited": 0}}
    assert w.window(150.9, 51, "key") == {
        "anonymous": {"requests": 1, "prompt_tokens": 3, "completion_tokens": 1, "errors": 1, "rate_limited": 0},
        "batch": {"requests": 1, "prompt_tokens": 5, "completion_tokens": 0, "errors": 0, "rate_limited": 0},
        "chat": {"requests": 3, "prompt_tokens": 10, "completion_tokens": 30, "errors": 1, "rate_limited": 1}}
    assert w.window(150.9, 50, "key")["chat"]["requests"] == 2  # 100 is the 51st second back: out
    # An hour later second 100's bucket is reused: its requests are gone, the later seconds' stay.
    later = 100.0 + MAX_WINDOW_SECONDS
    w.add(later, "c", "chat", 200, 1, 1)
    assert w.window(later, MAX_WINDOW_SECONDS, "model") == {
        "a": {"requests": 1, "prompt_tokens": 3, "completion_tokens": 1, "errors": 1, "rate_limited": 0},
        "b": {"requests": 2, "prompt_tokens": 0, "completion_tokens": 0, "errors": 1, "rate_limited": 1},
        "c": {"requests": 1, "prompt_tokens": 1, "completion_tokens": 1, "errors": 0, "rate_limited": 0}}
    assert w.window(later + 60, MAX_WINDOW_SECONDS, "model") == {
        "c": {"requests": 1, "prompt_tokens": 1, "completion_tokens": 1, "errors": 0, "rate_limited": 0}}


def test_metrics_count_tokens_by_model_key_and_kind() -> None:
    metrics = Metrics(NoState())
    m = metrics.for_model("m/a")
    m.observe(200, 0.1, 0.01, "chat", 10, 4)
    m.observe(200, 0.1, 0.01, "chat", 2, 3)
    m.observe(200, 0.1, None, "anonymous", None, None)  # no usage: a request, no tokens
    m.observe(429, 0.0, None, "batch")
    text = metrics.render().decode()
    assert metric_value(text, "router_tokens_total", model="m/a", key="chat", kind="prompt") == 12
    assert metric_value(text, "router_tokens_total", model="m/a", key="chat", kind="completion") == 7
    assert 'router_tokens_total{key="anonymous"' not in text
    assert metric_value(text, "router_requests_total", model="m/a", key="anonymous", status="200") == 1
    assert metric_value(text, "router_requests_total", model="m/a", key="batch", status="429") == 1


def test_traffic_feeds_the_windows_and_the_activity_log(tmp_path: Path) -> None:
    clock = Clock()
    traffic = Traffic(["m"], clock)
    path = tmp_path / "logs" / "activity.jsonl"
    traffic.activity = ActivityLog(str(path))
    traffic.record("m", 200, 0.25, 0.05, True, "chat", 7, 11, "m-0", 1)
    traffic.record("m", 503, 0.01, None, False)
    traffic.activity.close()
    assert traffic.usage_window(60, "model")["m"] == {"requests": 2, "prompt_tokens": 7, "completion_tokens": 11,
                                                      "errors": 1, "rate_limited": 0}
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [{k: v for k, v in line.items() if k != "time"} for line in lines] == [
        {"key": "chat", "model": "m", "instance": "m-0", "status": 200, "prompt_tokens": 7, "completion_tokens": 11,
         "latency_ms": 250.0, "ttft_ms": 50.0, "retries": 1},
        {"key": "anonymous", "model": "m", "instance": None, "status": 503, "prompt_tokens": None,
         "completion_tokens": None, "latency_ms": 10.0, "ttft_ms": None, "retries": 0}]
    assert lines[0]["time"].endswith("Z")


def test_the_activity_log_rotates_between_batches(tmp_path: Path) -> None:
    path = tmp_path / "activity.jsonl"
    log = ActivityLog(str(path), max_bytes=600, backups=2)
    for batch in range(6):
        for _ in range(3):  # no event loop here: each line is written at once
            log.request("k", "m", "m-0", 200, 1, 2, 0.1, 0.01, batch)
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["activity.jsonl", "activity.jsonl.1", "activity.jsonl.2"]
    for p in tmp_path.iterdir():
        text = p.read_text()
        assert 0 < len(text) <= 600 + 200 and all(json.loads(line)["key"] == "k" for line in text.splitlines())
