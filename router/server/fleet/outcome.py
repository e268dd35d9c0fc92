"""What a model's operations answer: an `Outcome` for the admin API, `ModelUnavailable` for a request."""
from __future__ import annotations

from dataclasses import dataclass

#: Seconds a client is told to wait after a failed wake or start (Retry-After).
RETRY_AFTER_SECONDS = 5


class ModelUnavailable(Exception):
    """The model cannot take requests now (e.g. its wake failed): answer 503."""

    def __init__(self, message: str, retry_after: int = RETRY_AFTER_SECONDS):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


@dataclass(frozen=True)
class Outcome:
    """Result of a sleep, wake, start or stop, with the HTTP status the admin API answers."""

    ok: bool
    message: str
    status: int = 200
