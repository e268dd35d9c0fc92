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
#: The other client paths (capture.py --only paths), replayed in this order: the responses_*
#: cases use the ids of earlier ones (mapped to the simulator's own ids).
PATH_CASES = [
    "responses", "responses_stream", "responses_chat_input", "responses_retrieve", "responses_cancel_finished",
    "responses_previous", "responses_store_false", "responses_retrieve_unstored", "responses_retrieve_unknown",
    "responses_cancel_unknown", "responses_previous_unknown", "responses_error_unknown_model",
    "responses_error_no_input", "responses_error_max_output_tokens", "responses_error_background_unstored",
    "responses_background", "responses_cancel_background", "responses_retrieve_cancelled",
    "messages", "messages_stream", "messages_system_stop", "messages_error_unknown_model",
    "messages_error_unknown_model_stream", "messages_error_max_tokens_too_large", "messages_error_no_max_tokens",
    "messages_error_invalid_json", "messages_count_tokens", "messages_count_tokens_unknown_model",
    "tokenize", "tokenize_token_strs", "tokenize_chat", "tokenize_unknown_model", "detokenize",
    "detokenize_bad_tokens", "chat_batch", "chat_batch_error_not_nested", "invocations_completion",
    "invocations_chat", "invocations_stream", "invocations_error_no_prompt",
    "pooling", "classify", "score", "v1_score", "rerank", "v1_rerank", "v2_rerank", "embeddings",
]
#: Cases replayed against the slow simulator, so a background response is still generating when cancelled.
SLOW_CASES = {"responses_background", "responses_cancel_background", "responses_retrieve_cancelled"}
#: Captured but not replayed: the tiny model has no speech-to-text, so real vLLM mounts no audio
#: routes (404); the simulator serves them as a speech-to-text model would (tests/test_sim_paths.py).
NOT_REPLAYED = {"audio_transcriptions", "audio_translations"}
#: Error messages that are fixed text in vLLM (others are pydantic's wording).
EXACT_MESSAGES = {"error_unknown_model", "error_unknown_model_stream", "error_max_tokens_too_large",
                  "error_max_tokens_too_large_stream", "responses_cancel_finished",
                  "responses_error_max_output_tokens", "responses_error_background_unstored",
                  "messages_error_max_tokens_too_large", "invocations_error_no_prompt"}


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


def shape(v: Any, loose: bool = False) -> Any:
    """The structure of a JSON value: keys in order, kinds of leaves (null kept apart).

    `loose`: a list is the distinct shapes of its items, so lengths that follow the
    tokenizer (token ids, text deltas) do not count.
    """
    if isinstance(v, dict):
        return [(k, shape(x, loose)) for k, x in v.items()]
    if isinstance(v, tuple):  # a named SSE event
        return (v[0], shape(v[1], loose))
    if isinstance(v, list):
        items = [shape(x, loose) for x in v]
        return [x for k, x in enumerate(items) if x not in items[:k]] if loose else items
    if v is None:
        return None
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    return "str"


def sse_events(body: bytes) -> list[Any]:
    """The data of each event (``[DONE]`` as text); an ``event:`` line makes it (name, data)."""
    events = [e for e in body.split(b"\n\n") if e.strip()]
    out = []
    for e in events:
        name = None
        if e.startswith(b"event: "):
            line, e = e.split(b"\n", 1)
            name = line[len(b"event: "):].decode()
        assert e.startswith(b"data: "), e
        data = e[len(b"data: "):]
        value = data.decode() if data == b"[DONE]" else json.loads(data)
        out.append(value if name is None else (name, value))
    return out


def response_ids(body: bytes) -> list[str]:
    """The Responses ids an answer makes: a JSON body's ``id``, or the stream's response.created."""
    try:
        events = sse_events(body) if body.startswith(b"event: ") else [json.loads(body)]
    except ValueError:
        return []
    ids = []
    for event in events:
        data = event[1].get("response", {}) if isinstance(event, tuple) else event
        if isinstance(data, dict) and str(data.get("id", "")).startswith("resp_"):
            ids.append(data["id"])
    return ids[:1]


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


def runs(shapes: list[Any]) -> list[Any]:
    """`shapes` with runs of equal ones made one (a real stream may send two tokens in one delta)."""
    return [x for k, x in enumerate(shapes) if k == 0 or x != shapes[k - 1]]


def compare(case: str, real: "Exchange", status: int, headers: dict[str, str], body: bytes,
            loose: bool = False) -> list[str]:
    """How the simulator's answer to `real`'s request differs from real vLLM's (`loose`: see shape)."""
    where = f"{case} ({real.method} {real.path})"
    if status != real.status:
        return [f"{where}: status {status}, real vLLM {real.status}: {body[:200]!r}"]
    problems = []
    if headers.get("content-type") != real.headers.get("content-type"):
        problems.append(f"{where}: content-type {headers.get('content-type')!r}, "
                        f"real vLLM {real.headers.get('content-type')!r}")
    if real.headers.get("content-type", "").startswith("text/event-stream"):
        got = [shape(e, loose) for e in sse_events(body)]
        want = [shape(e, loose) for e in sse_events(real.body)]
        if loose:
            got, want = runs(got), runs(want)
        if got != want:
            problems.append(f"{where}: SSE events differ\n  sim:  {body.decode()[:1500]}\n"
                            f"  real: {real.body.decode()[:1500]}")
        return problems
    if not real.body:
        return problems + ([f"{where}: body {body[:200]!r}, real vLLM sends an empty body"] if body else [])
    got, want = json.loads(body), json.loads(real.body)
    if shape(got, loose) != shape(want, loose):
        return problems + [f"{where}: JSON structure differs\n  sim:  {body.decode()[:800]}\n"
                           f"  real: {real.body.decode()[:800]}"]
    error = got.get("error") if isinstance(got, dict) else None
    if isinstance(error, dict):
        wanted = want["error"]
        for key in ("type", "param", "code"):
            if key in wanted and error[key] != wanted[key]:
                problems.append(f"{where}: error.{key} {error[key]!r}, real {wanted[key]!r}")
        if case in EXACT_MESSAGES and error["message"] != wanted["message"]:
            problems.append(f"{where}: error.message {error['message']!r}, real {wanted['message']!r}")
    elif real.path.startswith(("/sleep", "/wake_up", "/is_sleeping", "/version")) or "detail" in want:
        # Fixed text in vLLM (sleep API, version, FastAPI's 404/405): must match exactly.
        if got != want:
            problems.append(f"{where}: body {got}, real vLLM {want}")
    return problems


def test_sim_replays_captured_exchanges(sim):
    problems = []
    for case in CASES:
        real = Exchange(CAPTURED / f"{case}.http")
        problems += compare(case, real, *_request(sim, real.method, real.path, real.request_body))
    assert not problems, "the simulator differs from real vLLM 0.32:\n" + "\n".join(problems)


def test_path_captures_are_present():
    missing = [c for c in PATH_CASES + sorted(NOT_REPLAYED) if not (CAPTURED / f"{c}.http").is_file()]
    assert not missing, f"captured exchanges missing: {missing} (re-run tests/real_vllm/capture.py --only paths)"


def test_sim_replays_captured_paths(sim, slow_sim):
    """Every other client path, Responses ids of real vLLM swapped for the simulator's."""
    problems = []
    ids: dict[str, str] = {}
    for case in PATH_CASES:
        real = Exchange(CAPTURED / f"{case}.http")
        path, body = real.path, real.request_body
        for real_id, sim_id in ids.items():
            path = path.replace(real_id, sim_id)
            body = body.replace(real_id.encode(), sim_id.encode()) if body is not None else None
        status, headers, answer = _request(slow_sim if case in SLOW_CASES else sim, real.method, path, body)
        ids.update(zip(response_ids(real.body), response_ids(answer)))
        problems += compare(case, real, status, headers, answer, loose=True)
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
