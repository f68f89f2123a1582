"""Objectives registry. A new algorithm is one file here with ``@register_objective("name")``
plus its import below (docs/architecture.md); the CLI's algorithm list comes from the registry."""

from daralign.core.errors import ConfigError
from daralign.objectives.base import OBJECTIVES, Objective, register_objective
from daralign.objectives import bon_sft, dar, grpo, offline_dpo, online_dpo, ppo, rloo  # noqa: F401  (register)


def get_objective(name: str) -> type[Objective]:
    if name not in OBJECTIVES:
        raise ConfigError(f"algorithm: unknown {name!r}; choose one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


__all__ = ["OBJECTIVES", "Objective", "register_objective", "get_objective"]
