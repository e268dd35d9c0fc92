"""The YAML file -> a frozen, typed `Config` (the one parser every part reads through)."""
from router.config.load import (
    Config,
    ConfigError,
    ENV_NAME,
    INSTANCE_KEYS,
    Instance,
    LOG_LEVELS,
    RESERVED_NAMES,
    ROUTER_KEYS,
    RouterSettings,
    SAFE_NAME,
    SECRET_ENV,
    SLEEP_KEYS,
    SleepSettings,
    TOP_KEYS,
    WILDCARD_HOSTS,
    YAML_QUOTED,
    connect_host,
    env_value,
    load_config,
    loopback_ip,
    one_line,
    parse_config,
    summary_table,
    yaml_problem,
)

__all__ = ['Config', 'ConfigError', 'ENV_NAME', 'INSTANCE_KEYS', 'Instance', 'LOG_LEVELS', 'RESERVED_NAMES', 'ROUTER_KEYS', 'RouterSettings', 'SAFE_NAME', 'SECRET_ENV', 'SLEEP_KEYS', 'SleepSettings', 'TOP_KEYS', 'WILDCARD_HOSTS', 'YAML_QUOTED', 'connect_host', 'env_value', 'load_config', 'loopback_ip', 'one_line', 'parse_config', 'summary_table', 'yaml_problem']
