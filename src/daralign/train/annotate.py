"""Ask the annotator about a rollout and package the answer as ``Feedback``.

Score objectives get a (P, K) reward matrix. Compare objectives get pairs within each prompt:

- K = 2: the one pair (0, 1), as OAIF samples it;
- K > 2 with ``best_vs_worst``: a round-robin of all K(K-1)/2 pairs is judged, and the sample
  with the most wins is trained against the one with the fewest;
- K > 2 without it: K//2 disjoint pairs (0, 1), (2, 3), ..., each judged once and each trained on.

Every ``Feedback`` carries what the annotator spent on it, read from its meter: labels
(``num_annotations``), requests (``num_requests``, the budget's unit) and free cache hits.

The shuffled-reward control (``shuffle_rewards``: learning vs drift) is applied here too
(``shuffled_control``), after the labels are bought: the control spends exactly what its run spends.
"""

from __future__ import annotations

from typing import Callable

import torch

from daralign.annotators.base import Annotator
from daralign.core.errors import AnnotationError
from daralign.core.types import Feedback, Rollout
from daralign.objectives.base import candidate_pairs


class _Spend:
    """What the annotator spent (on its meter's current account) between construction and ``feedback(...)``."""

    def __init__(self, annotator: Annotator) -> None:
        self.annotator = annotator
        self.start = annotator.meter.snapshot()

    def feedback(self, **fields) -> Feedback:
        labels, requests, hits = (now - then for now, then in zip(self.annotator.meter.snapshot(), self.start))
        return Feedback(num_annotations=labels, num_requests=requests, num_cache_hits=hits, **fields)


def completion_token_ids(rollout: Rollout) -> list[list[int]]:
    """Each sample's completion token ids (EOS included), as plain lists."""
    return [row[mask.bool()].tolist() for row, mask in zip(rollout.input_ids.cpu(), rollout.completion_mask.cpu())]


def fill_invalid(rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """An invalid sample takes its prompt's mean valid reward: objectives drop it (valid mask), and
    the number it holds can neither move a baseline nor overflow anything."""
    fill = (rewards * valid).sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp(min=1)
    return torch.where(valid, rewards, fill)


def score_feedback(annotator: Annotator, rollout: Rollout, *, missing_eos_penalty: float | None = None) -> Feedback:
    K = rollout.num_generations
    spend = _Spend(annotator)
    ids = completion_token_ids(rollout)  # TRL's `completion_ids` column for reward functions
    rows = [{**rollout.rows[i // K], "completion_ids": ids[i]} for i in range(len(rollout.completions))]
    prompts = [rollout.prompt_of(i) for i in range(len(rollout.completions))]
    result = annotator.score(prompts, rollout.completions, rows)  # checked by the annotator base: one finite value or None each
    valid = torch.tensor([s is not None for s in result.scores]).view(-1, K)
    rewards = torch.tensor([s if s is not None else 0.0 for s in result.scores], dtype=torch.float32).view(-1, K)
    if missing_eos_penalty is not None:
        rewards = rewards - missing_eos_penalty * (~rollout.is_eos).float().view(-1, K)
    rewards = fill_invalid(rewards, valid)
    metrics = dict(result.metrics)
    metrics["annotator/invalid_frac"] = 1.0 - valid.float().mean().item()
    device = rollout.input_ids.device
    return spend.feedback(rewards=rewards.to(device), valid=valid.to(device), metrics=metrics)


def shuffle_rewards(rewards: torch.Tensor, valid: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The control run's rewards: (reward, valid) pairs permuted together across the whole batch,
    so a reward no longer says anything about the response it is attached to (anything that
    still "improves" is drift), while the invalid labels stay exactly as many."""
    perm = torch.randperm(rewards.numel(), generator=generator).to(rewards.device)
    r, v = rewards.reshape(-1)[perm].view_as(rewards), valid.reshape(-1)[perm].view_as(valid)
    return fill_invalid(r, v), v


def compare_feedback(annotator: Annotator, rollout: Rollout, *, best_vs_worst: bool = True) -> Feedback:
    K = rollout.num_generations
    if K < 2:
        raise AnnotationError("preference feedback needs num_generations ≥ 2")
    spend = _Spend(annotator)
    round_robin = K > 2 and best_vs_worst
    candidates = candidate_pairs(rollout.num_prompts, K, best_vs_worst)
    result = annotator.compare(
        [rollout.prompt_of(i) for i, _ in candidates],
        [rollout.completions[i] for i, _ in candidates],
        [rollout.completions[j] for _, j in candidates],
        [rollout.rows[i // K] for i, _ in candidates],
    )
    probs = result.prob_a  # checked by the annotator base: probabilities or None
    if round_robin:
        wins = torch.zeros(rollout.num_prompts * K)
        judged = torch.zeros(rollout.num_prompts, dtype=torch.long)
        for (i, j), p in zip(candidates, probs):
            if p is not None:
                wins[i] += p
                wins[j] += 1 - p
                judged[i // K] += 1
        pairs, prefs = [], []
        for p in range(rollout.num_prompts):
            w = wins[p * K:(p + 1) * K]
            best, worst = p * K + int(w.argmax()), p * K + int(w.argmin())
            if judged[p] and best != worst:  # a prompt with no valid label, or all wins equal, has no pair
                pairs.append((best, worst))
                prefs.append(1.0)
    else:
        pairs = [c for c, p in zip(candidates, probs) if p is not None]
        prefs = [p for p in probs if p is not None]
    metrics = dict(result.metrics)
    metrics["annotator/invalid_frac"] = sum(p is None for p in probs) / max(len(probs), 1)
    return spend.feedback(pairs=pairs, preference=torch.tensor(prefs, dtype=torch.float32), metrics=metrics)


def offline_feedback(rollout: Rollout) -> Feedback:
    """Offline preference data: sample 2p is the chosen response of prompt p, 2p+1 the rejected
    one. The labels came with the data, so nothing is spent."""
    pairs = [(2 * p, 2 * p + 1) for p in range(rollout.num_prompts)]
    return Feedback(num_annotations=0, pairs=pairs, preference=torch.ones(len(pairs)))


def annotate(annotator: Annotator | None, rollout: Rollout, *, kind: str, best_vs_worst: bool = True,
             missing_eos_penalty: float | None = None) -> Feedback:
    """The feedback an objective of ``kind`` (score | compare | offline) learns from."""
    if kind == "offline":
        return offline_feedback(rollout)
    if kind == "compare":
        return compare_feedback(annotator, rollout, best_vs_worst=best_vs_worst)
    return score_feedback(annotator, rollout, missing_eos_penalty=missing_eos_penalty)


def shuffled_control(feedback: Feedback, *, seed: int, step: int, rank: int,
                     gather: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> Feedback:
    """The control run's feedback (``shuffle_rewards``): labels that say nothing about the responses.

    - Scores: (reward, valid) permuted across the *global* batch (``gather`` collects every
      process's rows), identically on every process, seeded by (seed, step).
    - Preferences: every label replaced by a fair coin flip, seeded by (seed, step, process); ties
      stay ties, so the control has exactly as many labels as the run it controls.
    """
    if feedback.rewards is None:
        g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 8191 + rank)
        coins = torch.bernoulli(torch.full((len(feedback.pairs),), 0.5), generator=g).to(feedback.preference)
        feedback.preference = torch.where((feedback.preference - 0.5).abs() > 1e-6, coins, feedback.preference)
        return feedback
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    P = feedback.rewards.shape[0]
    rewards = gather(feedback.rewards.contiguous())
    valid = gather(feedback.valid.long().contiguous()).bool()
    rewards, valid = shuffle_rewards(rewards.cpu(), valid.cpu(), g)
    mine = slice(rank * P, (rank + 1) * P)
    feedback.rewards, feedback.valid = rewards[mine].to(feedback.rewards.device), valid[mine].to(feedback.rewards.device)
    return feedback
