"""This router among its replicas: whether it decides, and how it asks the router that does.

With ``kubernetes.leader_election`` several routers serve the same engines and
share nothing. The Lease (router/cluster/lease.py) names one leader; it alone
makes lifecycle decisions (idle sleep, residency, starts and stops). A
follower forwards requests like any router and, for a model it finds asleep
or stopped, asks the leader over its admin API (``POST /action/wakeup/M`` or
``/action/start/M``, the same calls an operator makes), then serves.

What a follower believes comes from the engines where they can tell (vLLM's
``/is_sleeping``, asked at every check as in one router) and from the leader
where they cannot (SGLang: its state is read from the leader's ``GET
/models``). The leader learns of a follower's traffic from ``POST
/cluster/activity`` every `ACTIVITY_SECONDS`, so a model busy through a
follower is not idle to the leader.
"""
from __future__ import annotations

import asyncio
import logging
import urllib.parse
from typing import Callable, Optional

import aiohttp
import orjson

from router.cluster.lease import LeaseElector
from router.config import Config
from router.observe.events import Events
from router.server.fleet.models import ModelTable
from router.server.fleet.outcome import Outcome

log = logging.getLogger("router.leadership")

#: How often a follower tells the leader which models it served, and reads the states engines cannot tell.
ACTIVITY_SECONDS = 1.0


class Leadership:
    """The `Authority` of every lifecycle of a router that runs leader election."""

    def __init__(self, elector: LeaseElector, admin_key: Optional[str]):
        self.elector = elector
        self._auth = {"authorization": f"Bearer {admin_key}"} if admin_key else {}
        self._session: Optional[aiohttp.ClientSession] = None
        self._election: Optional["asyncio.Task[None]"] = None
        self._following: Optional["asyncio.Task[None]"] = None
        self._reported: dict[str, float] = {}

    @classmethod
    def from_config(cls, config: Config, events: Events) -> "Leadership":
        elector = LeaseElector.from_config(config, config.router.port,
                                           on_change=lambda state, **detail: events.publish("leader", state,
                                                                                             **detail))
        return cls(elector, config.router.admin_api_key)

    def local(self) -> bool:
        """Whether this router decides now (it holds the Lease)."""
        return self.elector.is_leader

    def start(self, table: Callable[[], ModelTable]) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=5))
        self._election = asyncio.ensure_future(self.elector.run())
        self._following = asyncio.ensure_future(self._follow(table))

    async def stop(self) -> None:
        """Step down and free the Lease (another replica takes over at once, not a lease later)."""
        if self._election is None or self._following is None:
            return
        self._following.cancel()
        await self.elector.stop()  # the election loop ends at its next wait, freeing the Lease
        try:
            await asyncio.wait_for(asyncio.shield(self._election), self.elector.renew_deadline)
        except asyncio.TimeoutError:
            self._election.cancel()  # a call to the API server hangs: the Lease expires on its own
        await asyncio.gather(self._election, self._following, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def ask(self, model: str, action: str) -> Outcome:
        """Have the leader do `action` (sleep, wakeup, start, stop) to `model`; its answer."""
        address = self.elector.leader_address()
        if address is None or self._session is None:
            return Outcome(False, f"no router leads now (leader election under way), so model {model!r} cannot be "
                                  f"{action} yet; retry shortly", 503)
        url = f"http://{address}/action/{action}/{urllib.parse.quote(model, safe='/')}"
        try:
            async with self._session.post(url, headers=self._auth) as r:
                body = await r.read()
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            return Outcome(False, f"the leading router at {address} could not be asked to {action} model "
                                  f"{model!r}: {type(e).__name__}: {e}", 503)
        if r.status == 200:
            return Outcome(True, f"the leading router at {address}: {_message(body)}")
        return Outcome(False, f"the leading router at {address} answered {r.status} to {action} model {model!r}: "
                              f"{_message(body)}", 503 if r.status >= 500 or r.status == 403 else r.status)

    async def _follow(self, table: Callable[[], ModelTable]) -> None:
        """While following: tell the leader what was used here, and take its word where engines cannot tell."""
        while True:
            await asyncio.sleep(ACTIVITY_SECONDS)
            address = self.elector.leader_address()
            if self.local() or address is None or self._session is None:
                continue
            try:
                await self._report(address, table())
                await self._read_states(address, table())
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError) as e:
                log.warning("could not reach the leading router at %s: %s", address, e)

    async def _report(self, address: str, table: ModelTable) -> None:
        used = [m.name for m in table
                if m.lifecycle.in_flight or m.lifecycle.last_end > self._reported.get(m.name, float("-inf"))]
        if not used:
            return
        assert self._session is not None
        async with self._session.post(f"http://{address}/cluster/activity", headers=self._auth,
                                      data=orjson.dumps({"models": used})) as r:
            if r.status != 200:
                raise ValueError(f"/cluster/activity answered {r.status}: {_message(await r.read())}")
        for name in used:
            model = table.get(name)
            if model is not None:
                self._reported[name] = model.lifecycle.last_end

    async def _read_states(self, address: str, table: ModelTable) -> None:
        untold = [m for m in table if not all(r.instance.spec.is_sleeping_path for r in m.replicas)]
        if not untold:
            return
        assert self._session is not None
        async with self._session.get(f"http://{address}/models", headers=self._auth) as r:
            states = orjson.loads(await r.read())["models"]
        for model in untold:
            state = states.get(model.name, {}).get("state")
            if isinstance(state, str):
                model.lifecycle.follow(state)


def _message(body: bytes) -> str:
    """The message of an admin answer or of an error in OpenAI shape."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:200].decode("utf-8", "replace")
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        if "message" in data:
            return str(data["message"])
    return body[:200].decode("utf-8", "replace")
