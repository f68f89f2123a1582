"""RLOO: REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024, arXiv 2402.14740).

For K ≥ 2 samples y_1..y_K of a prompt x, with the KL-penalised reward (TRL's ``kl_coef``)

    R_i = r(x, y_i) − kl_coef · (log π_t(y_i|x) − log π_ref(y_i|x))     (sequence KL estimate)

each sample's baseline is the mean reward of the other K−1 samples:

    A_i = R_i − 1/(K−1) · Σ_{j≠i} R_j
    L(θ) = − mean_i A_i · log π_θ(y_i|x)                               (REINFORCE, A constant)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from daralign.core.errors import ConfigError
from daralign.objectives.base import Objective, register_objective


def leave_one_out_advantages(rewards: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """A_i = R_i − mean_{j≠i} R_j per prompt; rewards (num_prompts, K).

    Invalid samples neither get an advantage nor enter the others' baselines; a prompt with fewer
    than two valid samples has no baseline, so all its advantages are 0.
    """
    valid = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid.bool()
    r = torch.where(valid, rewards.double(), 0.0)
    count = valid.sum(dim=1, keepdim=True).double()
    baseline = (r.sum(dim=1, keepdim=True) - r) / (count - 1).clamp(min=1)  # mean_{j≠i} R_j
    return torch.where(valid & (count >= 2), r - baseline, 0.0)  # A_i = R_i − mean_{j≠i} R_j


@dataclass
class RLOOConfig:
    """RLOO knobs (TRL names)."""

    kl_coef: float = field(default=0.05, metadata={"help": 'weight of the sequence KL to π_ref subtracted from the reward (0 = no reference)'})

    def __post_init__(self) -> None:
        if not (self.kl_coef >= 0 and math.isfinite(self.kl_coef)):
            raise ConfigError(f"kl_coef must be a finite number ≥ 0 (got {self.kl_coef})")


@register_objective("rloo")
class RLOO(Objective):
    Config = RLOOConfig
    feedback_kind = "score"
    paper = "RLOO (Ahmadian et al., arXiv 2402.14740)"
    title = "RLOO"
    importance_ratio = "sequence"  # its loss is per sequence: the stale sample is reweighted whole

    def __init__(self, config, train, **kw) -> None:
        super().__init__(config if config is not None else RLOOConfig(), train, **kw)
        if train is not None and train.num_generations < 2:
            raise ConfigError(f"num_generations must be ≥ 2 for rloo (the leave-one-out baseline needs another sample; got {train.num_generations})")
        self.needs_reference = self.config.kl_coef > 0  # instance override: no reference forward when unused

    def prepare(self, rollout, feedback, ref_token_logps, model):
        P, K = rollout.num_prompts, rollout.num_generations
        if K < 2:
            raise ConfigError(f"num_generations must be ≥ 2 for rloo (got a rollout with K={K})")
        rewards, valid = self.rewards_and_valid(rollout, feedback)
        rewards = rewards.double()
        behaviour = rollout.behaviour_logps.double().view(P, K)
        if self.config.kl_coef > 0:
            kl = behaviour - ref_token_logps.sum(-1).double().view(P, K)  # log π_t(y|x) − log π_ref(y|x)
        else:
            kl = torch.zeros_like(rewards)
        rlhf_reward = rewards - self.config.kl_coef * kl  # R = r − kl_coef · KL
        adv = leave_one_out_advantages(rlhf_reward, valid)
        N = P * K
        # Σ_rows w·ℓ / N = mean over valid samples; the loop weights a micro-batch of n rows by n/N.
        row_weight = valid.reshape(-1).float() * self.global_mean_scale(int(valid.sum()), N)
        metrics = {
            "objective/kl": kl[valid].mean().item() if valid.any() else 0.0,
            "objective/rlhf_reward": rlhf_reward[valid].mean().item() if valid.any() else 0.0,
            "rloo/advantage_std": adv[valid].std().item() if valid.sum() > 1 else 0.0,
        }
        return {"advantages": adv.reshape(-1).float(), "row_weight": row_weight}, metrics

    def loss(self, policy_logps, batch):
        # L = − mean_i A_i · log π_θ(y_i|x_i)   (A is a constant)
        per_row = -batch["advantages"].to(policy_logps.dtype) * policy_logps
        if "importance_weight" in batch:  # async_steps: w = min(π_θ/π_sampler, cap) of the whole sequence
            per_row = batch["importance_weight"].to(policy_logps.dtype) * per_row
        loss = (batch["row_weight"].to(policy_logps.dtype) * per_row).sum() / policy_logps.shape[0]
        return loss, {}
