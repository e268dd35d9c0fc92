"""A wake from one sleep tier, run on one replica: the engine's steps in order, the first failure ends it.

The steps come from the engine's spec (router/engines/: `EngineSpec.wake_sequence`);
this module only runs them. They must run in order and all of them: a vLLM
level-2 wake that skips ``reload_weights``, or an SGLang one that skips
``update_weights_from_disk`` or ``/flush_cache``, leaves an engine that answers
with wrong text rather than an error. So a failed step stops the wake (the
replica stays asleep) and the error names the step.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

from router.engines import Call
from router.server.fleet.control import EngineCallError, EngineControl
from router.server.fleet.replica import Replica

#: The least time a later step of a sequence is given, even when the earlier ones used up the limit.
MIN_STEP_SECONDS = 1.0


async def run_steps(control: EngineControl, replica: Replica, steps: Sequence[Call], timeout: float,
                    clock: Callable[[], float] = time.monotonic) -> None:
    """Run `steps` on `replica` one after the other, all within `timeout` seconds (each later
    step gets at least MIN_STEP_SECONDS); raise EngineCallError naming the failed step."""
    if not steps:
        raise EngineCallError(f"{replica.name}: engine '{replica.instance.engine}' has no sleep API")
    deadline = clock() + timeout
    for i, step in enumerate(steps, 1):
        try:
            await control.call(replica, step, max(deadline - clock(), MIN_STEP_SECONDS if i > 1 else timeout))
        except EngineCallError as e:
            if len(steps) == 1:
                raise
            raise EngineCallError(f"step {i} of {len(steps)} ({step}) failed, the rest not run: {e}") from None
