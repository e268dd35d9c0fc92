"""The router's calls to engines outside the hot path: control calls, sleep questions, health probes,
and supervisord's starts and stops of engine processes.

One aiohttp session, opened in the app's lifespan (it needs the running
loop) and closed at its end, serves the HTTP calls; the hot path uses each
replica's own pool instead. supervisord is asked over its socket in a
worker thread (its XML-RPC client blocks). Every call goes to the replica's address with
the engine's own key. A failure of any kind (refused, timed out, an error
status, supervisord's refusal) is raised as one `EngineCallError` whose message
names the instance and what happened, so callers catch one type.
"""
from __future__ import annotations

import asyncio
import xmlrpc.client
from typing import Callable, Optional

import aiohttp

from router.engines import Call
from router.server.fleet.replica import Replica
from router.supervision.processes import ProcessState, start_program, stop_program

MODELS_PATH = "/v1/models"
#: Time limit of one ``/is_sleeping`` question.
ASK_TIMEOUT_SECONDS = 2.0


class EngineCallError(Exception):
    """An engine control call failed; the message says which and why."""


def new_session() -> aiohttp.ClientSession:
    """Pooled keep-alive connections with no cap; bodies relayed as the engine encoded them."""
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
    return aiohttp.ClientSession(connector=connector, auto_decompress=False)


class EngineControl:
    """Control calls to engines, over one session that exists between `open` and `close`;
    with a supervisord socket, the starts and stops of their processes too."""

    def __init__(self, supervisor_socket: Optional[str] = None) -> None:
        self._session: Optional[aiohttp.ClientSession] = None
        self._socket = supervisor_socket

    @property
    def can_start(self) -> bool:
        """Whether engine processes can be started and stopped (a supervisord runs them)."""
        return self._socket is not None

    async def start_program(self, replica: Replica) -> None:
        """Start the replica's supervisord program; its fresh process state is recorded at once."""
        replica.set_process(await self._supervise(start_program, replica))

    async def stop_program(self, replica: Replica) -> None:
        """Stop the replica's supervisord program and wait until it is down."""
        replica.set_process(await self._supervise(stop_program, replica))

    async def _supervise(self, action: Callable[[str, str], ProcessState], replica: Replica) -> ProcessState:
        if self._socket is None:
            raise EngineCallError(f"{replica.name}: no supervisord runs this router's engines")
        try:
            return await asyncio.to_thread(action, self._socket, replica.name)
        except (OSError, xmlrpc.client.Error) as e:
            raise EngineCallError(f"{replica.name}: supervisord could not {action.__name__.split('_')[0]} "
                                  f"it: {e}") from None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("engine control is not open (the app's lifespan has not started)")
        return self._session

    @property
    def is_open(self) -> bool:
        return self._session is not None

    def open(self) -> None:
        self._session = new_session()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def call(self, replica: Replica, call: Call, timeout: float) -> None:
        """Run one control call; raise EngineCallError unless the engine answers 2xx."""
        inst = replica.instance
        try:
            async with self.session.request(call.method, replica.url + call.path, params=dict(call.params),
                                            json=call.json, headers=inst.auth_headers,
                                            timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                body = await r.read()
                if r.status >= 300:
                    text = body[:300].decode("utf-8", "replace")
                    raise EngineCallError(f"{inst.name}: {call.method} {call.path} answered {r.status}: {text}")
        except asyncio.TimeoutError:
            raise EngineCallError(f"{inst.name}: {call.method} {call.path} got no answer within {timeout:g}s") from None
        except aiohttp.ClientError as e:
            raise EngineCallError(f"{inst.name}: {call.method} {call.path} failed: {e}") from None

    async def get_json(self, replica: Replica, path: str, timeout: float) -> object:
        """The engine's JSON answer to a GET, or None when it gives none (down, an error, not JSON)."""
        try:
            async with self.session.get(replica.url + path, headers=replica.instance.auth_headers,
                                        timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                return await r.json(content_type=None) if r.status == 200 else None
        except (asyncio.TimeoutError, aiohttp.ClientError, ValueError):
            return None

    async def is_sleeping(self, replica: Replica, path: str) -> Optional[bool]:
        """The engine's own answer, or None when it cannot tell (down, no dev mode)."""
        data = await self.get_json(replica, path, ASK_TIMEOUT_SECONDS)
        value = data.get("is_sleeping") if isinstance(data, dict) else None
        return value if isinstance(value, bool) else None

    async def model_card(self, replica: Replica, timeout: float) -> Optional[dict[str, object]]:
        """The engine's own entry for the name the replica serves in its ``GET /v1/models``
        (``max_model_len``, ``owned_by``, ``root``...), or None when it gives none."""
        data = await self.get_json(replica, MODELS_PATH, timeout)
        entries = data.get("data") if isinstance(data, dict) else None
        for entry in entries if isinstance(entries, list) else ():
            if isinstance(entry, dict) and entry.get("id") in replica.served:
                return entry
        return None

    async def probe(self, replica: Replica, timeout: float) -> tuple[bool, str]:
        """One GET of the replica's health path: (ok, what happened)."""
        url = replica.url + replica.instance.health_path
        try:
            async with self.session.get(url, headers=replica.instance.auth_headers,
                                        timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                await resp.read()
                return resp.status == 200, f"HTTP {resp.status}"
        except asyncio.TimeoutError:
            return False, f"no answer within {timeout:g}s"
        except aiohttp.ClientError as e:
            return False, f"{type(e).__name__}: {e}"
