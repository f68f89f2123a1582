"""Offline DPO inside ``daralign compare``: its preference pairs are bought up front with the same
request budget the online methods spend while training.

The starting policy answers twice each of the prompts online DPO would see (the same seeded
prompt schedule), the training annotator compares the two in compare mode, and the pairs become a
``{prompt, chosen, rejected}`` file (TRL's format) for ``algorithm: dpo``. One epoch over them is
as many optimizer steps as OAIF-DPO takes on the budget. Invalid and tied labels give no pair
but their requests still count.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from daralign.annotators import annotator_for, build_annotator, describe_annotator, requests_per_label
from daralign.core.data import PromptSchedule, load_prompts
from daralign.core.models import load_causal_lm, load_tokenizer
from daralign.core.rng import fork_rng
from daralign.rollout.hf import sample_rollout
from daralign.core.tracking import console


def label_pairs(train, budget: int, path: Path) -> dict:
    """Write ``path`` (jsonl pairs) and return ``{"requests", "pairs", "prompts"}``; a finished file is reused."""
    meta_path = path.with_suffix(".meta.json")
    if path.is_file() and meta_path.is_file():
        return json.loads(meta_path.read_text())
    judge_cfg = annotator_for(train.annotator, "compare", f"{train.algorithm} (pair labels)", needs_score=False)
    judge = build_annotator(judge_cfg)
    per_pair = requests_per_label(judge_cfg, "compare")
    schedule = PromptSchedule(load_prompts(train.dataset, column=train.prompt_column, split=train.dataset_split,
                                           config=train.dataset_config), train.prompts_per_step, train.seed)
    steps = budget // per_pair // train.prompts_per_step
    rows = [r for step in range(steps) for r in schedule.batch(step)]
    console.print(f"{train.algorithm}: labelling {len(rows)} pairs from the starting policy with {describe_annotator(judge_cfg)} "
                  f"({per_pair} requests each, budget {budget})")
    tokenizer = load_tokenizer(train.model_name_or_path, train.trust_remote_code)
    model = load_causal_lm(train.model_name_or_path, train.dtype, train.trust_remote_code).eval()
    with fork_rng():
        torch.manual_seed(train.seed)
        rollout = sample_rollout(model, tokenizer, rows, num_generations=2, max_completion_length=train.max_completion_length,
                                 temperature=train.temperature, top_p=train.top_p, top_k=train.top_k,
                                 max_prompt_length=train.max_prompt_length,
                                 generation_batch_size=train.generation_batch_size, bf16=train.bf16)
    del model
    a, b = rollout.completions[0::2], rollout.completions[1::2]
    judge.meter.allow(budget)
    try:
        probs = judge.compare([r["prompt"] for r in rows], a, b, rows).prob_a
        requests = judge.num_requests
    finally:
        judge.close()
    pairs = [{"prompt": r["prompt"], "chosen": x if p > 0.5 else y, "rejected": y if p > 0.5 else x}
             for r, x, y, p in zip(rows, a, b, probs) if p is not None and p != 0.5 and x != y]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    meta = {"requests": requests, "pairs": len(pairs), "prompts": len(rows)}
    meta_path.write_text(json.dumps(meta))
    return meta

