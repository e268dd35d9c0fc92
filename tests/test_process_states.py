"""The router sees supervisord: a supervised --sim stack whose engine cannot start.

One engine's port is taken by another process before supervisord starts, so
it exits at once, retries, and goes FATAL. The router must show that within
2 s in /health/all, answer requests for the model with a 503 naming the
instance, its process state and its log file, and stop probing it.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import urllib.request
from datetime import datetime
from typing import Any, Iterator

import pytest
from helpers import ROUTER_MODES, distinct_ports, get_json, http_status, in_both_modes, post_json, wait_for
from supervised import Supervised, give_up_sooner, sim_stack

pytestmark = pytest.mark.timeout(120)






@pytest.fixture(params=ROUTER_MODES)
def stack_with_a_taken_port(request: pytest.FixtureRequest) -> Iterator[tuple[Supervised, str, socket.socket]]:
    """A supervised stack whose router is one process, or a controller and two proxy workers."""
    router_port, good, taken = distinct_ports(3)
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", taken))
    squatter.listen()
    doc = {"router": {"router_port": router_port, "health_check_interval_seconds": 0.3, "workers": request.param},
           "instances": [
               {"name": "good", "model": "m/good", "engine": "vllm", "engine_args": [f"--port={good}"]},
               {"name": "broken", "model": "m/broken", "engine": "vllm", "engine_args": [f"--port={taken}"]},
           ]}
    try:
        with sim_stack(doc, prefix="kvp", before_start=give_up_sooner) as stack:
            yield stack, f"http://127.0.0.1:{router_port}", squatter
    finally:
        squatter.close()


def events(url: str) -> list[dict[str, Any]]:
    """The router's event history: GET /events sends it first; read until a quiet keep-alive gap."""
    out = []
    with urllib.request.urlopen(f"{url}/events", timeout=2) as r:
        try:
            for raw in r:
                if raw.startswith(b"data: "):
                    out.append(json.loads(raw[6:]))
        except TimeoutError:
            pass
    return out


def wait_up(stack: Supervised, url: str) -> None:
    """The good engine and the router RUNNING (the broken one is not: Supervised.wait_running would fail),
    and the router serving (with proxy workers, they bind the port a moment after the controller runs)."""
    wait_for(lambda: all(stack.status().get(p) == "RUNNING" for p in ("good", "router")), 30, "good and router RUNNING")
    wait_for(lambda: http_status(f"{url}/health") == 200, 30, "the router to serve")


def process_block(url: str, model: str) -> dict[str, Any]:
    _, health = get_json(f"{url}/health/all")
    return health["models"][model]["endpoints"][0].get("process") or {}


@in_both_modes("stack_with_a_taken_port")
def test_a_fatal_engine_shows_in_health_and_its_503_names_it(stack_with_a_taken_port) -> None:
    stack, url, _ = stack_with_a_taken_port
    wait_up(stack, url)
    # The router polls supervisord every 0.5 s: it sees RUNNING within a poll or two of supervisorctl.
    good = wait_for(lambda: (b := process_block(url, "m/good")).get("state") == "RUNNING" and b, 3, "RUNNING seen")
    assert good["pid"] == stack.pid("good") and good["log"].endswith("good.log")
    # supervisord retries the broken engine, then gives up: FATAL.
    wait_for(lambda: stack.status().get("broken") == "FATAL", 60, "supervisord to mark 'broken' FATAL", interval=0.2)
    wait_for(lambda: process_block(url, "m/broken").get("state") == "FATAL", 5, "the router to see FATAL")
    # How late the router saw it, from the two clocks that stamped it: supervisord's log line and the
    # router's event (a test polling both through subprocesses would measure its own delays).
    line = next(ln for ln in stack.log("supervisord", tail=10**6).splitlines() if "broken entered FATAL" in ln)
    marked = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    seen = next(e["time"] for e in events(url) if e["kind"] == "process" and e["instance"] == "broken"
                and e["state"] == "FATAL")
    assert 0 <= seen - marked < 2.0, (seen - marked)
    block = process_block(url, "m/broken")
    assert block["pid"] is None and block["description"] and block["log"].endswith("broken.log")
    _, health = get_json(f"{url}/health/all")
    broken = health["models"]["m/broken"]
    assert broken["status"] == "unhealthy" and broken["endpoints"][0]["status"] == "down"
    status, err = post_json(f"{url}/v1/completions", {"model": "m/broken", "prompt": "x", "max_tokens": 2})
    message = err["error"]["message"]
    assert status == 503 and "instance broken is FATAL" in message and "broken.log" in message
    assert post_json(f"{url}/v1/completions", {"model": "m/good", "prompt": "x", "max_tokens": 2})[0] == 200


def test_a_stopped_engine_is_not_probed_and_comes_back_when_started(stack_with_a_taken_port) -> None:
    stack, url, squatter = stack_with_a_taken_port
    wait_up(stack, url)
    wait_for(lambda: process_block(url, "m/good").get("state") == "RUNNING", 30, "the router to see 'good' run")
    stack.ctl("stop", "good")
    wait_for(lambda: process_block(url, "m/good").get("state") == "STOPPED", 3, "the router to see STOPPED")
    status, err = post_json(f"{url}/v1/completions", {"model": "m/good", "prompt": "x"})
    assert status == 503 and "instance good is STOPPED" in err["error"]["message"]
    stack.ctl("start", "good")
    wait_for(lambda: post_json(f"{url}/v1/completions", {"model": "m/good", "prompt": "x", "max_tokens": 2})[0] == 200,
             10, "'good' to serve again")
    squatter.close()  # the broken engine's port is free now: a manual start brings it up
    stack.ctl("start", "broken")
    wait_for(lambda: post_json(f"{url}/v1/completions", {"model": "m/broken", "prompt": "x", "max_tokens": 2})[0] == 200,
             30, "'broken' to serve after its port was freed")


@pytest.mark.slow  # sleep, wake and a kill in turn; test_sleep checks the order of /events in the fast suite
def test_events_follow_a_sleep_a_wake_and_an_engine_kill_in_order(stack_with_a_taken_port) -> None:
    stack, url, _ = stack_with_a_taken_port
    wait_up(stack, url)
    wait_for(lambda: process_block(url, "m/good").get("state") == "RUNNING", 5, "the router to see 'good' run")
    assert post_json(f"{url}/action/sleep/m/good", {})[0] == 200
    assert post_json(f"{url}/action/wakeup/m/good", {})[0] == 200
    old = stack.pid("good")
    os.kill(old, signal.SIGKILL)  # supervisord restarts it
    wait_for(lambda: process_block(url, "m/good").get("pid") not in (None, old)
             and process_block(url, "m/good").get("state") == "RUNNING", 15, "the restarted engine")
    good = [e for e in events(url) if e["model"] == "m/good"]
    assert [e["seq"] for e in good] == sorted(e["seq"] for e in good)
    story = [(e["kind"], e["state"]) for e in good]
    sleep_at = story.index(("model", "sleeping"))
    awake_at = story.index(("model", "awake"), sleep_at)
    # After the wake: the kill (the process left RUNNING), then supervisord's restart, RUNNING again.
    after = story[awake_at + 1:]
    down = next(i for i, (kind, state) in enumerate(after) if kind == "process" and state != "RUNNING")
    assert ("process", "RUNNING") in after[down:], story
