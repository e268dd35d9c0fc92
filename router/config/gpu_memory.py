"""An instance's GPU memory from the engine's own flag: the share it is told to take of each GPU.

vLLM's ``--gpu-memory-utilization`` and SGLang's ``--mem-fraction-static`` decide
what the engine really holds; a ``gpu_memory_gb`` typed beside them can only agree
or lie, and a lie makes the residency budget wrong. So with a GPU budget known
(``residency.gpu_memory_gb``) and the flag given, ``gpu_memory_gb`` defaults to
fraction x budget, and a declared value more than `TOLERANCE` away from it is a
warning. An engine under kvcached allocates its KV cache as it goes, so its flag
does not say what it holds and nothing is derived for it.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

from router.config.instance import Instance
from router.config.problems import Reading
from router.config.residency import ResidencySettings
from router.engines import last_flag_value

#: How far (a share of the derived size) a declared gpu_memory_gb may be from it without a warning.
TOLERANCE = 0.10


def from_flag(inst: Instance, residency: ResidencySettings) -> Optional[tuple[float, str]]:
    """(GB, how it was worked out) the engine's fraction flag gives on its GPUs' budget, or None
    when there is no budget for one of its GPUs, no flag given, no number in it, or kvcached.
    On GPUs with different budgets, the largest share: the budget must hold it on each."""
    flag = inst.spec.gpu_fraction_flag
    text = last_flag_value(inst.engine_args, flag) if flag is not None else None
    if text is None or inst.kvcached:
        return None
    try:
        fraction = float(text)
    except ValueError:
        return None  # the GPU checks warn about it
    budgets = [(gpu, residency.gpu_budget(gpu)) for gpu in inst.gpus]
    known = [(gpu, b) for gpu, b in budgets if b is not None]
    if not known or len(known) < len(budgets) or not 0 < fraction <= 1:
        return None
    gpu, budget = max(known, key=lambda gb: gb[1])
    return fraction * budget, f"{flag} {text} of GPU {gpu}'s {budget:g} GB budget"


def settle_gpu_memory(instances: tuple[Instance, ...], residency: ResidencySettings,
                      reading: Reading) -> tuple[Instance, ...]:
    """`instances` with `gpu_memory_gb` worked out from the engine's flag where not declared,
    after warning about each declared one that disagrees with it."""
    out = []
    for inst in instances:
        derived = from_flag(inst, residency)
        if derived is None:
            out.append(inst)
            continue
        size, how = derived
        if inst.gpu_memory_gb is None:
            out.append(replace(inst, gpu_memory_gb=round(size, 3)))
            continue
        if abs(inst.gpu_memory_gb - size) > TOLERANCE * size + 1e-9:
            reading.warn(f"instances[{inst.position}].gpu_memory_gb",
                         f"{inst.gpu_memory_gb:g} GB, but the engine takes {how} = {size:.3g} GB; the residency budget "
                         f"counts the declared value, so remove gpu_memory_gb (it then defaults to {size:.3g}) or "
                         "correct the flag")
        out.append(inst)
    return tuple(out)
