"""The study's page (docs/testbed.md, "The study"): reads the ``summary.json`` of the folders
``study.sh`` fills and writes, into ``--out``:

- ``study.json``: per arm, the gold change ± SE over seeds, the gold at the budget and over the whole
  curve, KL and answer length at the budget, where the gold peaks and whether it turns down, Gao's
  RL form fitted to gold gain against √KL; every arm's **paired** within-seed difference to DAR
  (gold at the budget, gold over the curve), and the pairs the study asks about (DAR's reference
  term on and off, DAR against its shuffled-reward control, label noise, DAR against OAIF-DPO under noise); P1 with its bootstrap CI; and the
  verdict on the paper's claim, by the rule written in ``verdict`` below, fixed before any result was seen;
  beside every paired difference, the smallest true difference it would detect with 80% power (``mde80``),
  its per-seed differences, and what it becomes with each seed left out in turn (``leave_one_out``):
  a difference is *decided* only when its 95% CI excludes 0 on the same side with every seed in and
  with any one left out, and the verdict is stated only when every leave-one-out gives it too;
- ``study.md``: those tables; ``study.png``: gold against requests per arm, and every seed's paired
  difference (a strip plot) with the mean and its 95% interval.

    python examples/testbed/study.py --core runs/study --ratio0 runs/study-ratio0 \\
        --noise runs/study-noise25 --control runs/study-control --out docs/img/study

An arm may name several folders or ``summary.json`` files: seeds run in different sessions (a run's
folder does not outlive its machine; its record in a committed ``summary.json`` does) are merged,
each (method, seed) once, and the statistics recomputed over all of them.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from daralign.compare.curves import gold_section  # noqa: E402
from daralign.compare.paired import gao_points, p1_bootstrap, seed_differences, t_interval  # noqa: E402
from daralign.compare.report import aggregate  # noqa: E402

SE_GOAL = 0.015  # the first study's goal: 0.03 = 2 SE, about 41% power at 8 seeds, not 80% (see mde80)
SETS = {"heldout.jsonl": " (the dev set)", "test.jsonl": " (the sealed test set)"}  # docs/testbed.md, "The prompt sets"
POWER = 0.8  # the power the minimum detectable difference is stated at, two-sided α = 0.05
NOISE, RATIO0, CONTROL = ", 25% noise", ", dar_ratio 0", ", shuffled rewards"
VERDICT_STATED = ("The verdict is stated only when the rule gives it with all seeds and with each seed left out in "
                  "turn; otherwise it is undecided.")  # issue 32: no single seed decides


def summary_path(path: Path) -> Path:
    """A compare folder's ``summary.json``, or the file itself."""
    path = Path(path)
    path = path / "summary.json" if path.is_dir() else path
    if not path.is_file():
        raise SystemExit(f"{path}: not found (run examples/testbed/study.sh first)")
    return path


def untimed(value):
    """A run's curve without ``train_s`` (seconds, which records made before it was kept lack): what
    says whether two records are one run."""
    if isinstance(value, list):
        return [{k: v for k, v in p.items() if k != "train_s"} if isinstance(p, dict) else p for p in value]
    return value


def merged(summaries: list[dict], root: Path) -> dict:
    """Several ``summary.json`` of one design (runs kept from earlier sessions beside new seeds) as one:
    each (group, seed) once, the per-group statistics recomputed by compare's own code."""
    first = summaries[0]
    for s in summaries[1:]:
        for key in ("annotation_budget", "training_annotator", "evaluator"):
            if s[key] != first[key]:
                raise SystemExit(f"the summaries to merge differ in {key}: {first[key]!r} vs {s[key]!r}")
    runs: dict[tuple, dict] = {}
    for s in summaries:
        for r in s["runs"]:
            key = (r["group"], r["seed"])
            if key in runs and any(untimed(runs[key].get(k)) != untimed(r.get(k)) for k in ("gold_before", "gold_after", "curve")):
                raise SystemExit(f"{r['group']} seed {r['seed']}: two different runs in the summaries to merge")
            runs[key] = r
    before: dict[int, set] = {}
    for r in runs.values():  # within a seed every run starts from the same held-out answers, or they do not pair
        before.setdefault(r["seed"], set()).add(r.get("gold_before"))
    for seed, values in before.items():  # the same answers scored on another CPU differ by ~1e-9
        if None not in values and max(values) - min(values) > 1e-6:
            raise SystemExit(f"seed {seed}: the summaries to merge start from different held-out answers (gold before "
                             f"{', '.join(map(str, sorted(values, key=str)))}): made on another machine or precision, they do not pair")
    by_group: dict[str, list[dict]] = {}
    for r in runs.values():
        by_group.setdefault(r["group"], []).append(r)
    records = [r for rs in by_group.values() for r in sorted(rs, key=lambda r: r["seed"])]
    out = {**first, "seeds": sorted({r["seed"] for r in records}), "runs": records,
           "groups": [{"group": g, "algorithm": rs[0]["algorithm"], "point": rs[0]["point"], **aggregate(rs)}
                      for g, rs in by_group.items()]}
    out["gold"] = gold_section(out, root)
    return out


def load(paths: list[Path] | None, suffix: str = "") -> dict | None:
    """An arm's summary from one or more compare folders (or ``summary.json`` files), merged; its groups
    renamed ``<group><suffix>`` (None: not given)."""
    if not paths:
        return None
    files = [summary_path(p) for p in paths]
    summaries = [json.loads(f.read_text()) for f in files]
    summary = summaries[0] if len(summaries) == 1 else merged(summaries, files[0].parent)
    for r in summary["runs"]:
        r["group"] += suffix
    summary["gold"]["groups"] = {g + suffix: v for g, v in summary["gold"]["groups"].items()}
    return summary


def arm(name: str, g: dict, runs: list[dict]) -> dict:
    """One arm's row: its statistics over seeds from ``summary.json``'s gold section, plus length."""
    mine = [r for r in runs if r["group"] == name]
    fit = g["gao_fit"]
    return {"arm": name, "seeds": len(mine), "gold_change": g["gold_change"], "gold_change_se": g["gold_change_se"],
            "gold_at_budget": g["gold_at_budget"], "gold_curve_mean": g["gold_curve_mean"],
            "proxy_change": g["proxy_change"], "proxy_change_se": g["proxy_change_se"], "kl_at_budget": g["kl_at_budget"],
            "length_after": t_interval([r.get("heldout_length_after") for r in mine])["mean"],
            "peak_requests": g["peak_requests"], "turn_down": g["turn_down"],
            "gao_peak_sqrt_kl": fit["peak_sqrt_kl"], "gao_peak_gain": fit["peak_gain"],
            "gao_max_sqrt_kl": max((d for d, _ in gao_points(mine)), default=None)}  # the furthest any run went


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p ≥ 0.5) of Student's t with ``df`` degrees of freedom: Simpson's rule on its
    density and bisection, to ~1e-9 (no scipy here; stats.T95 holds only the 0.975 quantiles, rounded)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(x: float, steps: int = 2000) -> float:
        h = x / steps
        f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(steps + 1)]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    lo, hi = 0.0, 100.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def mde80(t: dict) -> float | None:
    """The minimum detectable difference of a paired comparison: the true mean difference its
    two-sided 5% paired t-test finds with 80% power at its n and SE, by the usual approximation
    MDE ≈ (t_{0.975, n−1} + t_{0.8, n−1}) · SE (the noncentral t gives a hair more: 3.27 SE, not 3.26, at 7 df)."""
    if t.get("se") is None or t.get("n", 0) < 2:
        return None
    return (t_quantile(0.975, t["n"] - 1) + t_quantile(POWER, t["n"] - 1)) * t["se"]


def side(t: dict) -> int:
    """+1 or −1 when a paired difference's 95% CI lies above or below 0, else 0."""
    if t.get("mean") is None or t.get("ci95") is None:
        return 0
    return 1 if t["mean"] - t["ci95"] > 0 else -1 if t["mean"] + t["ci95"] < 0 else 0


def leave_one_out(diffs: dict[int, float]) -> dict:
    """The paired difference recomputed with each seed left out in turn (issue 32: no single seed
    decides): the range of its mean, the lowest CI bound and highest, and ``decided`` — "+" or "−"
    when the CI excludes 0 on that side with all seeds and with every one left out, else None."""
    subsets = [t_interval([d for s, d in diffs.items() if s != out]) for out in diffs] if len(diffs) > 2 else []
    full = t_interval(list(diffs.values()))
    sides = {side(full), *map(side, subsets)}
    return {"mean_min": min((t["mean"] for t in subsets), default=None),
            "mean_max": max((t["mean"] for t in subsets), default=None),
            "ci_low_min": min((t["mean"] - t["ci95"] for t in subsets), default=None),
            "ci_high_max": max((t["mean"] + t["ci95"] for t in subsets), default=None),
            "decided": ("+" if sides == {1} else "−" if sides == {-1} else None) if subsets else None}


def paired_summary(diffs: dict[int, float]) -> dict:
    """Per-seed differences as the pages report them: mean, SE, 95% CI, n, ``mde80``, the values
    themselves (``per_seed``) and the ``leave_one_out``."""
    t = t_interval(list(diffs.values()))
    return {**t, "mde80": mde80(t), "per_seed": diffs, "leave_one_out": leave_one_out(diffs)}


def pair(runs: list[dict], a: str, b: str) -> dict | None:
    """(a − b) per seed on the gold at the budget and over the curve: mean, SE, 95% CI, n, the
    difference detectable with 80% power (``mde80``), every seed's difference and the leave-one-out."""
    both = [r for r in runs if r["group"] in (a, b)]
    if not any(r["group"] == a for r in both) or not any(r["group"] == b for r in both):
        return None
    return {key: paired_summary(seed_differences(both, a, b, key)) for key in ("gold_after", "gold_curve_mean")}


def verdict(p1: dict, dar_vs_dpo: dict | None) -> str:
    """The paper's claim, "DAR reaches OAIF-DPO's quality with fewer annotations", on this testbed:
    confirmed when P1's 95% CI lies below 1 (and at most 5% of resamples leave it undefined);
    refuted when DAR ends below OAIF-DPO at the same budget (the paired gold difference's 95% CI
    lies below 0) or P1's CI lies above 1; otherwise undecided at this power."""
    gold = (dar_vs_dpo or {}).get("gold_after") or {}
    below = gold.get("mean") is not None and gold.get("ci95") is not None and gold["mean"] + gold["ci95"] < 0
    if below or (p1.get("p1_ci_low") is not None and p1["p1_ci_low"] > 1):
        return "refuted"
    if p1.get("p1_ci_high") is not None and p1["p1_ci_high"] < 1 and (p1.get("p1_undefined_frac") or 0) <= 0.05:
        return "confirmed"
    return "undecided"


def analyse(core: dict, ratio0: dict | None, noise: dict | None, control: dict | None = None) -> dict:
    summaries = [s for s in (core, ratio0, noise, control) if s is not None]
    runs = [r for s in summaries for r in s["runs"]]
    groups = {name: g for s in summaries for name, g in s["gold"]["groups"].items()}
    arms = [arm(name, g, runs) for name, g in groups.items()]
    vs_dar = {name: pair(runs, name, "dar") for name in groups if name != "dar"}
    asked = {"dar − online-dpo": pair(runs, "dar", "online-dpo"),
             "dar_ratio 0 − dar_ratio 0.1": pair(runs, "dar" + RATIO0, "dar"),
             "dar − its shuffled-reward control": pair(runs, "dar", "dar" + CONTROL),
             "dar − online-dpo, 25% noise": pair(runs, "dar" + NOISE, "online-dpo" + NOISE),
             "dar: 25% noise − clean": pair(runs, "dar" + NOISE, "dar"),
             "online-dpo: 25% noise − clean": pair(runs, "online-dpo" + NOISE, "online-dpo")}
    asked = {k: v for k, v in asked.items() if v is not None}
    p1 = p1_bootstrap(core["runs"])
    full = verdict(p1, asked.get("dar − online-dpo"))
    # the verdict with each seed left out in turn: stated only when every one gives the same
    left_out = {s: verdict(p1_bootstrap([r for r in core["runs"] if r["seed"] != s]),
                           pair([r for r in runs if r["seed"] != s], "dar", "online-dpo")) for s in core["seeds"]}
    stated = full if set(left_out.values()) <= {full} else "undecided"
    ses = [v["gold_after"] for v in [*vs_dar.values(), *asked.values()] if v and v["gold_after"]["se"] is not None]
    largest = max(ses, key=lambda t: t["se"]) if ses else None
    return {"budget": core["annotation_budget"], "seeds": core["seeds"], "training_annotator": core["training_annotator"],
            "evaluator": core["evaluator"], "eval_dataset": core.get("eval_dataset"), "arms": arms,
            "paired_vs_dar": vs_dar, "paired_asked": asked, "p1": p1,
            "max_paired_se": largest and largest["se"], "max_paired_se_mde80": largest and largest["mde80"],
            "se_goal": SE_GOAL, "se_goal_met": bool(ses) and largest["se"] <= SE_GOAL,
            "verdict": stated, "verdict_all_seeds": full, "verdict_leave_one_out": left_out,
            "verdict_rule": " ".join(verdict.__doc__.split()) + " " + VERDICT_STATED}


def shown_pairs(res: dict) -> dict:
    """Every arm − DAR, then the pairs asked about that are not one of those (or one turned round)."""
    rows = {f"{k} − dar": v for k, v in res["paired_vs_dar"].items()}
    return rows | {k: v for k, v in res["paired_asked"].items() if k != "dar − online-dpo" and v not in rows.values()}


def fmt(x, spec: str = "+.3f") -> str:
    if x == math.inf:  # P1's upper bound when the subject too often never reaches the target
        return "never"
    return "—" if x is None else format(x, spec)


def jsonable(x):
    """``study.json`` without the non-standard ``Infinity``: an infinite P1 bound is written "never"."""
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [jsonable(v) for v in x]
    return "never" if isinstance(x, float) and math.isinf(x) else x


def cell(t: dict) -> str:
    """A paired difference in a table: mean ± SE [95% CI], n."""
    if t["mean"] is None:
        return "—"
    ci = "" if t["ci95"] is None else f" [{t['mean'] - t['ci95']:+.3f}, {t['mean'] + t['ci95']:+.3f}]"
    return f"{t['mean']:+.3f} ± {fmt(t['se'], '.3f')}{ci}, n={t['n']}"


def markdown(res: dict) -> str:
    out = [f"Budget {res['budget']} training requests per run, seeds {res['seeds']}; trained on "
           f"{res['training_annotator']}, graded by {res['evaluator']} on {res.get('eval_dataset')}"
           f"{SETS.get(Path(res.get('eval_dataset') or '').name, '')}. Every ± and CI is over seeds.", "",
           "| arm | seeds | gold Δ ± SE | gold at budget | gold over the curve | proxy Δ ± SE | KL at budget | "
           "length | gold peak @ requests | turns down | Gao peak √KL (gain) |", "|---" * 11 + "|"]
    for a in res["arms"]:
        gao = "— (no peak)" if a["gao_peak_sqrt_kl"] is None else f"{a['gao_peak_sqrt_kl']:.2f} ({a['gao_peak_gain']:+.3f})"
        if a["gao_peak_sqrt_kl"] is not None and a.get("gao_max_sqrt_kl") is not None \
                and a["gao_peak_sqrt_kl"] > a["gao_max_sqrt_kl"]:  # an extrapolation, not a peak anyone saw
            gao = f"past the data (runs reach {a['gao_max_sqrt_kl']:.2f})"
        out.append(f"| {a['arm']} | {a['seeds']} | {fmt(a['gold_change'])} ± {fmt(a['gold_change_se'], '.3f')} | "
                   f"{fmt(a['gold_at_budget'], '.3f')} | {fmt(a['gold_curve_mean'], '.3f')} | "
                   f"{fmt(a['proxy_change'])} ± {fmt(a['proxy_change_se'], '.3f')} | {fmt(a['kl_at_budget'], '.2f')} | "
                   f"{fmt(a['length_after'], '.1f')} | {fmt(a['peak_requests'], '.0f')} | {'yes' if a['turn_down'] else 'no'} | {gao} |")
    out += ["", "Paired within-seed differences of the gold (mean ± SE [95% CI], n seeds; MDE: the true difference a "
            "two-sided 5% paired t-test finds with 80% power at that n and SE, ≈ (t₀.₉₇₅ + t₀.₈, n − 1 df) · SE; "
            "one seed left out: the range of the mean, and the lowest and highest CI bound, over the n subsets "
            "without one seed; decided: the sign when the CI excludes 0 on that side with every seed in and with "
            "any one left out, else no):", "",
            "| difference | at the budget | MDE | one seed left out | decided | over the curve | MDE | decided |",
            "|---|---|---|---|---|---|---|---|"]

    def left_out(t):
        loo = t["leave_one_out"]
        if loo["mean_min"] is None:
            return "—"
        return (f"{loo['mean_min']:+.3f} to {loo['mean_max']:+.3f}; "
                f"[{fmt(loo['ci_low_min'])}, {fmt(loo['ci_high_max'])}]")

    def decided(t):
        return t["leave_one_out"]["decided"] or "no"
    for k, v in shown_pairs(res).items():
        at, curve = v["gold_after"], v["gold_curve_mean"]
        out.append(f"| {k} | {cell(at)} | {fmt(at['mde80'], '.3f')} | {left_out(at)} | {decided(at)} | "
                   f"{cell(curve)} | {fmt(curve['mde80'], '.3f')} | {decided(curve)} |")
    p1 = res["p1"]
    out += ["", f"P1 (DAR's requests ÷ OAIF-DPO's to reach OAIF-DPO's final gold): {fmt(p1['p1'], '.2f')}, "
            f"95% CI over seed resamples [{fmt(p1['p1_ci_low'], '.2f')}, {fmt(p1['p1_ci_high'], '.2f')}]; DAR never "
            f"reaches it in {fmt(p1.get('p1_never_frac'), '.0%')} of resamples (counted: P1 = never, past any bound).",
            f"Largest paired SE: {fmt(res['max_paired_se'], '.4f')} (goal ≤ {res['se_goal']}: "
            f"{'met' if res['se_goal_met'] else 'not met'}); at that SE the difference detectable with 80% power is "
            f"{fmt(res['max_paired_se_mde80'], '.3f')}.", "",
            f"With each seed left out in turn the rule gives: "
            f"{', '.join(f'{v} (seed {k} out)' for k, v in res['verdict_leave_one_out'].items())}.", "",
            f"**Verdict on the paper's claim: {res['verdict']}.** Rule: {res['verdict_rule']}"]
    return "\n".join(out) + "\n"


def strip_plot(ax, rows: dict[str, dict]) -> None:
    """One row per paired difference: every seed's value (grey: no seed hides in the mean) above the
    mean and its 95% CI over seeds (blue), with 0 marked."""
    for y, t in enumerate(rows.values()):
        seeds = sorted(t["per_seed"], key=int)
        jitter = [(i - (len(seeds) - 1) / 2) * 0.25 / max(len(seeds), 1) for i in range(len(seeds))]
        ax.scatter([t["per_seed"][s] for s in seeds], [y + 0.18 + j for j in jitter], s=9, color="tab:grey", alpha=0.8)
    ys = range(len(rows))
    ax.errorbar([v["mean"] for v in rows.values()], list(ys), xerr=[v["ci95"] or 0 for v in rows.values()], fmt="o", capsize=3)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(list(ys), list(rows), fontsize=7)


def plot(res: dict, groups: dict, path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, g in groups.items():
        xs = [p["requests"] for p in g["curve"]]
        left.plot(xs, [p["gold"] for p in g["curve"]], marker="o", ls="--" if "," in name else "-", label=name)
    left.set(xlabel="training annotator requests", ylabel="held-out gold (mean over seeds)", title="gold along training")
    left.legend(fontsize=7)
    strip_plot(right, {k: v["gold_after"] for k, v in shown_pairs(res).items() if v["gold_after"]["mean"] is not None})
    for x in (-0.03, 0.03):
        right.axvline(x, color="grey", lw=0.6, ls=":")
    right.set(xlabel="paired gold difference at the budget\n(grey: each seed; blue: the mean and its 95% CI over seeds)",
              title="differences the study asks about")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # each arm: one or more compare folders or summary.json files (seeds run in different sessions), merged
    p.add_argument("--core", type=Path, nargs="+", required=True, help="dar, online-dpo, rloo, grpo on the learned proxy")
    p.add_argument("--ratio0", type=Path, nargs="+", help="dar with dar_ratio 0, same seeds and config")
    p.add_argument("--noise", type=Path, nargs="+", help="dar and online-dpo on the proxy fitted to 25%%-flipped labels")
    p.add_argument("--control", type=Path, nargs="+", help="dar with shuffled rewards (--shuffle_rewards true), same seeds")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    core, ratio0, noise, control = load(a.core), load(a.ratio0, RATIO0), load(a.noise, NOISE), load(a.control, CONTROL)
    res = analyse(core, ratio0, noise, control)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "study.json").write_text(json.dumps(jsonable(res), indent=1, allow_nan=False))
    (a.out / "study.md").write_text(markdown(res))
    groups = {n: g for s in (core, ratio0, noise, control) if s for n, g in s["gold"]["groups"].items()}
    plot(res, groups, a.out / "study.png")
    print((a.out / "study.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
