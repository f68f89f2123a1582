"""Objectives registry. A new algorithm is one file here with ``@register_objective("name")``
plus its import below (docs/architecture.md); the CLI's algorithm list comes from the registry."""

from daralign.core.errors import ConfigError
from daralign.objectives.base import OBJECTIVES, Objective, candidate_pairs, register_objective
from daralign.objectives import bon_sft, dar, grpo, offline_dpo, online_dpo, ppo, rloo  # noqa: F401  (register)


def get_objective(name: str) -> type[Objective]:
    if name not in OBJECTIVES:
        raise ConfigError(f"algorithm: unknown {name!r}; choose one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


def method_in_role(role: str) -> str | None:
    """The registered method whose class plays ``role`` in compare ("subject" | "reference",
    ``Objective.compare_role``), or None when none does."""
    # declared on the class itself: a variant subclassing DAR or OAIF-DPO does not inherit their part
    names = [name for name, cls in OBJECTIVES.items() if vars(cls).get("compare_role") == role]
    if len(names) > 1:
        raise ConfigError(f"compare_role {role!r} is claimed by {names}; at most one method may play it")
    return names[0] if names else None


__all__ = ["OBJECTIVES", "Objective", "candidate_pairs", "register_objective", "get_objective", "method_in_role"]
