"""The plain OpenAI dialect's routes: completions, chat, the model list and embeddings; no sleep API."""
from __future__ import annotations

from .api import EngineApi, RouteTable
from .dialects import OpenaiDialect


class OpenaiApi(EngineApi):
    wording = OpenaiDialect

    def routes(self) -> RouteTable:
        return {**super().routes(), ("POST", "/v1/embeddings"): self.embeddings}
