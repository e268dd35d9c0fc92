"""Residency against a real vLLM engine: on demand start, idle stop, manual stop/start.

The tiny real vLLM (see ``conftest.py``) is rendered as ``on_demand: true``
(supervisord ``autostart=false``) with a small ``idle_stop_seconds`` and a
one-second idle loop. Real supervisord runs it with the router:

* after the start, the engine is STOPPED and no vLLM process exists;
* the first chat request through the router starts it through supervisord,
  waits for its health check and gets a 200 (the cold start is timed);
* ``/health/all`` then shows it awake and the process RUNNING;
* without traffic it is stopped after ``idle_stop_seconds``, leaving no
  process of the engine (API server, EngineCore, workers) behind;
* a second request starts it again; ``POST /action/stop`` and
  ``POST /action/start`` work too.

The tests share one stack and run in file order. Nothing is ever killed by
name (see ``conftest.py``).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

pytestmark = pytest.mark.real_engine

REQUIRED = os.environ.get("REAL_VLLM_REQUIRED") == "1"
try:
    import psutil
    from conftest import ENGINE_START_TIMEOUT, LOG_TAIL, MODEL, SERVED, Stack, http_get, http_post, require_prepared
    from helpers import wait_for
    from supervised import alive as _alive
except ImportError as e:  # the test extra is not installed
    if REQUIRED:
        raise
    pytest.skip(f"REAL vLLM ENGINE TESTS NEED the test extra: {e}", allow_module_level=True)

IDLE_STOP_SECONDS = 5
CHECK_INTERVAL_SECONDS = 1
#: How long the idle stop may take past idle_stop_seconds: the loop's period, plus supervisord stopping vLLM.
STOP_SLACK_SECONDS = 90
#: Markers of a vLLM process in a command line (the API server, its EngineCore, workers).
VLLM_MARKERS = ("vllm", "VLLM", "EngineCore")


class OnDemandStack(Stack):
    """The conftest stack with the engine on demand, stopped after a short idle time."""

    timings: dict[str, float]
    #: time.monotonic() when the last answer through the router came back.
    last_answer_at: float = 0.0

    def write_config(self) -> Path:
        path = super().write_config()
        cfg = json.loads(path.read_text())
        cfg["sleep_manager"]["check_interval_seconds"] = CHECK_INTERVAL_SECONDS
        cfg["residency"] = {"start_timeout_seconds": ENGINE_START_TIMEOUT}
        cfg["instances"][0].update({"on_demand": True, "idle_stop_seconds": IDLE_STOP_SECONDS})
        path.write_text(json.dumps(cfg, indent=2))
        return path

    def health_all(self) -> dict[str, Any]:
        status, body = http_get(self.router + "/health/all", 30)
        assert status is not None, "the router does not answer /health/all"
        return json.loads(body)

    def model(self) -> dict[str, Any]:
        """This engine's model under /health/all (keyed by the model's name, the path; found by instance)."""
        models = self.health_all()["models"]
        found = [m for m in models.values() if any(e["instance"] == SERVED for e in m["endpoints"])]
        assert len(found) == 1, models
        return found[0]

    def replica(self) -> dict[str, Any]:
        """This engine's entry under /health/all."""
        model = self.model()
        assert len(model["endpoints"]) == 1, model
        return model["endpoints"][0]

    def logs(self) -> str:
        return f"{self.log(SERVED, LOG_TAIL)}\n{self.log('router', LOG_TAIL)}"

    def vllm_processes(self) -> list[psutil.Process]:
        """Every live process this stack ever had under supervisord that looks like vLLM, plus any under it now."""
        self.snapshot()
        found = []
        for p in list(self.seen.values()):
            try:
                if _alive(p) and any(m in " ".join([p.name(), *p.cmdline()]) for m in VLLM_MARKERS):
                    found.append(p)
            except psutil.NoSuchProcess:
                continue
        return found


@pytest.fixture(scope="module")
def od(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OnDemandStack]:
    require_prepared()
    s = OnDemandStack(tmp_path_factory.mktemp("residency"))
    try:
        s.render(s.write_config())
        conf = s.conf.read_text()
        section = conf[conf.index(f"[program:{SERVED}]"):]
        section = section[:section.find("\n[", 1) if "\n[" in section[1:] else len(section)]
        assert "autostart=false" in section.replace(" ", ""), f"on_demand engine not rendered autostart=false:\n{section}"
        s.start()
        wait_for(lambda: http_get(s.router + "/health", 2)[0] is not None, 60, "the router to answer /health")
        yield s
    finally:
        s.close()
        print(f"\nresidency real vLLM timings: {json.dumps({k: round(v, 1) for k, v in s.timings.items()})}")


# --------------------------------------------------------------------------- helpers

def chat(od: OnDemandStack, text: str) -> tuple[int, float, dict]:
    """POST /v1/chat/completions through the router: (status, seconds, body)."""
    t0 = time.monotonic()
    status, body = http_post(od.router + "/v1/chat/completions",
                             {"model": SERVED, "messages": [{"role": "user", "content": text}],
                              "max_tokens": 4, "temperature": 0, "ignore_eos": True},
                             timeout=ENGINE_START_TIMEOUT + 60)
    od.last_answer_at = time.monotonic()
    took = od.last_answer_at - t0
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = {"raw": body[:2000].decode(errors="replace")}
    return status, took, parsed


def assert_chat_ok(od: OnDemandStack, status: int, body: dict) -> None:
    assert status == 200, f"chat through the router: {status} {body}\n{od.logs()}"
    assert body["object"] == "chat.completion" and body["model"] == SERVED, body
    assert body["usage"]["completion_tokens"] == 4, body


def assert_awake_and_running(od: OnDemandStack) -> None:
    rep = od.replica()
    assert rep["residency"] == "awake", rep
    assert rep["status"] == "healthy", rep
    assert rep.get("process", {}).get("state") == "RUNNING", rep
    assert od.status().get(SERVED) == "RUNNING", od.status()


def assert_stopped_and_gone(od: OnDemandStack, old_tree: list[psutil.Process]) -> None:
    """supervisord STOPPED, /health/all stopped, and no process of the engine left anywhere."""
    assert od.status().get(SERVED) == "STOPPED", od.status()
    rep = od.replica()
    assert rep["residency"] == "stopped", rep
    assert rep.get("process", {}).get("state") == "STOPPED", rep
    # What stops last (workers of the EngineCore) may take a moment after supervisord reports STOPPED.
    _, left = psutil.wait_procs([p for p in old_tree if _alive(p)], timeout=15)
    left = [p for p in left if _alive(p)]
    assert not left, f"engine processes left after the stop: {[(p.pid, p.cmdline()) for p in left]}"
    pgid = old_tree[0].pid  # supervisord puts each program in its own process group
    in_group = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) == pgid and _alive(p):
                in_group.append(p)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    assert not in_group, f"processes left in the engine's group {pgid}: {[(p.pid, p.cmdline()) for p in in_group]}"
    vllm = od.vllm_processes()
    assert not vllm, f"vLLM processes of this stack left: {[(p.pid, p.cmdline()) for p in vllm]}"
    assert http_get(od.engine + "/health", 2)[0] is None, "something still answers on the engine's port"


def engine_tree(od: OnDemandStack) -> list[psutil.Process]:
    tree = od.engine_tree()
    described = [" ".join([p.name(), *p.cmdline()]) for p in tree]
    assert any("EngineCore" in d for d in described), described
    return tree


# --------------------------------------------------------------------------- tests

def test_on_demand_engine_stays_stopped(od: OnDemandStack):
    # Give supervisord's autostart (had it been rendered on) time to show.
    time.sleep(3)
    status = od.status()
    assert status.get(SERVED) == "STOPPED", status
    assert status.get("router") == "RUNNING", status
    assert not od.vllm_processes(), [p.cmdline() for p in od.vllm_processes()]
    rep = od.replica()
    assert rep["residency"] == "stopped", rep
    assert rep.get("process", {}).get("state") == "STOPPED", rep
    code, body = http_get(od.router + "/residency", 10)
    assert code == 200, body
    model = json.loads(body)["models"][str(MODEL)]
    assert model["state"] == "stopped" and model["on_demand"] is True, model


def test_first_request_starts_engine(od: OnDemandStack):
    status, took, body = chat(od, "Hello on demand")
    print(f"\ncold start + first answer: {took:.1f}s")
    od.timings["cold_start_s"] = took
    assert_chat_ok(od, status, body)
    assert_awake_and_running(od)
    engine_tree(od)
    sleep = od.model()["sleep"]
    assert sleep["start_count"] == 1 and sleep["on_demand"] is True, sleep


def test_idle_engine_is_stopped_and_leaves_no_process(od: OnDemandStack):
    tree = engine_tree(od)
    od.snapshot()
    try:
        wait_for(lambda: od.status().get(SERVED) == "STOPPED", IDLE_STOP_SECONDS + STOP_SLACK_SECONDS,
                 "the idle engine to be stopped", interval=0.5)
    except AssertionError as e:
        raise AssertionError(f"{e}; supervisord: {od.status()}; /health/all: {od.replica()}\n{od.logs()}")
    took = time.monotonic() - od.last_answer_at
    print(f"\nstopped {took:.1f}s after the last answer (idle_stop_seconds={IDLE_STOP_SECONDS})")
    od.timings["idle_stop_after_s"] = took
    assert took >= IDLE_STOP_SECONDS - 0.5, f"stopped {took:.1f}s after the last answer, before idle_stop_seconds"
    # The router follows supervisord's state within a poll or two.
    wait_for(lambda: od.replica()["residency"] == "stopped", 15, "/health/all to show the model stopped", interval=0.5)
    assert_stopped_and_gone(od, tree)
    sleep = od.model()["sleep"]
    assert sleep["stop_count"] >= 1, sleep


def test_second_request_starts_engine_again(od: OnDemandStack):
    status, took, body = chat(od, "Hello again")
    print(f"\nrestart + answer: {took:.1f}s")
    od.timings["restart_s"] = took
    assert_chat_ok(od, status, body)
    assert_awake_and_running(od)
    sleep = od.model()["sleep"]
    assert sleep["start_count"] == 2, sleep


def test_action_stop_then_start(od: OnDemandStack):
    if od.status().get(SERVED) != "RUNNING":  # the idle stop may have come first on a slow machine
        assert_chat_ok(od, *chat(od, "wake up")[::2])
    tree = engine_tree(od)
    od.snapshot()
    t0 = time.monotonic()
    status, body = http_post(f"{od.router}/action/stop/{SERVED}", timeout=180)
    od.timings["action_stop_s"] = time.monotonic() - t0
    assert status == 200, f"POST /action/stop/{SERVED}: {status} {body!r}\n{od.logs()}"
    assert_stopped_and_gone(od, tree)

    starts = od.model()["sleep"]["start_count"]
    t1 = time.monotonic()
    status, body = http_post(f"{od.router}/action/start/{SERVED}", timeout=ENGINE_START_TIMEOUT + 60)
    took = time.monotonic() - t1
    print(f"\nPOST /action/start: {took:.1f}s")
    od.timings["action_start_s"] = took
    assert status == 200, f"POST /action/start/{SERVED}: {status} {body!r}\n{od.logs()}"
    assert_awake_and_running(od)
    # Started by the action itself.
    assert od.model()["sleep"]["start_count"] == starts + 1
    status, _, answer = chat(od, "after a manual start")
    assert_chat_ok(od, status, answer)
