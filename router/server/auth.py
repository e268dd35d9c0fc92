"""Who may call what: client API keys on ``/v1/*``, the admin key (or loopback) on admin endpoints.

The check runs on every request before any route, so it is built once from
the settings: keys are encoded up front and a request with no key configured
costs a prefix test. Keys are compared with `hmac.compare_digest` against
every configured key (no early exit), so the time taken says nothing about
how much of a guess was right or which key it was close to. No key ever
appears in an answer or a log line: messages name the setting, never the value.

Admin endpoints are ``/action/*`` and every request outside ``/v1/`` that
may change state (any method but GET, HEAD and OPTIONS), so a state-changing
endpoint added later is guarded without being listed here. With no
``router.admin_api_key`` they are served only to loopback clients, judged by
the peer address of the connection (the ASGI scope's ``client``), never by a
header a client could forge.
"""
from __future__ import annotations

import hmac
from typing import Any, MutableMapping, NamedTuple, Optional

from router.config import RouterSettings, loopback_ip

Scope = MutableMapping[str, Any]

CLIENT_PREFIX = "/v1/"
ADMIN_PREFIX = "/action/"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CHALLENGE = [(b"www-authenticate", b"Bearer")]


class Denied(NamedTuple):
    """The error the router answers instead of running the route."""

    status: int
    message: str
    headers: list[tuple[bytes, bytes]]


MISSING_KEY = Denied(401, "Missing or invalid API key: send 'Authorization: Bearer <key>' with one of the keys "
                          "in router.api_keys.", CHALLENGE)
MISSING_ADMIN_KEY = Denied(401, "This admin endpoint needs the admin key: send 'Authorization: Bearer <key>' with "
                                "router.admin_api_key.", CHALLENGE)
NOT_LOOPBACK = Denied(403, "Admin endpoints are served only to clients on this machine (loopback) while "
                           "router.admin_api_key is not set; set it to allow remote administration.", [])


def bearer_token(scope: Scope) -> Optional[bytes]:
    """The token of the first Authorization header if it uses the Bearer scheme (any case)."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() != b"bearer":
                return None
            return token.strip() or None
    return None


def matches(token: Optional[bytes], keys: tuple[bytes, ...]) -> bool:
    """Whether `token` is one of `keys`, in time independent of the token's content."""
    if token is None:
        return False
    found = False
    for key in keys:
        found |= hmac.compare_digest(token, key)
    return found


def is_loopback(client: Optional[tuple[str, int]]) -> bool:
    """Whether the peer (the ASGI scope's ``client``) is on this machine's loopback."""
    return bool(client) and loopback_ip(client[0])


def is_admin(scope: Scope) -> bool:
    path: str = scope["path"]
    return path.startswith(ADMIN_PREFIX) or (scope["method"] not in SAFE_METHODS and not path.startswith(CLIENT_PREFIX))


class Guard:
    """The access rules of one router, from its settings."""

    def __init__(self, settings: RouterSettings):
        self.keys = tuple(k.encode() for k in settings.api_keys)
        self.admin_key = (settings.admin_api_key.encode(),) if settings.admin_api_key else ()

    def check(self, scope: Scope) -> Optional[Denied]:
        """None when the request may proceed, else the error to answer with."""
        if scope["path"].startswith(CLIENT_PREFIX):
            if self.keys and not matches(bearer_token(scope), self.keys):
                return MISSING_KEY
            return None
        if not is_admin(scope):
            return None
        if self.admin_key:
            return None if matches(bearer_token(scope), self.admin_key) else MISSING_ADMIN_KEY
        return None if is_loopback(scope.get("client")) else NOT_LOOPBACK
