"""The router: the ASGI app, the hot path, and the owners of every replica's and model's state."""
