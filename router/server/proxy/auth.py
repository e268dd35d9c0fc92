"""Who may call what: client API keys on the client paths, the admin key (or loopback) on admin endpoints.

The check runs on every request before any route, so it is built once from
the settings: keys are encoded up front and a request with no key configured
costs a prefix test. Keys are compared with `hmac.compare_digest` against
every configured key (no early exit, and the matching key's place taken by
arithmetic, not a branch), so the time taken says nothing about how much of a
guess was right or which key it was close to. When some key is given only as
its SHA-256 (``key_sha256``), the token is hashed once and every key's digest is
compared instead. No key ever appears in an answer or a log line: messages
name the setting, never the value. The matching key's record (its name, scope,
limits and class: router/config/keys.py) goes with the request as
``scope[KEY]``, for router/server/proxy/tenants.py.

Client paths are ``/v1/*`` and every other path a configured engine serves
to clients (``/tokenize``, ``/rerank``...). The Anthropic SDK sends its key
as ``x-api-key``; that header counts as a client key on the Messages paths.
Admin endpoints are ``/action/*``, ``/upstream/*``, ``/logs/*``, ``/usage`` and every other request
that may change state (any method but GET, HEAD and OPTIONS), so a
state-changing endpoint added later is guarded without being listed here. With no
``router.admin_api_key`` they are served only to loopback clients, judged by
the peer address of the connection (the ASGI scope's ``client``), never by a
header a client could forge.
"""
from __future__ import annotations

import hashlib
import hmac
from typing import Any, MutableMapping, NamedTuple, Optional

from router.config import RouterSettings, loopback_ip
from router.config.keys import ApiKey

Scope = MutableMapping[str, Any]

CLIENT_PREFIX = "/v1/"
ADMIN_PREFIXES = ("/action/", "/upstream/", "/logs/", "/usage")
#: Paths whose clients (the Anthropic SDK) send their key as ``x-api-key``.
X_API_KEY_PATHS = frozenset({"/v1/messages", "/v1/messages/count_tokens"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CHALLENGE = [(b"www-authenticate", b"Bearer")]
#: The scope entry holding the record of the client key a request sent.
KEY = "kvrouter.key"


class Denied(NamedTuple):
    """The error the router answers instead of running the route."""

    status: int
    message: str
    headers: list[tuple[bytes, bytes]]


MISSING_KEY = Denied(401, "Missing or invalid API key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>' "
                          "on the Anthropic Messages paths) with one of the keys in router.api_keys.", CHALLENGE)
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


_compare = hmac.compare_digest


def find(token: Optional[bytes], places: tuple[tuple[int, bytes], ...]) -> int:
    """The place (from 1) of `token` among the (place, key) pairs (keys unique), 0 when it is none
    of them, in time independent of the token's content and of which key it is."""
    if token is None:
        return 0
    found = 0
    for place, key in places:
        found |= place * _compare(token, key)
    return found


def is_loopback(client: Optional[tuple[str, int]]) -> bool:
    """Whether the peer (the ASGI scope's ``client``) is on this machine's loopback."""
    return client is not None and loopback_ip(client[0])


def on_unix_socket(scope: Scope) -> bool:
    """Whether the request came over a unix socket (a proxy worker passing a request to its
    controller): its peer is on this machine, like a loopback one."""
    server = scope.get("server")
    return scope.get("client") is None and server is not None and server[1] is None


def x_api_key(scope: Scope) -> Optional[bytes]:
    for k, v in scope["headers"]:
        if k == b"x-api-key":
            return v.strip()
    return None


class Guard:
    """The access rules of one router, from its settings."""

    def __init__(self, settings: RouterSettings, client_paths: frozenset[str]):
        self.records: tuple[ApiKey, ...] = settings.api_keys
        #: Compared by digest when some key is known only by its digest, else as given.
        self.hashed = any(k.key is None for k in self.records)
        self.keys = tuple(enumerate((k.digest if self.hashed or k.key is None else k.key.encode()
                                     for k in self.records), 1))
        self.admin_key = (settings.admin_api_key.encode(),) if settings.admin_api_key else ()
        self.client_paths = client_paths

    def find(self, token: Optional[bytes]) -> int:
        if self.hashed and token is not None:
            token = hashlib.sha256(token).digest()
        return find(token, self.keys)

    def is_client(self, path: str) -> bool:
        return path.startswith(CLIENT_PREFIX) or path in self.client_paths

    def is_admin(self, scope: Scope) -> bool:
        path: str = scope["path"]
        return path.startswith(ADMIN_PREFIXES) or (scope["method"] not in SAFE_METHODS and not self.is_client(path))

    def check(self, scope: Scope) -> Optional[Denied]:
        """None when the request may proceed, else the error to answer with."""
        path: str = scope["path"]
        if self.is_client(path):
            if self.keys:
                token = bearer_token(scope)
                place = find(hashlib.sha256(token).digest() if self.hashed and token else token, self.keys)
                if not place and path in X_API_KEY_PATHS:
                    place = self.find(x_api_key(scope))
                if not place:
                    return MISSING_KEY
                scope[KEY] = self.records[place - 1]
            return None
        if not self.is_admin(scope):
            return None
        if self.admin_key:
            return None if matches(bearer_token(scope), self.admin_key) else MISSING_ADMIN_KEY
        return None if is_loopback(scope.get("client")) or on_unix_socket(scope) else NOT_LOOPBACK
