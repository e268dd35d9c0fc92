"""The background loop's timing: a round runs when `sooner` says, asked again at each poke, and
otherwise every `interval` (the waits here are an hour: a round that runs in time came from a poke)."""
from __future__ import annotations

import asyncio
import logging
from typing import Optional

from router.util.periodic import Periodic

HOUR = 3600.0


def test_a_poke_asks_sooner_again_and_the_round_runs_when_it_says() -> None:
    async def test() -> None:
        rounds: list[float] = []
        ran = asyncio.Event()
        due: list[Optional[float]] = [None]

        async def work() -> None:
            rounds.append(asyncio.get_running_loop().time())
            due[0] = None  # done: nothing sooner until told
            ran.set()

        loop = Periodic("test", work, lambda: HOUR, logging.getLogger("test"), first_at_once=False,
                        sooner=lambda: due[0])
        loop.start()
        try:
            await asyncio.sleep(0)
            assert not rounds  # first_at_once=False: nothing is due for an hour
            due[0] = 0.0
            assert not rounds  # not asked yet
            loop.poke()
            await asyncio.wait_for(ran.wait(), 5)
            assert len(rounds) == 1
            ran.clear()
            due[0] = 0.01  # a deadline 10 ms away, learned at a poke
            loop.poke()
            await asyncio.wait_for(ran.wait(), 5)
            assert len(rounds) == 2 and rounds[1] - rounds[0] >= 0.01
        finally:
            await loop.stop()
        assert not loop.running
    asyncio.run(test())
