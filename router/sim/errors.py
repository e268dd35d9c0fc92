"""ApiError: a request the engine refuses, raised anywhere in the simulator and answered in
the engine's error shape by SimEngine (or re-worded by an API with its own, like Anthropic's)."""
from __future__ import annotations

from typing import Optional


class ApiError(Exception):
    """A request the engine refuses, answered in its error shape."""

    def __init__(self, status: int, message: str, err_type: str = "BadRequestError", param: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.param = param
