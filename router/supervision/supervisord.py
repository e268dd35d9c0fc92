"""Talking to a running supervisord over its unix socket.

Both the renderer (``render --apply``: reread, update, restart) and the router
(reading every engine's process state) use supervisord's own XML-RPC
interface through the supervisor package's transport, so neither speaks
XML-RPC by hand. The calls block: async callers run them in a thread.
"""
from __future__ import annotations

import xmlrpc.client
from pathlib import Path
from typing import Any

from supervisor.xmlrpc import SupervisorTransport

#: The socket file `render` writes supervisord.conf to use, beside it.
SOCKET_NAME = "supervisor.sock"


def socket_url(socket_path: str | Path) -> str:
    return f"unix://{Path(socket_path).resolve()}"


def connect(socket_path: str | Path) -> Any:
    """An XML-RPC proxy to the supervisord listening on `socket_path`.

    ``proxy.supervisor.getAllProcessInfo()`` and the rest of supervisord's
    API (supervisor.rpcinterface) hang off it; calls raise OSError when no
    supervisord listens and xmlrpc.client.Fault for its refusals.
    """
    transport = SupervisorTransport(serverurl=socket_url(socket_path))
    # The host part is ignored: the transport dials the unix socket.
    return xmlrpc.client.ServerProxy("http://supervisord", transport=transport)
