"""Statistics that use a comparison's design: within a seed every method shares the prompt order,
the evaluation seed and the "before" score, so methods are compared by **paired** within-seed
differences (their seed-to-seed noise largely cancels), with Student-t intervals over seeds.

- ``paired_differences``: per method, (method − reference) per seed on the gold at the budget, the
  gold over the whole curve and the proxy at the budget; mean, SE and 95% CI over seeds.
- ``curve_mean``: a run's gold over its whole curve (the mean over its evaluations after training
  began), beside the gold at the budget, which one noisy evaluation decides.
- ``fit_gao``: Gao et al. (2022)'s functional forms of gold gain against d = √KL(π‖π_ref),
  RL: R(d) = d(α − β log d) and best-of-n: R(d) = d(α − β d), fitted by least squares, with the
  peak the fit implies.
- ``p1_bootstrap``: P1 = the subject's requests ÷ the reference's to reach the reference's final
  mean gold (DAR and OAIF-DPO: the methods whose classes declare that ``compare_role``), with a
  percentile CI from resampling seeds (the same seeds for both methods, as they were run); a
  resample where the subject never gets there counts as P1 = ∞ ("never"), not as a missing value.
"""

from __future__ import annotations

import math
import random

from daralign.compare.stats import group_curve, mean_ci, requests_to_reach, t95
from daralign.objectives import method_in_role


def t_interval(xs: list[float]) -> dict:
    """Mean, standard error and 95% CI half-width (Student t, n − 1 df) of ``xs`` over seeds."""
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    mean, ci = mean_ci(xs)
    se = ci / t95(len(xs) - 1) if ci is not None else None
    return {"mean": mean, "se": se, "ci95": ci, "n": len(xs)}


def curve_mean(curve: list[dict]) -> float | None:
    """The gold over a run's whole curve: the mean over its evaluations after training began."""
    golds = [p["gold"] for p in curve if p["step"] > 0 and p.get("gold") is not None]
    return sum(golds) / len(golds) if golds else None


def _value(run: dict, key: str) -> float | None:
    if key == "gold_curve_mean":
        return curve_mean(run["curve"]) if run.get("curve") else None
    return run.get(key)


def _per_seed(runs: list[dict], group: str, key: str) -> dict:
    values = {r["seed"]: _value(r, key) for r in runs if r["group"] == group}
    return {seed: v for seed, v in values.items() if v is not None}


PAIRED_KEYS = ("gold_after", "gold_curve_mean", "proxy_after")


def paired_differences(runs: list[dict], reference: str, keys: tuple[str, ...] = PAIRED_KEYS) -> dict:
    """{method: {key: t_interval of (method − reference) over the seeds both ran}} for every method
    but ``reference``. Runs need ``group``, ``seed`` and the keys (``gold_curve_mean``: from the
    run's ``curve``)."""
    groups = sorted({r["group"] for r in runs} - {reference})
    return {g: {key: t_interval(list(seed_differences(runs, g, reference, key).values())) for key in keys}
            for g in groups}


def seed_differences(runs: list[dict], group: str, reference: str, key: str) -> dict[int, float]:
    """{seed: group's ``key`` − reference's} over the seeds both ran: the paired differences
    themselves, for a strip plot or a leave-one-out."""
    ours, theirs = _per_seed(runs, group, key), _per_seed(runs, reference, key)
    return {s: ours[s] - theirs[s] for s in sorted(ours.keys() & theirs.keys())}


def fit_gao(points: list[tuple[float, float]], form: str = "rl") -> dict:
    """Least-squares fit of gold gain R against d = √KL: ``rl``: R = d(α − β log d); ``bon``:
    R = d(α − β d). Both are linear in (α, β): R = α·d − β·d·g(d). The fitted peak: rl at
    d* = exp(α/β − 1) (R* = β d*), bon at d* = α / 2β (R* = α² / 4β); none when β ≤ 0."""
    pts = [(d, r) for d, r in points if d is not None and r is not None and d > 0 and math.isfinite(r)]
    no_fit = {"form": form, "alpha": None, "beta": None, "peak_sqrt_kl": None, "peak_gain": None, "n": len(pts)}
    if len(pts) < 2:
        return no_fit
    g = (lambda d: math.log(d)) if form == "rl" else (lambda d: d)
    x1 = [d for d, _ in pts]
    x2 = [-d * g(d) for d, _ in pts]
    y = [r for _, r in pts]
    s11, s22, s12 = sum(a * a for a in x1), sum(b * b for b in x2), sum(a * b for a, b in zip(x1, x2))
    s1y, s2y = sum(a * v for a, v in zip(x1, y)), sum(b * v for b, v in zip(x2, y))
    det = s11 * s22 - s12 * s12
    if abs(det) < 1e-12:
        return no_fit
    alpha = (s22 * s1y - s12 * s2y) / det  # the 2×2 normal equations
    beta = (s11 * s2y - s12 * s1y) / det
    rmse = math.sqrt(sum((alpha * a + beta * b - v) ** 2 for a, b, v in zip(x1, x2, y)) / len(pts))
    peak_d = peak_r = None
    if beta > 0:
        if form == "rl":
            peak_d = math.exp(alpha / beta - 1.0)
            peak_r = beta * peak_d
        else:
            peak_d = alpha / (2 * beta)
            peak_r = alpha * alpha / (4 * beta)
    return {"form": form, "alpha": alpha, "beta": beta, "peak_sqrt_kl": peak_d, "peak_gain": peak_r, "n": len(pts),
            "rmse": rmse}


def gao_points(runs: list[dict]) -> list[tuple[float, float]]:
    """(√KL, gold − the run's gold before) at every evaluation after training began, all seeds."""
    pts = []
    for r in runs:
        curve = r.get("curve") or []
        before = next((p["gold"] for p in curve if p["step"] == 0), None)
        pts += [(math.sqrt(max(p["kl"], 0.0)), p["gold"] - before) for p in curve
                if p["step"] > 0 and before is not None and p.get("gold") is not None and p.get("kl") is not None]
    return pts


def p1_bootstrap(runs: list[dict], n_boot: int = 2000, seed: int = 0, subject: str | None = None,
                 reference: str | None = None) -> dict:
    """P1 on the seeds as run, and its 95% percentile CI from resampling seeds with replacement
    (the same resample for both methods). ``subject`` and ``reference`` are group names; by default
    the methods in those ``compare_role``s.

    A resample where the subject never reaches the target is P1 = ∞ ("never": more than any
    request count) and stays in the interval: dropping it would keep only the resamples that
    favour the subject. So the upper bound is ``math.inf`` ("never") once more than about 2.5% of
    the resamples never get there; ``p1_never_frac`` is their share. A resample with no P1 at all
    (the reference at its target before training: 0 ÷ 0) is left out. ``p1_undefined_frac``, the
    share without a finite P1 (never + none), keeps its earlier meaning for the verdict rules that
    read it. P1 as run stays None when the subject never gets there."""
    subject = subject or method_in_role("subject")
    reference = reference or method_in_role("reference")

    def curves(group, seeds):
        by_seed = {r["seed"]: r["curve"] for r in runs if r["group"] == group and r.get("curve")}
        return [by_seed[s] for s in seeds]

    def p1(seeds):  # a ratio, math.inf when the subject never reaches the target, None when there is none
        subject_curve, reference_curve = group_curve(curves(subject, seeds)), group_curve(curves(reference, seeds))
        if not subject_curve or not reference_curve:
            return None
        target = reference_curve[-1]["gold"]
        a, b = requests_to_reach(subject_curve, target), requests_to_reach(reference_curve, target)
        if not b:
            return None
        return math.inf if a is None else a / b

    seeds = sorted({r["seed"] for r in runs if r["group"] == subject and r.get("curve")}
                   & {r["seed"] for r in runs if r["group"] == reference and r.get("curve")})
    if not seeds:
        return {"p1": None, "p1_ci_low": None, "p1_ci_high": None, "p1_undefined_frac": None, "p1_never_frac": None,
                "seeds": 0}
    rng = random.Random(seed)
    draws = [p1([rng.choice(seeds) for _ in seeds]) for _ in range(n_boot)]
    counted = sorted(d for d in draws if d is not None)  # "never" (inf) sorts last
    low = counted[int(0.025 * (len(counted) - 1))] if counted else None
    high = counted[int(math.ceil(0.975 * (len(counted) - 1)))] if counted else None
    as_run = p1(seeds)
    return {"p1": None if as_run == math.inf else as_run, "p1_ci_low": low, "p1_ci_high": high,
            "p1_undefined_frac": 1 - sum(d is not None and d != math.inf for d in draws) / n_boot,
            "p1_never_frac": sum(d == math.inf for d in draws) / n_boot, "seeds": len(seeds)}
