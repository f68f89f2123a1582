"""Reward from Python: a callable named ``module:function`` or ``path/to/file.py:function``, and a
weighted combination of any annotators.

The callable follows TRL's reward-function convention:
``fn(prompts=list, completions=list[str], **columns) -> list[float | None]``, where every extra
dataset column arrives as a list aligned with ``completions``.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import traceback
from pathlib import Path

from daralign.annotators.base import Annotator, ScoreResult, register_annotator
from daralign.errors import AnnotationError, ConfigError


def _check_keys(cfg: dict, allowed: set[str], kind: str) -> None:
    unknown = sorted(set(cfg) - allowed - {"type"})
    if unknown:
        raise ConfigError(f"annotator ({kind}): unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def load_callable(spec: str):
    """Import ``module:function`` or ``path/to/file.py:function``."""
    if ":" not in spec:
        raise ConfigError(f"annotator.function: expected 'module:function' or 'file.py:function', got {spec!r}")
    where, name = spec.rsplit(":", 1)
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ConfigError(f"annotator.function: file not found: {path}")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ConfigError(f"annotator.function: cannot import {where!r}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"annotator.function: {where!r} has no callable {name!r}")
    return fn


def validate_scores(scores, expected: int, who: str) -> list[float | None]:
    """A list of ``expected`` finite floats or None; anything else is an ``AnnotationError``."""
    if isinstance(scores, (str, bytes, dict)):  # list("1234") would be four "scores"
        raise AnnotationError(f"{who} returned {type(scores).__name__} {str(scores)[:40]!r}, expected a list of {expected} numbers")
    try:
        scores = list(scores)
    except TypeError:
        raise AnnotationError(f"{who} returned {type(scores).__name__}, expected a list of {expected} numbers") from None
    if len(scores) != expected:
        raise AnnotationError(f"{who} returned {len(scores)} scores for {expected} completions")
    out = []
    for i, s in enumerate(scores):
        if s is None:
            out.append(None)
            continue
        try:
            value = float(s)
        except (TypeError, ValueError):
            raise AnnotationError(f"{who}: score {i} is {s!r}, not a number") from None
        if not math.isfinite(value):
            raise AnnotationError(f"{who}: score {i} is {value} (non-finite rewards are never trained on)")
        out.append(value)
    return out


@register_annotator("function")
class FunctionAnnotator(Annotator):
    """``{type: function, function: "pkg.mod:fn", kwargs: {...}}``"""

    def __init__(self, fn, kwargs: dict, spec: str) -> None:
        super().__init__()
        self.fn, self.kwargs, self.spec = fn, kwargs, spec

    @classmethod
    def from_config(cls, cfg: dict) -> "FunctionAnnotator":
        _check_keys(cfg, {"function", "kwargs"}, "function")
        if "function" not in cfg:
            raise ConfigError("annotator (function): missing key 'function' ('module:function')")
        return cls(load_callable(cfg["function"]), dict(cfg.get("kwargs") or {}), cfg["function"])

    def score(self, prompts, completions, rows):
        n = self.affordable(len(completions))  # items past the request limit are not asked (invalid)
        rows = rows[:n]
        columns = {k: [r.get(k) for r in rows] for k in (rows[0] if rows else {}) if k not in ("prompt", "completion")}
        try:
            raw = self.fn(prompts=list(prompts[:n]), completions=list(completions[:n]), **columns, **self.kwargs) if n else []
        except Exception as e:  # the user's bug: show where in *their* code, not a traceback through ours
            frame = traceback.extract_tb(e.__traceback__)[-1]
            raise AnnotationError(f"reward function {self.spec} raised {type(e).__name__}: {e} "
                                  f"(at {frame.filename}:{frame.lineno}, in {frame.name})") from None
        self.num_requests += n  # one per batch item handed to the function
        scores = validate_scores(raw, n, f"reward function {self.spec}") + [None] * (len(completions) - n)
        self.num_annotations += sum(s is not None for s in scores)
        return ScoreResult(scores)


@register_annotator("combined")
class CombinedAnnotator(Annotator):
    """``{type: combined, sources: [{weight: 1.0, type: judge, ...}, {weight: 0.5, type: function, ...}]}``

    The score is Σ weight·score; a response invalid for any source is invalid. Each source's mean
    is logged as ``rewards/<i>_<type>/mean``. One annotation is counted per response labelled by
    all sources; the requests are every source's requests added up."""

    def __init__(self, sources: list[tuple[float, Annotator]]) -> None:
        super().__init__()
        self.sources = sources

    @classmethod
    def from_config(cls, cfg: dict) -> "CombinedAnnotator":
        from daralign.annotators import build_annotator

        _check_keys(cfg, {"sources"}, "combined")
        sources = cfg.get("sources")
        if not isinstance(sources, list) or not sources:
            raise ConfigError("annotator (combined): 'sources' must be a non-empty list of annotator mappings")
        built = []
        for i, src in enumerate(sources):
            if not isinstance(src, dict):
                raise ConfigError(f"annotator (combined): sources[{i}] must be a mapping")
            src = dict(src)
            weight = src.pop("weight", 1.0)
            if not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ConfigError(f"annotator (combined): sources[{i}].weight must be a finite number")
            built.append((float(weight), build_annotator(src)))
        return cls(built)

    def requests_per_label(self, kind: str) -> int:
        return sum(source.requests_per_label(kind) for _, source in self.sources)

    def member_scores(self, prompts, completions, rows) -> tuple[list[list[float | None]], dict[str, float]]:
        """Every source's scores, each source spending what is left of the shared request limit."""
        per_source, metrics = [], {}
        for i, (_, source) in enumerate(self.sources):
            requests, hits = source.num_requests, source.num_cache_hits
            # each source may spend what is left of the combined limit
            source.request_limit = None if self.request_limit is None else \
                source.num_requests + max(self.request_limit - self.num_requests, 0)
            result = source.score(prompts, completions, rows)
            self.num_requests += source.num_requests - requests
            self.num_cache_hits += source.num_cache_hits - hits
            valid = [s for s in result.scores if s is not None]
            metrics[f"rewards/{i}_{source.name}/mean"] = sum(valid) / len(valid) if valid else float("nan")
            metrics.update(result.metrics)
            per_source.append(result.scores)
        return per_source, metrics

    def score(self, prompts, completions, rows):
        per_source, metrics = self.member_scores(prompts, completions, rows)
        total: list[float | None] = [0.0] * len(completions)
        for (weight, _), scores in zip(self.sources, per_source):
            total = [None if t is None or s is None else t + weight * s for t, s in zip(total, scores)]
        self.num_annotations += sum(t is not None for t in total)
        return ScoreResult(total, metrics)

    def close(self):
        for _, source in self.sources:
            source.close()
