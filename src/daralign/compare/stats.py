"""The statistics of a comparison that ``curves.py`` (per-method gold curves) and ``paired.py``
(within-seed differences, P1) both use: Student-t intervals over seeds, the mean curve of a
method's seeds, and where a curve first reaches a target."""

from __future__ import annotations

import math

# two-sided 95% Student t quantiles by degrees of freedom (n − 1), every df to 30 (beyond: ``t95``)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086,
       21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042}


Z975 = 1.959963985  # the normal's 97.5% quantile
# Abramowitz & Stegun 26.7.5: the t quantile as the normal's plus a series in 1/df, within 1e-6 of
# the exact value for every df past 30 (2.021075 at 40, 1.979930 at 120) and tending to 1.96
_T_SERIES = ((Z975**3 + Z975) / 4, (5 * Z975**5 + 16 * Z975**3 + 3 * Z975) / 96,
             (3 * Z975**7 + 19 * Z975**5 + 17 * Z975**3 - 15 * Z975) / 384,
             (79 * Z975**9 + 776 * Z975**7 + 1482 * Z975**5 - 1920 * Z975**3 - 945 * Z975) / 92160)


def t95(df: int) -> float:
    """The two-sided 95% Student t quantile at ``df`` degrees of freedom."""
    if df in T95:
        return T95[df]
    return Z975 + sum(g / df ** (i + 1) for i, g in enumerate(_T_SERIES))


def mean_ci(xs: list[float]) -> tuple[float | None, float | None]:
    """Mean and the half-width of its 95% CI over ``xs`` (None for a single value)."""
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return m, t95(len(xs) - 1) * sd / math.sqrt(len(xs))


def group_curve(curves: list[list[dict]]) -> list[dict]:
    """Mean and 95% CI over seeds at each request count every seed reached (runs of one method
    evaluate at the same counts; a count some seed lacks, e.g. after a cut last step, is dropped
    but for the final point, which is each run's last)."""
    if not curves:
        return []
    common = sorted(set.intersection(*[{p["requests"] for p in c[:-1]} for c in curves]))
    rows = [[next(p for p in c if p["requests"] == x) for c in curves] for x in common]
    rows.append([c[-1] for c in curves])
    out = []
    for pts in rows:
        point = {"requests": sum(p["requests"] for p in pts) / len(pts), "n": len(pts)}
        for key in ("gold", "proxy", "kl", "length", "train_s"):  # train_s: absent from records made before it was kept
            point[key], point[f"{key}_ci"] = mean_ci([p.get(key) for p in pts])
        out.append(point)
    return out


def requests_to_reach(curve: list[dict], target: float | None) -> float | None:
    """First request count where the mean gold reaches ``target``, linear between evaluations."""
    if target is None:
        return None
    for a, b in zip(curve, curve[1:]):
        if a["gold"] is None or b["gold"] is None:
            continue
        if a["gold"] >= target:
            return a["requests"]
        if b["gold"] >= target:
            return a["requests"] + (target - a["gold"]) / (b["gold"] - a["gold"]) * (b["requests"] - a["requests"])
    return None
