"""Gold curves of a ``daralign compare`` with an independent ``eval_annotator`` (the *gold*) beside
the training annotator (the *proxy*): what the over-optimisation papers plot.

Per run, from its folder: the held-out gold score, proxy score and KL(π‖π_ref) before training
(0 requests), at every ``eval_steps`` and at the end, each at the annotator requests spent so far.
Per method: the mean over seeds at each request count with a 95% confidence interval
(Student t over seeds), and

- ``gold_at_budget``: the final gold, mean and CI; ``gold_change`` and ``proxy_change``: after −
  before, mean over seeds with its standard error (``_z`` = change ÷ SE);
- ``requests_to_reach``: the first request count where the mean gold reaches a target (the final
  gold of P1's reference method, OAIF-DPO; linear between evaluations) — ``p1`` = the subject's
  (DAR's) ÷ the reference's; the two are the methods whose classes declare that ``compare_role``;
- ``peak_requests``/``turn_down``: where the mean gold peaks, and whether it then falls by more
  than its CI while the proxy still rises — the proxy being hacked.

The best-of-n reference on the starting policy (KL = log n − (n−1)/n) is drawn on the gold-vs-√KL
axes; ``evaluation/best_of_n.py`` measures it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from daralign.compare.paired import curve_mean, fit_gao, gao_points, p1_bootstrap, paired_differences  # noqa: E402
from daralign.compare.stats import group_curve, mean_ci, requests_to_reach, t95  # noqa: E402,F401  (public here too)
from daralign.core.tracking import read_metrics  # noqa: E402
from daralign.objectives import OBJECTIVES, method_in_role  # noqa: E402


def run_curve(run_dir: Path, upfront_requests: int = 0) -> list[dict]:
    """[{requests, step, train_s, gold, proxy, kl, length}] from a run's held-out files.
    ``upfront_requests``: what was spent before training (offline DPO's pair labels): every trained
    point sits there. ``train_s``: the seconds of training up to that step (the sum of ``step_time``,
    waits for samples and labels included, evaluations not), the x of a gold-against-wall-time plot."""
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    spent = {m["step"]: m.get("annotation_requests", 0) for m in metrics}
    trained, clock = {0: 0.0}, 0.0
    for m in metrics:
        clock += m.get("step_time") or 0.0
        trained[m["step"]] = clock
    points = []
    for path in run_dir.glob("heldout_*.json"):
        tag = path.stem.removeprefix("heldout_")
        if tag == "before":
            step = 0
        elif tag == "after":
            step = max(spent, default=0)
        elif tag.startswith("step") and tag[4:].isdigit():
            step = int(tag[4:])
        else:
            continue  # heldout_reference_answers.json
        h = json.loads(path.read_text())
        requests = 0 if step == 0 else upfront_requests + spent.get(step, 0)
        points.append({"requests": requests, "step": step, "train_s": trained.get(step), "gold": h.get("score"), "proxy": h.get("proxy_score"),
                       "kl": h.get("kl"), "length": h.get("mean_length"), "after": tag == "after"})
    points.sort(key=lambda p: (p["step"], p["after"]))
    return [p for i, p in enumerate(points) if not (i and p["step"] == points[i - 1]["step"])]  # after == last eval


def peak(curve: list[dict]) -> dict:
    """Where the mean gold peaks, and whether it turns down after: the final gold lies below the
    peak by more than the peak's CI while the proxy at the end is above the proxy at the peak."""
    pts = [p for p in curve if p["gold"] is not None]
    if not pts:
        return {"peak_requests": None, "peak_gold": None, "turn_down": None}
    best = max(pts, key=lambda p: p["gold"])
    end = pts[-1]
    margin = best["gold_ci"] or 0.0
    proxy_rises = best["proxy"] is not None and end["proxy"] is not None and end["proxy"] > best["proxy"]
    return {"peak_requests": best["requests"], "peak_gold": best["gold"],
            "turn_down": bool(end is not best and best["gold"] - end["gold"] > margin and proxy_rises)}


def change_over_seeds(runs: list[dict], key: str) -> dict:
    """``<key>_change`` (after − before, mean over seeds), its standard error and their ratio ``_z``."""
    diffs = [r[f"{key}_after"] - r[f"{key}_before"] for r in runs
             if r.get(f"{key}_after") is not None and r.get(f"{key}_before") is not None]
    change, ci = mean_ci(diffs)
    se = ci / t95(len(diffs) - 1) if ci is not None else None
    return {f"{key}_change": change, f"{key}_change_se": se, f"{key}_change_z": change / se if se else None}


def gold_section(summary: dict, root: Path) -> dict:
    """Per-group gold curves and statistics for ``summary.json`` (needs per-run ``curve``). P1's
    subject and reference are the methods whose classes play those roles (``compare_role``); the
    JSON keys keep the names of the reference it was written for (``requests_to_reach_oaif_dpo``)."""
    groups = {}
    for g in summary["groups"]:
        runs = [r for r in summary["runs"] if r["group"] == g["group"] and r.get("curve")]
        curve = group_curve([r["curve"] for r in runs])
        final = curve[-1] if curve else {}
        whole, whole_ci = mean_ci([curve_mean(r["curve"]) for r in runs])
        groups[g["group"]] = {"curve": curve, "gold_at_budget": final.get("gold"), "gold_at_budget_ci": final.get("gold_ci"),
                              "gold_curve_mean": whole, "gold_curve_mean_ci": whole_ci,
                              **change_over_seeds(runs, "gold"), **change_over_seeds(runs, "proxy"),
                              "proxy_at_budget": final.get("proxy"), "kl_at_budget": final.get("kl"), **peak(curve),
                              "gao_fit": fit_gao(gao_points(runs), "rl"), "wall_time_s": g["mean"].get("wall_time_s")}
    subject, reference = method_in_role("subject"), method_in_role("reference")
    target = (groups.get(reference) or {}).get("gold_at_budget")
    offline = offline_groups(summary)  # labels bought before training: no request count reaches anything
    for name, g in groups.items():
        g["requests_to_reach_oaif_dpo"] = requests_to_reach(g["curve"], target) if name not in offline else None
    traced = [r for r in summary["runs"] if r.get("curve")]
    paired_reference = subject if subject in groups else next(iter(groups), None)
    boot = p1_bootstrap(traced, subject=subject, reference=reference)
    return {"groups": groups, "oaif_dpo_final_gold": target, "p1": boot["p1"], "p1_ci_low": boot["p1_ci_low"],
            "p1_ci_high": boot["p1_ci_high"], "p1_undefined_frac": boot["p1_undefined_frac"],
            "p1_never_frac": boot["p1_never_frac"],
            "paired_reference": paired_reference,
            "paired": paired_differences(traced, paired_reference) if paired_reference else {},
            "bon_reference": json.loads((root / "best_of_n.json").read_text()) if (root / "best_of_n.json").exists() else None}


def offline_groups(summary: dict) -> set[str]:
    """The groups of methods whose labels came before training (``feedback_kind == "offline"``)."""
    return {g["group"] for g in summary["groups"]
            if g["algorithm"] in OBJECTIVES and OBJECTIVES[g["algorithm"]].feedback_kind == "offline"}


# ---------------------------------------------------------------- plots
def plot_gold(summary: dict, root: Path, colors: dict) -> list[tuple[str, str]]:
    gold = summary["gold"]
    out = []
    offline = offline_groups(summary)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, g in gold["groups"].items():
        c = [p for p in g["curve"] if p["gold"] is not None]
        if not c:
            continue
        xs, ys = [p["requests"] for p in c], [p["gold"] for p in c]
        ci = [p["gold_ci"] or 0.0 for p in c]
        style = dict(color=colors[name], label=name, marker="o", ms=3)
        if name in offline:  # labels bought before training: one point at their cost
            axes[0].errorbar(xs[-1:], ys[-1:], yerr=ci[-1:], capsize=3, **style)
        else:
            axes[0].plot(xs, ys, **style)
            axes[0].fill_between(xs, [y - e for y, e in zip(ys, ci)], [y + e for y, e in zip(ys, ci)], color=colors[name], alpha=0.12)
        ks = [math.sqrt(max(p["kl"], 0.0)) if p["kl"] is not None else None for p in c]
        axes[1].plot([k for k in ks if k is not None], [y for k, y in zip(ks, ys) if k is not None], **style)
    bon = gold.get("bon_reference")
    if bon:
        axes[1].plot([math.sqrt(p["kl"]) for p in bon["curve"]], [p["gold"] for p in bon["curve"]], "k--", marker="s", ms=3,
                     label=f"best-of-n by proxy (n ≤ {bon['n_max']})")
    axes[0].set(xlabel="annotator requests spent", ylabel="held-out gold (mean, 95% CI)", title="gold vs annotation cost")
    axes[1].set(xlabel="√KL(π‖π_ref)  (nats^½ per sequence)", ylabel="held-out gold", title="gold vs √KL: the frontier")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(root / "gold_vs_requests_and_kl.png", dpi=110)
    plt.close(fig)
    offline_names = "/".join(n for n, cls in OBJECTIVES.items() if cls.feedback_kind == "offline")
    out.append(("gold_vs_requests_and_kl.png",
                f"Left: the gold ({summary['evaluator']}) on the held-out prompts against annotator requests spent, mean "
                f"over seeds with its 95% CI; offline {offline_names} bought all its labels before training (one point). Right: the "
                "same gold against √KL to the reference, with best-of-n on the starting policy, chosen by the proxy "
                "(KL = log n − (n−1)/n), dashed."))
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, g in gold["groups"].items():
        c = [p for p in g["curve"] if p["gold"] is not None and p["proxy"] is not None]
        if c:
            ax.plot([p["proxy"] for p in c], [p["gold"] for p in c], marker="o", ms=3, color=colors[name], label=name)
            ax.plot(c[-1]["proxy"], c[-1]["gold"], marker="*", ms=10, color=colors[name])
    if bon:
        ax.plot([p["proxy"] for p in bon["curve"]], [p["gold"] for p in bon["curve"]], "k--", marker="s", ms=3, label="best-of-n")
    ax.set(xlabel="held-out proxy (training annotator)", ylabel="held-out gold", title="proxy vs gold (★ = end)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(root / "proxy_vs_gold.png", dpi=110)
    plt.close(fig)
    out.append(("proxy_vs_gold.png", "Held-out proxy against held-out gold along each method's training (mean over "
                                     "seeds): a curve bending right-and-down is the proxy rising while the gold falls."))
    return out
