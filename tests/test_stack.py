"""The whole stack from the README on the simulated engines: example-config.yaml
rendered with --sim, run by a real supervisord, used through the router with
the OpenAI SDK; an engine stopped and started again; nothing left at shutdown.

Only what cannot work in a test is changed in the example: its fixed ports
(free ones instead, other suites share the machine), its launch delay, and
the health-probe timings (so a restarted engine is routed to again in about a
second rather than ten).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import openai
import pytest
import yaml
from helpers import distinct_ports, http_status, wait_for
from supervised import Supervised, alive, sim_stack

pytestmark = pytest.mark.timeout(120)

EXAMPLE = Path(__file__).resolve().parent.parent / "example-config.yaml"


def example_with_ports(router_port: int, engine_ports: list[int]) -> dict:
    """example-config.yaml as a dict, moved to free ports and quicker health timings."""
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["router"].update(router_port=router_port, health_check_interval_seconds=0.5, eject_seconds=1)
    doc["launch_delay_seconds"] = 0.2
    assert len(doc["instances"]) == len(engine_ports)
    for inst, port in zip(doc["instances"], engine_ports):
        args = [a for a in inst["engine_args"] if not a.startswith("--port")]
        inst["engine_args"] = [*args, f"--port={port}"]
    return doc


@pytest.fixture
def example_stack() -> Iterator[tuple[Supervised, dict]]:
    router_port, *engine_ports = distinct_ports(3)
    doc = example_with_ports(router_port, engine_ports)
    with sim_stack(doc) as stack:
        yield stack, doc


def check_model_serves(client: openai.OpenAI, model: str) -> None:
    """Completions and chat, plain and streamed, each with the simulator's text."""
    done = client.completions.create(model=model, prompt="The capital of France is", max_tokens=5)
    assert done.choices[0].finish_reason == "length" and len(done.choices[0].text.split()) == 5
    assert done.usage is not None and done.usage.completion_tokens == 5

    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=5, stream=True) if c.choices)
    assert streamed == done.choices[0].text  # the simulator's text is deterministic

    messages = [{"role": "user", "content": "Say hello"}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=4)
    assert chat.choices[0].message.role == "assistant" and len(chat.choices[0].message.content.split()) == 4

    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=4, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


def test_example_config_end_to_end_on_simulated_engines(example_stack: tuple[Supervised, dict]) -> None:
    stack, doc = example_stack
    router = f"http://127.0.0.1:{doc['router']['router_port']}"
    names = {i["name"]: i["model"] for i in doc["instances"]}
    assert set(names) == {"llama", "qwen"}
    stack.wait_running([*names, "router", "logs"])
    wait_for(lambda: all(http_status(f"{router}/health/{m}") == 200 for m in names.values()), 30,
             "every model to report healthy through the router")
    client = openai.OpenAI(base_url=f"{router}/v1", api_key="unused", max_retries=0, timeout=10)
    assert {m.id for m in client.models.list()} >= set(names.values())
    for model in names.values():
        check_model_serves(client, model)

    # One engine stopped: its model is refused at once in OpenAI shape, the other is still served.
    assert "stopped" in stack.ctl("stop", "llama").stdout
    for _ in range(3):  # the first refusal may be a connect failure (502), later ones 503 after probes
        with pytest.raises(openai.APIStatusError) as refused:
            client.completions.create(model=names["llama"], prompt="x", max_tokens=2)
        assert refused.value.status_code in (502, 503)
        error = refused.value.response.json()["error"]
        assert names["llama"] in error["message"] and error["code"] == refused.value.status_code
        check_model_serves(client, names["qwen"])
    wait_for(lambda: http_status(f"{router}/health/{names['llama']}") == 503, 10, "the stopped engine to be unhealthy")
    with pytest.raises(openai.APIStatusError) as refused:
        client.completions.create(model=names["llama"], prompt="x", max_tokens=2)
    assert refused.value.status_code == 503 and refused.value.response.headers.get("retry-after")

    # Started again: served again by the same router, without restarting it.
    router_pid = stack.pid("router")
    assert "started" in stack.ctl("start", "llama").stdout

    def served() -> bool:
        try:
            client.completions.create(model=names["llama"], prompt="x", max_tokens=2)
            return True
        except openai.APIStatusError:
            return False
    wait_for(served, 20, "the restarted engine to be served again", interval=0.2)
    check_model_serves(client, names["llama"])
    assert stack.pid("router") == router_pid

    # Shutdown leaves no process: supervisord, engines, router, logs program and tmux.
    wait_for(lambda: stack.tmux_server(), 15, "the tmux server of the logs program")
    everything = stack.snapshot()
    assert len(everything) >= 6
    stack.shutdown()
    wait_for(lambda: not any(alive(p) for p in everything), 15,
             f"every process to exit: {[p for p in everything if alive(p)]}")
    for port in (doc["router"]["router_port"], *(int(i["engine_args"][-1].split("=")[1]) for i in doc["instances"])):
        assert http_status(f"http://127.0.0.1:{port}/health") is None
