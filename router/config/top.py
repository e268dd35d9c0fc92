"""The file's top level: `Config`, its own keys, and the blocks it holds (each declared in its module)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Optional

from router.config.instance import Instance
from router.config.instances import Instances
from router.config.kinds import ENV_NAME, NON_NEGATIVE, Choice, Text, env_value
from router.config.kubernetes import KubernetesSettings
from router.config.problems import Reading
from router.config.residency import ResidencySettings
from router.config.router import RouterSettings
from router.config.schema import REQUIRED, Kind, Section, keys_of, setting
from router.config.sleep import SleepSettings

#: tmux session name prefixes: tmux itself turns '.' into '_' in session names.
#: How engines that share a GPU take turns at their first start.
LAUNCH_ORDERS = ("delay", "healthy")

TMUX_PREFIX = Text("1 to 40 letters, digits, `-`, `_`, `.`", r"[A-Za-z0-9._-]{1,40}",
                   "{value!r} is not a usable tmux session prefix: use 1 to 40 letters, digits, '-', '_' or '.' (e.g. 'kvcached-')")


@dataclass(frozen=True)
class KvcachedEnv(Kind[tuple[tuple[str, str], ...]]):
    """The ``kvcached`` block: each key, upper-cased, becomes an environment variable of every engine."""

    @property
    def label(self) -> str:
        return "mapping of kvcached settings"

    def read(self, value: object, where: str, reading: Reading) -> Optional[tuple[tuple[str, str], ...]]:
        if value is None:
            return ()
        if not isinstance(value, dict):
            reading.error(where, "must be a mapping of kvcached settings, e.g. 'kvcached_gpu_utilization: 0.95'")
            return None
        out = []
        for key, v in value.items():
            name = str(key).upper()
            if not ENV_NAME.match(name):
                reading.error(f"{where}.{key}", "not a valid environment variable name (letters, digits, '_')")
            elif isinstance(v, (dict, list)) or v is None:
                reading.error(f"{where}.{key}", "must be a single value (number, true/false or text)")
            else:
                out.append((name, env_value(v)))
        return tuple(out)


@dataclass(frozen=True, kw_only=True)
class Config:
    path: str
    kvcached_env: tuple[tuple[str, str], ...] = setting(KvcachedEnv(), (), (
        "kvcached's settings for every engine: each key, upper-cased, becomes an environment variable "
        "(`kvcached_gpu_utilization: 0.95` -> `KVCACHED_GPU_UTILIZATION=0.95`; YAML booleans become `true`/`false`)"),
        key="kvcached", shown="none")
    router: RouterSettings = setting(Section(RouterSettings), RouterSettings(), "the router's address and behaviour",
                                     shown="see below")
    sleep: SleepSettings = setting(Section(SleepSettings), SleepSettings(), (
        "automatic sleep of idle models (see \"Sleep and wake\")"), key="sleep_manager", shown="see below")
    residency: ResidencySettings = setting(Section(ResidencySettings), ResidencySettings(), (
        "memory budgets and groups that decide which models are awake, asleep or stopped (see \"Residency\")"),
        shown="see below")
    launch_delay_seconds: float = setting(NON_NEGATIVE, 0.0, (
        "launched engine number *i* (in file order, counting from 0; `launch: false` instances do not count) waits *i* x "
        "this many seconds before it starts, so engines do not load weights and allocate GPU memory at the same moment. "
        "Under supervisord the wait is on an engine's first start only: a restart after a crash (or `supervisorctl "
        "restart`, or an `--apply` restart) starts at once; starting supervisord again or `supervisorctl reload` counts "
        "as a first start. `tmux-launch.sh` waits every time. Used when `launch_order` is `delay`"))
    launch_order_given: Optional[str] = setting(Choice(LAUNCH_ORDERS), None, (
        "how engines take turns at their first start. `healthy`: engines that share a GPU (the same "
        "`CUDA_VISIBLE_DEVICES` device, or none given) start one after another, each once the one before it on that GPU "
        "passes its health check, fails, or is past its `start_timeout_seconds`; engines on different GPUs start "
        "together. `delay`: by `launch_delay_seconds`. Either way only a first start in supervisord's first minute waits: "
        "restarts, and engines that `--apply` adds to a stack running longer, start at once"),
        key="launch_order", shown="`delay` when `launch_delay_seconds` is above 0, else `healthy`")
    #: Start of every tmux session name the renderer makes (`<prefix><name>`).
    tmux_session_prefix: str = setting(TMUX_PREFIX, "kvcached-", (
        "start of every tmux session name: `<prefix><name>` per engine, `<prefix>frontend` for the router (tmux shows "
        "`.` as `_`); see \"Several stacks on one machine\""))
    instances: tuple[Instance, ...] = setting(Instances(), REQUIRED, "the engines, a non-empty list (below)")
    kubernetes: KubernetesSettings = setting(Section(KubernetesSettings), KubernetesSettings(), (
        "where `render --target kubernetes` puts the stack, which images run it, and the router replicas' leader "
        "election (see \"More than one node\")"), shown="see below")
    warnings: tuple[str, ...] = ()
    #: What each instance's `dns_name` resolved to last (name -> addresses), set by the router at run
    #: time (`with_addresses`); not from the YAML.
    resolved: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def models(self) -> dict[str, tuple[Instance, ...]]:
        """Model -> its replicas, in config order. An instance with a `dns_name` is one replica per
        address the name resolved to (named ``<instance>@<address>``), or, until it resolves to
        any, the name itself."""
        addresses = dict(self.resolved)
        out: dict[str, list[Instance]] = {}
        for inst in self.instances:
            found = addresses.get(inst.dns_name) if inst.dns_name else None
            if found:
                out.setdefault(inst.model, []).extend(replace(inst, name=f"{inst.name}@{a}", host=a) for a in found)
            else:
                out.setdefault(inst.model, []).append(inst)
        return {m: tuple(v) for m, v in out.items()}

    def with_addresses(self, addresses: Mapping[str, tuple[str, ...]]) -> "Config":
        """This config with `dns_name` -> addresses as resolved (each address list sorted, so the
        same answer in another order is the same config)."""
        return replace(self, resolved=tuple(sorted((n, tuple(sorted(set(a)))) for n, a in addresses.items())))

    @property
    def routes(self) -> dict[str, str]:
        """Every routable name (model, alias, LoRA adapter, served name) -> its model (an adapter's is its base)."""
        out: dict[str, str] = {}
        for inst in self.instances:  # names the config gives win over engine-served ones
            for n in (inst.model, *inst.aliases):
                out.setdefault(n, inst.model)
        for inst in self.instances:
            for adapter in inst.lora_adapters:
                out.setdefault(adapter.name, inst.model)
        for inst in self.instances:
            for n in inst.served_names:
                out.setdefault(n, inst.model)
        return out

    @property
    def launch_order(self) -> str:
        """`launch_order` as given, else `delay` where a launch delay is set (kvcached's files) and `healthy` otherwise."""
        if self.launch_order_given:
            return self.launch_order_given
        return "delay" if self.launch_delay_seconds > 0 else "healthy"

    @property
    def launched(self) -> tuple[Instance, ...]:
        return tuple(i for i in self.instances if i.launch)


#: The file's top-level keys.
TOP_KEYS = tuple(k.name for k in keys_of(Config))


def summary_table(cfg: Config) -> str:
    """The instance table printed by ``render --check``."""
    rows = [("NAME", "MODEL", "ENGINE", "HOST:PORT", "VENV", "LAUNCH")]
    for inst in cfg.instances:
        rows.append((inst.name, inst.model, inst.engine, f"{inst.host}:{inst.port}", inst.venv_path or "-", "yes" if inst.launch else "no (external)"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)
