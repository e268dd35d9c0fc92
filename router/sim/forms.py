"""The parts of a ``multipart/form-data`` body (the audio endpoints' uploads), by field name.

python-multipart (the parser Starlette, hence vLLM's FastAPI, uses) does the
parsing; this only gathers each part's bytes under its ``name``.
"""
from __future__ import annotations

from typing import Optional

from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header


class FormError(ValueError):
    """The body is not the multipart form its Content-Type says."""


def parse_form(content_type: str, body: bytes) -> dict[str, bytes]:
    """Every part of the form, name -> bytes (the last part of a repeated name wins)."""
    kind, options = parse_options_header(content_type.encode("latin-1"))
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise FormError("expected a multipart/form-data body with a boundary")
    parts: dict[str, bytes] = {}
    header: dict[bytes, bytes] = {}
    name: list[bytes] = []
    value: list[bytes] = []
    field: Optional[bytes] = None

    def on_header_field(data: bytes, start: int, end: int) -> None:
        name.append(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        value.append(data[start:end])

    def on_header_end() -> None:
        header[b"".join(name).lower()] = b"".join(value)
        name.clear()
        value.clear()

    def on_headers_finished() -> None:
        nonlocal field
        _, opts = parse_options_header(header.get(b"content-disposition", b""))
        field = opts.get(b"name")
        header.clear()
        chunks.clear()

    chunks: list[bytes] = []

    def on_part_data(data: bytes, start: int, end: int) -> None:
        chunks.append(data[start:end])

    def on_part_end() -> None:
        if field is not None:
            parts[field.decode("utf-8", "replace")] = b"".join(chunks)

    parser = MultipartParser(boundary, {
        "on_header_field": on_header_field, "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished, "on_part_data": on_part_data, "on_part_end": on_part_end})
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as e:
        raise FormError(f"malformed multipart body: {e}") from None
    return parts
