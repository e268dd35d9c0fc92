"""The simulated vLLM answers like the real one: replay tests/real_vllm/captured/.

`captured/*.http` are exchanges recorded from real vLLM 0.32.0 (CPU build) by
capture.py. Each request is replayed against ``python -m router.sim --engine
vllm`` started with the same arguments, and the answers are compared: status,
content type, the JSON structure (keys in order, and which are null), the SSE
event sequence, error type/param/code, and the sleep API's bodies and
hang-while-asleep behaviour. Only values that are random by nature (ids,
timestamps, generated text) may differ.

Needs no real engine: it runs in the fast suite too.
"""
from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

import pytest

from helpers import PY, Proc, free_port, wait_http

CAPTURED = Path(__file__).resolve().parent / "captured"
MODEL = "/root/.cache/router-real-vllm/tiny-model"  # only echoed back as "root"

#: Replayed in this order (the sleep cases depend on it).
CASES = [
    "health", "models", "version",
    "completions", "completions_stream", "completions_stream_usage", "chat", "chat_stream_usage",
    "error_unknown_model", "error_unknown_model_stream", "error_max_tokens_too_large",
    "error_max_tokens_too_large_stream", "error_invalid_json", "error_body_not_object", "error_bad_type",
    "no_model_field", "error_unknown_route", "error_wrong_method",
    "is_sleeping_awake", "sleep", "is_sleeping_asleep", "health_asleep", "models_asleep", "wake_up",
    "is_sleeping_after_wake", "sleep_level2_mode_abort", "wake_up_again", "sleep_bad_level", "sleep_bad_mode",
    "is_sleeping_after_bad_sleep",
]
#: Error messages that are fixed text in vLLM (others are pydantic's wording).
EXACT_MESSAGES = {"error_unknown_model", "error_unknown_model_stream", "error_max_tokens_too_large",
                  "error_max_tokens_too_large_stream"}


class Exchange:
    """One parsed captured/<case>.http file."""

    def __init__(self, path: Path):
        text = path.read_text()
        head, _, body = text.partition("\n\n")
        self.method = self.path = ""
        self.request_body: Optional[bytes] = None
        self.status = 0
        self.headers: dict[str, str] = {}
        for line in head.splitlines():
            if line.startswith("> ") and not self.method:
                self.method, self.path = line[2:].split(" ", 1)
            elif line.startswith("> "):
                self.request_body = line[2:].encode()
            elif line.startswith("< HTTP/"):
                self.status = int(line.split()[2])
            elif line.startswith("< "):
                k, _, v = line[2:].partition(": ")
                self.headers[k.lower()] = v
        self.body = body.encode()
        if "content-length" in self.headers:
            # capture.py adds a newline after a body that lacks one
            self.body = self.body[: int(self.headers["content-length"])]


def _request(base: str, method: str, path: str, body: Optional[bytes], timeout: float = 30.0):
    headers = {"Content-Type": "application/json"} if body is not None else {}
    req = urllib.request.Request(base + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def shape(v: Any) -> Any:
    """The structure of a JSON value: keys in order, kinds of leaves (null kept apart)."""
    if isinstance(v, dict):
        return [(k, shape(x)) for k, x in v.items()]
    if isinstance(v, list):
        return [shape(x) for x in v]
    if v is None:
        return None
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    return "str"


def sse_events(body: bytes) -> list[Any]:
    events = [e for e in body.split(b"\n\n") if e.strip()]
    out = []
    for e in events:
        assert e.startswith(b"data: "), e
        data = e[len(b"data: "):]
        out.append(data.decode() if data == b"[DONE]" else json.loads(data))
    return out


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("simcap") / "sim.log"
    proc = Proc([PY, "-m", "router.sim", "--engine", "vllm", "--model", MODEL, "--served-model-name", "tiny",
                 "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "512", "--max-num-seqs", "8",
                 "--enforce-eager"], env={"VLLM_SERVER_DEV_MODE": "1"}, log=str(log))
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=30)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


def test_captures_are_present():
    missing = [c for c in CASES if not (CAPTURED / f"{c}.http").is_file()]
    assert not missing, f"captured exchanges missing: {missing} (re-run tests/real_vllm/capture.py)"


def test_sim_replays_captured_exchanges(sim):
    problems = []
    for case in CASES:
        real = Exchange(CAPTURED / f"{case}.http")
        status, headers, body = _request(sim, real.method, real.path, real.request_body)
        where = f"{case} ({real.method} {real.path})"
        if status != real.status:
            problems.append(f"{where}: status {status}, real vLLM {real.status}: {body[:200]!r}")
            continue
        if headers.get("content-type") != real.headers.get("content-type"):
            problems.append(f"{where}: content-type {headers.get('content-type')!r}, "
                            f"real vLLM {real.headers.get('content-type')!r}")
        if real.headers.get("content-type", "").startswith("text/event-stream"):
            got, want = sse_events(body), sse_events(real.body)
            if [shape(e) for e in got] != [shape(e) for e in want]:
                problems.append(f"{where}: SSE events differ\n  sim:  {body.decode()[:1500]}\n"
                                f"  real: {real.body.decode()[:1500]}")
            continue
        if not real.body:
            if body:
                problems.append(f"{where}: body {body[:200]!r}, real vLLM sends an empty body")
            continue
        got, want = json.loads(body), json.loads(real.body)
        if shape(got) != shape(want):
            problems.append(f"{where}: JSON structure differs\n  sim:  {body.decode()[:800]}\n"
                            f"  real: {real.body.decode()[:800]}")
            continue
        if "error" in want:
            for key in ("type", "param", "code"):
                if got["error"][key] != want["error"][key]:
                    problems.append(f"{where}: error.{key} {got['error'][key]!r}, real {want['error'][key]!r}")
            if case in EXACT_MESSAGES and got["error"]["message"] != want["error"]["message"]:
                problems.append(f"{where}: error.message {got['error']['message']!r}, "
                                f"real {want['error']['message']!r}")
        elif real.path.startswith(("/sleep", "/wake_up", "/is_sleeping", "/version")) or "detail" in want:
            # Fixed text in vLLM (sleep API, version, FastAPI's 404/405): must match exactly.
            if got != want:
                problems.append(f"{where}: body {got}, real vLLM {want}")
    assert not problems, "the simulator differs from real vLLM 0.32:\n" + "\n".join(problems)


def test_sim_holds_a_request_while_asleep_until_wake_up(sim):
    """Real vLLM accepts a request while asleep and answers it only after /wake_up."""
    assert _request(sim, "POST", "/sleep?level=1", None)[0] == 200
    result: dict = {}

    def send():
        result["r"] = _request(sim, "POST", "/v1/completions",
                               json.dumps({"model": "tiny", "prompt": "Hello", "max_tokens": 4}).encode(),
                               timeout=30)

    t = threading.Thread(target=send)
    t.start()
    t.join(2.0)
    try:
        assert t.is_alive(), f"answered while asleep: {result.get('r')}"
    finally:
        assert _request(sim, "POST", "/wake_up", None)[0] == 200
        t.join(10.0)
    assert not t.is_alive(), "still held after /wake_up"
    status, _, body = result["r"]
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 4


def _streams_during_sleep(sim: str, sleep_path: str) -> tuple[float, list[Optional[str]]]:
    """Four long streams; `sleep_path` once they run. Returns (sleep call seconds, final finish_reasons)."""
    finals: list[Optional[str]] = [None] * 4
    body = json.dumps({"model": "tiny", "prompt": "Hello", "max_tokens": 200, "stream": True,
                       "ignore_eos": True}).encode()

    def stream(i):
        status, _, raw = _request(sim, "POST", "/v1/completions", body, timeout=60)
        events = sse_events(raw)
        assert events[-1] == "[DONE]"
        finals[i] = events[-2]["choices"][0]["finish_reason"]

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    status, _, _ = _request(sim, "POST", sleep_path, None, timeout=60)
    took = time.monotonic() - t0
    assert status == 200
    for t in threads:
        t.join(60)
    assert _request(sim, "POST", "/wake_up", None)[0] == 200
    return took, finals


@pytest.fixture(scope="module")
def slow_sim(tmp_path_factory):
    """A simulated vLLM that takes 10 ms per token, so streams are still running when /sleep comes."""
    port = free_port()
    log = tmp_path_factory.mktemp("simslow") / "sim.log"
    proc = Proc([PY, "-m", "router.sim", "--engine", "vllm", "--model", MODEL, "--served-model-name", "tiny",
                 "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "512", "--itl-ms", "10"],
                env={"VLLM_SERVER_DEV_MODE": "1"}, log=str(log))
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=30)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


def test_sim_sleep_default_mode_aborts_running_streams(slow_sim):
    """Real vLLM 0.32: /sleep (mode=abort) ends running streams with finish_reason "abort" at once."""
    took, finals = _streams_during_sleep(slow_sim, "/sleep?level=1")
    assert finals == ["abort"] * 4
    assert took < 1.0


def test_sim_sleep_mode_wait_lets_streams_finish(slow_sim):
    """Real vLLM 0.32: /sleep?mode=wait answers only once running requests have finished."""
    took, finals = _streams_during_sleep(slow_sim, "/sleep?level=1&mode=wait")
    assert finals == ["length"] * 4
    assert took > 0.5
