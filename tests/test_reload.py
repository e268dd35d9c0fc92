"""The live model table: POST /action/reload and SIGHUP re-read the YAML and apply it at once.

In-process router and test engines here; the supervised --sim stack under
200 concurrent streams is in test_reload_stack.py.
"""
from __future__ import annotations

import os
import re
import signal
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from helpers import PY, Proc, distinct_ports, post_json, wait_for, wait_http
from router_support import Stack, instance, loop, stack  # noqa: F401  (fixtures)
from test_router_streams import sse_events


def complete(url: str, model: str) -> int:
    return post_json(f"{url}/v1/completions", {"model": model, "prompt": "x", "max_tokens": 2})[0]


def rewrite(path: Path, instances: list[dict[str, Any]], **router: Any) -> None:
    """The config file at `path` with new instances (and router settings), as an operator edits it."""
    doc = yaml.safe_load(path.read_text())
    doc["instances"] = [{"engine": "vllm", "launch": False, **i} for i in instances]
    doc["router"].update(router)
    path.write_text(yaml.safe_dump(doc))


def test_reload_adds_removes_and_realiases_while_streams_finish(stack: Stack) -> None:
    a, b, c = stack.engine(), stack.engine(chunks=10, interval=0.15), stack.engine()
    r = stack.router([instance("a", a.port, max_concurrency=4), instance("b", b.port)])
    cfg = stack.tmp / "config.yaml"
    assert complete(r.url, "a") == 200 and complete(r.url, "b") == 200
    replica_a = r.app.state.table.get("a").replicas[0]

    streamed: dict[str, Any] = {}
    t = threading.Thread(target=lambda: streamed.update(
        result=sse_events(r.url, {"model": "b", "prompt": "x", "stream": True})))
    t.start()
    wait_for(lambda: len(b.chunk_times) >= 1)
    rewrite(cfg, [instance("a", a.port, max_concurrency=8, aliases=["a2"]), instance("c", c.port)])
    status, change = post_json(f"{r.url}/action/reload", {})
    assert status == 200, change
    assert change["changed"] is True
    assert change["models"] == {"added": ["c"], "removed": ["b"], "changed": ["a"]}
    assert change["aliases"] == {"added": ["a2"], "removed": []}
    assert change["needs_restart"] == []
    # New requests see the new table at once.
    assert complete(r.url, "c") == 200 and complete(r.url, "a2") == 200
    status, err = post_json(f"{r.url}/v1/completions", {"model": "b", "prompt": "x"})
    assert status == 404 and "'b' does not exist" in err["error"]["message"]
    # The stream on the removed model was not disturbed.
    t.join(10)
    status, _, events = streamed["result"]
    assert status == 200 and len(events) == 11 and events[-1][1] == "[DONE]"
    # max_concurrency changed: a fresh replica of 'a' took over with the new limit.
    new_a = r.app.state.table.get("a").replicas[0]
    assert new_a is not replica_a and new_a.limit == 8 and replica_a.retired
    # Metrics and traffic follow the table.
    metrics = r.app.state.metrics.render().decode()
    assert 'model="c"' in metrics and not re.search(r'^router_requests_total\{[^}]*model="b"', metrics, re.M)
    assert "c" in r.app.state.traffic and "b" not in r.app.state.traffic


def test_reload_of_an_unchanged_file_changes_nothing_and_keeps_replica_state(stack: Stack) -> None:
    a = stack.engine()
    r = stack.router([instance("a", a.port)], health_check_interval_seconds=0.05)
    replica = r.app.state.table.get("a").replicas[0]
    wait_for(lambda: replica.health == "healthy")
    status, change = post_json(f"{r.url}/action/reload", {})
    assert status == 200 and change["changed"] is False
    assert r.app.state.table.get("a").replicas[0] is replica and replica.health == "healthy"


def test_a_bad_file_changes_nothing_and_the_answer_names_file_and_field(stack: Stack) -> None:
    a = stack.engine()
    r = stack.router([instance("a", a.port)])
    cfg = stack.tmp / "config.yaml"
    table = r.app.state.table
    good = cfg.read_text()
    cfg.write_text(good.replace("--port", "--prot"))
    status, err = post_json(f"{r.url}/action/reload", {})
    assert status == 400
    message = err["error"]["message"]
    assert "nothing changed" in message and str(cfg.resolve()) in message
    assert "instances[0].engine_args" in message and "--port" in message
    assert r.app.state.table is table and complete(r.url, "a") == 200


def test_router_settings_that_need_a_restart_are_reported(stack: Stack) -> None:
    a = stack.engine()
    r = stack.router([instance("a", a.port)])
    cfg = stack.tmp / "config.yaml"
    port = distinct_ports(1)[0]
    doc = yaml.safe_load(cfg.read_text())
    doc["router"].update(router_port=port, queue_timeout_seconds=3)
    cfg.write_text(yaml.safe_dump(doc))
    status, change = post_json(f"{r.url}/action/reload", {})
    assert status == 200
    assert change["needs_restart"] == ["port"]
    assert sorted(change["router_settings"]) == ["port", "queue_timeout_seconds"]
    assert r.app.state.proxy.queue_timeout == 3  # applied at once
    assert complete(r.url, "a") == 200  # still serving on the port it has


def test_reload_is_admin_only_from_other_hosts_with_an_admin_key(stack: Stack) -> None:
    a = stack.engine()
    r = stack.router([instance("a", a.port)], admin_api_key="secret-admin")
    status, err = post_json(f"{r.url}/action/reload", {})
    assert status == 401 and "admin" in err["error"]["message"]
    req = urllib.request.Request(f"{r.url}/action/reload", data=b"{}", method="POST",
                                 headers={"Authorization": "Bearer secret-admin"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200


def test_sighup_reloads_the_router_process(tmp_path: Path) -> None:
    router_port, a, b = distinct_ports(3)
    engines = [Proc([PY, "-m", "router.sim", "--engine", "vllm", "--model", m, "--port", str(p)],
                    log=str(tmp_path / f"{m}.log")) for m, p in (("a", a), ("b", b))]
    cfg = tmp_path / "config.yaml"
    doc = {"router": {"router_port": router_port},
           "instances": [{"model": "a", "engine": "vllm", "launch": False, "engine_args": [f"--port={a}"]}]}
    cfg.write_text(yaml.safe_dump(doc))
    router = Proc([PY, "-m", "router.serve", "--config", str(cfg)], log=str(tmp_path / "router.log"))
    url = f"http://127.0.0.1:{router_port}"
    try:
        for port in (a, b, router_port):
            wait_http(f"http://127.0.0.1:{port}/health", timeout=30)
        assert complete(url, "b") == 404
        # A bad file first: logged with file and field, nothing changes.
        cfg.write_text("instances: [{model: b, engine: vllm}]\n")
        os.kill(router.pid, signal.SIGHUP)
        log = tmp_path / "router.log"
        wait_for(lambda: "reload refused" in log.read_text(), 5)
        assert "instances[0].engine_args" in log.read_text()
        assert complete(url, "a") == 200
        doc["instances"].append({"model": "b", "engine": "vllm", "launch": False, "engine_args": [f"--port={b}"]})
        cfg.write_text(yaml.safe_dump(doc))
        os.kill(router.pid, signal.SIGHUP)
        wait_for(lambda: complete(url, "b") == 200, 5)
        assert router.p.poll() is None  # reloaded, not restarted
    finally:
        for p in (router, *engines):
            p.stop()
