"""Building annotators from their YAML mappings, and what the loop and ``compare`` ask of a
mapping before building it: its cost per label, the mode a method needs, a one-line description,
whether two mappings are one annotator. Every kind is looked up in ``ANNOTATORS``, which the
package's ``__init__`` fills by importing the built-in kinds (before anything here is called)."""

from __future__ import annotations

from daralign.annotators.base import ANNOTATORS, Annotator
from daralign.core.errors import ConfigError


def build_annotator(cfg: dict | str) -> Annotator:
    """Build from a mapping (or a path to a YAML file holding one)."""
    if isinstance(cfg, str):
        from daralign.core.parsing import read_yaml

        cfg = read_yaml(cfg)
    if not isinstance(cfg, dict) or "type" not in cfg:
        raise ConfigError(f"annotator: needs a mapping with a 'type' (one of {sorted(ANNOTATORS)}), got {cfg!r}")
    if cfg["type"] not in ANNOTATORS:
        raise ConfigError(f"annotator.type: unknown {cfg['type']!r}; choose one of {sorted(ANNOTATORS)}")
    return ANNOTATORS[cfg["type"]].from_config(cfg)


def requests_per_label(cfg: dict, kind: str) -> int:
    """Requests one label of ``kind`` (score | compare) costs with this annotator config when
    nothing is invalid or cached: the one cost model of the loop's budget and of ``compare``."""
    if cfg.get("type") not in ANNOTATORS:
        raise ConfigError(f"annotator.type: unknown {cfg.get('type')!r}; choose one of {sorted(ANNOTATORS)}")
    return ANNOTATORS[cfg["type"]].cost_per_label(cfg, kind)


def annotator_for(annotator: dict, feedback_kind: str, algorithm: str, needs_score: bool) -> dict:
    """The annotator config a run of ``algorithm`` gets (its class's ``for_method``): a judge in the
    mode the method needs, anything else as it is, checked to implement what the method asks."""
    if not isinstance(annotator, dict):
        raise ConfigError(f"{algorithm}: the annotator must be a mapping (or a path to a YAML file of one), got {annotator!r}")
    kind = "compare" if feedback_kind == "compare" else "score"
    cls = ANNOTATORS.get(annotator.get("type"))
    return annotator if cls is None else cls.for_method(annotator, kind, needs_score, algorithm)


def describe_annotator(cfg: dict) -> str:
    """One line naming an annotator config, for reports: its class's ``describe``."""
    return ANNOTATORS.get(cfg.get("type"), Annotator).describe(cfg)


def same_annotator(a: dict | None, b: dict | None) -> bool:
    """Whether two annotator configs are one annotator (a judge asked in another mode is the same judge)."""
    if a is None or b is None:
        return False
    ignore = {"mode", "debias", "cache"}
    return {k: v for k, v in a.items() if k not in ignore} == {k: v for k, v in b.items() if k not in ignore}
