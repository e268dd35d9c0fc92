"""Tenants: what a client key may do (its scope, limits and priority class), decided without the server.

Parsing is router/config/keys.py; the server applies these decisions in
router/server/proxy/tenants.py.
"""
