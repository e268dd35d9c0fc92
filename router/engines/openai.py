"""Any OpenAI-compatible server, started by the instance's own ``command``.

The router knows nothing of such a server beyond the OpenAI API: it reaches it
at ``--host``/``--port`` in the command (or the instance's ``host:``/``port:``),
probes the instance's ``health_path`` and never puts it to sleep, having no
sleep API to call. Its GPU memory share and served names are its own
business, so no flag of the command is read for them.
"""
from router.engines.spec import EngineSpec

SPEC = EngineSpec(
    name="openai",
    rank=2,
    spellings=(),
    launcher=None,
    client_paths=(
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/embeddings",
    ),
    health_path="/health",
    sim_dialect="openai",
)
