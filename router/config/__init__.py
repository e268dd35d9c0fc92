"""The YAML file -> a frozen, typed `Config` (the one parser every part reads through).

Each key is declared once, in the module of its block (router, sleep, residency,
kubernetes, instances, top); `python -m router.config.reference` prints the
reference generated from those declarations.
"""
from router.config.instance import RESERVED_NAMES, SAFE_NAME, Instance, connect_host, loopback_ip
from router.config.instances import INSTANCE_KEYS
from router.config.load import load_config, parse_config
from router.config.problems import ConfigError
from router.config.residency import Group, ResidencySettings
from router.config.router import RouterSettings
from router.config.sleep import SleepSettings
from router.config.top import TOP_KEYS, Config, summary_table

__all__ = [
    "Config",
    "ConfigError",
    "Group",
    "INSTANCE_KEYS",
    "Instance",
    "RESERVED_NAMES",
    "ResidencySettings",
    "RouterSettings",
    "SAFE_NAME",
    "SleepSettings",
    "TOP_KEYS",
    "connect_host",
    "load_config",
    "loopback_ip",
    "parse_config",
    "summary_table",
]
