"""Real-engine tests: the shared stack, and making a skip impossible to miss.

The stack (one real vLLM under real supervisord, with the router in front) is
defined once here for every real-engine module: each module gets its own
(module scope), started from the same config, with the module's
``ROUTER_SETTINGS`` dict (if any) merged into the ``router`` section and its
``INSTANCE_SETTINGS`` (if any) into the engine's instance; so a module that
needs client keys or LoRA adapters gets them without copying the stack.
Test modules import the helpers below (``from conftest import ...``), as the
suite imports ``helpers``: pytest puts this directory on ``sys.path``.

The `real_engine` marker is registered in setup.cfg. When the prepared vLLM
cache is absent, every test here is skipped; `pytest_terminal_summary` then
prints a banner at the end of the run so a green run without the real engine
is never mistaken for one that exercised it. With REAL_VLLM_REQUIRED=1 the
tests fail instead.

Nothing is ever killed by name: every process killed is one a module started
or a descendant recorded (pid and start time) from supervisord's tree;
``tests/supervised.py`` keeps that record.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest
from helpers import distinct_ports

REQUIRED = os.environ.get("REAL_VLLM_REQUIRED") == "1"
#: Why the stack cannot be built in this environment (the test extra is missing), or None.
MISSING_EXTRA: Optional[str] = None
try:
    import openai
    import psutil
    from supervised import Supervised
except ImportError as e:  # the test extra is not installed: the modules skip, conftest must still import
    if REQUIRED:
        raise
    MISSING_EXTRA = f"REAL vLLM ENGINE TESTS NEED the test extra: {e}"
    Supervised = object  # type: ignore[assignment,misc]

CACHE = Path(os.environ.get("REAL_VLLM_CACHE") or Path.home() / ".cache" / "router-real-vllm")
VENV = CACHE / "venv"
MODEL = CACHE / "tiny-model"
MARKER = CACHE / "READY"
SERVED = "tiny"
MAX_MODEL_LEN = 512
ENGINE_START_TIMEOUT = 240.0  # ~30 s alone; more on a busy 2-core machine
LOG_TAIL = 8000  # characters of a program's log shown when the engine does not come up
#: The engine's environment: offline, CPU KV cache of 1 GiB, the dev-mode sleep API, no telemetry, and
#: the Responses API store (off by default in vLLM 0.32: without it GET /v1/responses/{id} and
#: previous_response_id find nothing).
ENGINE_ENV = ["HF_HUB_OFFLINE=1", "VLLM_HOST_IP=127.0.0.1", "VLLM_CPU_KVCACHE_SPACE=1",
              "VLLM_SERVER_DEV_MODE=1", "VLLM_NO_USAGE_STATS=1", "DO_NOT_TRACK=1",
              "VLLM_ENABLE_RESPONSES_API_STORE=1"]


# --------------------------------------------------------------------------- HTTP helpers

def not_prepared() -> Optional[str]:
    """Why the prepared cache is unusable, or None when it is ready."""
    if not MARKER.is_file():
        return f"no prepared real-vLLM cache ({MARKER} is missing)"
    if not (VENV / "bin" / "python").exists():
        return f"{VENV}/bin/python is missing"
    if not (MODEL / "config.json").is_file():
        return f"{MODEL}/config.json is missing"
    return None


def http_get(url: str, timeout: float = 5.0, headers: Optional[dict[str, str]] = None) -> tuple[Optional[int], bytes]:
    """(status, body) of GET `url`; (None, b"") when nothing answers."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return None, b""


def http_post_full(url: str, body: Optional[dict] = None, timeout: float = 120.0,
                   headers: Optional[dict[str, str]] = None):
    """(status, headers, body) of POST `url` with a JSON body; status None when nothing answers."""
    data = json.dumps(body).encode() if body is not None else b""
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()
    except OSError:
        return None, None, b""


def http_post(url: str, body: Optional[dict] = None, timeout: float = 120.0,
              headers: Optional[dict[str, str]] = None) -> tuple[Optional[int], bytes]:
    status, _, data = http_post_full(url, body, timeout, headers)
    return status, data


# --------------------------------------------------------------------------- the stack

class Stack(Supervised):
    """Rendered config + real supervisord + its process tree, owned by one test module.

    `Supervised` starts, stops and cleans up; its watcher thread records the
    tree twice a second, so cleanup finds any orphan of a slow vLLM.
    """

    def __init__(self, root: Path, router_settings: Optional[dict[str, Any]] = None,
                 instance_settings: Optional[dict[str, Any]] = None):
        self.root = root
        self.router_settings = router_settings or {}
        #: More keys of the engine's instance; its ``engine_args`` are added to the stack's own.
        self.instance_settings = instance_settings or {}
        self.engine_port, self.router_port = distinct_ports(2)
        self.router = f"http://127.0.0.1:{self.router_port}"
        self.engine = f"http://127.0.0.1:{self.engine_port}"
        # vLLM starts and stops slowly, more so on a busy 2-core machine.
        super().__init__(root / "out", root / "tmux", ctl_timeout=120, shutdown_timeout=120, watch=0.5)
        self.timings: dict[str, float] = {}

    # -- config and render
    def write_config(self) -> Path:
        cfg = {
            "router": {
                "router_host": "127.0.0.1",
                "router_port": self.router_port,
                "health_check_interval_seconds": 1,
                "health_check_timeout_seconds": 2,
                "unhealthy_threshold": 1,
                "healthy_threshold": 1,
                "connect_timeout_seconds": 2,
                "eject_seconds": 1,
                "shutdown_grace_seconds": 5,
                **self.router_settings,
            },
            "sleep_manager": {
                "auto_sleep_enabled": False,
                "wakeup_on_request": True,
                "wake_timeout_seconds": 60,
            },
            "instances": [{
                "name": SERVED,
                "model": str(MODEL),
                "engine": "vllm",
                "using_venv": True,
                "venv_path": str(VENV),
                "engine_env": ENGINE_ENV,
                **{k: v for k, v in self.instance_settings.items() if k != "engine_args"},
                "engine_args": [f"--served-model-name {SERVED}", "--host 127.0.0.1", f"--port {self.engine_port}",
                                f"--max-model-len {MAX_MODEL_LEN}", "--max-num-seqs 8", "--enforce-eager",
                                *self.instance_settings.get("engine_args", [])],
            }],
        }
        path = self.root / "config.yaml"
        # JSON is YAML: no YAML writer needed.
        path.write_text(json.dumps(cfg, indent=2))
        return path

    def render(self, config: Path) -> None:
        r = subprocess.run([sys.executable, "-m", "router.render", "--config", str(config), "--out", str(self.out)],
                           capture_output=True, text=True, timeout=60, env=self.env)
        assert r.returncode == 0, f"render failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
        assert self.conf.is_file() and (self.out / "engines" / f"{SERVED}.sh").is_file()

    # -- the engine
    def engine_tree(self) -> list["psutil.Process"]:
        """The engine program's process and all its descendants (API server, EngineCore, ...)."""
        root = psutil.Process(self.pid(SERVED))
        return [root, *root.children(recursive=True)]

    def wait_engine_ready(self, timeout: float = ENGINE_START_TIMEOUT) -> float:
        """Until the engine answers /health directly and the router reports it healthy."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, \
                f"supervisord exited ({self.proc.returncode})"
            state = self.status().get(SERVED)
            if state in ("FATAL", "BACKOFF"):
                pytest.fail(f"engine program is {state}; its log:\n{self.log(SERVED, LOG_TAIL)}")
            if http_get(self.engine + "/health", 2)[0] == 200:
                status, body = http_get(f"{self.router}/health/{SERVED}", 5)
                if status == 200 and json.loads(body).get("status") == "healthy":
                    return time.monotonic() - t0
            time.sleep(1)
        pytest.fail(f"engine not healthy through the router within {timeout:.0f}s; engine log:\n"
                    f"{self.log(SERVED, LOG_TAIL)}\nrouter log:\n{self.log('router', LOG_TAIL)}")

    # -- clients
    def client(self, base: Optional[str] = None, timeout: float = 90.0, api_key: str = "unused") -> "openai.OpenAI":
        """The official OpenAI SDK on the router (or on `base`, e.g. the engine), without retries:
        a retry would hide the first answer's status."""
        return openai.OpenAI(base_url=(base or self.router) + "/v1", api_key=api_key, max_retries=0,
                             timeout=timeout)


def require_prepared() -> None:
    """Skip, or with REAL_VLLM_REQUIRED=1 fail, when the real engine's venv and model are not there."""
    if MISSING_EXTRA:
        pytest.skip(MISSING_EXTRA)
    missing = not_prepared()
    if missing:
        msg = (f"REAL vLLM ENGINE NOT PREPARED: {missing}. Run tests/real_vllm/prepare.sh "
               f"(cache: REAL_VLLM_CACHE, default ~/.cache/router-real-vllm).")
        if REQUIRED:
            pytest.fail(msg + " REAL_VLLM_REQUIRED=1, so this is a failure.", pytrace=False)
        pytest.skip(msg)


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The module's own stack, its router configured with the module's ``ROUTER_SETTINGS``."""
    require_prepared()
    s = Stack(tmp_path_factory.mktemp("realvllm"), getattr(request.module, "ROUTER_SETTINGS", None),
              getattr(request.module, "INSTANCE_SETTINGS", None))
    try:
        s.render(s.write_config())
        t0 = time.monotonic()
        s.start()
        s.timings["engine_start_s"] = s.wait_engine_ready()
        s.timings["stack_start_s"] = time.monotonic() - t0
        yield s
    finally:
        s.close()
        print(f"\nreal vLLM stack timings: {json.dumps({k: round(v, 1) for k, v in s.timings.items()})}")


# --------------------------------------------------------------------------- the skip banner

def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = [r for r in terminalreporter.stats.get("skipped", [])
               if "real_vllm" in getattr(r, "nodeid", "") or "real_vllm" in str(getattr(r, "fspath", ""))]
    if not skipped:
        return
    reason = ""
    longrepr = getattr(skipped[0], "longrepr", None)
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        reason = longrepr[2]
    terminalreporter.write_sep("!", "REAL vLLM ENGINE TESTS SKIPPED", red=True, bold=True)
    terminalreporter.write_line(f"{len(skipped)} real-engine test(s) did not run. {reason}", red=True)
    terminalreporter.write_line(
        "Prepare the engine with tests/real_vllm/prepare.sh, or set REAL_VLLM_REQUIRED=1 to make this a failure.",
        red=True)
