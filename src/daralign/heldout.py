"""Held-out check: the annotator's mean score on a fixed prompt set, sampled with a fixed seed.

Run before and after training (and every ``eval_steps``), it measures progress on prompts the
policy never trained on; per-prompt scores allow a paired before/after difference with its
standard error. Sampling runs inside ``torch.random.fork_rng`` so the training RNG stream (and
hence exact resume) is untouched. Its annotations are not counted in the training budget.
"""

from __future__ import annotations

import math

import torch

from daralign.rollout.hf import sample_rollout


def judge_heldout(model, tokenizer, annotator, rows: list[dict], *, max_new_tokens: int, temperature: float,
                  seed: int, samples_per_prompt: int = 2, bf16: bool = False, batch_size: int = 32) -> dict:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rollout = sample_rollout(model, tokenizer, rows, num_generations=samples_per_prompt,
                                 max_completion_length=max_new_tokens, temperature=temperature,
                                 generation_batch_size=batch_size, bf16=bf16)
    K = samples_per_prompt
    prompts = [rollout.prompt_of(i) for i in range(len(rollout.completions))]
    result = annotator.score(prompts, rollout.completions, [rows[i // K] for i in range(len(prompts))])
    per_prompt = []
    for p in range(len(rows)):
        s = [x for x in result.scores[p * K:(p + 1) * K] if x is not None]
        per_prompt.append(sum(s) / len(s) if s else float("nan"))
    lengths = rollout.completion_lengths.float()
    valid = [x for x in per_prompt if math.isfinite(x)]
    return {
        "score": sum(valid) / max(len(valid), 1),
        "per_prompt": per_prompt,
        "mean_length": lengths.mean().item(),
        "eos_frac": rollout.is_eos.float().mean().item(),
        "completions": rollout.completions[::K],
    }


def paired_difference(before: list[float], after: list[float]) -> tuple[float, float]:
    """Mean and standard error over prompts of (after − before)."""
    diffs = [a - b for a, b in zip(after, before) if math.isfinite(a) and math.isfinite(b)]
    n = len(diffs)
    if n < 2:
        return (diffs[0] if diffs else float("nan")), float("nan")
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    return mean, math.sqrt(var / n)
