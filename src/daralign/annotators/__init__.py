"""Annotators: turn (prompt, response) into a scalar score, or two responses into a preference.

``build_annotator(cfg)`` builds one from a YAML mapping; ``cfg["type"]`` picks the kind:
``judge`` (LLM judge, see judge.py), ``reward_model`` (sequence classifier), ``function``
(a Python callable), ``combined`` (weighted sum of several sources) or ``ensemble`` (mean, min or
uncertainty-weighted aggregate of several, against over-optimisation: ensemble.py). Building and
the questions asked of a mapping live in build.py; this ``__init__`` registers the built-in kinds
and judge backends by importing their modules (a new one is one more name on these lines).
"""

from __future__ import annotations

from daralign.annotators.base import ANNOTATORS, Annotator, CompareResult, Meter, ScoreResult, register_annotator
from daralign.annotators.build import annotator_for, build_annotator, describe_annotator, requests_per_label, same_annotator
from daralign.annotators import llama_cpp_client, openai_client, transformers_client  # noqa: F401  (register the judge backends; llama_cpp loads only when used)
from daralign.annotators import ensemble, functions, judge, learned, reward_model  # noqa: F401  (register the kinds)

__all__ = ["Annotator", "Meter", "ScoreResult", "CompareResult", "build_annotator", "describe_annotator", "register_annotator",
           "same_annotator", "annotator_for", "requests_per_label"]
