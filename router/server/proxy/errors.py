"""Errors in the shape the client's SDK parses, for every HTTP answer the router makes itself.

Clients (the OpenAI SDKs, LangChain) parse ``{"error": {...}}`` to raise the
right exception, so every error the router originates uses it, with the
status code the SDKs map to the matching exception class. On the Anthropic
Messages paths the Anthropic SDK's shape is used instead:
``{"type": "error", "error": {"type": ..., "message": ...}}``.
"""
from __future__ import annotations

from typing import Mapping, Optional

import orjson
from starlette.responses import Response

#: HTTP status -> OpenAI error `type`.
ERROR_TYPES: Mapping[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "timeout",
}


def error_body(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> bytes:
    return orjson.dumps({"error": {
        "message": message,
        "type": ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "internal_error"),
        "param": param,
        "code": code if code is not None else status,
    }})


#: HTTP status -> Anthropic error `type` (the Anthropic API's own names).
ANTHROPIC_ERROR_TYPES: Mapping[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}

#: The paths whose clients speak the Anthropic API.
ANTHROPIC_PATHS = frozenset({"/v1/messages", "/v1/messages/count_tokens"})


def anthropic_error_body(status: int, message: str) -> bytes:
    kind = ANTHROPIC_ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})


def error_body_for(path: str, status: int, message: str, param: Optional[str] = None) -> bytes:
    """The error body in the shape the client of `path` parses."""
    if path in ANTHROPIC_PATHS:
        return anthropic_error_body(status, message)
    return error_body(status, message, param)


def error_response(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                   headers: Optional[Mapping[str, str]] = None) -> Response:
    return Response(error_body(status, message, param, code), status_code=status,
                    headers=dict(headers or {}), media_type="application/json")
