"""The end-of-run report: PNG plots of reward / KL / length per step and ``report.md`` with the
held-out before/after numbers (paired difference ± standard error over prompts), the
shuffled-reward control beside them when it was run, and a few before/after samples."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from daralign.annotators import describe_annotator  # noqa: E402
from daralign.train.heldout import paired_difference  # noqa: E402
from daralign.core.tracking import read_metrics  # noqa: E402

PLOTS = [("reward", "training reward (annotator)"), ("kl", "KL(π_t ‖ π_ref) per sequence"),
         ("completions/mean_length", "mean response length (tokens)")]


def _heldout(run_dir: Path, tag: str) -> dict | None:
    path = run_dir / f"heldout_{tag}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _paired(first: dict, second: dict) -> tuple[tuple, tuple]:
    """(mean, s.e.) of second − first per prompt, for the evaluator's score and the proxy's."""
    return (paired_difference(first["per_prompt"], second["per_prompt"]),
            paired_difference(first.get("proxy_per_prompt") or [], second.get("proxy_per_prompt") or []))


def heldout_summary(run_dir: str | Path) -> dict | None:
    run_dir = Path(run_dir)
    before, after = _heldout(run_dir, "before"), _heldout(run_dir, "after")
    if not before or not after:
        return None
    (diff, se), (proxy_diff, proxy_se) = _paired(before, after)
    return {"before": before["score"], "after": after["score"], "diff": diff, "se": se,
            "length_before": before["mean_length"], "length_after": after["mean_length"],
            "kl_before": before.get("kl"), "kl_after": after.get("kl"),
            "proxy_before": before.get("proxy_score"), "proxy_after": after.get("proxy_score"),
            "proxy_diff": proxy_diff, "proxy_se": proxy_se,
            "evaluator": after.get("evaluator"), "evaluator_is_training_annotator": after.get("evaluator_is_training_annotator"),
            "n_prompts": len(before["per_prompt"])}


def control_gap(run_dir: str | Path, control_dir: str | Path) -> dict | None:
    """Trained after − control after, per prompt (both start from the same before), ± s.e."""
    trained, control = _heldout(Path(run_dir), "after"), _heldout(Path(control_dir), "after")
    if not trained or not control or len(trained["per_prompt"]) != len(control["per_prompt"]):
        return None
    (diff, se), (proxy_diff, proxy_se) = _paired(control, trained)
    return {"diff": diff, "se": se, "proxy_diff": proxy_diff, "proxy_se": proxy_se}


def fmt(x, spec: str = ".4f") -> str:
    """A number, or "not measured" (never "nan")."""
    return "not measured" if x is None else format(x, spec)


def plot_runs(runs: dict[str, Path], out_dir: Path) -> list[str]:
    names = []
    for key, title in PLOTS:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for label, run in runs.items():
            rows = [r for r in read_metrics(run) if r.get(key) is not None]
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], marker="o", ms=3, label=label)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        name = key.replace("/", "_") + ".png"
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        names.append(name)
    return names


def write_report(run_dir: str | Path, control_dir: str | Path | None = None, n_samples: int = 4) -> Path:
    run_dir = Path(run_dir)
    runs = {"trained": run_dir} | ({"shuffled-reward control": Path(control_dir)} if control_dir else {})
    plots = plot_runs(runs, run_dir)
    lines = ["# daralign run report", ""]
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").exists() else {}
    prov = json.loads((run_dir / "provenance.json").read_text()) if (run_dir / "provenance.json").exists() else {}
    if cfg:
        trained_by = describe_annotator(cfg["annotator"]) if cfg.get("annotator") else "no annotator (offline pairs)"
        lines += [f"- algorithm `{cfg.get('algorithm')}`, policy `{cfg.get('model_name_or_path')}`",
                  f"- data `{cfg.get('dataset')}`, held-out `{cfg.get('eval_dataset')}`",
                  f"- trained by: {trained_by}",
                  f"- evaluated by: {describe_annotator(cfg['eval_annotator']) if cfg.get('eval_annotator') else 'the training annotator'}"]
    for label, path in runs.items():
        spent = Path(path) / "annotation_requests.json"
        if spent.is_file():
            s = json.loads(spent.read_text())
            cost = f"; training requests cost {s['annotation_cost']:.4g} at the judge's prices" if s.get("annotation_cost") else ""
            lines.append(f"- annotator requests ({label}): {s.get('annotation_requests', 0)} for training (the budget's unit), "
                         f"{s.get('eval_annotation_requests', 0)} for evaluation{cost}")
    if prov:
        lines.append(f"- daralign {prov.get('daralign')} (commit {prov.get('git_commit') or 'unknown'}), "
                     + ", ".join(f"{k} {v}" for k, v in prov.get("libraries", {}).items() if v))
    lines.append("")
    summaries = {label: heldout_summary(path) for label, path in runs.items()}
    summaries = {label: s for label, s in summaries.items() if s}
    with_proxy = any(s["proxy_before"] is not None for s in summaries.values())
    lines += ["## Held-out score (fixed prompts, fixed sampling seed)", "",
              "| run | before | after | after − before (± s.e. over prompts) | "
              + ("training annotator: before → after (Δ ± s.e.) | " if with_proxy else "")
              + "KL(π‖π_ref) after (nats/seq) | length before → after |",
              "|---|---|---|---|" + ("---|" if with_proxy else "") + "---|---|"]
    evaluator = next(iter(summaries.values()), None)
    for label, s in summaries.items():
        proxy = (f"{fmt(s['proxy_before'], '.4f')} → {fmt(s['proxy_after'], '.4f')} "
                 f"({fmt(s['proxy_diff'], '+.4f')} ± {fmt(s['proxy_se'])}) | ") if with_proxy else ""
        lines.append(f"| {label} | {fmt(s['before'])} | {fmt(s['after'])} | {fmt(s['diff'], '+.4f')} ± {fmt(s['se'])} | "
                     f"{proxy}{fmt(s['kl_after'], '.2f')} | {s['length_before']:.1f} → {s['length_after']:.1f} |")
    gap = control_gap(run_dir, control_dir) if control_dir else None
    if gap:
        lines += ["", f"Trained − control after training, paired over the held-out prompts: "
                  f"**{fmt(gap['diff'], '+.4f')} ± {fmt(gap['se'])}**"
                  + (f" (training annotator: {fmt(gap['proxy_diff'], '+.4f')} ± {fmt(gap['proxy_se'])})"
                     if gap["proxy_diff"] is not None else "") + "."]
    if evaluator and evaluator.get("evaluator"):
        same = evaluator.get("evaluator_is_training_annotator")
        lines += ["", f"Scored by: {evaluator['evaluator']}" + (
            " — **the same annotator the run trained on**, so this score is the signal it optimised, not an "
            "independent yardstick (set `eval_annotator` for one)." if same else " (not the training annotator"
            + ("; the training annotator's own score of the same answers is beside it" if with_proxy else "") + ").")]
    lines += ["", "A gain counts only if it clearly exceeds the control's: the control trains on rewards "
              "shuffled across the batch, so whatever it gains is drift, not learning from the annotator.", ""]
    lines += [f"![{p}]({p})" for p in plots] + [""]
    before, after = _heldout(run_dir, "before"), _heldout(run_dir, "after")
    if before and after:
        prompts = json.loads((run_dir / "heldout_prompts.json").read_text()) if (run_dir / "heldout_prompts.json").exists() else None
        lines += ["## Before / after samples (held-out prompts)", ""]
        for i in range(min(n_samples, len(before["completions"]))):
            if prompts:
                lines.append(f"**Prompt:** {prompts[i]}")
            lines += [f"- before ({fmt(before['per_prompt'][i], '.3f')}): {before['completions'][i]!r}",
                      f"- after ({fmt(after['per_prompt'][i], '.3f')}): {after['completions'][i]!r}", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    write_results(run_dir, summaries, gap)
    return path


def write_results(run_dir: Path, summaries: dict, gap: dict | None) -> Path:
    """``results.json`` beside ``report.md``: the report's numbers for a script or a doc to quote.
    "gold" is the held-out evaluator (``eval_annotator``; the training annotator where none is set,
    which ``evaluator_is_training_annotator`` says), "proxy" the training annotator's score of the
    same answers. Differences are paired over held-out prompts (each prompt's answers averaged)."""
    trained, control = summaries.get("trained"), summaries.get("shuffled-reward control")
    results = {"evaluator": (trained or {}).get("evaluator"),
               "evaluator_is_training_annotator": (trained or {}).get("evaluator_is_training_annotator"),
               "num_heldout_prompts": (trained or {}).get("n_prompts"),
               # what every *_se here is over: one training seed's held-out prompts, not seeds
               "se_unit": "held-out prompts of one training run (paired per prompt); seed-to-seed spread not included"}
    for name, s in (("trained", trained), ("control", control)):
        if s:
            results[name] = {"gold_before": s["before"], "gold_after": s["after"], "gold_delta": s["diff"],
                             "gold_delta_se": s["se"], "proxy_before": s["proxy_before"], "proxy_after": s["proxy_after"],
                             "proxy_delta": s["proxy_diff"], "proxy_delta_se": s["proxy_se"], "kl_after": s["kl_after"],
                             "length_before": s["length_before"], "length_after": s["length_after"]}
    if gap:
        results |= {"gold_delta_vs_control": gap["diff"], "gold_delta_vs_control_se": gap["se"],
                    "proxy_delta_vs_control": gap["proxy_diff"], "proxy_delta_vs_control_se": gap["proxy_se"]}
    path = run_dir / "results.json"
    path.write_text(json.dumps(results, indent=1))
    return path
