"""Which engines share a Pod: those that share a GPU on one node, as they do under supervisord.

The premise of the project is several engines on one GPU. Kubernetes hands out
GPUs whole (``nvidia.com/gpu: 1``), so one Deployment per engine would need one
GPU per engine. Engines that share a GPU of one node (the same ``node:``, GPU
sets that meet, by their ``CUDA_VISIBLE_DEVICES``; GPU 0 when none is given) are
therefore one Pod: one GPU request for the GPUs they use together, one
container per engine, each engine still reached at its own Service.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from router.config import Config, Instance
from router.render.kubernetes.names import k8s_name

#: Longest Kubernetes object name (an RFC 1035 label).
MAX_NAME = 63


@dataclass(frozen=True)
class GpuPod:
    """Engines that run in one Pod, in config order, and the GPUs they use together (first use first)."""

    members: tuple[Instance, ...]
    gpus: tuple[str, ...]

    @property
    def shared(self) -> bool:
        return len(self.members) > 1

    @property
    def name(self) -> str:
        """The Deployment's name: the engine's own when alone, else its members' names joined
        (cut to fit, with a digest of the whole so two long groups stay apart)."""
        names = "-".join(k8s_name(i) for i in self.members)
        if len(names) <= MAX_NAME:
            return names
        digest = hashlib.sha256(names.encode()).hexdigest()[:8]
        return f"{names[:MAX_NAME - 9].rstrip('-')}-{digest}"

    def devices(self, inst: Instance) -> str:
        """`inst`'s GPUs as the Pod numbers them: the device plugin gives the Pod its GPUs as 0..n-1."""
        return ",".join(str(self.gpus.index(g)) for g in inst.gpus)


def gpu_pods(cfg: Config) -> list[GpuPod]:
    """The launched engines grouped into Pods: engines on one node whose GPUs meet, transitively
    (a on GPU 0 and b on GPUs 0,1 and c on GPU 1 are one Pod), in the order of their first member."""
    order = {inst.name: n for n, inst in enumerate(cfg.launched)}
    groups: list[list[Instance]] = []
    for inst in cfg.launched:
        meeting = [g for g in groups if g[0].node == inst.node and any(set(m.gpus) & set(inst.gpus) for m in g)]
        merged = [m for g in meeting for m in g] + [inst]
        groups = [g for g in groups if not any(g is x for x in meeting)]
        groups.append(sorted(merged, key=lambda i: order[i.name]))
    groups.sort(key=lambda g: order[g[0].name])
    return [GpuPod(tuple(g), tuple(dict.fromkeys(gpu for m in g for gpu in m.gpus))) for g in groups]
