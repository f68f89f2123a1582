"""GRPO: group-relative policy optimisation (Shao et al. 2024, arXiv 2402.03300), one file.

For the K ≥ 2 samples of a prompt, per token t of y_i (TRL's names ``epsilon``, ``beta``):

    A_i   = (r_i − mean_g r) / (std_g r + eps)                          (group-normalised advantage)
    ρ_t   = π_θ(y_t|·) / π_t(y_t|·)                                     (ratio to the behaviour policy)
    KL_t  = π_ref/π_θ − log(π_ref/π_θ) − 1                              (k3 estimator, ≥ 0)
    ℓ_t   = −min(ρ_t·A_i, clip(ρ_t, 1−ε, 1+ε)·A_i) + β·KL_t
    L(θ)  = Σ_{i,t} ℓ_t / Σ_i |y_i|                                     (token-level average over the batch)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from daralign.core.errors import ConfigError
from daralign.core.models import token_logps
from daralign.objectives.base import LossOutput, Objective, register_objective


def group_advantages(rewards: torch.Tensor, valid: torch.Tensor | None = None, eps: float = 1e-4) -> torch.Tensor:
    """(r − mean_g) / (std_g + eps) per prompt over its valid samples; rewards (num_prompts, K).

    std is the unbiased sample std (torch.std, as TRL); invalid samples get 0, and so does a prompt
    with fewer than two valid samples (nothing to compare against).
    """
    valid = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid.bool()
    r = torch.where(valid, rewards.double(), 0.0)
    count = valid.sum(dim=1, keepdim=True).double()
    mean = r.sum(dim=1, keepdim=True) / count.clamp(min=1)  # mean_g r
    centred = torch.where(valid, r - mean, 0.0)
    std = (centred.pow(2).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()  # std_g r
    return torch.where(valid & (count >= 2), centred / (std + eps), 0.0)


def clipped_surrogate(logps, old_logps, advantages, epsilon: float):
    """Per-token −min(ρ·A, clip(ρ, 1−ε, 1+ε)·A) and whether the clipped branch was taken.
    logps, old_logps: (n, T); advantages broadcastable to (n, T)."""
    ratio = torch.exp(logps - old_logps)  # ρ = π_θ / π_old
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * advantages
    return -torch.min(unclipped, clipped), clipped < unclipped


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(π_θ‖π_ref) estimate k3 = exp(ref − logp) − (ref − logp) − 1 (unbiased, ≥ 0)."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


@dataclass
class GRPOConfig:
    """GRPO knobs (TRL names)."""

    beta: float = field(default=0.04, metadata={"help": 'β: weight of the per-token k3 KL to the reference (0 = no reference model)'})
    epsilon: float = field(default=0.2, metadata={"help": 'ε: the ratio is clipped to [1−ε, 1+ε]'})
    scale_eps: float = field(default=1e-4, metadata={"help": 'added to the group std before dividing (TRL uses 1e-4)'})

    def __post_init__(self) -> None:
        if not (self.beta >= 0 and math.isfinite(self.beta)):
            raise ConfigError(f"beta must be a finite number ≥ 0 (got {self.beta})")
        if not 0 < self.epsilon < 1:
            raise ConfigError(f"epsilon must be in (0, 1) (got {self.epsilon})")
        if not self.scale_eps > 0:
            raise ConfigError(f"scale_eps must be > 0 (got {self.scale_eps})")


@register_objective("grpo")
class GRPO(Objective):
    Config = GRPOConfig
    feedback_kind = "score"
    paper = "GRPO (Shao et al., arXiv 2402.03300)"
    title = "GRPO"
    behaviour_in_loss = True  # the ratio's denominator may be the update's own detached forward
    importance_ratio = "token"

    def __init__(self, config, train, **kw) -> None:
        super().__init__(config if config is not None else GRPOConfig(), train, **kw)
        if train is not None and train.num_generations < 2:
            raise ConfigError(f"num_generations must be ≥ 2 for grpo (a group of one has no relative advantage; got {train.num_generations})")
        self.needs_reference = self.config.beta > 0  # instance override: no reference forward when unused

    def prepare(self, rollout, feedback, ref_token_logps, model):
        P, K = rollout.num_prompts, rollout.num_generations
        if K < 2:
            raise ConfigError(f"num_generations must be ≥ 2 for grpo (got a rollout with K={K})")
        device = rollout.input_ids.device
        rewards, valid = self.rewards_and_valid(rollout, feedback)
        adv = group_advantages(rewards, valid, self.config.scale_eps)
        mask = rollout.completion_mask[:, 1:].float() * valid.reshape(-1, 1).float()  # tokens that enter the loss
        N = P * K
        # token-level average over the whole batch: Σ ℓ_t / #tokens. The loop weights a micro-batch of
        # n rows by n/N, so each row carries N / #tokens and a micro-batch returns Σ ℓ_t·(N/#tokens) / n.
        token_scale = torch.full((N,), self.global_mean_scale(float(mask.sum()), N), device=device)
        prepared = {"advantages": adv.reshape(-1).float(), "loss_mask": mask, "token_scale": token_scale}
        if rollout.behaviour_token_logps is not None:  # else π_t is the update's own forward (compute_loss)
            prepared["old_token_logps"] = rollout.behaviour_token_logps.float()
        if self.config.beta > 0:
            prepared["ref_token_logps"] = ref_token_logps.float()
        r = rewards.double()
        hi, lo = torch.where(valid, r, -math.inf).amax(1), torch.where(valid, r, math.inf).amin(1)
        zero_std = (hi == lo) & (valid.sum(1) >= 2)  # groups that carry no signal (all rewards equal)
        metrics = {"frac_reward_zero_std": zero_std.double().mean().item()}
        return prepared, metrics

    def compute_loss(self, model, batch):
        logps = token_logps(model, batch["input_ids"], batch["attention_mask"], self.train.temperature,
                            batch["completion_mask"], self.train.share_prompt_forward)  # (n, L-1), completion positions only
        recorded = logps.detach()  # every completion token's, before the loss mask
        mask = batch["loss_mask"].to(logps.dtype)
        off = mask == 0  # zero every log-prob off the loss tokens so exp() there cannot overflow into 0·inf
        logps = logps.masked_fill(off, 0.0)
        adv = batch["advantages"].to(logps.dtype)[:, None]
        # one update per batch and no recorded π_t: θ = θ_t at this forward, so π_t is its detached value
        old = batch["old_token_logps"].to(logps.dtype) if "old_token_logps" in batch else recorded
        old = old.masked_fill(off, 0.0)
        per_token, is_clipped = clipped_surrogate(logps, old, adv, self.config.epsilon)
        if "importance_weight" in batch:  # async_steps: π_old is the current policy, w = min(π_old/π_sampler, cap)
            per_token = batch["importance_weight"].to(logps.dtype) * per_token
        if self.config.beta > 0:
            kl = k3_kl(logps, batch["ref_token_logps"].to(logps.dtype).masked_fill(off, 0.0))
            per_token = per_token + self.config.beta * kl  # ℓ_t = −min(ρA, clip(ρ)A) + β·KL_t
        row_sums = (per_token * mask).sum(-1)
        loss = (batch["token_scale"].to(logps.dtype) * row_sums).sum() / logps.shape[0]  # L = Σ ℓ_t / #tokens
        n_tokens = mask.sum().clamp(min=1)
        metrics = {"clip_ratio/region_mean": ((is_clipped.float() * mask).sum() / n_tokens).item()}
        if self.config.beta > 0:
            metrics["grpo/kl"] = ((kl.detach() * mask).sum() / n_tokens).item()
        return LossOutput(loss, metrics, pi_t_token_logps=None if "old_token_logps" in batch else recorded)
