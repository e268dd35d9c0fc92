"""Record what a real vLLM OpenAI server answers, for the simulator to match.

Usage (with the cache made by prepare.sh)::

    python tests/real_vllm/capture.py [--cache DIR] [--out tests/real_vllm/captured]

Starts ``VENV/bin/python -m vllm.entrypoints.openai.api_server`` on the tiny
model on a free loopback port, sends a fixed list of requests with the standard
library's http.client, and writes each exchange to OUT/<case>.http: the request
line and body, then the status line, the response headers and the raw body
(SSE bytes as sent). The engine is stopped (process group) at the end.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CACHE = os.environ.get(
    "REAL_VLLM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "router-real-vllm")
)
SKIP_HEADERS = {"date"}  # volatile

sys.path.insert(0, os.path.dirname(HERE))  # tests/, for the suite's one free_port
from helpers import free_port  # noqa: E402


class Recorder:
    def __init__(self, port: int, out: str):
        self.port = port
        self.out = out
        os.makedirs(out, exist_ok=True)

    def request(self, method, path, body=None, raw=None, timeout=120.0, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        hdrs = {"Content-Type": "application/json"} if data is not None else {}
        hdrs.update(headers or {})
        t0 = time.monotonic()
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        payload = resp.read()
        elapsed = time.monotonic() - t0
        conn.close()
        return resp, payload, data, elapsed

    def case(self, name, method, path, body=None, raw=None, note="", **kw):
        resp, payload, data, elapsed = self.request(method, path, body=body, raw=raw, **kw)
        self.write(name, method, path, data, resp.status, resp.reason, resp.getheaders(), payload,
                   elapsed, note)
        return resp.status, payload

    def response_id(self, name, body) -> str:
        """POST /v1/responses as case `name`; the id of the response it made."""
        status, payload = self.case(name, "POST", "/v1/responses", body)
        return json.loads(payload)["id"] if status == 200 else "resp_missing"

    def write(self, name, method, path, data, status, reason, headers, payload, elapsed, note=""):
        lines = []
        if note:
            lines.append(f"# {note}")
        lines.append(f"# elapsed {elapsed:.3f} s")
        lines.append(f"> {method} {path}")
        if data is not None:
            lines.append(f"> {data.decode('utf-8', 'replace')}")
        lines.append(f"< HTTP/1.1 {status} {reason}")
        for k, v in headers:
            if k.lower() not in SKIP_HEADERS:
                lines.append(f"< {k}: {v}")
        lines.append("")
        text = "\n".join(lines) + "\n" + payload.decode("utf-8", "replace")
        with open(os.path.join(self.out, name + ".http"), "w") as f:
            f.write(text if text.endswith("\n") else text + "\n")
        print(f"{name}: {status} ({len(payload)} bytes, {elapsed:.2f} s)")


def _keep_metric_lines(path: str) -> None:
    """Trim a captured /metrics to its headers and the vllm: request/sleep gauges."""
    keep = ("vllm:num_requests_running", "vllm:num_requests_waiting{", "vllm:engine_sleep_state",
            "vllm:generation_tokens_total", "vllm:prompt_tokens_total")
    with open(path) as f:
        head, _, body = f.read().partition("\n\n")
    lines = [ln for ln in body.splitlines() if ln.startswith(keep)]
    with open(path, "w") as f:
        f.write(head + "\n# (trimmed to a few vllm: series)\n\n" + "\n".join(lines) + "\n")


def sleep_during_streams(r, port, out, suffix, sleep_path):
    """Send `sleep_path` once four 500-token streams are generating; record both sides."""
    streams = [dict() for _ in range(4)]
    started = threading.Event()

    def long_stream(slot):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            data = json.dumps({"model": "tiny", "prompt": "Hello", "max_tokens": 500,
                               "temperature": 1.0, "ignore_eos": True,
                               "stream": True}).encode()
            t0 = time.monotonic()
            conn.request("POST", "/v1/completions", body=data,
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            body = b""
            while True:
                line = resp.readline()
                if not line:
                    break
                body += line
                if body.count(b"data: ") >= 20:
                    started.set()
            slot.update(resp=resp, payload=body, data=data, elapsed=time.monotonic() - t0)
            conn.close()
        except Exception as e:  # noqa: BLE001
            slot["error"] = repr(e)

    threads = [threading.Thread(target=long_stream, args=(s,)) for s in streams]
    for t in threads:
        t.start()
    started.wait(30)
    r.case("sleep_during_stream" + suffix, "POST", sleep_path,
           note="sent while four 500-token streams were generating")
    for t in threads:
        t.join(60.0)
    slot = streams[0]
    name = "stream_cut_by_sleep" + suffix
    if "resp" not in slot:
        with open(os.path.join(out, name + ".http"), "w") as f:
            f.write(f"# no response: {slot.get('error', 'timeout (still hanging after 60 s)')}\n")
        return
    finals = []
    counts = []
    for s in streams:
        body = s.get("payload", b"")
        counts.append(body.count(b"data: {"))
        finals += [json.loads(ln[6:])["choices"][0]["finish_reason"] for ln in body.splitlines()
                   if ln.startswith(b"data: {") and b'"finish_reason":"' in ln][-1:]
    r.write(name, "POST", "/v1/completions", slot["data"], slot["resp"].status,
            slot["resp"].reason, slot["resp"].getheaders(), slot["payload"][-1200:],
            slot["elapsed"],
            f"streams in flight when {sleep_path} came; text events per stream {counts}; "
            f"final finish_reason per stream {finals}; only the last 1200 bytes of the first "
            "stream are kept")


def capture_core(r: Recorder, port: int, out: str) -> None:
    """Completions, chat, errors, and the sleep API (its cases run in this order)."""
    r.case("health", "GET", "/health")
    r.case("models", "GET", "/v1/models")
    r.case("version", "GET", "/version")
    r.case("completions", "POST", "/v1/completions",
           {"model": "tiny", "prompt": "Hello", "max_tokens": 8, "temperature": 0})
    r.case("completions_stream", "POST", "/v1/completions",
           {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0,
            "stream": True})
    r.case("completions_stream_usage", "POST", "/v1/completions",
           {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}})
    r.case("chat", "POST", "/v1/chat/completions",
           {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 8, "temperature": 0})
    r.case("chat_stream_usage", "POST", "/v1/chat/completions",
           {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}})
    r.case("error_unknown_model", "POST", "/v1/completions",
           {"model": "nope", "prompt": "Hello", "max_tokens": 4})
    r.case("error_unknown_model_stream", "POST", "/v1/completions",
           {"model": "nope", "prompt": "Hello", "max_tokens": 4, "stream": True})
    r.case("error_max_tokens_too_large", "POST", "/v1/completions",
           {"model": "tiny", "prompt": "Hello", "max_tokens": 100000})
    r.case("error_max_tokens_too_large_stream", "POST", "/v1/chat/completions",
           {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 100000, "stream": True})
    r.case("error_invalid_json", "POST", "/v1/completions", raw=b'{"model": "tiny", ')
    r.case("error_body_not_object", "POST", "/v1/completions", raw=b'[1, 2]')
    r.case("error_bad_type", "POST", "/v1/completions",
           {"model": "tiny", "prompt": "Hello", "max_tokens": "many"})
    r.case("no_model_field", "POST", "/v1/completions",
           {"prompt": "Hello", "max_tokens": 2, "temperature": 0})
    r.case("error_unknown_route", "GET", "/v1/nothing")
    r.case("error_wrong_method", "GET", "/v1/completions")
    r.case("is_sleeping_awake", "GET", "/is_sleeping")
    r.case("sleep", "POST", "/sleep?level=1")
    r.case("is_sleeping_asleep", "GET", "/is_sleeping")
    r.case("health_asleep", "GET", "/health")
    r.case("models_asleep", "GET", "/v1/models")

    # A request sent while asleep: does it hang, and what happens on wake_up?
    result = {}

    def asleep_request():
        try:
            resp, payload, data, elapsed = r.request(
                "POST", "/v1/completions",
                {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0},
                timeout=120)
            result.update(resp=resp, payload=payload, data=data, elapsed=elapsed)
        except Exception as e:  # noqa: BLE001
            result["error"] = repr(e)

    t = threading.Thread(target=asleep_request)
    t.start()
    t.join(6.0)
    # What the engine's own gauges say about the held request.
    r.case("metrics_asleep_with_held_request", "GET", "/metrics",
           note="asleep, one completion request held for 6 s")
    _keep_metric_lines(os.path.join(out, "metrics_asleep_with_held_request.http"))
    t.join(2.0)
    pending_after_8s = t.is_alive()
    r.case("wake_up", "POST", "/wake_up")
    t.join(60.0)
    note = (f"sent while asleep; still pending after 8 s: {pending_after_8s}; "
            "then POST /wake_up was sent")
    if "resp" in result:
        r.write("request_while_asleep", "POST", "/v1/completions", result["data"],
                result["resp"].status, result["resp"].reason, result["resp"].getheaders(),
                result["payload"], result["elapsed"], note)
    else:
        with open(os.path.join(out, "request_while_asleep.http"), "w") as f:
            f.write(f"# {note}\n# no response: {result.get('error', 'timeout')}\n")
    r.case("is_sleeping_after_wake", "GET", "/is_sleeping")
    r.case("sleep_level2_mode_abort", "POST", "/sleep?level=2&mode=abort",
           note="does 0.32 accept level=2 and a mode parameter?")
    r.case("wake_up_again", "POST", "/wake_up")
    r.case("sleep_bad_level", "POST", "/sleep?level=3")
    r.case("sleep_bad_mode", "POST", "/sleep?mode=bogus")
    r.case("is_sleeping_after_bad_sleep", "GET", "/is_sleeping")

    # /sleep while four 500-token streams are generating: default mode=abort,
    # then mode=wait (what the router's sleep manager sends).
    sleep_during_streams(r, port, out, "", "/sleep?level=1")
    r.case("wake_up_after_stream_sleep", "POST", "/wake_up")
    sleep_during_streams(r, port, out, "_mode_wait", "/sleep?level=1&mode=wait")
    r.case("wake_up_after_stream_sleep", "POST", "/wake_up")
    r.case("completions_after_wake", "POST", "/v1/completions",
           {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0})
    r.case("metrics", "GET", "/metrics")


AUDIO_BOUNDARY = "capture-boundary"


def multipart(fields: dict, file_bytes: bytes) -> bytes:
    """A multipart/form-data body: `fields` as text parts, then `file` (audio/wav)."""
    parts = [f'--{AUDIO_BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{AUDIO_BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
                 f"Content-Type: audio/wav\r\n\r\n".encode() + file_bytes + b"\r\n")
    return b"".join(parts) + f"--{AUDIO_BOUNDARY}--\r\n".encode()


def capture_paths(r: Recorder) -> None:
    """Every other client path the router routes to vLLM (router/engines/vllm.py).

    The engine runs with VLLM_ENABLE_RESPONSES_API_STORE=1 so stored responses,
    retrieve, cancel and previous_response_id can be seen (0.32 stores nothing
    without it). Responses ids are made here, so the cases using them run in order.
    """
    hello = {"model": "tiny", "input": "Hello", "max_output_tokens": 4, "temperature": 0}
    rid = r.response_id("responses", hello)
    r.case("responses_stream", "POST", "/v1/responses", {**hello, "max_output_tokens": 3, "stream": True})
    r.case("responses_chat_input", "POST", "/v1/responses",
           {**hello, "input": [{"role": "user", "content": "hi"}], "instructions": "be brief"})
    r.case("responses_retrieve", "GET", f"/v1/responses/{rid}")
    r.case("responses_cancel_finished", "POST", f"/v1/responses/{rid}/cancel")
    r.case("responses_previous", "POST", "/v1/responses", {**hello, "previous_response_id": rid})
    unstored = r.response_id("responses_store_false", {**hello, "store": False})
    r.case("responses_retrieve_unstored", "GET", f"/v1/responses/{unstored}")
    r.case("responses_retrieve_unknown", "GET", "/v1/responses/resp_nope")
    r.case("responses_cancel_unknown", "POST", "/v1/responses/resp_nope/cancel")
    r.case("responses_previous_unknown", "POST", "/v1/responses", {**hello, "previous_response_id": "resp_nope"})
    r.case("responses_error_unknown_model", "POST", "/v1/responses", {**hello, "model": "nope"})
    r.case("responses_error_no_input", "POST", "/v1/responses", {"model": "tiny"})
    r.case("responses_error_max_output_tokens", "POST", "/v1/responses", {**hello, "max_output_tokens": 100000})
    r.case("responses_error_background_unstored", "POST", "/v1/responses",
           {**hello, "background": True, "store": False})
    background = r.response_id("responses_background", {**hello, "background": True, "max_output_tokens": 490,
                                                        "ignore_eos": True})
    r.case("responses_cancel_background", "POST", f"/v1/responses/{background}/cancel",
           note="sent at once, while the background response was generating")
    r.case("responses_retrieve_cancelled", "GET", f"/v1/responses/{background}")

    chat = {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    r.case("messages", "POST", "/v1/messages", chat)
    r.case("messages_stream", "POST", "/v1/messages", {**chat, "max_tokens": 3, "stream": True})
    r.case("messages_system_stop", "POST", "/v1/messages",
           {**chat, "system": "be brief", "stop_sequences": ["x"],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
    r.case("messages_error_unknown_model", "POST", "/v1/messages", {**chat, "model": "nope"})
    r.case("messages_error_unknown_model_stream", "POST", "/v1/messages", {**chat, "model": "nope", "stream": True})
    r.case("messages_error_max_tokens_too_large", "POST", "/v1/messages", {**chat, "max_tokens": 100000})
    r.case("messages_error_no_max_tokens", "POST", "/v1/messages", {"model": "tiny", "messages": chat["messages"]})
    r.case("messages_error_invalid_json", "POST", "/v1/messages", raw=b'{"model": "tiny", ')
    r.case("messages_count_tokens", "POST", "/v1/messages/count_tokens",
           {"model": "tiny", "messages": chat["messages"]})
    r.case("messages_count_tokens_unknown_model", "POST", "/v1/messages/count_tokens",
           {"model": "nope", "messages": chat["messages"]})

    r.case("tokenize", "POST", "/tokenize", {"model": "tiny", "prompt": "Hello world"})
    r.case("tokenize_token_strs", "POST", "/tokenize",
           {"model": "tiny", "prompt": "Hello world", "return_token_strs": True})
    r.case("tokenize_chat", "POST", "/tokenize", {"model": "tiny", "messages": chat["messages"]})
    r.case("tokenize_unknown_model", "POST", "/tokenize", {"model": "nope", "prompt": "Hello"})
    r.case("detokenize", "POST", "/detokenize", {"model": "tiny", "tokens": [43, 424, 323]})
    r.case("detokenize_bad_tokens", "POST", "/detokenize", {"model": "tiny", "tokens": "x"})

    r.case("chat_batch", "POST", "/v1/chat/completions/batch",
           {"model": "tiny", "max_tokens": 2, "temperature": 0,
            "messages": [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "yo"}]]})
    r.case("chat_batch_error_not_nested", "POST", "/v1/chat/completions/batch", chat)
    r.case("invocations_completion", "POST", "/invocations",
           {"model": "tiny", "prompt": "Hello", "max_tokens": 2, "temperature": 0})
    r.case("invocations_chat", "POST", "/invocations", {**chat, "max_tokens": 2, "temperature": 0})
    r.case("invocations_stream", "POST", "/invocations",
           {"model": "tiny", "prompt": "Hello", "max_tokens": 2, "temperature": 0, "stream": True})
    r.case("invocations_error_no_prompt", "POST", "/invocations", {"model": "tiny", "input": "x"})

    pair = {"model": "tiny", "text_1": "a", "text_2": "b"}
    rerank = {"model": "tiny", "query": "a", "documents": ["b", "c"]}
    for name, path, body in (("pooling", "/pooling", {"model": "tiny", "input": "Hello"}),
                             ("classify", "/classify", {"model": "tiny", "input": "Hello"}),
                             ("score", "/score", pair), ("v1_score", "/v1/score", pair),
                             ("rerank", "/rerank", rerank), ("v1_rerank", "/v1/rerank", rerank),
                             ("v2_rerank", "/v2/rerank", rerank),
                             ("embeddings", "/v1/embeddings", {"model": "tiny", "input": "Hello"})):
        r.case(name, "POST", path, body, note="a generative model: vLLM mounts no pooling routes")
    form = {"Content-Type": f"multipart/form-data; boundary={AUDIO_BOUNDARY}"}
    audio = multipart({"model": "tiny"}, b"RIFF....WAVEfmt fake audio bytes")
    for name in ("transcriptions", "translations"):
        r.case(f"audio_{name}", "POST", f"/v1/audio/{name}", raw=audio, headers=form,
               note="a model without speech-to-text: vLLM mounts no audio routes")


def wait_health(port, proc, timeout=180.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"engine exited with {proc.returncode} before becoming healthy")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit("engine not healthy in time")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default=DEFAULT_CACHE)
    ap.add_argument("--out", default=os.path.join(HERE, "captured"))
    ap.add_argument("--only", choices=("core", "paths"), default=None,
                    help="capture one group: core (completions, chat, sleep) or paths (the other client paths)")
    args = ap.parse_args()
    venv = os.path.join(args.cache, "venv")
    model = os.path.join(args.cache, "tiny-model")
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_HOST_IP="127.0.0.1",
               VLLM_CPU_KVCACHE_SPACE="1", VLLM_SERVER_DEV_MODE="1",
               VLLM_ENABLE_RESPONSES_API_STORE="1")
    cmd = [os.path.join(venv, "bin", "python"), "-m", "vllm.entrypoints.openai.api_server",
           "--model", model, "--served-model-name", "tiny", "--host", "127.0.0.1",
           "--port", str(port), "--max-model-len", "512", "--max-num-seqs", "8",
           "--enforce-eager"]
    log = open(os.path.join(args.cache, "capture-engine.log"), "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        up = wait_health(port, proc)
        print(f"engine healthy after {up:.1f} s (pid {proc.pid})")
        r = Recorder(port, args.out)
        if args.only in (None, "core"):
            capture_core(r, port, args.out)
        if args.only in (None, "paths"):
            capture_paths(r)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
