"""Per-engine knowledge: one module per engine kind, and the registry of them."""
from router.engines.spec import (ENGINE_ALIASES, ENGINES, SIM_MODULE, Call, EngineSpec, flag_values,
                                 last_flag_value, sim_argv, split_args)

__all__ = ["ENGINE_ALIASES", "ENGINES", "SIM_MODULE", "Call", "EngineSpec", "flag_values", "last_flag_value",
           "sim_argv", "split_args"]
