"""Which replica made each stored response (the Responses API's ids).

vLLM keeps a stored response in the memory of the replica that made it, so
``GET /v1/responses/{id}``, ``POST /v1/responses/{id}/cancel`` and a
request with ``previous_response_id`` must go to that replica. The router
learns each id from the engine's answer (the JSON body's ``id``, or the
stream's ``response.created`` event) and keeps the most recently used
`MAX_RESPONSES` of them; the least recently used id is forgotten first, and
a request naming a forgotten or unknown id gets 404.

With proxy workers each process learns ids from the answers it relays and
tells the controller, which tells the others. A follow-up can outrun that
news (it may reach another worker first), so an id not known here is asked
of the controller, which first fences every worker: what any of them had
learned by then is applied before it answers.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Awaitable, Callable, NamedTuple, Optional

import orjson

from router.server.fleet.models import Model
from router.server.fleet.replica import Replica

#: Ids remembered at most (about 200 bytes each).
MAX_RESPONSES = 100_000
RESPONSES_PATH = "/v1/responses"
#: The stream event that carries a new response's id.
CREATED = b'"response.created"'


class Owner(NamedTuple):
    model: Model
    replica: Replica


class ResponseOwners:
    """Response id -> the model and replica that made it; bounded, least recently used evicted first."""

    def __init__(self, limit: int = MAX_RESPONSES, on_learn: Optional[Callable[[str, Model, Replica], None]] = None,
                 elsewhere: Optional[Callable[[str], Awaitable[Optional[Owner]]]] = None):
        self._owners: OrderedDict[str, Owner] = OrderedDict()
        self._limit = limit
        #: Told of each id learned from an engine's answer (a proxy worker tells its controller).
        self._on_learn = on_learn
        #: Asked for an id not known here: the other processes that may have learned it.
        self._elsewhere = elsewhere

    def __len__(self) -> int:
        return len(self._owners)

    def remember(self, response_id: str, model: Model, replica: Replica) -> None:
        self._owners[response_id] = Owner(model, replica)
        self._owners.move_to_end(response_id)
        while len(self._owners) > self._limit:
            self._owners.popitem(last=False)

    def owner(self, response_id: str) -> Optional[Owner]:
        found = self._owners.get(response_id)
        if found is not None:
            self._owners.move_to_end(response_id)
        return found

    async def find(self, response_id: str) -> Optional[Owner]:
        """The owner of `response_id`, asking the other processes when it is not known here."""
        found = self.owner(response_id)
        if found is None and self._elsewhere is not None:
            found = await self._elsewhere(response_id)
            if found is not None:
                self.remember(response_id, *found)
        return found

    def _learned(self, response_id: str, model: Model, replica: Replica) -> None:
        self.remember(response_id, model, replica)
        if self._on_learn is not None:
            self._on_learn(response_id, model, replica)

    def learn_from_body(self, body: bytes, model: Model, replica: Replica) -> None:
        """A whole answer of POST /v1/responses: its ``id``."""
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return
        if isinstance(data, dict) and isinstance(data.get("id"), str):
            self._learned(data["id"], model, replica)

    def learn_from_stream(self, chunk: bytes, model: Model, replica: Replica) -> bool:
        """One chunk of a streamed answer; True once the ``response.created`` event gave the id."""
        if CREATED not in chunk:
            return False
        for line in chunk.split(b"\n"):
            if line.startswith(b"data:") and CREATED in line:
                try:
                    event = orjson.loads(line[5:])
                except orjson.JSONDecodeError:
                    return False
                response = event.get("response") if isinstance(event, dict) else None
                if isinstance(response, dict) and isinstance(response.get("id"), str):
                    self._learned(response["id"], model, replica)
                    return True
        return False
