"""The text fields of a multipart form body (audio uploads), read without copying the files.

The audio endpoints take ``multipart/form-data`` with ``model`` as a form
field. The router needs that field (and ``stream``) to route, and may have
to rewrite ``model`` to the name the engine serves; everything else is
forwarded byte for byte. python-multipart (Starlette's own form parser)
walks the body and reports where each part's data lies, so the rewrite
replaces exactly the bytes of one field.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header

#: Fields the router reads; their values are short text.
WANTED = (b"model", b"stream")
MAX_FIELD_BYTES = 1024


class FormError(Exception):
    """The body is not the multipart form its Content-Type says."""


class Field(NamedTuple):
    value: str
    #: Where the value's bytes lie in the body, for a rewrite.
    start: int
    end: int


def boundary_of(content_type: bytes) -> Optional[bytes]:
    """The boundary of a ``multipart/form-data`` Content-Type, or None for any other type."""
    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data":
        return None
    boundary = params.get(b"boundary")
    if not boundary:
        raise FormError("the multipart Content-Type has no boundary")
    return boundary


def read_fields(body: bytes, boundary: bytes) -> dict[str, Field]:
    """The wanted text fields of the form, with their positions in `body`."""
    fields: dict[str, Field] = {}
    state: dict[str, object] = {}
    header: list[bytes] = []

    def on_part_begin() -> None:
        state.clear()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header[:] = [data[start:end].lower()]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        if header and header[0] == b"content-disposition":
            _, params = parse_options_header(b"form-data; " + data[start:end].split(b";", 1)[-1])
            name = params.get(b"name")
            if name in WANTED and b"filename" not in params:
                state["name"] = name.decode()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if "name" in state:
            state.setdefault("start", start)
            state["end"] = end

    def on_part_end() -> None:
        name = state.get("name")
        if isinstance(name, str):
            s, e = state.get("start"), state.get("end")
            s, e = (s, e) if isinstance(s, int) and isinstance(e, int) else (0, 0)
            if e - s > MAX_FIELD_BYTES:
                raise FormError(f"form field '{name}' is longer than {MAX_FIELD_BYTES} bytes")
            fields[name] = Field(body[s:e].decode("utf-8", "replace") if e > s else "", s, e)

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_part_data": on_part_data, "on_part_end": on_part_end,
    })
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as e:
        raise FormError(f"the multipart body cannot be parsed: {e}") from None
    return fields


def replace_field(body: bytes, field: Field, value: str) -> bytes:
    return body[:field.start] + value.encode() + body[field.end:]
