"""What a reload changes: two Configs compared, for the router's reload answer and ``render --apply``."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Mapping

from router.config.instance import Instance
from router.config.router import RouterSettings
from router.config.sleep import SleepSettings
from router.config.top import Config

#: Router settings a running router cannot take without a restart.
RESTART_SETTINGS = ("host", "port", "enable_router", "workers", "log_format")
#: Settings never shown, only whether they changed.
SECRET_SETTINGS = ("api_keys", "admin_api_key")


@dataclass(frozen=True)
class ConfigChange:
    """Names of what differs between two configs (empty lists when nothing does)."""

    models_added: list[str]
    models_removed: list[str]
    models_changed: list[str]
    replicas_added: list[str]
    replicas_removed: list[str]
    replicas_changed: list[str]
    aliases_added: list[str]
    aliases_removed: list[str]
    router_settings: list[str]
    sleep_settings: list[str]
    needs_restart: list[str]

    @property
    def changed(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))

    def report(self) -> dict[str, object]:
        """The JSON body of a reload's answer."""
        return {
            "changed": self.changed,
            "models": {"added": self.models_added, "removed": self.models_removed, "changed": self.models_changed},
            "replicas": {"added": self.replicas_added, "removed": self.replicas_removed,
                         "changed": self.replicas_changed},
            "aliases": {"added": self.aliases_added, "removed": self.aliases_removed},
            "router_settings": self.router_settings,
            "sleep_settings": self.sleep_settings,
            "needs_restart": self.needs_restart,
        }


def _by_name(instances: tuple[Instance, ...]) -> Mapping[str, Instance]:
    return {i.name: i for i in instances}


def _changed_fields(old: RouterSettings | SleepSettings, new: RouterSettings | SleepSettings) -> list[str]:
    return [f.name for f in fields(old) if getattr(old, f.name) != getattr(new, f.name)]


def diff(old: Config, new: Config) -> ConfigChange:
    old_models, new_models = old.models, new.models
    old_inst, new_inst = _by_name(old.instances), _by_name(new.instances)
    replicas_changed = sorted(n for n in old_inst.keys() & new_inst.keys() if old_inst[n] != new_inst[n])
    models_changed = sorted(m for m in old_models.keys() & new_models.keys() if old_models[m] != new_models[m])
    old_aliases = [n for n in old.routes if n not in old_models]
    new_aliases = [n for n in new.routes if n not in new_models]
    router_settings = _changed_fields(old.router, new.router)
    return ConfigChange(
        models_added=[m for m in new_models if m not in old_models],
        models_removed=[m for m in old_models if m not in new_models],
        models_changed=models_changed,
        replicas_added=[n for n in new_inst if n not in old_inst],
        replicas_removed=[n for n in old_inst if n not in new_inst],
        replicas_changed=replicas_changed,
        aliases_added=[n for n in new_aliases if n not in old_aliases],
        aliases_removed=[n for n in old_aliases if n not in new_aliases],
        router_settings=router_settings,
        sleep_settings=_changed_fields(old.sleep, new.sleep),
        needs_restart=[s for s in router_settings if s in RESTART_SETTINGS],
    )
