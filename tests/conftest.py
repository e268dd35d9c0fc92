import os

import pytest
from helpers import Proc

os.environ.setdefault("KVROUTER_STRICT_MACHINE", "1")  # an illegal state move raises, here and in the routers tests start


@pytest.fixture
def procs():
    """Start processes through this list; every one is ended after the test."""
    started: list[Proc] = []
    yield started
    for p in reversed(started):
        p.stop()
