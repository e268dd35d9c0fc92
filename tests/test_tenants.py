"""Keys as tenants, end to end through the official `openai` SDK against a loopback stack: scope
(403, /v1/models), rpm and tpm (429 with Retry-After and OpenAI's x-ratelimit-* headers), the same
limits with two proxy workers, priority classes in a model's slot queue, vLLM's `priority` field,
and a reload with a bad record changing nothing."""
from __future__ import annotations

import concurrent.futures
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import anthropic
import openai
import orjson
import pytest
import yaml
from helpers import metric_value, post_json, wait_for
from router_support import Engine, LoopThread, Stack, instance, loop  # noqa: F401

SCOPED = "sk-scoped-aaaaaaaaaaaa"
FREE = "sk-free-bbbbbbbbbbbbbb"
MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]


@pytest.fixture(params=[1, 2], ids=["one-process", "two-workers"])
def workers(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture
def stack(loop: LoopThread, tmp_path: Path) -> Iterator[Stack]:  # noqa: F811
    s = Stack(loop, tmp_path)
    yield s
    s.close()


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)


def chat(c: openai.OpenAI, model: str, **extra: Any) -> Any:
    return c.chat.completions.with_raw_response.create(model=model, messages=MESSAGES, **extra)


def test_a_scoped_key_with_rpm_5_and_an_unscoped_key(stack: Stack, workers: int) -> None:
    a, b = stack.engine(), stack.engine()
    r = stack.router([instance("a", a.port), instance("b", b.port)], workers=workers, api_keys=[
        {"name": "scoped", "key": SCOPED, "models": ["a"], "rpm": 5}, FREE])
    scoped, free = client(r.url, SCOPED), client(r.url, FREE)

    with pytest.raises(openai.PermissionDeniedError) as denied:
        scoped.chat.completions.create(model="b", messages=MESSAGES)
    assert denied.value.status_code == 403 and "may not use model 'b'" in denied.value.message
    assert not b.bodies
    assert [m.id for m in scoped.models.list()] == ["a"]
    assert [m.id for m in free.models.list()] == ["a", "b"]
    assert scoped.models.retrieve("a").id == "a"
    with pytest.raises(openai.PermissionDeniedError):
        scoped.models.retrieve("b")

    for i in range(5):  # each on a new connection: with two workers, the kernel spreads them
        raw = chat(client(r.url, SCOPED), "a")
        assert raw.http_response.status_code == 200
        assert raw.headers["x-ratelimit-limit-requests"] == "5"
        assert raw.headers["x-ratelimit-remaining-requests"] == str(4 - i)
    with pytest.raises(openai.RateLimitError) as limited:
        chat(client(r.url, SCOPED), "a")
    headers = limited.value.response.headers
    assert 1 <= int(headers["retry-after"]) <= 60
    assert headers["x-ratelimit-limit-requests"] == "5" and headers["x-ratelimit-remaining-requests"] == "0"
    assert len(a.bodies) == 5

    for model in ("a", "b", "a", "b", "a", "b", "a"):  # the other key: unaffected throughout
        raw = chat(free, model)
        assert raw.http_response.status_code == 200 and "x-ratelimit-limit-requests" not in raw.headers
    with pytest.raises(openai.RateLimitError):  # and the scoped one still waits
        chat(scoped, "a")


def test_tpm_refuses_the_request_that_would_pass_the_budget(stack: Stack, workers: int) -> None:
    """The engine reports usage 1 + 2 = 3 tokens per answer; each request's bound is its body / 4 +
    its max_tokens, reserved while it runs and replaced by those 3 at its end."""
    e = stack.engine()
    tpm, cap = 150, 100
    r = stack.router([instance("a", e.port)], workers=workers, api_keys=[
        {"name": "metered", "key": SCOPED, "tpm": tpm}, FREE])
    passed = 0
    with pytest.raises(openai.RateLimitError) as limited:
        while passed < 60:
            raw = chat(client(r.url, SCOPED), "a", max_tokens=cap)
            passed += 1
            assert raw.headers["x-ratelimit-limit-tokens"] == str(tpm)
            bound = len(e.bodies[0]) // 4 + cap
            # told as it was let in: the answers before charged 3 each, its own bound reserved
            assert raw.headers["x-ratelimit-remaining-tokens"] == str(tpm - 3 * (passed - 1) - bound)
    assert 3 * (passed - 1) + bound <= tpm < 3 * passed + bound  # refused exactly when it would pass tpm
    headers = limited.value.response.headers
    # Honest: the tokens it lacks are freed when the first answer's charge leaves the minute.
    assert 50 <= int(headers["retry-after"]) <= 60
    assert headers["x-ratelimit-remaining-tokens"] == str(tpm - 3 * passed)
    raw = chat(client(r.url, SCOPED), "a", max_tokens=cap - 10)  # a smaller bound still fits: the refusal was the bound's
    assert raw.http_response.status_code == 200
    assert chat(client(r.url, FREE), "a", max_tokens=cap).http_response.status_code == 200


@pytest.mark.slow  # holds its one slot 2 s per request so the queue fills on a loaded machine (unit: test_tenant_classes)
def test_a_high_request_is_served_before_the_queued_low_ones(stack: Stack) -> None:
    e = stack.engine(interval=2.0)  # each request holds the one slot 2 s: time for the queue to fill
    r = stack.router([instance("a", e.port, max_concurrency=1, max_queue=10)], api_keys=[
        {"name": "batch", "key": FREE, "priority": "low"}, {"name": "chat", "key": SCOPED, "priority": "high"}])
    low, high = client(r.url, FREE), client(r.url, SCOPED)

    def queued() -> float:
        with urllib.request.urlopen(f"{r.url}/metrics", timeout=5) as resp:
            return metric_value(resp.read().decode(), "router_model_queued_requests", model="a")

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        jobs = [pool.submit(chat, low, "a", user="blocker")]
        wait_for(lambda: len(e.bodies) == 1, 10, "the first request to reach the engine")
        for i in range(1, 4):
            jobs.append(pool.submit(chat, low, "a", user=f"low-{i - 1}"))
            wait_for(lambda n=i: queued() == n, 10, f"{i} requests queued")
        jobs.append(pool.submit(chat, high, "a", user="high"))
        wait_for(lambda: queued() == 4, 10, "the high request queued")
        for job in jobs:
            assert job.result().http_response.status_code == 200
    assert [orjson.loads(b)["user"] for b in e.bodies] == ["blocker", "high", "low-0", "low-1", "low-2"]


def test_vllms_priority_field_reaches_only_an_engine_that_orders_by_it(stack: Stack) -> None:
    ranked, plain = stack.engine(), stack.engine()
    r = stack.router([instance("r", ranked.port, "--scheduling-policy", "priority"), instance("p", plain.port)],
                     api_keys=[{"name": "chat", "key": SCOPED, "priority": "high"}, FREE])
    for model in ("r", "p"):
        chat(client(r.url, SCOPED), model)
        chat(client(r.url, FREE), model)
        chat(client(r.url, SCOPED).with_options(default_headers={"x-kvrouter-priority": "low"}), model)
        chat(client(r.url, FREE).with_options(default_headers={"x-kvrouter-priority": "high"}), model)
    assert [orjson.loads(b).get("priority") for b in ranked.bodies] == [-10, None, 10, None]
    assert [orjson.loads(b).get("priority") for b in plain.bodies] == [None] * 4


def test_a_reload_with_a_bad_record_changes_nothing(stack: Stack) -> None:
    e = stack.engine()
    r = stack.router([instance("a", e.port)], api_keys=[{"name": "scoped", "key": SCOPED, "rpm": 2}])
    c = client(r.url, SCOPED)
    chat(c, "a")
    path = Path(r.config.path)
    doc = yaml.safe_load(path.read_text())
    doc["router"]["api_keys"] = [{"name": "scoped", "key": SCOPED, "rpm": 0}, {"name": "other", "key": FREE}]
    path.write_text(yaml.safe_dump(doc))
    status, err = post_json(f"{r.url}/action/reload", {})
    assert status == 400 and "router.api_keys[0].rpm" in str(err) and SCOPED not in str(err)
    with pytest.raises(openai.AuthenticationError):  # the new key did not come in
        chat(client(r.url, FREE), "a")
    raw = chat(c, "a")  # the old record holds, its counter too
    assert raw.headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(openai.RateLimitError):
        chat(c, "a")



def test_the_anthropic_sdk_gets_its_own_error_shape(stack: Stack) -> None:
    a, b = stack.engine(), stack.engine()
    r = stack.router([instance("a", a.port), instance("b", b.port)],
                     api_keys=[{"name": "scoped", "key": SCOPED, "models": ["a"]}])
    claude = anthropic.Anthropic(base_url=r.url, api_key=SCOPED, max_retries=0)
    with pytest.raises(anthropic.PermissionDeniedError) as denied:
        claude.messages.create(model="b", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert denied.value.status_code == 403
    assert denied.value.body == {"type": "error", "error": {
        "type": "permission_error", "message": "The key 'scoped' may not use model 'b'; it may use: a."}}
    assert not b.bodies


def test_a_limited_keys_stream_carries_the_headers_and_every_chunk(stack: Stack) -> None:
    e = stack.engine(chunks=4)
    r = stack.router([instance("a", e.port)], api_keys=[{"name": "metered", "key": SCOPED, "rpm": 10, "tpm": 5000}])
    raw = client(r.url, SCOPED).chat.completions.with_raw_response.create(model="a", messages=MESSAGES,
                                                                          max_tokens=10, stream=True)
    assert raw.headers["x-ratelimit-remaining-requests"] == "9" and "x-ratelimit-remaining-tokens" in raw.headers
    assert [c.choices[0].delta.content for c in raw.parse()] == ["t0 ", "t1 ", "t2 ", "t3 "]
    # the stream was charged its usage at its end (1 prompt token, 4 completion tokens: the last chunk the
    # router asked for, and took out of the client's stream); the next request holds its bound meanwhile
    after = chat(client(r.url, SCOPED), "a", max_tokens=10)
    assert after.headers["x-ratelimit-remaining-tokens"] == str(5000 - 5 - (len(e.bodies[1]) // 4 + 10))


def test_a_key_falls_back_only_to_models_it_may_use(stack: Stack) -> None:
    a, b = stack.engine(behaviour="error503"), stack.engine()
    r = stack.router([instance("a", a.port, fallbacks=["b"]), instance("b", b.port)], retries=0, api_keys=[
        {"name": "scoped", "key": SCOPED, "models": ["a"]}, FREE])
    with pytest.raises(openai.InternalServerError) as failed:  # b would answer, but the key may not use it
        chat(client(r.url, SCOPED), "a")
    assert failed.value.status_code == 503 and not b.bodies
    assert chat(client(r.url, FREE), "a").http_response.status_code == 200 and len(b.bodies) == 1


def test_a_request_no_engine_answered_is_charged_no_tokens(stack: Stack) -> None:
    e = stack.engine()
    r = stack.router([instance("a", e.port)], retries=0, api_keys=[{"name": "metered", "key": SCOPED, "tpm": 5000}])
    stack.loop.run(e.stop())  # nothing listens any more: the router answers the error itself
    remaining = []
    for _ in range(2):
        with pytest.raises(openai.APIStatusError) as failed:
            chat(client(r.url, SCOPED), "a", max_tokens=100)
        assert failed.value.status_code in (502, 503)
        remaining.append(int(failed.value.response.headers["x-ratelimit-remaining-tokens"]))
    # each saw only its own reservation: the first was charged nothing when it ended
    assert remaining[0] == remaining[1] < 5000
