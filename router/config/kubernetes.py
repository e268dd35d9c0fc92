"""The ``kubernetes`` block: where `render --target kubernetes` puts the stack, which images run
it, and the Lease the router replicas elect their leader by."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from router.config.kinds import POSITIVE, Flag, Text
from router.config.problems import Reading
from router.config.schema import Kind, setting
from router.engines import ENGINES

#: A Kubernetes namespace name (an RFC 1123 label).
NAMESPACE = Text("a Kubernetes namespace name", r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?",
                 "{value!r} is not a Kubernetes namespace name: use lower-case letters, digits and '-' (at most 63, e.g. kvrouter)")
#: A Lease name (an RFC 1123 subdomain).
OBJECT_NAME = Text("a Kubernetes object name", r"(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*",
                   "{value!r} is not a Kubernetes object name: use lower-case letters, digits and '-' (e.g. kvrouter-leader)")
IMAGE = Text("a container image reference", r"\S+", "{value!r} is not a container image reference (e.g. registry/name:tag)")


@dataclass(frozen=True)
class Images(Kind[tuple[tuple[str, str], ...]]):
    """Engine kind -> container image."""

    @property
    def label(self) -> str:
        return f"mapping of engine kind ({', '.join(f'`{e}`' for e in ENGINES)}) to image"

    def read(self, value: object, where: str, reading: Reading) -> Optional[tuple[tuple[str, str], ...]]:
        if not isinstance(value, dict):
            reading.error(where, "must map engine kinds to images, e.g. {vllm: vllm/vllm-openai:v0.11.0}")
            return None
        out = []
        for kind, image in value.items():
            if kind not in ENGINES:
                reading.error(f"{where}.{kind}", f"not an engine kind; use one of: {', '.join(ENGINES)}")
            got = IMAGE.read(image, f"{where}.{kind}", reading)
            if kind in ENGINES and got is not None:
                out.append((str(kind), got))
        return tuple(out)


@dataclass(frozen=True)
class KubernetesSettings:
    """Where `render --target kubernetes` puts the stack and which images run it (top-level ``kubernetes``);
    the renderer has defaults for every image not named here."""

    namespace: str = setting(NAMESPACE, "kvrouter", "the namespace of every object rendered")
    images: tuple[tuple[str, str], ...] = setting(Images(), (), (
        "the image of each engine kind: `vllm` (default `vllm/vllm-openai:latest`), `sglang` (default "
        "`lmsysorg/sglang:latest`), `openai` (required when an `openai` instance is launched)"), shown="see meaning")
    router_image: Optional[str] = setting(IMAGE, None, "the router's image, one with this package installed",
                                          shown="`kvrouter:latest`")
    leader_election: bool = setting(Flag(), False, "elect one leading router replica through a Lease",
                                    shown="`true` when `router.replicas` > 1")
    lease_name: str = setting(OBJECT_NAME, "kvrouter-leader", "the Lease")
    lease_namespace: Optional[str] = setting(NAMESPACE, None, "its namespace (the Role is made there)",
                                             shown="`kubernetes.namespace`")
    lease_seconds: float = setting(POSITIVE, 15.0, "a leader not renewed this long is replaced")
    renew_deadline_seconds: float = setting(POSITIVE, 10.0, (
        "a leader that could not renew for this long stops leading; must be less than `lease_seconds`"),
        shown="`lease_seconds` × 2/3")
    retry_period_seconds: float = setting(POSITIVE, 2.0, (
        "how often the leader renews and the others try; must be less than `renew_deadline_seconds`"),
        shown="`lease_seconds` × 2/15")

    @property
    def lease_ns(self) -> str:
        return self.lease_namespace or self.namespace


def settle_lease(k8s: KubernetesSettings, block: object, replicas: int, reading: Reading) -> KubernetesSettings:
    """`k8s` with the defaults that follow other keys, after checking the durations' order: leader
    election is on with more than one router replica, and unset durations keep client-go's
    proportions to the lease (15 s: 10 s and 2 s)."""
    given = {k for k in (block if isinstance(block, dict) else {}) if not reading.failed(f"kubernetes.{k}")}
    lease = k8s.lease_seconds
    renew = k8s.renew_deadline_seconds if "renew_deadline_seconds" in given else lease * 2 / 3
    retry = k8s.retry_period_seconds if "retry_period_seconds" in given else lease * 2 / 15
    if renew >= lease:
        reading.error("kubernetes.renew_deadline_seconds", f"{renew:g} must be less than lease_seconds ({lease:g}): a "
                                                           "leader must stop leading before another may take the Lease; "
                                                           f"lower it (e.g. {lease * 2 / 3:.3g}) or raise lease_seconds")
    elif retry >= renew:
        reading.error("kubernetes.retry_period_seconds", f"{retry:g} must be less than renew_deadline_seconds ({renew:g}), "
                                                         "or the leader could not renew in time; lower it "
                                                         f"(e.g. {renew / 5:.3g})")
    election = k8s.leader_election if "leader_election" in given else replicas > 1
    return replace(k8s, leader_election=election, renew_deadline_seconds=renew, retry_period_seconds=retry)
