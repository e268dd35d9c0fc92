"""The worker's end of the controller link: its batched reports under uvloop, the loop the router runs."""

import asyncio
from typing import Any

import pytest
import uvloop

from router.server import link as link_module
from router.server.link import REPORT_SECONDS, REQUEST, ControllerLink


class SentMessages:
    """Stands in for the link's channel: keeps what would have gone to the controller."""

    def __init__(self) -> None:
        self.sent: list[tuple[Any, ...]] = []

    def send(self, message: tuple[Any, ...]) -> None:
        self.sent.append(message)


class LateClock:
    """The running loop as the link sees it when the loop stalls between the link's reading of the
    clock and the timer's: the link's reading is `lag` seconds older than the loop's own."""

    def __init__(self, loop: asyncio.AbstractEventLoop, lag: float):
        self._loop = loop
        self._lag = lag

    def time(self) -> float:
        return self._loop.time() - self._lag

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)


def make_link(channel: SentMessages) -> ControllerLink:
    return ControllerLink(channel, on_table=lambda m: None, model=lambda name: None,  # type: ignore[arg-type]
                          replica_changed=lambda *a: None, owner=lambda *a: None)


@pytest.mark.parametrize("lag", [0.0, REPORT_SECONDS - 0.0002])
def test_records_reach_the_controller_in_one_report_even_when_the_loop_is_late(
        monkeypatch: pytest.MonkeyPatch, lag: float) -> None:
    """Requests that end close together leave in one message, within REPORT_SECONDS; a loop that
    fell behind while scheduling (uvloop then makes a sub-millisecond timer a plain Handle) must
    neither fail the request that reports nor lose the records."""
    channel = SentMessages()
    running = asyncio.get_running_loop

    async def scenario() -> None:
        link = make_link(channel)
        monkeypatch.setattr(link_module.asyncio, "get_running_loop", lambda: LateClock(running(), lag))
        for i in range(3):
            link.record((REQUEST, "m", 200, 0.01 * i, 0.001, False))
        monkeypatch.undo()
        assert channel.sent == []
        await asyncio.sleep(REPORT_SECONDS + 0.05)
        assert len(channel.sent) == 1
        kind, counts, outstanding, records = channel.sent[0]
        assert kind == "report" and counts == {} and outstanding == {}
        assert [r[3] for r in records] == [0.0, 0.01, 0.02]

    uvloop.run(scenario())
