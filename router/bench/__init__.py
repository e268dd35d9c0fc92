"""``python -m router.bench``: load every configured model through the router (or directly)."""
