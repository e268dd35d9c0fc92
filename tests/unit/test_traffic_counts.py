"""The traffic monitor's arithmetic on a fake clock: counts, rates, windows and percentiles."""
from __future__ import annotations

import math

import pytest

from router.observe.traffic import MAX_WINDOW_SECONDS, SAMPLE_SIZE, Traffic, percentile


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_counts_rates_and_percentiles_on_a_known_sequence():
    clock = FakeClock()
    tr = Traffic(["a", "b"], clock)
    for i in range(1, 11):  # latencies 0.1 .. 1.0, one request per second
        tr.record("a", 200, i / 10, None, False)
        clock.t += 1
    tr.record("a", 500, 9.0, None, False)
    tr.record("a", 200, 0.5, 0.05, True)
    tr.record("a", 200, 0.5, 0.25, True)
    s = tr.summary("a", 60)
    assert (s["total_requests"], s["successful_requests"], s["failed_requests"]) == (13, 12, 1)
    assert (s["requests_in_window"], s["failed_in_window"]) == (13, 1)
    assert s["request_rate"] == pytest.approx(13 / 60)
    assert s["avg_response_time"] == pytest.approx((5.5 + 1.0) / 12)
    assert s["p50_response_time"] == 0.5 and s["p99_response_time"] == 9.0
    assert s["streams"] == 2 and s["avg_ttfb"] == pytest.approx(0.15)
    assert s["p50_ttfb"] == 0.05 and s["p99_ttfb"] == 0.25
    # A 3 s window counts whole seconds: this one (3 requests) and the two before (the 9th and 10th).
    s3 = tr.summary("a", 3)
    assert s3["requests_in_window"] == 5 and s3["p99_response_time"] == 9.0 and s3["total_requests"] == 13
    clock.t += 120
    late = tr.summary("a", 60)
    assert late["requests_in_window"] == 0 and late["p50_response_time"] is None and late["request_rate"] == 0
    # A known model without traffic reports zeros; unknown names are ignored by record.
    tr.record("nope", 200, 1.0, None, False)
    b = tr.summary("b", 60)
    assert b["total_requests"] == 0 and b["avg_response_time"] == 0.0 and b["p99_ttfb"] is None


def test_buckets_wrap_around_the_hour_and_the_sample_ring():
    clock = FakeClock(5.0)
    tr = Traffic(["a"], clock)
    tr.record("a", 200, 1.0, None, False)
    clock.t += MAX_WINDOW_SECONDS  # same bucket, one hour later: the old count must not leak in
    tr.record("a", 200, 2.0, None, False)
    assert tr.summary("a", MAX_WINDOW_SECONDS)["requests_in_window"] == 1
    for _ in range(SAMPLE_SIZE + 10):
        tr.record("a", 200, 3.0, None, False)
    s = tr.summary("a", 60)
    assert s["requests_in_window"] == SAMPLE_SIZE + 11  # counts are exact beyond the sample
    assert s["p50_response_time"] == 3.0 and s["p99_response_time"] == 3.0  # the 2.0 left the ring


def test_percentile_nearest_rank():
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 99) == 99.0
    assert not math.isnan(percentile([0.0], 99) or 0.0)
