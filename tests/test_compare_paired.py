"""The paired statistics of compare/paired.py against values computed by hand."""

from __future__ import annotations

import math

import pytest

from daralign.compare.paired import curve_mean, fit_gao, gao_points, p1_bootstrap, paired_differences, t_interval


def curve(golds, requests=(0, 100, 200), kls=(0.0, 1.0, 4.0)):
    return [{"requests": r, "step": i * 2, "gold": g, "proxy": g, "kl": k, "length": 10.0, "after": i == len(golds) - 1}
            for i, (r, g, k) in enumerate(zip(requests, golds, kls))]


def test_t_interval_by_hand():
    s = t_interval([0.1, 0.3])
    # mean 0.2; sd = √((0.01 + 0.01) / 1) = 0.14142; SE = sd/√2 = 0.1; 95% CI = t(1 df) 12.706 × 0.1
    assert s["mean"] == pytest.approx(0.2) and s["se"] == pytest.approx(0.1) and s["ci95"] == pytest.approx(1.2706)
    assert t_interval([0.4])["se"] is None and t_interval([0.4])["n"] == 1


def test_t_quantile_past_the_table():
    """Past df 30 the series (A&S 26.7.5) gives the exact quantiles (R's qt(0.975, df)), not 1.96."""
    from daralign.compare.stats import t95

    exact = {30: 2.042272, 31: 2.039513, 40: 2.021075, 60: 2.000298, 120: 1.979930, 10_000: 1.960201}
    for df, q in exact.items():
        assert t95(df) == pytest.approx(q, abs=2e-6 if df > 30 else 5e-4)
    assert all(t95(df) > t95(df + 1) for df in range(1, 200))  # falls with df, across the table's end too


def test_paired_differences_by_hand():
    runs = [{"group": g, "seed": s, "gold_after": v, "proxy_after": 0.0, "gold_curve_mean": None}
            for g, vals in {"dar": [0.5, 0.6, 0.7], "rloo": [0.55, 0.62, 0.74]}.items() for s, v in zip((1, 2, 3), vals)]
    runs.append({"group": "rloo", "seed": 9, "gold_after": 5.0})  # a seed dar did not run: not paired, left out
    d = paired_differences(runs, reference="dar")["rloo"]["gold_after"]
    # differences 0.05, 0.02, 0.04: mean 0.036667; sd = √(0.00046667 / 2) = 0.015275; SE = 0.0088192; × t(2) 4.303
    assert d["n"] == 3 and d["mean"] == pytest.approx(0.036667, abs=1e-6)
    assert d["se"] == pytest.approx(0.0088192, abs=1e-6) and d["ci95"] == pytest.approx(0.037949, abs=1e-5)
    assert paired_differences(runs, reference="dar")["rloo"]["proxy_after"]["mean"] == 0.0


def test_curve_mean_leaves_out_the_start():
    assert curve_mean(curve([0.5, 0.6, 0.7])) == pytest.approx(0.65)  # (0.6 + 0.7) / 2: step 0 is before training


@pytest.mark.parametrize("form, alpha, beta, peak_d, peak_r", [
    ("rl", 0.2, 0.1, math.e, 0.1 * math.e),   # d* = exp(α/β − 1) = e, R* = β d*
    ("bon", 0.3, 0.05, 3.0, 0.45),            # d* = α / 2β = 3, R* = α² / 4β = 0.45
])
def test_gao_forms_are_recovered_with_their_peak(form, alpha, beta, peak_d, peak_r):
    g = math.log if form == "rl" else (lambda d: d)
    pts = [(d, d * (alpha - beta * g(d))) for d in (0.5, 1.0, 2.0, 3.0, 4.5)]
    fit = fit_gao(pts, form)
    assert fit["alpha"] == pytest.approx(alpha) and fit["beta"] == pytest.approx(beta) and fit["rmse"] < 1e-9
    assert fit["peak_sqrt_kl"] == pytest.approx(peak_d) and fit["peak_gain"] == pytest.approx(peak_r)
    rising = fit_gao([(d, 0.1 * d) for d in (1.0, 2.0, 3.0)], form)  # no turn in sight: β ≈ 0 or below, no peak
    assert rising["peak_sqrt_kl"] is None or rising["beta"] <= 1e-9


def test_gao_points_are_gains_against_root_kl():
    pts = gao_points([{"curve": curve([0.5, 0.6, 0.7])}])
    assert pts == [(pytest.approx(1.0), pytest.approx(0.1)), (pytest.approx(2.0), pytest.approx(0.2))]


def test_p1_with_its_bootstrap_interval():
    dpo = [0.5, 0.6, 0.7]  # OAIF-DPO's final mean gold 0.7, reached at 200 requests
    runs = [{"group": "online-dpo", "seed": s, "curve": curve(dpo)} for s in (1, 2)]
    runs += [{"group": "dar", "seed": s, "curve": curve([0.5, 0.7, 0.8])} for s in (1, 2)]  # DAR: at 100
    res = p1_bootstrap(runs, n_boot=200)
    assert res["p1"] == pytest.approx(0.5) and res["p1_ci_low"] == res["p1_ci_high"] == pytest.approx(0.5)
    assert res["p1_undefined_frac"] == 0.0 and res["seeds"] == 2
    # seeds that differ: DAR's seed 2 reaches 0.65 at 100 and 0.7 at 200; the resamples spread P1
    runs[3]["curve"] = curve([0.5, 0.65, 0.75])
    res = p1_bootstrap(runs, n_boot=400, seed=1)
    # as run: DAR's mean curve 0.5, 0.675, 0.775 reaches 0.7 at 100 + (0.025 / 0.1) × 100 = 125: P1 = 0.625
    assert res["p1"] == pytest.approx(0.625)
    # both resampled seeds 1: 0.5; both seeds 2: DAR reaches 0.7 at 150, P1 = 0.75
    assert res["p1_ci_low"] == pytest.approx(0.5) and res["p1_ci_high"] == pytest.approx(0.75)


def test_p1_counts_the_resamples_where_dar_never_gets_there():
    """A resample where DAR never reaches OAIF-DPO's final gold is P1 = ∞ ("never"), kept in the
    interval: once more than 2.5% of the resamples are such, the upper bound is "never"."""
    dpo = [{"group": "online-dpo", "seed": s, "curve": curve([0.5, 0.6, 0.7])} for s in (1, 2)]
    runs = dpo + [{"group": "dar", "seed": 1, "curve": curve([0.5, 0.7, 0.8])},   # reaches 0.7 at 100: P1 0.5
                  {"group": "dar", "seed": 2, "curve": curve([0.5, 0.55, 0.6])}]  # never reaches 0.7
    res = p1_bootstrap(runs, n_boot=400, seed=3)
    # as run: DAR's mean curve 0.5, 0.625, 0.7 reaches 0.7 at 200, as OAIF-DPO does: P1 = 1
    assert res["p1"] == pytest.approx(1.0)
    # resamples {1, 1}: 0.5; {1, 2}: 1.0; {2, 2}: never, a quarter of them (the old interval dropped those)
    assert res["p1_never_frac"] == pytest.approx(0.25, abs=0.06) and res["p1_undefined_frac"] == res["p1_never_frac"]
    assert res["p1_ci_low"] == pytest.approx(0.5) and res["p1_ci_high"] == math.inf
    only_dar_2 = p1_bootstrap(dpo + [runs[3]], n_boot=50)
    assert only_dar_2["p1"] is None and only_dar_2["p1_ci_low"] == only_dar_2["p1_ci_high"] == math.inf
    assert only_dar_2["p1_never_frac"] == 1.0


@pytest.mark.parametrize("slow_final, never_at_top", [(0.65, False), (0.55, True)])
def test_p1_upper_bound_is_never_only_past_2_5_percent(slow_final, never_at_top):
    """Four seeds, three of which reach the target early; the fourth ends at ``slow_final``. At 0.65
    the mean misses 0.7 only when all four resampled seeds are the fourth: (1/4)^4 = 0.4% of
    resamples, so the bound stays finite. At 0.55 it misses with three or four of them: 5.1%."""
    runs = [{"group": "online-dpo", "seed": s, "curve": curve([0.5, 0.6, 0.7])} for s in (1, 2, 3, 4)]
    runs += [{"group": "dar", "seed": s, "curve": curve([0.5, 0.8, 0.9])} for s in (1, 2, 3)]
    runs.append({"group": "dar", "seed": 4, "curve": curve([0.5, 0.52, slow_final])})
    res = p1_bootstrap(runs, n_boot=4000, seed=0)
    expected = 0.25 ** 4 if not never_at_top else 4 * 0.25 ** 3 * 0.75 + 0.25 ** 4
    assert res["p1_never_frac"] == pytest.approx(expected, abs=0.012)
    assert (res["p1_ci_high"] == math.inf) is never_at_top
    assert res["p1_ci_low"] < 1


def test_an_unbounded_p1_is_never_in_summary_json_and_the_report():
    """summary.json is strict JSON: an infinite P1 bound is written "never" (other non-finite
    numbers None), and the report's sentence reads it back."""
    import json

    from daralign.compare.report import _finite, p1_text

    g = _finite({"p1": 0.89, "p1_ci_low": 0.46, "p1_ci_high": math.inf, "p1_undefined_frac": 0.33, "kl": math.nan})
    assert json.loads(json.dumps(g, allow_nan=False)) == {"p1": 0.89, "p1_ci_low": 0.46, "p1_ci_high": "never",
                                                         "p1_undefined_frac": 0.33, "kl": None}
    assert "0.46–never" in p1_text(g)
