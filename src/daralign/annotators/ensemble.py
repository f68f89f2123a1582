"""An ensemble of annotators, aggregated conservatively against over-optimisation.

    {type: ensemble, aggregate: mean | min | uwo, uwo_lambda: 1.0,
     members: [{type: judge, template: tone, ...}, {type: judge, template: helpfulness, ...}, ...]}

Coste et al., "Reward Model Ensembles Help Mitigate Overoptimization" (ICLR 2024) score each
response with every member and train on

    mean:  R(x, y) = (1/M) Σ_m r_m(x, y)
    min:   R(x, y) = min_m r_m(x, y)                               (worst-case optimisation, WCO)
    uwo:   R(x, y) = mean_m r_m(x, y) − λ · spread_m r_m(x, y)      (uncertainty-weighted optimisation)

where ``spread`` is the members' standard deviation (``uwo_penalty: std``, the default) or their
variance (``variance``, the paper's form). A response the members disagree about is worth less,
so the policy gains little by finding what one member alone over-rates.

Members must be on one scale (for example several P("Yes") judges): the aggregate does not
rescale them. Members that are judges on the same model share one loaded model. Requests are
every member's requests added up (the user pays for each); a response invalid for any member is
invalid. Scores only: preference methods need a ``compare`` annotator.
"""

from __future__ import annotations

import statistics

from daralign.annotators.base import ScoreResult, register_annotator
from daralign.annotators.build import build_annotator, describe_annotator, requests_per_label
from daralign.annotators.functions import CombinedAnnotator, _check_keys
from daralign.core.errors import ConfigError

AGGREGATES = ("mean", "min", "uwo")


@register_annotator("ensemble")
class EnsembleAnnotator(CombinedAnnotator):
    def __init__(self, members, aggregate: str = "mean", uwo_lambda: float = 1.0, uwo_penalty: str = "std") -> None:
        super().__init__([(1.0, m) for m in members])
        self.aggregate, self.uwo_lambda, self.uwo_penalty = aggregate, uwo_lambda, uwo_penalty

    @classmethod
    def from_config(cls, cfg: dict) -> "EnsembleAnnotator":
        _check_keys(cfg, {"members", "aggregate", "uwo_lambda", "uwo_penalty"}, "ensemble")
        members = cfg.get("members")
        if not isinstance(members, list) or len(members) < 2 or not all(isinstance(m, dict) for m in members):
            raise ConfigError("annotator (ensemble): 'members' must be a list of at least two annotator mappings")
        aggregate = cfg.get("aggregate", "mean")
        if aggregate not in AGGREGATES:
            raise ConfigError(f"annotator (ensemble): aggregate {aggregate!r} is not one of {', '.join(AGGREGATES)}")
        lam = cfg.get("uwo_lambda", 1.0)
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0:
            raise ConfigError(f"annotator (ensemble): uwo_lambda must be a number ≥ 0, got {lam!r}")
        penalty = cfg.get("uwo_penalty", "std")
        if penalty not in ("std", "variance"):
            raise ConfigError(f"annotator (ensemble): uwo_penalty must be std or variance, got {penalty!r}")
        built = [build_annotator(member) for member in members]  # judges on one model share it (judge.py)
        return cls(built, aggregate, float(lam), penalty)

    @classmethod
    def cost_per_label(cls, cfg: dict, kind: str) -> int:
        return sum(requests_per_label(m, kind) for m in cfg.get("members", []))

    @classmethod
    def describe(cls, cfg: dict) -> str:
        lam = f" λ={cfg.get('uwo_lambda', 1.0)}" if cfg.get("aggregate") == "uwo" else ""
        return f"ensemble {cfg.get('aggregate', 'mean')}{lam}: " + " | ".join(f"[{describe_annotator(m)}]" for m in cfg.get("members", []))

    def _aggregate(self, values: list[float]) -> float:
        if self.aggregate == "min":
            return min(values)
        mean = statistics.fmean(values)
        if self.aggregate == "mean":
            return mean
        spread = statistics.pstdev(values) if self.uwo_penalty == "std" else statistics.pvariance(values)
        return mean - self.uwo_lambda * spread

    def _score(self, prompts, completions, rows):
        per_member, metrics = self.member_scores(prompts, completions, rows)
        out: list[float | None] = []
        spreads = []
        for values in zip(*per_member):
            if any(v is None for v in values):
                out.append(None)
                continue
            out.append(self._aggregate(list(values)))
            spreads.append(statistics.pstdev(values))
        metrics["rewards/ensemble_std"] = statistics.fmean(spreads) if spreads else float("nan")
        return ScoreResult(out, metrics)
