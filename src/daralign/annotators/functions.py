"""Reward from Python: a callable named ``module:function`` or ``path/to/file.py:function`` (or,
from the Python API, a callable object: ``python:NAME``), and a weighted combination of any
annotators.

The callable follows TRL's reward-function convention:
``fn(prompts=list, completions=list[str], completion_ids=list[list[int]], **columns) -> list[float | None]``,
where every extra dataset column arrives as a list aligned with ``completions``. ``async def``
callables are awaited with a timeout (``timeout_s``); several in one combination run concurrently.
Each function's scores are logged as ``rewards/<name>/mean`` and ``/std`` (TRL's names).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextvars
import importlib
import importlib.util
import inspect
import math
import statistics
import traceback
from pathlib import Path
from typing import Callable

from daralign.annotators.base import Annotator, ScoreResult, checked_values, register_annotator
from daralign.annotators.build import build_annotator, describe_annotator, requests_per_label
from daralign.core.errors import AnnotationError, ConfigError


def _check_keys(cfg: dict, allowed: set[str], kind: str) -> None:
    unknown = sorted(set(cfg) - allowed - {"type"})
    if unknown:
        raise ConfigError(f"annotator ({kind}): unknown key(s) {unknown}; allowed: {sorted(allowed)}")


# Callables handed to the Python API (``daralign.Trainer(reward_funcs=[fn])``), by name: a config
# then names them as ``python:NAME`` like any other function, so every path builds them the same way.
PYTHON_CALLABLES: dict[str, Callable] = {}


def python_callable_spec(fn: Callable) -> str:
    """A ``function:`` spec for ``fn``: ``module:qualname`` when it can be imported back (a saved
    config then re-runs from the CLI), else ``python:NAME`` registered in this process."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if module and module != "__main__" and "<" not in qualname and "." not in qualname:
        try:
            if getattr(importlib.import_module(module), qualname, None) is fn:
                return f"{module}:{qualname}"
        except ImportError:
            pass
    name = getattr(fn, "__name__", type(fn).__name__)
    spec = f"python:{name}"
    i = 1
    while spec in PYTHON_CALLABLES and PYTHON_CALLABLES[spec] is not fn:
        i += 1
        spec = f"python:{name}_{i}"
    PYTHON_CALLABLES[spec] = fn
    return spec


def callable_name(spec: str) -> str:
    """What a function is logged as: its own name (``rewards/<name>/mean``)."""
    return spec.rsplit(":", 1)[-1]


def load_callable(spec: str):
    """Import ``module:function`` or ``path/to/file.py:function``, or look up ``python:NAME``."""
    if spec.startswith("python:"):
        if spec not in PYTHON_CALLABLES:
            raise ConfigError(f"annotator.function: {spec!r} names a Python callable of another process; pass the "
                              f"callable itself (daralign.Trainer(reward_funcs=[...])) or give it as 'module:function'")
        return PYTHON_CALLABLES[spec]
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


@register_annotator("function")
class FunctionAnnotator(Annotator):
    """``{type: function, function: "pkg.mod:fn", kwargs: {...}, timeout_s: 60}``"""

    def __init__(self, fn, kwargs: dict, spec: str, timeout_s: float = 60.0) -> None:
        super().__init__()
        self.fn, self.kwargs, self.spec, self.timeout_s = fn, kwargs, spec, timeout_s
        self.is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))
        self.label = callable_name(spec)

    @classmethod
    def describe(cls, cfg: dict) -> str:
        return f"reward function {cfg.get('function')}"

    @classmethod
    def from_config(cls, cfg: dict) -> "FunctionAnnotator":
        _check_keys(cfg, {"function", "kwargs", "timeout_s"}, "function")
        if "function" not in cfg:
            raise ConfigError("annotator (function): missing key 'function' ('module:function')")
        timeout = cfg.get("timeout_s", 60.0)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ConfigError(f"annotator (function): timeout_s must be a number > 0, got {timeout!r}")
        return cls(load_callable(cfg["function"]), dict(cfg.get("kwargs") or {}), cfg["function"], float(timeout))

    def _score(self, prompts, completions, rows):
        columns = {k: [r.get(k) for r in rows] for k in (rows[0] if rows else {}) if k not in ("prompt", "completion")}
        timed_out = False
        try:
            raw = self.fn(prompts=list(prompts), completions=list(completions), **columns, **self.kwargs)
            if inspect.isawaitable(raw):
                raw, timed_out = _await(raw, self.timeout_s)
                raw = [None] * len(completions) if timed_out else raw
        except Exception as e:  # the user's bug: show where in *their* code, not a traceback through ours
            frame = traceback.extract_tb(e.__traceback__)[-1]
            raise AnnotationError(f"reward function {self.spec} raised {type(e).__name__}: {e} "
                                  f"(at {frame.filename}:{frame.lineno}, in {frame.name})") from None
        scores = checked_values(raw, len(completions), f"reward function {self.spec}")  # named here: the base would say "function"
        metrics = _source_metrics(self.label, scores)
        if self.is_async:
            metrics[f"rewards/{self.label}/timeouts"] = float(timed_out)
        return ScoreResult(scores, metrics)


def _await(awaitable, timeout_s: float):
    """(result, timed out) of an awaitable, with a timeout; on a thread of its own when this thread
    already runs an event loop (a notebook)."""

    async def bounded():
        try:
            return await asyncio.wait_for(awaitable, timeout_s), False
        except asyncio.TimeoutError:
            return None, True

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(bounded())
    with cf.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, bounded()).result()


def _source_metrics(name: str, scores: list[float | None]) -> dict[str, float]:
    """TRL's per-function metrics: mean and std of the valid scores."""
    valid = [s for s in scores if s is not None]
    return {f"rewards/{name}/mean": statistics.fmean(valid) if valid else float("nan"),
            f"rewards/{name}/std": statistics.pstdev(valid) if len(valid) > 1 else 0.0}


@register_annotator("combined")
class CombinedAnnotator(Annotator):
    """``{type: combined, sources: [{weight: 1.0, type: judge, ...}, {weight: 0.5, type: function, ...}]}``

    The score is Σ weight·score. A source's ``None`` makes the response invalid
    (``none_is: invalid``, the default), or — TRL's rule for several reward functions,
    ``none_is: not_applicable`` — leaves that source out of the sum (invalid only when every source
    said None). Each source is logged as ``rewards/<name>/mean`` and ``/std`` (a function by its
    name, another source as ``<i>_<type>``). One annotation is counted per response labelled; the
    requests are every source's, on the one meter they share (a cap reached by the first source
    leaves the next nothing to ask). ``async def`` function sources are awaited concurrently."""

    meters_items = False  # the sources reserve their own requests on the shared meter

    def __init__(self, sources: list[tuple[float, Annotator]], none_is: str = "invalid") -> None:
        super().__init__()
        self.sources, self.none_is = sources, none_is
        self.use_meter(self.meter)

    def members(self) -> list[Annotator]:
        return [source for _, source in self.sources]

    @classmethod
    def from_config(cls, cfg: dict) -> "CombinedAnnotator":
        _check_keys(cfg, {"sources", "none_is"}, "combined")
        none_is = cfg.get("none_is", "invalid")
        if none_is not in ("invalid", "not_applicable"):
            raise ConfigError(f"annotator (combined): none_is must be invalid or not_applicable, got {none_is!r}")
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
        return cls(built, none_is)

    @classmethod
    def cost_per_label(cls, cfg: dict, kind: str) -> int:
        return sum(requests_per_label({k: v for k, v in s.items() if k != "weight"}, kind) for s in cfg.get("sources", []))

    @classmethod
    def describe(cls, cfg: dict) -> str:
        return "combined: " + " + ".join(f"{s.get('weight', 1.0)}×[{describe_annotator(s)}]" for s in cfg.get("sources", []))

    def member_scores(self, prompts, completions, rows) -> tuple[list[list[float | None]], dict[str, float]]:
        """Every source's scores (each reserving its requests on the shared meter); the ``async``
        functions among them awaited concurrently, each on a thread of its own."""
        members = [source for _, source in self.sources]
        concurrent = [i for i, m in enumerate(members) if getattr(m, "is_async", False)]
        results: dict[int, object] = {}
        if len(concurrent) > 1:
            with cf.ThreadPoolExecutor(len(concurrent)) as pool:  # context copied: the outer call counts the labels
                futures = {i: pool.submit(contextvars.copy_context().run, members[i].score, prompts, completions, rows)
                           for i in concurrent}
                results = {i: f.result() for i, f in futures.items()}
        per_source, metrics = [], {}
        for i, source in enumerate(members):
            result = results[i] if i in results else source.score(prompts, completions, rows)
            if not any(k.startswith("rewards/") for k in result.metrics):
                metrics |= _source_metrics(f"{i}_{source.name}", result.scores)
            metrics.update(result.metrics)
            per_source.append(result.scores)
        return per_source, metrics

    def _score(self, prompts, completions, rows):
        per_source, metrics = self.member_scores(prompts, completions, rows)
        total: list[float | None] = []
        for values in zip(*per_source):
            given = [(w, s) for (w, _), s in zip(self.sources, values) if s is not None]
            if len(given) < len(values) and (self.none_is == "invalid" or not given):
                total.append(None)
            else:
                total.append(sum(w * s for w, s in given))
        return ScoreResult(total, metrics)

    def close(self):
        for _, source in self.sources:
            source.close()
