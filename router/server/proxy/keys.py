"""A request's routing key, for a model routed by `session` or `prefix` (router/server/fleet/sticky.py).

Made only for such a model (`least_outstanding` requests make none), from what
the proxy already has: the headers and the body it parsed once.

- `session`: the ``x-session-id`` header, else the body's ``user`` (Anthropic's
  ``metadata.user_id`` on /v1/messages). A follow-up naming a stored response
  (``previous_response_id``) is pinned to that response's replica before any key.
- `prefix`: the first `prefix_chars` characters of the prompt, as JSON text:
  Anthropic's ``system``, then ``messages`` (chat), ``prompt`` (completions)
  or ``input`` (responses, embeddings). Messages are serialized one by one
  until the prefix is full (a long one's text cut first), so a long
  conversation costs no more than its first `prefix_chars`.

A request with no key (no session named, a form upload) goes to the least
loaded replica, as under `least_outstanding`.
"""
from __future__ import annotations

from typing import Any, Optional

import orjson

from router.server.fleet.ring import key_hash
from router.server.fleet.sticky import Sticky
from router.server.proxy.reply import Scope

SESSION_HEADER = b"x-session-id"
#: The body fields that hold the prompt, in the order the engine reads them.
PROMPT_FIELDS = ("system", "messages", "prompt", "input")


def request_key(sticky: Sticky, scope: Scope, payload: Optional[dict[str, Any]]) -> Optional[int]:
    """The request's place on its model's ring, or None when it has no key."""
    if sticky.routing == "session":
        return session_key(scope, payload)
    return prefix_key(payload, sticky.prefix_chars) if payload is not None else None


def session_key(scope: Scope, payload: Optional[dict[str, Any]]) -> Optional[int]:
    for k, v in scope["headers"]:
        if k == SESSION_HEADER and v:
            return key_hash(v)
    if payload is None:
        return None
    user = payload.get("user")
    if not isinstance(user, str) or not user:
        metadata = payload.get("metadata")
        user = metadata.get("user_id") if isinstance(metadata, dict) else None
    return key_hash(user.encode()) if isinstance(user, str) and user else None


def prefix_key(payload: dict[str, Any], chars: int) -> Optional[int]:
    parts: list[bytes] = []
    left = chars
    for name in PROMPT_FIELDS:
        value = payload.get(name)
        if value is None:
            continue
        for item in (value if isinstance(value, list) else (value,)):
            # A string counts by characters and is cut before encoding (a long one is never copied
            # whole); anything else is its JSON text, cut after.
            if isinstance(item, str):
                text = item[:left]
                left -= len(text)
                parts.append(text.encode())
            else:
                content = item.get("content") if isinstance(item, dict) else None
                if isinstance(content, str) and len(content) > left:  # a long message: only what counts
                    item = {**item, "content": content[:left]}
                data = orjson.dumps(item)[:left]
                left -= len(data)
                parts.append(data)
            if left <= 0:
                return key_hash(b"\x1e".join(parts))
        parts.append(b"\x1f")  # the end of one field: `system` "ab" + messages "c" is not "a" + "bc"
    return key_hash(b"\x1e".join(parts)) if parts else None
