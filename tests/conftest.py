import os

import pytest
from helpers import Proc, free_port, start_sim, wait_http

os.environ.setdefault("KVROUTER_STRICT_MACHINE", "1")  # an illegal state move raises, here and in the routers tests start


@pytest.fixture
def procs():
    """Start processes through this list; every one is ended after the test."""
    started: list[Proc] = []
    yield started
    for p in reversed(started):
        p.stop()


@pytest.fixture
def sims(procs: list[Proc]):
    """Start simulated engines: sims(engine, model, *args) -> port."""
    def start(engine: str, model: str, *args: str) -> int:
        port = free_port()
        procs.append(start_sim(engine, model, port, *args))
        wait_http(f"http://127.0.0.1:{port}/health", timeout=20)
        return port
    return start
