"""What ``daralign compare`` writes at the end: ``summary.json`` (one record per run, mean ± std
per method over seeds, knob effects of a sweep, a prompt-order check) and ``report.html`` with PNGs.

Numbers, and where they come from (each run folder's files, written by the loop):
- ``train_reward_*``: the annotator's mean score of the step's online batch, before that step's
  update (``reward`` in metrics.jsonl). Reward methods only: preference methods get no scores.
- ``heldout_*``: the score-mode judge's mean score of answers to the fixed held-out prompts
  (``heldout_before/after.json``, ``eval/score`` every ``eval_steps``) — the same yardstick for
  every method, and the one to compare preference and reward methods on.
- ``kl_final``: Monte-Carlo KL(π‖π_ref) per sequence on the last step's samples (before its
  update); absent for methods that run without a reference model (bon-sft, kl_coef/beta = 0).
- ``wall_time_s``: the whole run (loading, held-out evaluation, training, saving);
  ``train_time_s``: the sum of ``step_time``.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from daralign.report import heldout_summary  # noqa: E402
from daralign.tracking import console, read_metrics  # noqa: E402

NUMERIC = ["annotations", "steps", "train_reward_final", "train_reward_best", "heldout_before", "heldout_after",
           "heldout_diff", "heldout_best", "kl_final", "mean_length_final", "heldout_length_after",
           "wall_time_s", "train_time_s"]
TABLE = [("annotations", "annotations", 0), ("steps", "steps", 0), ("train_reward_final", "train reward final", 3),
         ("train_reward_best", "train reward best", 3), ("heldout_before", "held-out before", 3),
         ("heldout_after", "held-out after", 3), ("heldout_diff", "held-out Δ", 3), ("kl_final", "KL final", 2),
         ("mean_length_final", "length final", 1), ("wall_time_s", "wall time (s)", 0)]


# ---------------------------------------------------------------- reading runs
def prompt_stream(run_dir: Path, K: int) -> list[int]:
    """Prompt indices the run trained on, in order (one per prompt, from completions.jsonl)."""
    path = Path(run_dir) / "completions.jsonl"
    if not path.exists():
        return []
    by_step: dict[int, list[int]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            by_step.setdefault(r["step"], []).append(r["prompt_index"])
    return [i for step in sorted(by_step) for i in by_step[step][::K]]


def run_record(run_dir: Path, root: Path, budget: int) -> dict:
    meta = json.loads((run_dir / "compare_run.json").read_text())
    metrics = read_metrics(run_dir)
    rewards = [m["reward"] for m in metrics if m.get("reward") is not None]
    last = metrics[-1] if metrics else {}
    rec = {k: meta[k] for k in ("group", "algorithm", "point", "seed", "annotations_per_step", "wall_time_s")}
    rec |= {"dir": str(run_dir.relative_to(root)), "annotations": last.get("annotations", 0), "steps": len(metrics),
            "train_reward_final": rewards[-1] if rewards else None,
            "train_reward_best": max(rewards) if rewards else None,
            "kl_final": last.get("kl"), "mean_length_final": last.get("completions/mean_length"),
            "train_time_s": sum(m.get("step_time") or 0.0 for m in metrics)}
    rec["budget_reached"] = rec["annotations"] >= budget
    s = heldout_summary(run_dir)
    if s:
        evals = [m["eval/score"] for m in metrics if m.get("eval/score") is not None]
        rec |= {"heldout_before": s["before"], "heldout_after": s["after"], "heldout_diff": s["diff"],
                "heldout_se": s["se"], "heldout_best": max([s["before"], *evals, s["after"]]),
                "heldout_length_before": s["length_before"], "heldout_length_after": s["length_after"],
                "heldout_prompts": s["n_prompts"]}
    return rec


def _mean_std(values: list) -> tuple[float | None, float | None]:
    xs = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def aggregate(records: list[dict]) -> dict:
    out = {"n": len(records), "mean": {}, "std": {}}
    for k in NUMERIC:
        out["mean"][k], out["std"][k] = _mean_std([r.get(k) for r in records])
    return out


def summarise(plan, root: Path) -> dict:
    root = Path(root)
    records = [run_record(r.out, root, plan.budget) for r in plan.runs]
    groups: dict[str, list[dict]] = {}
    for rec in records:
        groups.setdefault(rec["group"], []).append(rec)
    summary = {
        "annotation_budget": plan.budget, "seeds": plan.seeds, "algorithms": plan.algorithms,
        "sweep": plan.sweep, "sweep_algorithm": plan.sweep_algorithm, "runs": records,
        "groups": [{"group": g, "algorithm": rs[0]["algorithm"], "point": rs[0]["point"], **aggregate(rs)}
                   for g, rs in groups.items()],
    }
    # every run of a seed must have trained on one prompt stream (prefixes of the longest)
    same = {}
    for seed in plan.seeds:
        streams = [prompt_stream(r.out, r.train.num_generations) for r in plan.runs if r.seed == seed]
        longest = max(streams, key=len, default=[])
        same[str(seed)] = all(s == longest[:len(s)] for s in streams)
    summary["same_prompt_order"] = same
    if plan.sweep:
        effects = {}
        swept = [rec for rec in records if rec["algorithm"] == plan.sweep_algorithm]
        for knob, values in plan.sweep.items():
            effects[knob] = {v: aggregate([r for r in swept if r["point"].get(knob) == v]) for v in values}
        summary["sweep_effects"] = effects
    return _finite(summary)


def _finite(obj):
    """NaN/inf → None, so summary.json is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


# ---------------------------------------------------------------- plots
def _series(records: list[dict], root: Path, x: str, y: str) -> tuple[list, list]:
    """Mean over seeds of metrics ``y`` (and ``x``) by step, up to the shortest run."""
    per_run = [[m for m in read_metrics(root / r["dir"]) if m.get(y) is not None and m.get(x) is not None]
               for r in records]
    per_run = [rows for rows in per_run if rows]
    if not per_run:
        return [], []
    n = min(len(rows) for rows in per_run)
    xs = [sum(rows[i][x] for rows in per_run) / len(per_run) for i in range(n)]
    ys = [sum(rows[i][y] for rows in per_run) / len(per_run) for i in range(n)]
    return xs, ys


def _heldout_curve(records: list[dict], root: Path):
    """(annotations, mean score, std) at 0, every eval step and the end, averaged over seeds."""
    curves = []
    for r in records:
        if r.get("heldout_after") is None:
            continue
        pts = [(0, r["heldout_before"])]
        pts += [(m["annotations"], m["eval/score"]) for m in read_metrics(root / r["dir"]) if m.get("eval/score") is not None]
        pts.append((r["annotations"], r["heldout_after"]))
        curves.append(pts)
    if not curves:
        return [], [], []
    n = min(len(c) for c in curves)
    stats = [_mean_std([c[i][1] for c in curves]) for i in range(n)]
    return ([sum(c[i][0] for c in curves) / len(curves) for i in range(n)], [s[0] for s in stats], [s[1] for s in stats])


def _colors(names: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    return {g: cmap(i % cmap.N) for i, g in enumerate(names)}


def _finish(fig, ax_list, path: Path) -> str:
    for ax in ax_list:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def plot_all(summary: dict, root: Path) -> list[tuple[str, str]]:
    """Write the PNGs; returns [(file name, caption)]."""
    runs = summary["runs"]
    groups = [g["group"] for g in summary["groups"]]
    by_group = {g: [r for r in runs if r["group"] == g] for g in groups}
    color = _colors(groups)
    has_heldout = any(r.get("heldout_after") is not None for r in runs)
    out = []

    fig, axes = plt.subplots(1, 2 if has_heldout else 1, figsize=(10 if has_heldout else 5.5, 3.6), squeeze=False)
    axes = axes[0]
    for g in groups:
        xs, ys = _series(by_group[g], root, "annotations", "reward")
        if xs:
            axes[0].plot(xs, ys, marker="o", ms=3, color=color[g], label=g)
    axes[0].set(xlabel="annotations used", ylabel="mean reward of the online batch",
                title="training reward (reward methods only)")
    if has_heldout:
        for i, g in enumerate(groups):
            xs, ys, sd = _heldout_curve(by_group[g], root)
            shift = (i - (len(groups) - 1) / 2) * 0.01 * summary["annotation_budget"]  # keep error bars apart
            if xs:
                axes[1].errorbar([x + shift for x in xs], ys, yerr=sd, marker="o", ms=4, capsize=3, color=color[g], label=g)
        axes[1].set(xlabel="annotations used", ylabel="mean judge score", title="held-out score (every method)")
    out.append((_finish(fig, axes, root / "reward_vs_annotations.png"),
                "Reward vs annotations used. Left: the annotator's mean score of each online batch (before that "
                "step's update); preference methods have none. Right: the score-mode judge on the fixed held-out "
                "prompts, before training, at each eval step and at the end (mean ± std over seeds)."))

    fig, axes = plt.subplots(1, 2 if has_heldout else 1, figsize=(10 if has_heldout else 5.5, 3.6), squeeze=False)
    axes = axes[0]
    for g in groups:
        xs, ys = _series(by_group[g], root, "kl", "reward")
        xs_ok = [(a, b) for a, b in zip(xs, ys) if a is not None]
        if xs_ok:
            axes[0].plot(*zip(*xs_ok), marker="o", ms=3, color=color[g], label=g)
            axes[0].plot(*xs_ok[-1], marker="*", ms=10, color=color[g])
    axes[0].set(xlabel="KL(π‖π_ref) per sequence", ylabel="training reward", title="training reward vs KL (★ = last step)")
    if has_heldout:
        for g in groups:
            pts = [(r["kl_final"], r["heldout_after"]) for r in by_group[g] if r.get("kl_final") is not None
                   and r.get("heldout_after") is not None]
            if pts:
                axes[1].scatter(*zip(*pts), color=color[g], label=g, s=30)
        axes[1].set(xlabel="KL(π‖π_ref) at the last step", ylabel="held-out score after",
                    title="held-out score vs KL (one point per run)")
    no_kl = [g for g in groups if all(r.get("kl_final") is None for r in by_group[g])]
    out.append((_finish(fig, axes, root / "reward_vs_kl.png"),
                "The over-optimisation frontier: reward against drift from the reference."
                + (f" No KL for {', '.join(no_kl)} (run without a reference model)." if no_kl else "")))

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for g in groups:
        xs, ys = _series(by_group[g], root, "step", "completions/mean_length")
        if xs:
            ax.plot(xs, ys, marker="o", ms=3, color=color[g], label=g)
    ax.set(xlabel="step", ylabel="tokens", title="mean response length of the online batch")
    out.append((_finish(fig, [ax], root / "length_vs_step.png"),
                "Mean sampled response length per step (mean over seeds). Steps cost different numbers of "
                "annotations per method (see the table)."))

    for knob, effects in (summary.get("sweep_effects") or {}).items():
        keys = [k for k in ("heldout_after", "train_reward_final") if any(e["mean"][k] is not None for e in effects.values())]
        if not keys:
            continue
        fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 3.4), squeeze=False)
        axes = axes[0]
        values = list(effects)
        for ax, k in zip(axes, keys):
            ys = [effects[v]["mean"][k] for v in values]
            sd = [effects[v]["std"][k] or 0.0 for v in values]
            pos = [i for i, y in enumerate(ys) if y is not None]
            ax.errorbar(pos, [ys[i] for i in pos], yerr=[sd[i] for i in pos], marker="o", capsize=3)
            ax.set_xticks(range(len(values)), values)
            ax.set(xlabel=knob, title={"heldout_after": "held-out score after", "train_reward_final": "final training reward"}[k])
        out.append((_finish(fig, axes, root / f"sweep_{knob}.png"),
                    f"{summary['sweep_algorithm']}: effect of {knob}, each value averaged over the other knobs and the "
                    f"seeds (error bars: std over those runs)."))
    return out


# ---------------------------------------------------------------- tables
def _fmt(mean, std, digits: int, n: int) -> str:
    if mean is None:
        return "—"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if n > 1 and std is not None else "")


def table_rows(summary: dict) -> list[list[str]]:
    return [[g["group"], str(g["n"])] + [_fmt(g["mean"][k], g["std"][k], d, g["n"]) for k, _, d in TABLE]
            for g in summary["groups"]]


def print_table(summary: dict) -> None:
    from rich.table import Table

    keys = ["annotations", "train_reward_final", "heldout_after", "heldout_diff", "kl_final", "wall_time_s"]
    t = Table(title=f"compare: mean ± std over seeds (budget {summary['annotation_budget']}; all columns in report.html)")
    for name in ["method", "seeds"] + [label for k, label, _ in TABLE if k in keys]:
        t.add_column(name, overflow="fold")
    cols = [0, 1] + [2 + i for i, (k, _, _) in enumerate(TABLE) if k in keys]
    for row in table_rows(summary):
        t.add_row(*[row[i] for i in cols])
    console.print(t)


def write_html(summary: dict, root: Path) -> Path:
    root = Path(root)
    plots = plot_all(summary, root)
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in ["method", "seeds"] + [label for _, label, _ in TABLE])
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in table_rows(summary))
    order = summary["same_prompt_order"]
    under = [r["dir"] for r in summary["runs"] if not r["budget_reached"]]
    over = [f"{r['dir']} ({r['annotations']})" for r in summary["runs"] if r["annotations"] > summary["annotation_budget"]]
    notes = [f"Budget: {summary['annotation_budget']} annotations per run (one per scored response, one per judged "
             f"pair); a run stops after the step that reaches it, so the last step may overshoot.",
             "Same prompts in the same order for every run of a seed: "
             + ", ".join(f"seed {s}: {'yes' if ok else 'NO'}" for s, ok in order.items()) + "."]
    if over:
        notes.append("Overshoot (annotations used): " + ", ".join(over) + ".")
    if under:
        notes.append("Budget not reached (invalid labels are not counted): " + ", ".join(under) + ".")
    notes.append("Training reward exists for reward methods only; compare all methods on the held-out score. "
                 "Held-out Δ = after − before, paired over prompts.")
    figs = "".join(f'<figure><img src="{esc(name)}" alt="{esc(name)}"><figcaption>{esc(cap)}</figcaption></figure>'
                   for name, cap in plots)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>daralign compare</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}td:first-child{{text-align:left}}
figure{{margin:1.5em 0}}img{{max-width:100%}}figcaption{{font-size:13px;color:#444}}</style></head><body>
<h1>daralign compare</h1>
<p>Algorithms: {esc(', '.join(summary['algorithms']))}; seeds: {esc(', '.join(map(str, summary['seeds'])))}
{esc(f"; {summary['sweep_algorithm']} grid: {summary['sweep']}") if summary['sweep'] else ''}.</p>
<h2>Mean ± std over seeds</h2><table><tr>{head}</tr>{body}</table>
<ul>{''.join(f'<li>{esc(n)}</li>' for n in notes)}</ul>
<h2>Plots</h2>{figs}
<p>Per-run numbers: <code>summary.json</code>; each run's metrics, completions and held-out answers are in its folder.</p>
</body></html>
"""
    path = root / "report.html"
    path.write_text(page)
    return path
