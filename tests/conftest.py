import pytest
from helpers import Proc


@pytest.fixture
def procs():
    """Start processes through this list; every one is ended after the test."""
    started: list[Proc] = []
    yield started
    for p in reversed(started):
        p.stop()
