"""SFT on the online Best-of-N (iterative rejection sampling / ReST-style), one file.

Each step: sample N = K responses per prompt from the current policy, score them, keep the best

    y*(x) = argmax_k r(x, y_k)            (ties → the first; invalid samples never win)
    L(θ)  = − mean_x log π_θ(y*(x)|x)     (sequence NLL: the sum of the token log-probs of y*)

Sequence NLL, not the per-token mean: it is exactly DAR's loss −mean w·log π(y|x) with w = 1 on
the argmax and 0 elsewhere (the limit DAR's weights approach at small α+β), so a comparison with
DAR isolates the weighting rather than also changing the length normalisation. The price: a long
selected response gets a proportionally larger gradient than a short one, as in DAR.
"""

from __future__ import annotations

import math

import torch

from daralign.core.errors import ConfigError
from daralign.objectives.base import Objective, register_objective


def best_of_n(rewards: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(index (num_prompts,) of the best valid sample per prompt, whether the prompt has one).
    rewards (num_prompts, K); ties go to the first maximum (``torch.argmax`` guarantees it)."""
    valid = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid.bool()
    masked = torch.where(valid, rewards.double(), -math.inf)
    return masked.argmax(dim=1), valid.any(dim=1)


@register_objective("bon-sft")
class BestOfNSFT(Objective):
    Config = None  # no knobs of its own: N is num_generations
    feedback_kind = "score"
    paper = "SFT on the online best-of-N (rejection sampling)"
    title = "best-of-N SFT"
    needs_reference = False

    def __init__(self, config, train, **kw) -> None:
        super().__init__(config, train, **kw)
        if train is not None and train.num_generations < 2:
            raise ConfigError(f"num_generations must be ≥ 2 for bon-sft (best of 1 is plain self-SFT; got {train.num_generations})")

    def prepare(self, rollout, feedback, ref_token_logps, model):
        P, K = rollout.num_prompts, rollout.num_generations
        device = rollout.input_ids.device
        rewards = feedback.rewards.to(device).view(P, K)
        valid = feedback.valid.to(device).view(P, K) if feedback.valid is not None else None
        best, has_best = best_of_n(rewards, valid)
        selected = torch.zeros(P, K, dtype=torch.bool, device=device)
        selected[torch.arange(P, device=device)[has_best], best[has_best]] = True
        N, num_selected = P * K, int(selected.sum())
        # Σ_rows w·ℓ / N = mean over the selected responses; the loop weights a micro-batch of n rows by n/N.
        row_weight = selected.reshape(-1).float() * self.global_mean_scale(num_selected, N)
        lengths = rollout.completion_lengths.view(P, K).float()
        metrics = {
            "bon/selected_reward": rewards[selected].double().mean().item() if num_selected else 0.0,
            "bon/selected_length": lengths[selected].mean().item() if num_selected else 0.0,
            "bon/prompts_skipped": float(P - num_selected),
        }
        return {"row_weight": row_weight}, metrics

    def loss(self, policy_logps, batch):
        # L = −mean over selected y* of log π_θ(y*|x)
        loss = -(batch["row_weight"].to(policy_logps.dtype) * policy_logps).sum() / policy_logps.shape[0]
        return loss, {}
