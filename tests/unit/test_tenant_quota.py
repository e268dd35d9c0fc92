"""One key's counters on a fake clock: rpm and tpm over a sliding minute, requests in flight, and
the Retry-After each refusal gives (the time at which the request would be let in)."""
from __future__ import annotations

from fakes import Clock

from router.tenants.quota import KeyQuota, Limits, Quotas, Refusal, Standing
from router.tenants.scope import allowed


def test_the_sixth_request_in_a_minute_waits_for_the_first_to_leave_the_window() -> None:
    clock = Clock()
    q = KeyQuota(Limits(rpm=5))
    for i in range(5):
        got = q.admit(clock(), 0)
        assert isinstance(got, Standing) and got.remaining_requests == 4 - i
        q.finish(clock(), 0, None)
        clock.advance(10)
    # t = 50 s after the first: it leaves the window at 60 s
    refused = q.admit(clock(), 0)
    assert isinstance(refused, Refusal) and refused.status == 429 and refused.retry_after == 10
    assert refused.standing.remaining_requests == 0 and "5 requests per minute" in refused.message
    clock.advance(9.5)
    assert isinstance(q.admit(clock(), 0), Refusal)  # still inside: Retry-After was not early
    clock.advance(0.5)
    assert isinstance(q.admit(clock(), 0), Standing)  # exactly when it said


def test_tokens_are_reserved_then_charged_with_what_the_engine_reported() -> None:
    clock = Clock()
    q = KeyQuota(Limits(tpm=100))
    first = q.admit(clock(), 60)  # bound 60 reserved while in flight
    assert isinstance(first, Standing) and first.remaining_tokens == 40
    second = q.admit(clock(), 50)  # 60 reserved + 50 > 100
    assert isinstance(second, Refusal) and second.retry_after == 60  # only a reservation stands in the way
    clock.advance(5)
    q.finish(clock(), 60, 30)  # it used 30: the reservation becomes 30 charged at t=5
    assert q.standing(clock()).remaining_tokens == 70
    assert isinstance(q.admit(clock(), 50), Standing)  # 30 + 50 fit
    clock.advance(1)
    q.finish(clock(), 50, 50)  # charged 50 at t=6; window holds 30 (t=5) + 50 (t=6)
    refused = q.admit(clock(), 40)  # 80 + 40 > 100: 20 must leave; the 30 charged at t=5 leaves at t=65
    assert isinstance(refused, Refusal) and refused.retry_after == 59
    clock.advance(59)
    assert isinstance(q.admit(clock(), 40), Standing)


def test_unknown_usage_charges_the_bound() -> None:
    clock = Clock()
    q = KeyQuota(Limits(tpm=100))
    q.admit(clock(), 70)
    q.finish(clock(), 70, None)
    assert q.standing(clock()).remaining_tokens == 30


def test_a_request_that_can_never_fit_is_a_400_naming_max_tokens() -> None:
    q = KeyQuota(Limits(tpm=100))
    refused = q.admit(0.0, 101)
    assert isinstance(refused, Refusal) and refused.status == 400 and "max_tokens" in refused.message


def test_concurrency_counts_requests_in_flight() -> None:
    q = KeyQuota(Limits(max_concurrency=2))
    assert isinstance(q.admit(0.0, 1), Standing) and isinstance(q.admit(0.0, 1), Standing)
    refused = q.admit(0.0, 1)
    assert isinstance(refused, Refusal) and refused.status == 429 and "max_concurrency 2" in refused.message
    q.finish(1.0, 1, None)
    assert isinstance(q.admit(1.0, 1), Standing)


def test_a_refused_request_is_not_counted() -> None:
    q = KeyQuota(Limits(rpm=1, max_concurrency=1))
    q.admit(0.0, 0)
    assert isinstance(q.admit(0.0, 0), Refusal)
    q.finish(0.0, 0, None)
    assert len(q.requests) == 1 and q.in_flight == 0


def test_a_reload_keeps_the_counters_of_the_names_that_stay() -> None:
    quotas = Quotas()
    quotas.update({"a": Limits(rpm=2), "b": Limits(rpm=1)})
    assert isinstance(quotas.admit("a", 0.0, 0), Standing)
    quotas.update({"a": Limits(rpm=1)})  # lowered: the one already counted fills it
    refused = quotas.admit("a", 1.0, 0)
    assert isinstance(refused, Refusal) and refused.retry_after == 59
    assert quotas.admit("b", 1.0, 0) is None  # dropped: no limit any more
    quotas.finish("b", 1.0, 0, None)  # a request of a dropped key ends quietly


def test_rpm_lowered_below_the_window_waits_for_enough_to_leave() -> None:
    q = KeyQuota(Limits(rpm=3))
    for t in (0.0, 10.0, 20.0):
        q.admit(t, 0)
        q.finish(t, 0, None)
    q.limits = Limits(rpm=1)
    refused = q.admit(30.0, 0)
    assert isinstance(refused, Refusal) and refused.retry_after == 50  # the request at 20 s must leave too


def test_a_scope_is_globs_over_model_names_and_aliases() -> None:
    models = {"Qwen/Qwen3-8B": ("Qwen/Qwen3-8B", "qwen"), "llama": ("llama",), "m": ("m", "alpha")}
    assert allowed(None, models) is None
    assert allowed(("Qwen/*", "llama"), models) == {"Qwen/Qwen3-8B", "llama"}
    assert allowed(("alph?",), models) == {"m"}  # through an alias
    assert allowed(("qwen/*",), models) == frozenset()  # case counts
