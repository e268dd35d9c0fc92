"""One OpenAI-compatible endpoint for many vLLM/SGLang engines on one node."""

__version__ = "0.1.0"
