"""Checks across the instances and blocks of a config: clashes are errors, risky combinations warnings.

They run on what could be read even when some of it could not, so one run of
``render --check`` shows every problem; a check that needs every instance
(`complete`) is skipped when one could not be read.
"""
from __future__ import annotations

from router.config.instance import WILDCARD_HOSTS, Instance, connect_host, loopback_ip
from router.config.keys import check_scopes
from router.config.per_model import check_per_model
from router.config.problems import Reading
from router.config.top import Config
from router.config.venvs import check_venvs
from router.engines import has_flag, last_flag_value


def check(cfg: Config, reading: Reading, complete: bool = True) -> None:
    """Checks across instances: clashes are errors, risky combinations warnings."""
    names: dict[str, int] = {}
    #: (address dialled, port, bound to a wildcard, launched here) -> instance name
    binds: dict[tuple[str, int, bool, bool], str] = {}
    route_owner: dict[str, str] = {}
    # A router address that could not be read is the default one, which no engine need avoid.
    router_unknown = reading.failed("router.router_port") or reading.failed("router.router_host")
    for inst in cfg.instances:
        i, where = inst.position, f"instances[{inst.position}]"
        if inst.name in names:
            reading.error(f"{where}.name", f"duplicate instance name {inst.name!r} (also instances[{names[inst.name]}]); give each instance its own 'name'")
        names.setdefault(inst.name, i)
        host = connect_host(inst.host)
        wild = inst.host in WILDCARD_HOSTS
        for (h, port, other_wild, other_launch), other in binds.items():
            # A wildcard bind takes the port on every local address, but only
            # clashes with another engine on this machine, i.e. one launched here.
            if port == inst.port and (h == host or (inst.launch and other_launch and (wild or other_wild))):
                field, flag = _port_source(inst)
                reading.error(f"{where}.{field}", f"{inst.host}:{inst.port} is already used by instance {other!r}; give each instance its own {flag}")
                break
        binds[(host, inst.port, wild, inst.launch)] = inst.name
        if cfg.router.enable_router and not router_unknown and inst.port == cfg.router.port and (
                host in ("127.0.0.1", connect_host(cfg.router.host))
                or (inst.launch and (wild or cfg.router.host in WILDCARD_HOSTS))):
            field, flag = _port_source(inst)
            reading.error(f"{where}.{field}", f"{flag} {inst.port} is the router's port (router.router_port); pick another")
        for n in (inst.model, *inst.aliases):
            owner = route_owner.setdefault(n, inst.model)
            if owner != inst.model:  # the alias is this instance's, or the earlier one's when n is this model
                key = "model" if n == inst.model else "aliases"
                reading.error(f"{where}.{key}", f"model name {n!r} would route to both {owner!r} and {inst.model!r}; rename the alias")
    routes = cfg.routes
    aliases: dict[str, tuple[str, ...]] = {}
    for inst in cfg.instances:
        aliases[inst.model] = (*aliases.get(inst.model, (inst.model,)), *inst.aliases)
        aliases.update((a.name, (a.name,)) for a in inst.lora_adapters)  # an adapter is a model to clients
    check_scopes(cfg.router.api_keys, aliases, reading)
    adapter_owner: dict[str, str] = {}
    for inst in cfg.instances:
        where = f"instances[{inst.position}]"
        for n in inst.served_names:
            if routes[n] != inst.model:
                reading.warn(f"{where}.engine_args", f"--served-model-name {n!r} is also a name of model {routes[n]!r}, "
                       f"so requests for {n!r} go there; reach this instance as {inst.model!r}")
        if cfg.sleep.auto_sleep_enabled and inst.sleep and not inst.spec.has_sleep_api:
            reading.warn(where, f"auto sleep is on but engine '{inst.engine}' has no sleep API, so model {inst.model!r} "
                          "is never put to sleep; set 'sleep: false' to say so")
        elif cfg.sleep.auto_sleep_enabled and inst.sleep:
            missing = inst.spec.sleep_api_missing(inst.engine_args, dict(inst.env))
            if missing:
                reading.warn(where, f"auto sleep is on but this {inst.engine} engine lacks what its sleep API needs: "
                              f"{', '.join(missing)}; add them or set 'sleep: false'")
        if inst.sleep:
            _tier_check(inst, reading)
        _adapter_checks(inst, route_owner, adapter_owner, reading)
    _residency_checks(cfg, reading, complete)
    check_per_model(cfg, reading, complete)
    router = cfg.router
    if router.default_model is not None and router.default_model not in routes and complete:
        reading.error("router.default_model", f"{router.default_model!r} is not a model, alias or served name of any "
                                        f"instance; use one of: {', '.join(routes)}")
    if router.enable_router and not router.api_keys and not (router.host == "localhost" or loopback_ip(router.host)):
        reading.warn("router.router_host", f"{router.host} lets other machines reach the router and router.api_keys is not "
                                     "set, so anyone who can connect may use every model; set api_keys")
    _gpu_checks(cfg, reading)
    check_venvs(cfg.instances, reading)


def _adapter_checks(inst: Instance, route_owner: dict[str, str], adapter_owner: dict[str, str], reading: Reading) -> None:
    """An adapter name is a model name of its own (of one base model), and the engine must be started
    with its adapter support to load any."""
    lora = inst.spec.lora
    where = f"instances[{inst.position}]"
    for adapter in inst.lora_adapters:
        owner = route_owner.get(adapter.name)
        base = adapter_owner.setdefault(adapter.name, inst.model)
        if owner is not None or base != inst.model:
            reading.error(f"{where}.lora_adapters", f"adapter name {adapter.name!r} is already a name of model "
                                                    f"{owner or base!r}; rename the adapter")
    if lora is not None and inst.lora_adapters and not has_flag(inst.engine_args, lora.enable_flag) \
            and not (lora.static_enables and has_flag(inst.engine_args, lora.static_flag)):
        reading.warn(f"{where}.engine_args", f"lora_adapters is set but the engine is not started with {lora.enable_flag}, "
                                             f"so it cannot load them; add {lora.enable_flag}"
                                             f"{f' (and {lora.max_flag} N to hold N at once)' if lora.max_default == 1 else ''}")


def _tier_check(inst: Instance, reading: Reading) -> None:
    """A sleep at the instance's level must leave answers right: the flags its tier needs are given."""
    spec = inst.spec
    missing = spec.tier_missing(inst.sleep_level, inst.engine_args)
    if not missing:
        return
    others = [level for level in spec.tiers if level != inst.sleep_level and not spec.tier_missing(level, inst.engine_args)]
    flags = ", ".join(missing)
    why = "; ".join(missing.values())
    instead = "".join(f", or set 'sleep_level: {level}'" for level in others)
    reading.error(f"instances[{inst.position}].sleep_level", f"sleep level {inst.sleep_level} of this {inst.engine} engine "
                  f"needs {flags} in {spec.args_key} ({why}); add {flags}{instead}, or set 'sleep: false'")


def _port_source(inst: Instance) -> tuple[str, str]:
    """The field that gave `inst` its port and how it is spelt there, for messages."""
    spec = inst.spec
    if spec.launcher is None and last_flag_value(inst.engine_args, spec.port_flag) is None:
        return "port", "port:"
    return spec.args_key, spec.port_flag


def _residency_checks(cfg: Config, reading: Reading, complete: bool) -> None:
    """Groups name real instances once; budgets need every budgeted engine's size."""
    names = {i.name for i in cfg.instances}
    grouped: dict[str, str] = {}
    for gi, group in enumerate(cfg.residency.groups):
        for member in group.members:
            if member not in names and complete:
                reading.error(f"residency.groups[{gi}].members", f"{member!r} is not an instance name; use one of: "
                                                          f"{', '.join(sorted(names))}")
            elif member in grouped and member in names:
                reading.error(f"residency.groups[{gi}].members", f"instance {member!r} is already in group "
                                                          f"{grouped[member]!r}; an instance may be in one group")
            grouped.setdefault(member, group.name)
    r = cfg.residency
    for inst in cfg.instances:
        where = f"instances[{inst.position}]"
        if r.gpu_memory_gb is not None and inst.gpu_memory_gb is None and inst.launch:
            flag = inst.spec.gpu_fraction_flag
            also = f", or give the engine's {flag} and it is that share of the budget" if flag else ""
            reading.error(f"{where}.gpu_memory_gb", "missing: residency.gpu_memory_gb sets a GPU budget, so every launched "
                                              f"instance must say what it holds while awake (e.g. gpu_memory_gb: 20{also})")
        if r.host_memory_gb is not None and inst.host_memory_gb is None and inst.launch and inst.sleep \
                and inst.spec.has_sleep_api and inst.sleep_level == 1:
            reading.error(f"{where}.host_memory_gb", "missing: residency.host_memory_gb sets a host budget, so every "
                                               "sleepable instance must say what its weights hold while asleep")
        for gpu in inst.gpus:
            budget = r.gpu_budget(gpu)
            if budget is not None and inst.gpu_memory_gb is not None and inst.gpu_memory_gb > budget:
                reading.error(f"{where}.gpu_memory_gb", f"{inst.gpu_memory_gb:g} GB is more than GPU {gpu}'s whole "
                                                  f"budget of {budget:g} GB (residency.gpu_memory_gb)")


def _gpu_checks(cfg: Config, reading: Reading) -> None:
    groups: dict[str, list[tuple[int, Instance, float]]] = {}
    forms: dict[str, list[int]] = {}
    for inst in cfg.instances:
        i = inst.position
        if not inst.launch:
            continue  # on another machine, or sharing GPUs we do not see
        env = dict(inst.env)
        devices = env.get("CUDA_VISIBLE_DEVICES", "")
        if devices:
            form = "uuid" if "GPU-" in devices or "MIG-" in devices else "index"
            forms.setdefault(form, []).append(i)
        spec = inst.spec
        if spec.gpu_fraction_flag is None:
            continue  # the engine's memory use is its own business
        text = last_flag_value(inst.engine_args, spec.gpu_fraction_flag)
        try:
            frac = float(text) if text is not None else spec.gpu_fraction_default
        except ValueError:
            reading.warn(f"instances[{i}].engine_args", f"{spec.gpu_fraction_flag} {text!r} is not a number")
            frac = None
        if frac is None or inst.kvcached:
            continue
        for dev in (devices.split(",") if devices else ["default"]):
            groups.setdefault(dev.strip(), []).append((i, inst, frac))
    for dev, members in groups.items():
        total = sum(f for _, _, f in members)
        if len(members) > 1 and total > 1.0 + 1e-9:
            who = ", ".join(f"{inst.name} ({f:g})" for _, inst, f in members)
            reading.warn("instances", f"GPU memory fractions on GPU {dev} add up to {total:g} > 1.0 without kvcached: {who}; "
                                "lower them or enable kvcached (ENABLE_KVCACHED=true)")
    if len(forms) > 1:
        reading.warn("instances", "CUDA_VISIBLE_DEVICES is given as indexes for some instances and as UUIDs for others; "
                                  "use one form so GPU sharing can be checked")
