"""``final/README.md``: the trained model's card, in the Hub's format (YAML metadata, then prose):
the method and its paper, the base model, the annotator that trained it and the yardstick that
measured it, the data, the key settings, the held-out results and the provenance."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from daralign.annotators import describe_annotator

PAPERS = {  # the paper of each method's protocol (docs/algorithms.md)
    "dar": "Direct Advantage Regression (He et al., arXiv 2504.14177)",
    "online-dpo": "Online AI Feedback (Guo et al., arXiv 2402.04792) with DPO (Rafailov et al., arXiv 2305.18290)",
    "online-ipo": "Online AI Feedback (Guo et al., arXiv 2402.04792) with IPO (Azar et al., arXiv 2310.12036)",
    "online-slic": "Online AI Feedback (Guo et al., arXiv 2402.04792) with SLiC (Zhao et al., arXiv 2305.10425)",
    "rloo": "RLOO (Ahmadian et al., arXiv 2402.14740)",
    "grpo": "GRPO (Shao et al., arXiv 2402.03300)",
    "ppo": "PPO for RLHF (Ouyang et al., arXiv 2203.02155)",
    "bon-sft": "SFT on the online best-of-N (rejection sampling)",
    "dpo": "DPO (Rafailov et al., arXiv 2305.18290), offline",
}
KEY_SETTINGS = ("learning_rate", "max_steps", "num_generations", "max_completion_length", "temperature", "annotation_budget",
                "dar_alpha", "dar_beta", "weight_clip", "kl_coef", "beta", "loss_type", "use_peft", "seed")


def _fmt(x) -> str:
    return "—" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)


def write_model_card(out: Path, config: dict, provenance: dict) -> Path:
    """Write ``out/final/README.md`` from the run folder (config, held-out files, metrics)."""
    final = out / "final"
    algorithm = config.get("algorithm", "dar")
    annotator, evaluator = config.get("annotator"), config.get("eval_annotator")
    meta = {"library_name": "transformers", "base_model": config.get("model_name_or_path"),
            "tags": ["daralign", algorithm, "rlaif", "alignment"], "pipeline_tag": "text-generation"}
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {Path(str(config.get('model_name_or_path'))).name} aligned with {algorithm}", "",
             f"Trained online from AI feedback with [daralign](https://pypi.org/project/daralign/): **{algorithm}** — "
             f"{PAPERS.get(algorithm, algorithm)}.", "",
             "## Training", "",
             f"- Base model: `{config.get('model_name_or_path')}`",
             f"- Annotator (what it learned from): {describe_annotator(annotator) if isinstance(annotator, dict) else 'none (offline pairs)'}",
             f"- Data: `{config.get('dataset')}`" + (f"; held-out prompts `{config.get('eval_dataset')}`" if config.get("eval_dataset") else ""),
             "", "| setting | value |", "|---|---|"]
    lines += [f"| `{k}` | {_fmt(config[k])} |" for k in KEY_SETTINGS if config.get(k) is not None]
    spent = out / "annotation_requests.json"
    if spent.is_file():
        s = json.loads(spent.read_text())
        lines += ["", f"Annotator requests: {s.get('annotation_requests', 0)} for training, "
                      f"{s.get('eval_annotation_requests', 0)} for evaluation."]
    before, after = (out / "heldout_before.json", out / "heldout_after.json")
    if before.is_file() and after.is_file():
        b, a = json.loads(before.read_text()), json.loads(after.read_text())
        who = describe_annotator(evaluator) if isinstance(evaluator, dict) else "the training annotator itself"
        lines += ["", "## Held-out results", "",
                  f"Scored by {who}" + ("" if isinstance(evaluator, dict) else " (not an independent yardstick)") + ".", "",
                  "| | before | after |", "|---|---|---|",
                  f"| score | {_fmt(b.get('score'))} | {_fmt(a.get('score'))} |",
                  f"| KL(π‖π_ref), nats | {_fmt(b.get('kl'))} | {_fmt(a.get('kl'))} |",
                  f"| mean length, tokens | {_fmt(b.get('mean_length'))} | {_fmt(a.get('mean_length'))} |"]
        if a.get("proxy_score") is not None:
            lines.append(f"| training annotator's score | {_fmt(b.get('proxy_score'))} | {_fmt(a.get('proxy_score'))} |")
    libs = ", ".join(f"{k} {v}" for k, v in (provenance.get("libraries") or {}).items() if v)
    lines += ["", "## Provenance", "", f"daralign {provenance.get('daralign')} (commit {provenance.get('git_commit')}); "
              f"Python {provenance.get('python')}; {libs}.", ""]
    path = final / "README.md"
    path.write_text("\n".join(lines))
    return path
