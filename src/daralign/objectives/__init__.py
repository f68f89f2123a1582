"""Objectives registry. A new algorithm is one file here with ``@register_objective("name")``
plus its import below."""

from daralign.errors import ConfigError
from daralign.objectives.base import OBJECTIVES, Objective, register_objective
from daralign.objectives import dar  # noqa: F401  (registers "dar")

# Baselines register themselves on import; missing files are tolerated while they are written.
for _module in ("online_dpo", "rloo", "ppo", "grpo", "bon_sft", "offline_dpo"):
    try:
        __import__(f"daralign.objectives.{_module}")
    except ModuleNotFoundError as e:
        if e.name != f"daralign.objectives.{_module}":
            raise


def get_objective(name: str) -> type[Objective]:
    if name not in OBJECTIVES:
        raise ConfigError(f"algorithm: unknown {name!r}; choose one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


__all__ = ["OBJECTIVES", "Objective", "register_objective", "get_objective"]
