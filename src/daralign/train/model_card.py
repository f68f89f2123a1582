"""``final/README.md``: the trained model's card, in the Hub's format (YAML metadata, then prose):
the method and its paper, the base model, the annotator that trained it and the yardstick that
measured it, the data, the key settings, the held-out results and the provenance."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import yaml

from daralign.annotators import describe_annotator
from daralign.objectives import get_objective

# TrainConfig's settings every card shows; the method's own (its Config's fields) go between them
SHARED_SETTINGS = ("learning_rate", "max_steps", "num_generations", "max_completion_length", "temperature", "annotation_budget")
SHARED_LAST = ("use_peft", "seed")


def key_settings(algorithm: str) -> tuple[str, ...]:
    """The settings the card lists: the shared ones, then every field of the method's config."""
    cfg = get_objective(algorithm).Config
    return SHARED_SETTINGS + (tuple(f.name for f in dataclasses.fields(cfg)) if cfg else ()) + SHARED_LAST


def _fmt(x) -> str:
    return "—" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)


def write_model_card(out: Path, config: dict, provenance: dict) -> Path:
    """Write ``out/final/README.md`` from the run folder (config, held-out files, metrics)."""
    final = out / "final"
    algorithm = config["algorithm"]  # the run's whole config (``to_dict`` of its TrainConfig and method config)
    objective = get_objective(algorithm)
    annotator, evaluator = config.get("annotator"), config.get("eval_annotator")
    meta = {"library_name": "transformers", "base_model": config.get("model_name_or_path"),
            "tags": ["daralign", algorithm, "rlaif", "alignment"], "pipeline_tag": "text-generation"}
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {Path(str(config.get('model_name_or_path'))).name} aligned with {algorithm}", "",
             f"Trained online from AI feedback with [daralign](https://pypi.org/project/daralign/): **{algorithm}** — "
             f"{objective.paper or algorithm}.", "",
             "## Training", "",
             f"- Base model: `{config.get('model_name_or_path')}`",
             f"- Annotator (what it learned from): {describe_annotator(annotator) if isinstance(annotator, dict) else 'none (offline pairs)'}",
             f"- Data: `{config.get('dataset')}`" + (f"; held-out prompts `{config.get('eval_dataset')}`" if config.get("eval_dataset") else ""),
             "", "| setting | value |", "|---|---|"]
    lines += [f"| `{k}` | {_fmt(config[k])} |" for k in key_settings(algorithm) if config.get(k) is not None]
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
