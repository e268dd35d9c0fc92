"""One client request as the engines get it: parsed once, forwarded as bytes.

The body is parsed once (orjson, or one walk over a multipart form) for `model`
and `stream`; the engine gets the client's bytes unless its served name differs
or its model shapes the request (router/config/shaping.py): then the body is
encoded once more, with both.
Which headers are forwarded is decided in `request_head` alone.
"""
from __future__ import annotations

from typing import Any, Optional

import orjson

from router.server.fleet.replica import Replica
from router.server.fleet.upstream import Response
from router.server.proxy.forms import Field, FormError, read_fields, replace_field
from router.server.proxy.reply import Receive, Scope
from router.server.proxy.tokens import USAGE_PATHS, ask_usage
from router.tenants.classes import NORMAL, VLLM_PRIORITY

#: Request headers never forwarded: hop-by-hop (RFC 9110 7.6.1) and the ones the router sets itself.
DROP_REQUEST_HEADERS = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection", b"te",
    b"trailer", b"transfer-encoding", b"upgrade", b"host", b"content-length", b"expect",
})
#: Engine response headers relayed to the client, streamed or not (the router sets length and framing).
RELAY_RESPONSE_HEADERS = frozenset({b"content-type", b"content-encoding", b"x-request-id"})
AUTHORIZATION = frozenset({b"authorization"})
#: The Anthropic SDK's key header: a router key, not forwarded when the router checks keys.
API_KEY = frozenset({b"x-api-key"})


class Reject(Exception):
    """The router answers this request itself with an OpenAI-shaped error."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 headers: Optional[list[tuple[bytes, bytes]]] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers or []


class Unserved(Reject):
    """The model could not serve the request and nothing reached the client: a model it falls back
    to may (router/server/proxy/fallback.py); with none, the error is the answer."""


def request_head(scope: Scope, target: bytes, authority: bytes, length: int, drop: frozenset[bytes],
                 auth_line: bytes = b"", trace_lines: bytes = b"") -> bytes:
    """Request line and headers for the engine (the one place deciding which headers are forwarded).

    End-to-end headers pass as the client sent them; hop-by-hop ones (and
    those the Connection header names) do not. An engine with its own API
    key gets that key (`auth_line`) instead of whatever the client sent;
    with tracing on, the router's trace context (`trace_lines`, its names
    in `drop`) replaces the client's.
    """
    if auth_line:
        drop = drop | AUTHORIZATION
    headers = scope["headers"]
    typed = False
    for k, v in headers:
        if k == b"connection":
            drop = drop | {t.strip().lower().encode() for t in v.decode("latin-1").split(",")}
        elif k == b"content-type":
            typed = True
    if scope["query_string"]:
        target += b"?" + scope["query_string"]
    parts = [scope["method"].encode(), b" ", target, b" HTTP/1.1\r\nhost: ", authority, b"\r\ncontent-length: ",
             str(length).encode(), b"\r\n" if typed or not length else b"\r\ncontent-type: application/json\r\n",
             auth_line, trace_lines]
    for k, v in headers:
        if k not in drop:
            parts += (k, b": ", v, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def relay_headers(resp: Response, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """`headers` with the engine's headers that reach the client appended."""
    for k, v in resp.headers:
        if k in RELAY_RESPONSE_HEADERS:
            headers.append((k, v))
    return headers


def header(scope: Scope, name: bytes) -> Optional[bytes]:
    for k, v in scope["headers"]:
        if k == name:
            return v
    return None


class Outgoing:
    """What one client request asks for, and the body each replica gets.

    `name` is the model name the client gave (None: the default model);
    the body is forwarded as the client sent it unless the replica serves
    the model under another name, when the model field is rewritten (JSON
    re-encoded once, or the one form field replaced), or its model shapes the
    request (`shaped`: a JSON body on a path that is shaped), or the router asks
    for a stream's usage (`strip_usage`, router/server/proxy/tokens.py).
    """

    __slots__ = ("name", "payload", "body", "stream", "form_model", "pin", "key", "shaped", "priority", "adapter",
                 "adapter_on", "adapter_retried", "strip_usage")

    def __init__(self, name: Optional[str], payload: Optional[dict[str, Any]], body: bytes, stream: bool,
                 form_model: Optional[Field] = None, pin: Optional[Replica] = None):
        self.name = name
        self.payload = payload
        self.body = body
        self.stream = stream
        self.form_model = form_model
        #: The one replica this request must go to (it holds the response the request names).
        self.pin = pin
        #: Its place on the model's ring (`routing: session | prefix`, router/server/proxy/keys.py).
        self.key: Optional[int] = None
        self.shaped = False
        #: Its priority class (router/tenants/classes.py): its key's, or lower if it asked.
        self.priority = NORMAL
        #: The LoRA adapter the request names (its `model`, which the engine knows by the same name), and
        #: the replica whose adapter use it counts now (router/server/proxy/adapters.py).
        self.adapter: Optional[str] = None
        self.adapter_on: Optional[Replica] = None
        #: Sent again once already because its engine had lost the adapter.
        self.adapter_retried = False
        #: The router asked for the stream's usage chunk: it is removed from the client's stream.
        self.strip_usage = False

    def asking_usage(self, path: str) -> "Outgoing":
        """This request, asking the engine for a stream's usage chunk when the client did not (an
        OpenAI chat or completions stream). The body is re-encoded once, by `data_for`, with the
        model rewrite and the shaping; other bodies stay the client's bytes."""
        if self.stream and self.payload is not None and path in USAGE_PATHS:
            asked = ask_usage(self.payload)
            if asked is not None:
                self.payload = asked
                self.strip_usage = True
        return self

    def data_for(self, replica: Replica) -> bytes:
        served = self.name in replica.served or self.adapter is not None
        shaping = replica.instance.shaping if self.shaped else None
        # Only an engine that orders its queue by `priority` looks further (one attribute for the others).
        ranked = replica.ranks and self.payload is not None and (self.priority != NORMAL or "priority" in self.payload)
        if served and shaping is None and not ranked and not self.strip_usage:
            return self.body
        if self.payload is not None:
            if shaping is None and not ranked:
                return orjson.dumps(self.payload if served else {**self.payload, "model": replica.served_name})
            body = shaping.apply(self.payload) if shaping is not None else dict(self.payload)
            if not served:
                body["model"] = replica.served_name
            if ranked:
                body["priority"] = self.rank(body.get("priority"))
            return orjson.dumps(body)
        if self.form_model is not None:
            return replace_field(self.body, self.form_model, replica.served_name)
        return self.body

    def rank(self, theirs: object) -> int:
        """The `priority` for an engine that orders its queue by it (vLLM's ``--scheduling-policy
        priority``, lower first): the request's class as that number; a client's own value counts
        only where it ranks the request lower (a larger number). A normal request without one is
        not rewritten for it: vLLM's default is 0."""
        ours = VLLM_PRIORITY[self.priority]
        return max(theirs, ours) if type(theirs) is int else ours


def parse_json(body: bytes) -> tuple[dict[str, Any], Optional[str], bool]:
    """(payload, model name or None, stream) from a JSON request body, or Reject(400)."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise Reject(400, f"The request body is not valid JSON: {e}") from None
    if type(payload) is not dict:
        raise Reject(400, "The request body must be a JSON object.")
    model = payload.get("model")
    if (model is not None or "model" in payload) and (type(model) is not str or not model):
        raise Reject(400, f"'model' is a {type(model).__name__}, not a non-empty string; give the name of the "
                          "model to use (or leave it out for the default model).", "model")
    stream = payload.get("stream", False)
    if stream is None:
        stream = False
    elif type(stream) is not bool:
        raise Reject(400, "'stream' must be true or false.", "stream")
    return payload, model, stream


def parse_form(body: bytes, boundary: bytes) -> tuple[Optional[str], bool, Optional[Field]]:
    """(model name or None, stream, the model field) from a multipart form body, or Reject(400)."""
    try:
        fields = read_fields(body, boundary)
    except FormError as e:
        raise Reject(400, f"{e}.") from None
    model = fields.get("model")
    stream = fields.get("stream")
    return (model.value or None) if model else None, bool(stream and stream.value.lower() == "true"), model


async def read_body(scope: Scope, receive: Receive, limit: int) -> Optional[bytes]:
    """The request body, refusing (413) as soon as it is known to exceed the limit."""
    for k, v in scope["headers"]:
        if k == b"content-length":
            try:
                declared = int(v)
            except ValueError:
                raise Reject(400, "Content-Length is not a number.") from None
            if declared > limit:
                raise Reject(413, f"The request body ({declared} bytes) exceeds the limit of {limit} bytes "
                                  "(router.max_request_bytes).")
            break
    msg = await receive()
    body = msg.get("body", b"")
    if not msg.get("more_body"):
        return body if msg["type"] == "http.request" else None
    parts = [body]
    size = len(body)
    while True:
        if size > limit:
            raise Reject(413, f"The request body exceeds the limit of {limit} bytes (router.max_request_bytes).")
        if not msg.get("more_body"):
            break
        msg = await receive()
        if msg["type"] != "http.request":
            return None
        chunk = msg.get("body", b"")
        size += len(chunk)
        parts.append(chunk)
    return b"".join(parts)
