"""A proxy worker's admission strategy: the model's state is the controller's, mirrored by the
link (router/server/workers/worker_end.py); while it is awake a request is admitted in the worker
(no message), otherwise the controller is asked, and the counts reach it in the link's reports."""
from __future__ import annotations

from typing import Callable, Protocol

from router.server.fleet.admission import Admission, Transitions
from router.util.states import AWAKE


class Link(Protocol):
    """What the strategy needs of the worker's end of the link (`ControllerLink`)."""

    def changed(self, lc: "RemoteAdmission") -> None: ...

    async def ready(self, lc: "RemoteAdmission") -> None: ...


class RemoteAdmission(Admission):
    """One model's admission in a proxy worker; `reported` is the link's business."""

    __slots__ = ("link", "model", "members", "reported")

    def __init__(self, lifecycle: Transitions, link: Link):
        super().__init__(lifecycle)
        self.link = link
        self.model = lifecycle.model
        self.members = lifecycle.members
        #: The count the controller last heard.
        self.reported = 0

    @classmethod
    def factory(cls, link: Link) -> Callable[[Transitions], Admission]:
        """What a worker's lifecycles are built with."""
        return lambda lifecycle: cls(lifecycle, link)

    async def admit(self) -> None:
        if self.machine.state == AWAKE:
            self.in_flight += 1
            self.link.changed(self)
            return
        self.waiting += 1
        try:
            await self.link.ready(self)
        finally:
            self.waiting -= 1

    def admitted(self) -> None:
        """The controller made the model ready for this request."""
        self.in_flight += 1
        self.link.changed(self)

    def count(self, delta: int) -> None:
        self.in_flight += delta
        self.link.changed(self)
