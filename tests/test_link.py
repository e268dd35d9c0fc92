"""The worker's end of the controller link: its batched reports under uvloop, the loop the router runs."""

import asyncio
import tempfile
from pathlib import Path
from typing import Any

import pytest
import uvloop
from helpers import wait_for_async
from router_support import config_from, instance

from router.server.state import RouterState
from router.server.workers import worker_end as link_module
from router.server.workers.messages import REPORT_SECONDS, Report
from router.server.workers.worker import WorkerApp
from router.server.workers.worker_end import ControllerLink


class SentMessages:
    """Stands in for the link's channel: keeps what would have gone to the controller."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send(self, message: Any) -> None:
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
                          replica_changed=lambda m: None, breaker_changed=lambda m: None, owner=lambda m: None)


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
            link.finished("m", 200, 0.01 * i, 0.001, False)
        monkeypatch.undo()
        assert channel.sent == []
        await wait_for_async(lambda: channel.sent, 2, "the report")
        assert len(channel.sent) == 1
        report = channel.sent[0]
        assert isinstance(report, Report) and report.counts == {} and report.outstanding == {}
        assert [r[2] for r in report.done] == [0.0, 0.01, 0.02]

    uvloop.run(scenario())


async def delaying_relay(path: str, target: str, delay: float) -> asyncio.AbstractServer:
    """A unix socket at `path` that passes each connection's bytes on to `target` `delay` seconds
    late, in order, both ways: a link whose messages are slow to arrive, as under load."""
    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await asyncio.sleep(delay)
                writer.write(data)
        finally:
            writer.close()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(target)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)

    return await asyncio.start_unix_server(accept, path)


def test_a_follow_up_that_outruns_the_news_of_its_response_still_finds_the_replica() -> None:
    """Worker A relays a stored response; a follow-up naming it reaches worker B before A's news of the
    id reaches the controller (A's link is slow). B asks the controller, which fences every worker
    first, so the answer includes what A learned: the follow-up goes to the replica that holds it."""
    with tempfile.TemporaryDirectory(prefix="kvr") as tmp:
        config = config_from(Path(tmp), [instance("org/m", 1, name="m-a"), instance("org/m", 2, name="m-b")],
                             {"workers": 2})

        async def scenario() -> None:
            controller = RouterState(config)
            assert controller.workers is not None
            await controller.workers.serve(f"{tmp}/link.sock")
            relay = await delaying_relay(f"{tmp}/slow.sock", f"{tmp}/link.sock", 0.2)
            a = WorkerApp(f"{tmp}/slow.sock", f"{tmp}/http.sock", lambda: None)
            b = WorkerApp(f"{tmp}/link.sock", f"{tmp}/http.sock", lambda: None)
            await a.start()
            await b.start()
            try:
                assert a.state is not None and b.state is not None
                model = a.state.table.get("org/m")
                assert model is not None
                maker = model.replicas[1]
                a.state.owners.learn_from_body(b'{"id": "resp_1", "object": "response"}', model, maker)
                found = await b.state.owners.find("resp_1")
                assert controller.owners.owner("resp_1") is not None  # A's news arrived: it came late
                assert found is not None
                assert (found.model.name, found.replica.name) == ("org/m", maker.name)
                assert found.model is b.state.table.get("org/m")  # B's own table's objects
                # Now known to B itself; an id nobody learned is still unknown (the 404 case).
                assert b.state.owners.owner("resp_1") == found
                assert await b.state.owners.find("resp_unknown") is None
            finally:
                await a.stop()
                await b.stop()
                relay.close()
                await controller.workers.close()
                await controller.idle.stop()

        uvloop.run(scenario())
