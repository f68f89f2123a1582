"""Annotators: turn (prompt, response) into a scalar score, or two responses into a preference.

``build_annotator(cfg)`` builds one from a YAML mapping; ``cfg["type"]`` picks the kind:
``judge`` (LLM judge, see judge.py), ``reward_model`` (sequence classifier), ``function``
(a Python callable) or ``combined`` (weighted sum of several sources).
"""

from __future__ import annotations

from daralign.annotators.base import ANNOTATORS, Annotator, CompareResult, ScoreResult, register_annotator
from daralign.errors import ConfigError
from daralign.annotators import functions, reward_model  # noqa: F401  (register)

try:  # the LLM judge (its own module, optional extras inside)
    from daralign.annotators import judge  # noqa: F401
except ModuleNotFoundError as e:
    if e.name != "daralign.annotators.judge":
        raise


def build_annotator(cfg: dict | str) -> Annotator:
    """Build from a mapping (or a path to a YAML file holding one)."""
    if isinstance(cfg, str):
        from daralign.config import read_yaml

        cfg = read_yaml(cfg)
    if not isinstance(cfg, dict) or "type" not in cfg:
        raise ConfigError(f"annotator: needs a mapping with a 'type' (one of {sorted(ANNOTATORS)}), got {cfg!r}")
    if cfg["type"] not in ANNOTATORS:
        raise ConfigError(f"annotator.type: unknown {cfg['type']!r}; choose one of {sorted(ANNOTATORS)}")
    return ANNOTATORS[cfg["type"]](cfg)


__all__ = ["Annotator", "ScoreResult", "CompareResult", "build_annotator", "register_annotator"]
