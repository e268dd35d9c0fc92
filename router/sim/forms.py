"""The parts of a ``multipart/form-data`` body (the audio endpoints' uploads), by field name.

python-multipart's form parser (the one Starlette, hence vLLM's FastAPI, uses)
does all the work (a file over 1 MiB goes through a temporary file, read back here).
"""
from __future__ import annotations

import io

from python_multipart import parse_form as _parse
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import Field, File


class FormError(ValueError):
    """The body is not the multipart form its Content-Type says."""


def parse_form(content_type: str, body: bytes) -> dict[str, bytes]:
    """Every part of the form, name -> bytes (the last part of a repeated name wins)."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise FormError("expected a multipart/form-data body")
    parts: dict[str, bytes] = {}

    def on_field(field: Field) -> None:
        parts[(field.field_name or b"").decode("utf-8", "replace")] = field.value or b""

    def on_file(file: File) -> None:
        file.file_object.seek(0)
        parts[(file.field_name or b"").decode("utf-8", "replace")] = file.file_object.read()

    headers = {"Content-Type": content_type.encode("latin-1"), "Content-Length": str(len(body)).encode()}
    try:
        _parse(headers, io.BytesIO(body), on_field, on_file)
    except (FormParserError, ValueError) as e:
        raise FormError(f"malformed multipart body: {e}") from None
    return parts
