"""What ``daralign compare`` writes at the end: ``summary.json`` (one record per run, mean ± std
per method over seeds, knob effects of a sweep, a prompt-order check) and ``report.html`` with PNGs.

Numbers, and where they come from (each run folder's files, written by the loop):
- ``train_reward_*``: the annotator's mean score of the step's online batch, before that step's
  update (``reward`` in metrics.jsonl). Reward methods only: preference methods get no scores.
- ``heldout_*``: the score-mode judge's mean score of answers to the fixed held-out prompts
  (``heldout_before/after.json``, ``eval/score`` every ``eval_steps``) — the same yardstick for
  every method, and the one to compare preference and reward methods on.
- ``kl_final``: Monte-Carlo KL(π‖π_ref) per sequence (nats) on the held-out answers after training,
  for every method (a reference forward at eval time); ``kl_train_final`` is the same on the last
  online batch, for methods that compute reference log-probs anyway.
- ``annotation_requests`` (the budget's unit: what the user pays) beside ``annotations`` (labels).
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

from daralign.annotators import describe_annotator, same_annotator  # noqa: E402
from daralign.compare.curves import gold_section, plot_gold, run_curve  # noqa: E402
from daralign.train.report import heldout_summary  # noqa: E402
from daralign.core.tracking import console, read_metrics  # noqa: E402
from daralign.objectives import OBJECTIVES, method_in_role  # noqa: E402

NUMERIC = ["annotation_requests", "eval_annotation_requests", "annotations", "steps", "train_reward_final", "train_reward_best", "gold_before",
           "gold_after", "proxy_before", "proxy_after", "heldout_before",
           "heldout_after", "heldout_diff", "heldout_best", "kl_final", "kl_train_final", "mean_length_final",
           "heldout_length_after", "wall_time_s", "train_time_s"]
TABLE = [("annotation_requests", "requests", 0), ("eval_annotation_requests", "eval requests", 0), ("annotations", "labels", 0), ("steps", "steps", 0),
         ("train_reward_final", "train reward final", 3),
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


def _eval_requests(run_dir: Path, last: dict) -> int:
    """Requests held-out scoring and win rates spent (the finished run's count, which includes the
    final evaluation; else the last logged step's)."""
    path = Path(run_dir) / "annotation_requests.json"
    if path.is_file():
        return json.loads(path.read_text()).get("eval_annotation_requests", 0)
    return last.get("eval_annotation_requests", 0)


def _cpu(run_dir: Path) -> str | None:
    """The CPU the run (its last start, when resumed) ran on, from its provenance.json: in fp32 the
    same run differs between CPU makes, so paired comparisons pair runs from one machine."""
    path = Path(run_dir) / "provenance.json"
    return json.loads(path.read_text()).get("cpu") if path.is_file() else None


def run_record(run_dir: Path, root: Path, budget: int) -> dict:
    meta = json.loads((run_dir / "compare_run.json").read_text())
    metrics = read_metrics(run_dir)
    rewards = [m["reward"] for m in metrics if m.get("reward") is not None]
    last = metrics[-1] if metrics else {}
    rec = {k: meta.get(k) for k in ("group", "algorithm", "point", "seed", "requests_per_step", "num_generations", "wall_time_s")}
    upfront = meta.get("label_requests") or 0  # offline dpo: its pairs' labels, bought before training
    rec |= {"dir": str(run_dir.relative_to(root)), "annotations": last.get("annotations", 0) + (meta.get("pairs") or 0),
            "annotation_requests": last.get("annotation_requests", 0) + upfront,
            "cache_hits": last.get("annotation_cache_hits", 0),
            "eval_annotation_requests": _eval_requests(run_dir, last),
            "steps": len(metrics), "train_reward_final": rewards[-1] if rewards else None,
            "train_reward_best": max(rewards) if rewards else None,
            "kl_train_final": last.get("kl"), "mean_length_final": last.get("completions/mean_length"),
            "train_time_s": sum(m.get("step_time") or 0.0 for m in metrics)}
    rec["budget_reached"] = budget - rec["annotation_requests"] < (meta.get("requests_per_prompt") or 1)  # no prompt fits any more
    rec["cpu"] = _cpu(run_dir)
    s = heldout_summary(run_dir)
    if s:
        rec |= {"kl_final": s["kl_after"], "evaluator": s["evaluator"],
                "evaluator_is_training_annotator": s["evaluator_is_training_annotator"]}
        evals = [m["eval/score"] for m in metrics if m.get("eval/score") is not None]
        rec |= {"heldout_before": s["before"], "heldout_after": s["after"], "heldout_diff": s["diff"],
                "heldout_se": s["se"], "heldout_best": max([s["before"], *evals, s["after"]]),
                "heldout_length_before": s["length_before"], "heldout_length_after": s["length_after"],
                "heldout_prompts": s["n_prompts"]}
        if not s["evaluator_is_training_annotator"]:  # an independent gold beside the proxy trained on
            rec |= {"gold_before": s["before"], "gold_after": s["after"], "proxy_before": s["proxy_before"],
                    "proxy_after": s["proxy_after"], "curve": run_curve(run_dir, upfront)}
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
    first = plan.runs[0].train
    summary = {
        "annotation_budget": plan.budget, "budget_unit": "annotator requests", "seeds": plan.seeds, "algorithms": plan.algorithms,
        "model": first.model_name_or_path, "dataset": first.dataset, "eval_dataset": first.eval_dataset,
        "training_annotator": describe_annotator(first.annotator),
        "evaluator": describe_annotator(first.eval_annotator or first.annotator),
        "evaluator_is_training_annotator": first.eval_annotator is None or same_annotator(first.eval_annotator, first.annotator),
        "sweep": plan.sweep, "sweep_algorithm": plan.sweep_algorithm, "runs": records,
        "groups": [{"group": g, "algorithm": rs[0]["algorithm"], "point": rs[0]["point"], **aggregate(rs)}
                   for g, rs in groups.items()],
    }
    # every run of a seed must have trained on one prompt stream (prefixes of the longest)
    if any("curve" in r for r in records):
        summary["gold"] = gold_section(summary, root)
    same = {}
    for seed in plan.seeds:  # offline dpo trains on its pairs, not on the prompt stream
        streams = [prompt_stream(r.out, r.K) for r in plan.runs if r.seed == seed and r.train.annotation_budget]
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


def _finite(obj, key: str = ""):
    """NaN/inf → None, so summary.json is strict JSON; but an infinite P1 bound (the subject never
    reaches the target in too many resamples) is "never", as ``study.json`` writes it."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else "never" if key.startswith("p1") and obj == math.inf else None
    if isinstance(obj, dict):
        return {k: _finite(v, k) for k, v in obj.items()}
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
    """(annotator requests, mean score, std) at 0, every eval step and the end, averaged over seeds."""
    curves = []
    for r in records:
        if r.get("heldout_after") is None:
            continue
        pts = [(0, r["heldout_before"])]
        pts += [(m["annotation_requests"], m["eval/score"]) for m in read_metrics(root / r["dir"]) if m.get("eval/score") is not None]
        pts.append((r["annotation_requests"], r["heldout_after"]))
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
        xs, ys = _series(by_group[g], root, "annotation_requests", "reward")
        if xs:
            axes[0].plot(xs, ys, marker="o", ms=3, color=color[g], label=g)
    axes[0].set(xlabel="annotator requests spent", ylabel="mean reward of the online batch",
                title="training reward (reward methods only)")
    if has_heldout:
        for i, g in enumerate(groups):
            xs, ys, sd = _heldout_curve(by_group[g], root)
            shift = (i - (len(groups) - 1) / 2) * 0.01 * summary["annotation_budget"]  # keep error bars apart
            if xs:
                axes[1].errorbar([x + shift for x in xs], ys, yerr=sd, marker="o", ms=4, capsize=3, color=color[g], label=g)
        axes[1].set(xlabel="annotator requests spent", ylabel="mean held-out score", title="held-out score (every method)")
    out.append((_finish(fig, axes, root / "reward_vs_annotations.png"),
                "Reward vs annotator requests spent. Left: the training annotator's mean score of each online batch "
                "(before that step's update); preference methods have none. Right: the evaluator "
                f"({summary['evaluator']}) on the fixed held-out prompts, before training, at each eval step and at "
                "the end (mean ± std over seeds)."))

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
        axes[1].set(xlabel="held-out KL(π‖π_ref) after (nats/seq)", ylabel="held-out score after",
                    title="held-out score vs KL (one point per run)")
    no_kl = [g for g in groups if all(r.get("kl_train_final") is None for r in by_group[g])]
    out.append((_finish(fig, axes, root / "reward_vs_kl.png"),
                "The over-optimisation frontier: reward against drift from the reference. Right: every method, KL "
                "measured on the held-out answers."
                + (f" Left has no curve for {', '.join(no_kl)} (no reference forward during training)." if no_kl else "")))

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for g in groups:
        xs, ys = _series(by_group[g], root, "step", "completions/mean_length")
        if xs:
            ax.plot(xs, ys, marker="o", ms=3, color=color[g], label=g)
    ax.set(xlabel="step", ylabel="tokens", title="mean response length of the online batch")
    out.append((_finish(fig, [ax], root / "length_vs_step.png"),
                "Mean sampled response length per step (mean over seeds). Steps cost different numbers of "
                "requests per method (see the table)."))

    if summary.get("gold"):
        out += plot_gold(summary, root, color)

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
    from rich.markup import escape
    from rich.table import Table

    keys = ["annotation_requests", "annotations", "train_reward_final", "heldout_after", "heldout_diff", "kl_final", "wall_time_s"]
    t = Table(title=f"compare: mean ± std over seeds (budget {summary['annotation_budget']}; all columns in report.html)")
    for name in ["method", "seeds"] + [label for k, label, _ in TABLE if k in keys]:
        t.add_column(name, overflow="fold")
    cols = [0, 1] + [2 + i for i, (k, _, _) in enumerate(TABLE) if k in keys]
    for row in table_rows(summary):
        t.add_row(*[escape(row[i]) for i in cols])  # `dar[dar_ratio=0]` is a name, not rich markup
    console.print(t)


def p1_titles() -> tuple[str, str]:
    """How the report names P1's subject and reference in prose (DAR, OAIF-DPO): the methods in
    those ``compare_role``s, by their ``title``."""
    def title(role: str) -> str:
        name = method_in_role(role)
        return (OBJECTIVES[name].title or name) if name else f"the {role}"
    return title("subject"), title("reference")


def gold_rows(summary: dict) -> list[list[str]]:
    """Per method: gold at the budget (mean ± 95% CI), requests to reach P1's reference's final
    gold, the gold's peak and whether it turned down while the proxy rose, and wall time."""
    def num(x, d=3):
        return "—" if x is None else f"{x:.{d}f}"

    rows = []
    for name, g in summary["gold"]["groups"].items():
        ci = f" ± {g['gold_at_budget_ci']:.3f}" if g.get("gold_at_budget_ci") is not None else ""
        def change(key):
            return "—" if g.get(f"{key}_change") is None else f"{g[f'{key}_change']:+.3f}" + (
                f" ± {g[f'{key}_change_se']:.3f}" if g.get(f"{key}_change_se") is not None else "")
        whole = num(g.get("gold_curve_mean")) + (f" ± {g['gold_curve_mean_ci']:.3f}" if g.get("gold_curve_mean_ci") is not None else "")
        rows.append([name, num(g["gold_at_budget"]) + ci, whole, change("gold"), num(g["proxy_at_budget"]), change("proxy"),
                     num(g["kl_at_budget"], 2),
                     num(g["requests_to_reach_oaif_dpo"], 0), f"{num(g['peak_gold'])} @ {num(g['peak_requests'], 0)}",
                     {True: "yes", False: "no", None: "—"}[g["turn_down"]], num(g["wall_time_s"], 0)])
    return rows


def gold_head() -> list[str]:
    return ["method", "gold at budget (95% CI)", "gold over the curve (95% CI)", "gold Δ (± SE over seeds)", "proxy at budget",
            "proxy Δ (± SE)", "KL at budget", f"requests to {p1_titles()[1]}'s final gold",
            "gold peak @ requests", "turns down while proxy rises", "wall time (s)"]


PAIRED_HEAD = ["method − {ref}, paired within seeds", "gold at budget (± SE, 95% CI)", "gold over the curve",
               "proxy at budget", "seeds"]


def paired_head(g: dict) -> list[str]:
    return [PAIRED_HEAD[0].format(ref=g.get("paired_reference")), *PAIRED_HEAD[1:]]


def paired_rows(summary: dict) -> list[list[str]]:
    """Per method: (method − the reference method) per seed, mean ± SE [95% CI] over seeds."""
    def cell(d):
        if d["mean"] is None:
            return "—"
        return f"{d['mean']:+.3f}" + (f" ± {d['se']:.3f} [{d['mean'] - d['ci95']:+.3f}, {d['mean'] + d['ci95']:+.3f}]"
                                      if d["se"] is not None else "")
    return [[name, cell(d["gold_after"]), cell(d["gold_curve_mean"]), cell(d["proxy_after"]), str(d["gold_after"]["n"])]
            for name, d in summary["gold"].get("paired", {}).items()]


def p1_definition() -> str:
    subject, reference = p1_titles()
    return f"{subject}'s requests ÷ {reference}'s to reach {reference}'s final gold"


def p1_text(g: dict) -> str:
    if g["p1"] is None:
        return "not measured ({} or {} never reached the target)".format(*p1_titles())

    def bound(x):  # inf ("never" in summary.json): in too many resamples the subject never reaches the target
        return "never" if x in (math.inf, "never") else f"{x:.2f}"

    ci = (f" (95% bootstrap CI over seeds {bound(g['p1_ci_low'])}–{bound(g['p1_ci_high'])}; "
          f"{g['p1_undefined_frac']:.0%} of resamples never reached it)") if g.get("p1_ci_low") is not None else ""
    return f"{g['p1']:.2f}{ci}"


def gold_table(summary: dict) -> str:
    if not summary.get("gold"):
        return ""
    esc = html.escape
    g = summary["gold"]
    def table(head, rows):
        cells = "".join(f"<th>{esc(h)}</th>" for h in head)
        body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
        return f"<table><tr>{cells}</tr>{body}</table>"

    return (f"<h2>Gold (the evaluator) against the proxy (the training annotator)</h2>{table(gold_head(), gold_rows(summary))}"
            f"<p>P1 = {p1_definition()} ({num_or_dash(g['oaif_dpo_final_gold'])}): "
            f"{esc(p1_text(g))}.</p>" + (table(paired_head(g), paired_rows(summary)) if g.get("paired") else ""))


def gold_markdown(summary: dict) -> str:
    """The gold table as Markdown (``gold.md``, for pasting into docs)."""
    g = summary["gold"]
    head = gold_head()
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in gold_rows(summary)]
    text = "\n".join(lines) + f"\n\nP1 ({p1_definition()}, {num_or_dash(g['oaif_dpo_final_gold'])}): {p1_text(g)}\n"
    if g.get("paired"):
        head = paired_head(g)
        text += "\n| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n"
        text += "\n".join("| " + " | ".join(row) + " |" for row in paired_rows(summary)) + "\n"
    return text


def num_or_dash(x) -> str:
    return "—" if x is None else f"{x:.3f}"


def seeds_per_cpu(records: list[dict]) -> str:
    """``<cpu>: seeds 1, 2; <cpu>: seeds 3``, the CPUs in the order the records first name them."""
    seeds: dict[str, set] = {}
    for r in records:
        seeds.setdefault(r.get("cpu") or "a CPU not recorded", set()).add(r["seed"])
    return "; ".join(f"{cpu}: seeds {', '.join(map(str, sorted(s)))}" for cpu, s in seeds.items())


def machines_note(records: list[dict]) -> str:
    """Which CPU ran the runs; where several did, which seeds each ran (a paired difference across two
    CPU makes holds the machines' difference too: docs/testbed.md, "The lag study")."""
    cpus = {r.get("cpu") or "a CPU not recorded" for r in records}
    if len(cpus) == 1:
        return f"Every run on one machine: {cpus.pop()}."
    return ("Runs from SEVERAL MACHINES (in fp32 two CPU makes train the same run to slightly different ends, so a "
            "difference between runs of different machines holds theirs too): " + seeds_per_cpu(records) + ".")


def write_html(summary: dict, root: Path) -> Path:
    root = Path(root)
    plots = plot_all(summary, root)
    if summary.get("gold"):
        (root / "gold.md").write_text(gold_markdown(summary))
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in ["method", "seeds"] + [label for _, label, _ in TABLE])
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in table_rows(summary))
    order = summary["same_prompt_order"]
    under = [r["dir"] for r in summary["runs"] if not r["budget_reached"]]
    over = [f"{r['dir']} ({r['annotation_requests']})" for r in summary["runs"] if r["annotation_requests"] > summary["annotation_budget"]]
    same = summary["evaluator_is_training_annotator"]
    prov = json.loads((root / "provenance.json").read_text()) if (root / "provenance.json").exists() else {}
    libs = ", ".join(f"{k} {v}" for k, v in prov.get("libraries", {}).items() if v)
    notes = [f"Policy {summary['model']}, trained on {summary['dataset']}, held-out prompts {summary['eval_dataset']}.",
             f"daralign {prov.get('daralign')} (commit {prov.get('git_commit') or 'unknown'}); {libs}.",
             f"Trained by: {summary['training_annotator']}. Evaluated by: {summary['evaluator']}"
             + (" — the SAME annotator the methods trained on: the held-out score is the signal the reward methods "
                "optimise, not an independent yardstick (give eval_annotator for one)." if same else " (independent of training)."),
             f"Budget: {summary['annotation_budget']} annotator requests per run (what the user pays: both orders of a "
             f"comparison are 2, retries and invalid answers count, cache hits are free); the last step is cut to fit.",
             "Same prompts in the same order for every run of a seed: "
             + ", ".join(f"seed {s}: {'yes' if ok else 'NO'}" for s, ok in order.items()) + "."]
    notes.append(machines_note(summary["runs"]))
    if over:
        notes.append("OVER BUDGET (requests spent): " + ", ".join(over) + ".")
    if under:
        notes.append("Budget not spent (the run hit max_steps first): " + ", ".join(under) + ".")
    notes.append("Training reward exists for reward methods only; compare all methods on the held-out score. "
                 "Held-out Δ = after − before, paired over prompts. KL: held-out, nats per sequence.")
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
{gold_table(summary)}
<ul>{''.join(f'<li>{esc(n)}</li>' for n in notes)}</ul>
<h2>Plots</h2>{figs}
<p>Per-run numbers: <code>summary.json</code>; each run's metrics, completions and held-out answers are in its folder.</p>
</body></html>
"""
    path = root / "report.html"
    path.write_text(page)
    return path
