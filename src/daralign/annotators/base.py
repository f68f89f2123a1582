"""The annotator interface and its one meter.

Annotators never see policy tensors: they get text (the raw prompt — a string or a list of chat
messages — and the completion text) plus the dataset row, so extra columns (e.g. `reference`)
reach reward functions.

**The meter.** What a user pays for is annotator *requests*: every call to a judge (both orders
= 2, second-digit steps, invalid answers, HTTP retries), every response a reward model scores,
every batch item handed to a reward function; cache hits are free. Every request is *reserved*
on the annotator's ``Meter`` before it is sent, so a cap can never be passed — not by retries,
not by a composite annotator's members (they share one meter). The meter keeps two accounts:
``train`` (capped by ``annotation_budget``) and ``eval`` (held-out scoring, win rates, best-of-n:
reported as ``eval_annotation_requests``, never capped, never hidden).
"""

from __future__ import annotations

import contextvars
import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from daralign.core.errors import AnnotationError, ConfigError
from daralign.core.registry import registrar

PHASES = ("train", "eval")
# nesting of annotator calls in this thread/context: only the outermost counts labels (a
# combination's members label the same responses)
_CALL_DEPTH = contextvars.ContextVar("daralign_annotator_call_depth", default=0)


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


class Meter:
    """Counts requests, free cache hits and labels per phase, and caps training requests.

    ``reserve(n)`` is called *before* sending: it returns how many of ``n`` requests may go out and
    counts them at once (a reserved request that then fails is still paid for — it reached, or may
    have reached, the backend). Thread-safe: HTTP backends reserve from worker threads."""

    def __init__(self) -> None:
        self.requests = dict.fromkeys(PHASES, 0)
        self.cache_hits = dict.fromkeys(PHASES, 0)
        self.labels = dict.fromkeys(PHASES, 0)
        self.phase = "train"
        self.cap: int | None = None  # training requests allowed in all (None: no cap)
        self._lock = threading.Lock()

    def reserve(self, n: int = 1) -> int:
        with self._lock:
            if self.phase == "train" and self.cap is not None:
                n = max(0, min(n, self.cap - self.requests["train"]))
            self.requests[self.phase] += n
            return n

    def reserve_one(self) -> bool:
        return self.reserve(1) == 1

    def cache_hit(self, n: int = 1) -> None:
        with self._lock:
            self.cache_hits[self.phase] += n

    def allow(self, more: int | None) -> None:
        """Cap training requests at ``more`` beyond those already spent (None: no cap)."""
        self.cap = None if more is None else self.requests["train"] + max(0, more)

    @property
    def exhausted(self) -> bool:
        return self.cap is not None and self.requests["train"] >= self.cap

    @contextmanager
    def evaluation(self):
        """Requests inside are evaluation's: counted apart, not capped by the training budget."""
        saved, self.phase = self.phase, "eval"
        try:
            yield self
        finally:
            self.phase = saved

    def snapshot(self) -> tuple[int, int, int]:
        """(labels, requests, cache hits) of the current phase, for differences."""
        return self.labels[self.phase], self.requests[self.phase], self.cache_hits[self.phase]


class Annotator:
    """Base class. Subclasses implement ``_score`` and/or ``_compare`` on the items they are
    given; the public ``score``/``compare`` here meter them (one request per item, reserved
    first: items past the cap come back as invalid, ``None``), check what came back (one finite
    value per item) and count the labels. Annotators that pay per backend call instead (the
    judge) or whose members pay (ensembles) set ``meters_items = False`` and reserve themselves.
    """

    name: ClassVar[str] = "annotator"
    meters_items: ClassVar[bool] = True  # one request per item, reserved here

    def __init__(self) -> None:
        self.meter = Meter()

    # -- the meter ------------------------------------------------------------------------------
    def members(self) -> list["Annotator"]:
        """Annotators this one asks (they share its meter)."""
        return []

    def use_meter(self, meter: Meter) -> "Annotator":
        """Count this annotator's (and its members') requests on ``meter`` (e.g. a run's)."""
        self.meter = meter
        for m in self.members():
            m.use_meter(meter)
        return self

    @property
    def num_requests(self) -> int:
        return sum(self.meter.requests.values())

    @property
    def num_annotations(self) -> int:
        return sum(self.meter.labels.values())

    @property
    def num_cache_hits(self) -> int:
        return sum(self.meter.cache_hits.values())

    @classmethod
    def cost_per_label(cls, cfg: dict, kind: str) -> int:
        """Requests one label costs when nothing is invalid or cached (``kind``: score | compare),
        from the config alone: the one cost model the loop sizes a budget's last step with and
        ``compare`` plans runs with (``annotators.requests_per_label``)."""
        return 1

    @classmethod
    def describe(cls, cfg: dict) -> str:
        """One line naming an annotator config in reports and model cards: what it is, and which
        model or code (``annotators.describe_annotator``)."""
        return f"{cfg.get('type')} annotator"

    @classmethod
    def for_method(cls, cfg: dict, kind: str, needs_score: bool, algorithm: str) -> dict:
        """The config a run of ``algorithm`` gets, whose training feedback is ``kind`` (score |
        compare) and which also scores held-out answers when ``needs_score``: the config as it is,
        once this class is seen to implement what is asked (a judge overrides it to set its mode)."""
        for method in {kind} | ({"score"} if needs_score else set()):
            if getattr(cls, f"_{method}") is getattr(Annotator, f"_{method}"):
                why = "its training feedback" if method == kind else "the held-out score (eval_dataset)"
                raise ConfigError(f"{algorithm}: annotator type {cfg['type']!r} cannot {method}, which {why} needs; "
                                  f"use a judge (type: judge), which does both")
        return cfg

    @property
    def can_score(self) -> bool:
        return type(self)._score is not Annotator._score

    @property
    def can_compare(self) -> bool:
        return type(self)._compare is not Annotator._compare

    def single_order(self) -> "Annotator":
        """This annotator comparing exactly in the order given (a judge drops its both-orders
        debiasing), for evaluations that swap orders themselves; others already do."""
        return self

    # -- public calls ---------------------------------------------------------------------------
    def score(self, prompts: list[Any], completions: list[str], rows: list[dict] | None = None) -> ScoreResult:
        if not self.can_score:
            raise AnnotationError(f"annotator {self.name!r} cannot score single responses")
        rows = rows if rows is not None else [{} for _ in completions]
        return self._metered(self._score, len(completions), lambda n: (prompts[:n], completions[:n], rows[:n]),
                             lambda r: r.scores, lambda r, v: ScoreResult(v, r.metrics), "scores")

    def compare(self, prompts: list[Any], completions_a: list[str], completions_b: list[str],
                rows: list[dict] | None = None) -> CompareResult:
        if not self.can_compare:
            raise AnnotationError(f"annotator {self.name!r} cannot compare two responses")
        if len(completions_a) != len(completions_b):
            raise AnnotationError(f"annotator {self.name!r}: {len(completions_a)} completions_a but {len(completions_b)} completions_b")
        rows = rows if rows is not None else [{} for _ in completions_a]
        return self._metered(self._compare, len(completions_a),
                             lambda n: (prompts[:n], completions_a[:n], completions_b[:n], rows[:n]),
                             lambda r: r.prob_a, lambda r, v: CompareResult(v, r.metrics), "preferences")

    def _metered(self, call: Callable, n: int, items: Callable, values: Callable, rebuild: Callable, what: str):
        meter = self.meter
        allowed = meter.reserve(n) if self.meters_items else n
        outermost = _CALL_DEPTH.get() == 0
        token = _CALL_DEPTH.set(_CALL_DEPTH.get() + 1)
        try:
            result = call(*items(allowed)) if allowed else None
        finally:
            _CALL_DEPTH.reset(token)
        got = checked_values(values(result) if result is not None else [], allowed, f"annotator {self.name!r}", what)
        got += [None] * (n - allowed)  # past the cap: not asked, invalid
        if outermost:
            with meter._lock:
                meter.labels[meter.phase] += sum(v is not None for v in got)
        return rebuild(result, got) if result is not None else rebuild(_EMPTY[what], got)

    # -- what subclasses implement ----------------------------------------------------------------
    def _score(self, prompts: list[Any], completions: list[str], rows: list[dict]) -> ScoreResult:
        raise NotImplementedError

    def _compare(self, prompts: list[Any], completions_a: list[str], completions_b: list[str],
                 rows: list[dict]) -> CompareResult:
        raise NotImplementedError

    def close(self) -> None:
        """Release models, servers and files. Safe to call twice."""


_EMPTY = {"scores": ScoreResult([]), "preferences": CompareResult([])}


def checked_values(values, expected: int, who: str, what: str = "scores") -> list[float | None]:
    """A list of ``expected`` finite floats or None (preferences: in [0, 1]); anything else is an
    ``AnnotationError`` naming ``who`` and the item."""
    if isinstance(values, (str, bytes, dict)):  # list("1234") would be four "scores"
        raise AnnotationError(f"{who} returned {type(values).__name__} {str(values)[:40]!r}, expected a list of {expected} numbers")
    try:
        values = list(values)
    except TypeError:
        raise AnnotationError(f"{who} returned {type(values).__name__}, expected a list of {expected} numbers") from None
    if len(values) != expected:
        raise AnnotationError(f"{who} returned {len(values)} {what} for {expected} completions")
    out: list[float | None] = []
    for i, s in enumerate(values):
        if s is None:
            out.append(None)
            continue
        try:
            value = float(s)
        except (TypeError, ValueError):
            raise AnnotationError(f"{who}: {what[:-1]} {i} is {s!r}, not a number") from None
        if not math.isfinite(value):
            raise AnnotationError(f"{who}: {what[:-1]} {i} is {value} (non-finite values are never trained on)")
        if what == "preferences" and not 0 <= value <= 1:
            raise AnnotationError(f"{who} returned preference {value}; expected a probability")
        out.append(value)
    return out


ANNOTATORS: dict[str, type[Annotator]] = {}
# ``@register_annotator("judge")`` on a class with ``from_config(cfg: dict)`` makes ``type: judge`` build it
register_annotator = registrar(ANNOTATORS)
