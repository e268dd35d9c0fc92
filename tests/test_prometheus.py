"""The alert rules and the Grafana dashboard against a real Prometheus scraping a --sim stack.

Debian's `prometheus` scrapes the router of a supervised --sim stack every
second and evaluates deploy/prometheus/alerts.yaml. Traffic makes every kind of
series the deploy files read: requests to two on-demand models in a GPU budget
for one start each, evict one for the other (gpu_budget) and wake the evicted
one again. Then every PromQL expression of the dashboard is run through the
HTTP API as Grafana would (a range query for a graph, an instant one for a
table) and must return series; the alert expressions must evaluate and read only
metric names the router exports. A third on-demand engine exits at once: its
failed start must fire KvrouterStartFailures, and nothing else may fire.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from helpers import Proc, distinct_ports, http_status, wait_for
from supervised import sim_stack
from test_residency import Stack, engine

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts_test.yaml"
DASHBOARD = DEPLOY / "grafana" / "kvrouter.json"
#: Dashboard panels that show failures: no series on a stack where nothing failed.
QUIET_PANELS = {"Upstream errors and retries"}
#: What Grafana puts for the dashboard's variables ("All" is the regex .+).
VARIABLES = {"$__rate_interval": "1m", "$job": ".+", "$model": ".+"}

needs_prometheus = pytest.mark.skipif(shutil.which("prometheus") is None or shutil.which("promtool") is None,
                                      reason="Debian's prometheus package (prometheus, promtool) is not installed; "
                                             ".ci/run installs it: apt-get install -y prometheus")


class Prometheus:
    """A Prometheus server of this test, and its HTTP API."""

    def __init__(self, tmp: Path, router_port: int, port: int):
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "rule_files": [str(ALERTS)],
                  "scrape_configs": [{"job_name": "kvrouter", "static_configs": [{"targets": [f"127.0.0.1:{router_port}"]}]}]}
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{port}"
        self.log = tmp / "prometheus.log"
        self.proc = Proc(["prometheus", f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
                          f"--web.listen-address=127.0.0.1:{port}"], log=str(self.log))
        wait_for(lambda: http_status(f"{self.url}/-/ready") == 200, 60, f"Prometheus ready (log: {self.log})")

    def api(self, path: str, **params: str) -> dict[str, Any]:
        """`data` of a successful API answer; AssertionError with Prometheus's error otherwise."""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}", timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:
            body = json.load(e)
        assert body["status"] == "success", (path, params, body)
        return body["data"]

    def query(self, expr: str) -> dict[str, Any]:
        return self.api("query", query=expr)

    def value(self, expr: str) -> float:
        """The single value of `expr` now; 0 when it has none."""
        result = self.query(expr)["result"]
        return float(result[0]["value"][1]) if result else 0.0


@pytest.fixture(scope="module")
def scraped() -> Iterator[tuple[Prometheus, Stack]]:
    """A --sim stack with traffic behind it, and a Prometheus that has scraped all of it."""
    router_port, prom_port, port_a, port_b, port_bad = distinct_ports(5)
    doc = {"router": {"router_port": router_port, "health_check_interval_seconds": 0.5},
           "residency": {"gpu_memory_gb": {"0": 10, "1": 10}, "host_memory_gb": 100},
           "instances": [engine("a", port_a, on_demand=True, gpu_memory_gb=10, host_memory_gb=4, sim="--startup-s 0.3"),
                         engine("b", port_b, on_demand=True, gpu_memory_gb=10, host_memory_gb=4, sim="--startup-s 0.3"),
                         # An engine that exits at once: its start fails (and its model's request with 503).
                         # (On GPU 1, so its start evicts nothing.)
                         engine("bad", port_bad, on_demand=True, gpu_memory_gb=10, host_memory_gb=4, sim="--ttft-ms not-a-number",
                                engine_env=["VLLM_SERVER_DEV_MODE=1", "CUDA_VISIBLE_DEVICES=1"])]}
    with sim_stack(doc, prefix="kvp") as sup:
        tmp = sup.out.parent
        stack = Stack(sup, router_port, {"a": port_a, "b": port_b, "bad": port_bad})
        prometheus = None
        try:
            stack.wait_ready()
            prometheus = Prometheus(tmp, router_port, prom_port)
            wait_for(lambda: prometheus.value('up{job="kvrouter"}') == 1, 30, "a first scrape of the router")
            # a starts; b starts and evicts a (one fits the budget); a wakes and evicts b.
            order = ["a", "a", "b", "b", "a", "a"]
            for name in order:
                status, body = stack.ask(name)
                assert status == 200, (name, body)
            assert [e["reason"] for e in stack.residency()["evictions"]] == ["gpu_budget", "gpu_budget"]
            # Twice, the second after a scrape saw the first: a counter's first sample shows no increase to rate().
            assert stack.ask("bad")[0] == 503
            wait_for(lambda: prometheus.value('sum(router_requests_total{model="m/bad"})') == 1, 30, "a scrape of the 503")
            assert stack.ask("bad")[0] == 503
            wait_for(lambda: prometheus.value('sum(router_requests_total{job="kvrouter"})') == len(order) + 2, 30,
                     "Prometheus to scrape every request")
            # Two more scrapes after that, so a series that appeared with the last request has two samples for rate().
            wait_for(lambda: prometheus.value('min(count_over_time(router_model_evictions_total{job="kvrouter"}[1m]))') >= 2,
                     30, "two scrapes of the evictions")
            # Prometheus has evaluated every alert rule at least once on this data.
            wait_for(lambda: all(r["lastEvaluation"] > "2000" for g in prometheus.api("rules")["groups"] for r in g["rules"]),
                     30, "the alert rules' first evaluation")
            yield prometheus, stack
        finally:
            if prometheus is not None:
                prometheus.proc.stop()


def dashboard_targets() -> list[tuple[str, str, bool]]:
    """(panel title, PromQL with the variables filled in, whether Grafana asks it as a table's instant query)."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    out = []
    for panel in panels:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, f"panel {panel['title']!r}: a variable the test does not fill in: {expr}"
            out.append((panel["title"], expr, bool(target.get("instant"))))
    return out


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


@needs_prometheus
def test_promtool_checks_and_unit_tests_the_alert_rules() -> None:
    for argv in (["promtool", "check", "rules", str(ALERTS)], ["promtool", "test", "rules", str(ALERT_TESTS)]):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (argv, done.stdout, done.stderr)
    assert "SUCCESS" in done.stdout


@needs_prometheus
def test_every_dashboard_query_returns_series(scraped: tuple[Prometheus, Stack]) -> None:
    prometheus, _ = scraped
    targets = dashboard_targets()
    assert len(targets) >= 20
    end = time.time()
    empty = []
    for title, expr, instant in targets:
        if instant:
            data = prometheus.query(expr)
            assert data["resultType"] == "vector", (title, expr, data)
        else:
            data = prometheus.api("query_range", query=expr, start=str(end - 120), end=str(end), step="1")
            assert data["resultType"] == "matrix", (title, expr, data)
        if not data["result"] and title not in QUIET_PANELS:
            empty.append((title, expr))
    assert not empty, f"dashboard queries without data: {empty}"


@needs_prometheus
def test_the_dashboard_variables_list_the_job_and_the_models(scraped: tuple[Prometheus, Stack]) -> None:
    prometheus, _ = scraped
    variables = [v for v in json.loads(DASHBOARD.read_text())["templating"]["list"] if v["type"] == "query"]
    values = {}
    for v in variables:
        found = re.fullmatch(r"label_values\((.+), (\w+)\)", v["query"]["query"])
        assert found, v
        selector, label = found.groups()
        values[v["name"]] = set(prometheus.api(f"label/{label}/values", **{"match[]": selector.replace("$job", ".+")}))
    assert values == {"job": {"kvrouter"}, "model": {"m/a", "m/b", "m/bad"}}


@needs_prometheus
def test_the_dashboard_shows_what_the_traffic_did(scraped: tuple[Prometheus, Stack]) -> None:
    """A few panels' numbers, against what the stack itself reports."""
    prometheus, stack = scraped
    per_model = {s["metric"]["model"]: float(s["value"][1])
                 for s in prometheus.query('sum by (model) (router_requests_total{status="200"})')["result"]}
    assert per_model == {"m/a": 4.0, "m/b": 2.0}
    completion = {s["metric"]["model"]: float(s["value"][1])
                  for s in prometheus.query('sum by (model) (router_tokens_total{kind="completion"})')["result"]}
    assert completion == {"m/a": 4.0 * 2, "m/b": 2.0 * 2}  # max_tokens 2, each answer says so in its usage
    states = {s["metric"]["model"]: s["metric"]["state"]
              for s in prometheus.query('max by (model, state) (router_model_state) == 1')["result"]}
    assert states == {m: v["state"] for m, v in stack.residency()["models"].items()}
    assert prometheus.value('sum(router_model_evictions_total{reason="gpu_budget"})') == 2
    assert prometheus.value('sum(router_model_starts_total)') == 2
    assert prometheus.value('router_model_wakes_total{model="m/a"}') == 1
    assert 0 < prometheus.value('router_model_last_wake_seconds{model="m/a"}') < 30
    assert 0.3 <= prometheus.value('router_model_start_seconds{model="m/b"}') < 30
    processes = {s["metric"]["exported_instance"]: s["metric"]["state"]
                 for s in prometheus.query('router_backend_process_state == 1')["result"]}
    # a and b run (STARTING for supervisord's startsecs after their start, then RUNNING), the slept one
    # too; the router stopped bad after its failed start.
    assert processes.pop("bad") == "STOPPED" and set(processes) == {"a", "b"}, processes
    assert set(processes.values()) <= {"STARTING", "RUNNING"}, processes


@needs_prometheus
def test_every_alert_evaluates_on_exported_metrics_and_only_the_failed_start_fires(scraped: tuple[Prometheus, Stack]) -> None:
    """The failed start of m/bad fires KvrouterStartFailures (no `for`), and its 503 makes the 5xx
    ratio's expression true (pending for its 5 minutes); the engine the router stopped after its failed
    start is STOPPED, not an engine that is down. Nothing else is wrong, and nothing else fires."""
    prometheus, _ = scraped
    rules = alert_rules()
    assert len(rules) == 7
    exported = set(prometheus.api("label/__name__/values"))
    expect = {"KvrouterStartFailures": [{"model": "m/bad"}], "KvrouterHigh5xxRatio": [{"model": "m/bad"}]}
    for rule in rules:
        names = set(re.findall(r"\brouter_[a-z_]+", rule["expr"]))
        assert names and names <= exported, (rule["alert"], names - exported)
        data = prometheus.query(rule["expr"])
        assert data["resultType"] == "vector", (rule["alert"], data)
        got = [{"model": s["metric"].get("model")} for s in data["result"]]
        assert got == expect.get(rule["alert"], []), (rule["alert"], data["result"])
    # Prometheus loaded the same rules and evaluates them without error; the start failure fires.
    def firing() -> list[dict[str, Any]]:
        return [a for a in prometheus.api("alerts")["alerts"] if a["state"] == "firing"]
    wait_for(firing, 30, "KvrouterStartFailures to fire")
    assert [(a["labels"]["alertname"], a["labels"]["model"], a["labels"]["severity"]) for a in firing()] == \
           [("KvrouterStartFailures", "m/bad", "critical")]
    assert firing()[0]["annotations"]["summary"] == "Starting m/bad failed"
    loaded = {r["name"]: r for g in prometheus.api("rules")["groups"] for r in g["rules"]}
    assert set(loaded) == {r["alert"] for r in rules}
    assert all(r["health"] == "ok" for r in loaded.values()), loaded
