"""Ask the annotator about a rollout and package the answer as ``Feedback``.

Score objectives get a (P, K) reward matrix; compare objectives get pairs within each prompt:
(0, 1) when K = 2, or, when K > 2, the best and worst of a round-robin of all K(K-1)/2 pairs
(each compared pair costs one annotation).
"""

from __future__ import annotations

import math

import torch

from daralign.annotators.base import Annotator
from daralign.errors import AnnotationError
from daralign.types import Feedback, Rollout


def score_feedback(annotator: Annotator, rollout: Rollout, *, missing_eos_penalty: float | None = None,
                   shuffle_generator: torch.Generator | None = None) -> Feedback:
    K = rollout.num_generations
    before = annotator.num_annotations
    rows = [rollout.rows[i // K] for i in range(len(rollout.completions))]
    prompts = [rollout.prompt_of(i) for i in range(len(rollout.completions))]
    result = annotator.score(prompts, rollout.completions, rows)
    if len(result.scores) != len(rollout.completions):
        raise AnnotationError(f"annotator {annotator.name!r} returned {len(result.scores)} scores for {len(rollout.completions)} completions")
    for i, s in enumerate(result.scores):
        if s is not None and not math.isfinite(s):
            raise AnnotationError(f"annotator {annotator.name!r}: score {i} is {s}; non-finite rewards are never trained on")
    valid = torch.tensor([s is not None for s in result.scores]).view(-1, K)
    rewards = torch.tensor([s if s is not None else 0.0 for s in result.scores], dtype=torch.float32).view(-1, K)
    if missing_eos_penalty is not None:
        rewards = rewards - missing_eos_penalty * (~rollout.is_eos).float().view(-1, K)
    if not valid.all():
        # An invalid sample takes its prompt's mean valid reward: zero advantage, and the objective
        # also drops it (valid mask), so it neither moves the baseline nor gets a weight.
        fill = (rewards * valid).sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp(min=1)
        rewards = torch.where(valid, rewards, fill)
    if shuffle_generator is not None:
        # Control run: rewards permuted across the whole batch, so they carry no information about
        # the response they are attached to. Anything that still "improves" is drift.
        perm = torch.randperm(rewards.numel(), generator=shuffle_generator)
        rewards = rewards.reshape(-1)[perm].view_as(rewards)
    metrics = dict(result.metrics)
    metrics["annotator/invalid_frac"] = 1.0 - valid.float().mean().item()
    device = rollout.input_ids.device
    return Feedback(num_annotations=annotator.num_annotations - before, rewards=rewards.to(device),
                    valid=valid.to(device), metrics=metrics)


def compare_feedback(annotator: Annotator, rollout: Rollout, *, best_vs_worst: bool = True) -> Feedback:
    K = rollout.num_generations
    if K < 2:
        raise AnnotationError("preference feedback needs num_generations ≥ 2")
    before = annotator.num_annotations
    candidates = [(p * K + a, p * K + b) for p in range(rollout.num_prompts)
                  for a in range(K) for b in range(a + 1, K)] if (K > 2 and best_vs_worst) else \
                 [(p * K, p * K + 1) for p in range(rollout.num_prompts)]
    result = annotator.compare(
        [rollout.prompt_of(i) for i, _ in candidates],
        [rollout.completions[i] for i, _ in candidates],
        [rollout.completions[j] for _, j in candidates],
        [rollout.rows[i // K] for i, _ in candidates],
    )
    probs = result.prob_a
    if K > 2 and best_vs_worst:
        wins = torch.zeros(rollout.num_prompts * K)
        for (i, j), p in zip(candidates, probs):
            if p is not None:
                wins[i] += p
                wins[j] += 1 - p
        pairs, prefs = [], []
        for p in range(rollout.num_prompts):
            w = wins[p * K:(p + 1) * K]
            best, worst = p * K + int(w.argmax()), p * K + int(w.argmin())
            if best != worst:
                pairs.append((best, worst))
                prefs.append(1.0)
    else:
        pairs = [c for c, p in zip(candidates, probs) if p is not None]
        prefs = [p for p in probs if p is not None]
    for p in prefs:
        if not math.isfinite(p) or not 0 <= p <= 1:
            raise AnnotationError(f"annotator {annotator.name!r} returned preference {p}; expected a probability")
    metrics = dict(result.metrics)
    metrics["annotator/invalid_frac"] = sum(p is None for p in probs) / max(len(probs), 1)
    return Feedback(num_annotations=annotator.num_annotations - before, pairs=pairs,
                    preference=torch.tensor(prefs, dtype=torch.float32), metrics=metrics)
