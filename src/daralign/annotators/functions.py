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

from daralign.annotators.base import Annotator, ScoreResult, checked_values, register_annotator
from daralign.core.errors import AnnotationError, ConfigError


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
    return checked_values(scores, expected, who)


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

    def _score(self, prompts, completions, rows):
        columns = {k: [r.get(k) for r in rows] for k in (rows[0] if rows else {}) if k not in ("prompt", "completion")}
        try:
            raw = self.fn(prompts=list(prompts), completions=list(completions), **columns, **self.kwargs)
        except Exception as e:  # the user's bug: show where in *their* code, not a traceback through ours
            frame = traceback.extract_tb(e.__traceback__)[-1]
            raise AnnotationError(f"reward function {self.spec} raised {type(e).__name__}: {e} "
                                  f"(at {frame.filename}:{frame.lineno}, in {frame.name})") from None
        return ScoreResult(validate_scores(raw, len(completions), f"reward function {self.spec}"))


@register_annotator("combined")
class CombinedAnnotator(Annotator):
    """``{type: combined, sources: [{weight: 1.0, type: judge, ...}, {weight: 0.5, type: function, ...}]}``

    The score is Σ weight·score; a response invalid for any source is invalid. Each source's mean
    is logged as ``rewards/<i>_<type>/mean``. One annotation is counted per response labelled by
    all sources; the requests are every source's, on the one meter they share (a cap reached by
    the first source leaves the next nothing to ask)."""

    meters_items = False  # the sources reserve their own requests on the shared meter

    def __init__(self, sources: list[tuple[float, Annotator]]) -> None:
        super().__init__()
        self.sources = sources
        self.use_meter(self.meter)

    def members(self) -> list[Annotator]:
        return [source for _, source in self.sources]

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

    @classmethod
    def cost_per_label(cls, cfg: dict, kind: str) -> int:
        from daralign.annotators import requests_per_label

        return sum(requests_per_label({k: v for k, v in s.items() if k != "weight"}, kind) for s in cfg.get("sources", []))

    def member_scores(self, prompts, completions, rows) -> tuple[list[list[float | None]], dict[str, float]]:
        """Every source's scores (each reserving its requests on the shared meter)."""
        per_source, metrics = [], {}
        for i, (_, source) in enumerate(self.sources):
            result = source.score(prompts, completions, rows)
            valid = [s for s in result.scores if s is not None]
            metrics[f"rewards/{i}_{source.name}/mean"] = sum(valid) / len(valid) if valid else float("nan")
            metrics.update(result.metrics)
            per_source.append(result.scores)
        return per_source, metrics

    def _score(self, prompts, completions, rows):
        per_source, metrics = self.member_scores(prompts, completions, rows)
        total: list[float | None] = [0.0] * len(completions)
        for (weight, _), scores in zip(self.sources, per_source):
            total = [None if t is None or s is None else t + weight * s for t, s in zip(total, scores)]
        return ScoreResult(total, metrics)

    def close(self):
        for _, source in self.sources:
            source.close()
