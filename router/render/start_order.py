"""Which engine waits for which at its first start under ``launch_order: healthy``.

Engines that share a GPU must not load weights and profile memory at the same
moment (a vLLM that profiles while another allocates miscounts free memory),
but a fixed delay guesses how long a load takes. Instead each engine waits for
the engine before it, in file order, on each GPU it uses; engines on other
GPUs (or nodes) do not wait for each other. The wait is bounded: an engine
waits at most as long as the engines ahead of it may take to start, one after
another.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from router.config import Config, Instance


@dataclass(frozen=True)
class Turn:
    """What one engine waits for at its first start."""

    #: The engines it waits for: the one before it on each of its GPUs, in file order.
    after: tuple[Instance, ...]
    #: Longest wait, in seconds: the sum of the start timeouts of the chain ahead of it.
    timeout: float


def start_timeout(cfg: Config, inst: Instance) -> float:
    """How long `inst` may take to pass its health check once it runs."""
    return inst.start_timeout_seconds or cfg.residency.start_timeout_seconds


def turns(cfg: Config) -> dict[str, Turn]:
    """Every engine started with supervisord -> its turn. Engines started on demand are
    neither waited for nor wait: the router starts them when asked."""
    last_on: dict[tuple[Optional[str], str], Instance] = {}  # (node, GPU) -> the last engine to start there
    out: dict[str, Turn] = {}
    for inst in cfg.launched:
        if inst.on_demand:
            continue
        places = [(inst.node, gpu) for gpu in inst.gpus]
        after = tuple({p.name: p for p in (last_on[k] for k in places if k in last_on)}.values())
        timeout = max((out[p.name].timeout + start_timeout(cfg, p) for p in after), default=0.0)
        out[inst.name] = Turn(after, timeout)
        for place in places:
            last_on[place] = inst
    return out
