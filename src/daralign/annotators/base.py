"""The annotator interface: a scalar score per response, or a preference between two.

Annotators never see policy tensors: they get text (the raw prompt — a string or a list of chat
messages — and the completion text) plus the dataset row, so extra columns (e.g. `reference`)
reach reward functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar


@dataclass
class ScoreResult:
    """One score per (prompt, completion). ``None`` marks an invalid label (counted, never
    silently turned into a number); NaN/inf are rejected before they reach training."""

    scores: list[float | None]
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class CompareResult:
    """P(completion_a is better than completion_b) per pair; ``None`` marks an invalid label."""

    prob_a: list[float | None]
    metrics: dict[str, float] = field(default_factory=dict)


class Annotator:
    """Base class. Subclasses implement ``score`` and/or ``compare``.

    Two counters, both cumulative over the annotator's life:

    - ``num_annotations``: labels produced (one per scored response, one per compared pair).
    - ``num_requests``: what the user pays for, the unit of ``annotation_budget``: every call to a
      judge (both orders = 2, second-digit steps, invalid answers, retries, HTTP attempts), every
      response a reward model scored, every batch item handed to a reward function. Cache hits
      are free and counted apart in ``num_cache_hits``.

    ``request_limit`` (set by the loop from the budget) is a hard cap on ``num_requests``: asks
    beyond it are not sent and come back as invalid labels, so a run never exceeds its budget.
    """

    name: ClassVar[str] = "annotator"

    def __init__(self) -> None:
        self.num_annotations = 0
        self.num_requests = 0
        self.num_cache_hits = 0
        self.request_limit: int | None = None

    def requests_per_label(self, kind: str) -> int:
        """Requests one label costs when nothing is invalid or cached (``kind``: score | compare);
        the loop sizes the last step of a budget with it."""
        return 1

    def affordable(self, n: int) -> int:
        """How many of ``n`` one-request items fit under ``request_limit``."""
        return n if self.request_limit is None else max(0, min(n, self.request_limit - self.num_requests))

    def score(self, prompts: list[Any], completions: list[str], rows: list[dict]) -> ScoreResult:
        raise NotImplementedError(f"annotator {self.name!r} cannot score single responses")

    def compare(
        self, prompts: list[Any], completions_a: list[str], completions_b: list[str], rows: list[dict]
    ) -> CompareResult:
        raise NotImplementedError(f"annotator {self.name!r} cannot compare two responses")

    def close(self) -> None:
        """Release models, servers and files. Safe to call twice."""


ANNOTATORS: dict[str, Callable[[dict], Annotator]] = {}


def register_annotator(name: str):
    """Decorator: ``@register_annotator("judge")`` on a class with ``from_config(cfg: dict)``."""

    def wrap(cls):
        ANNOTATORS[name] = cls.from_config
        cls.name = name
        return cls

    return wrap
