"""Direct Advantage Regression (He et al., arXiv 2504.14177), one readable file.

Target (per prompt x):   π*(y|x) ∝ π_ref(y|x)^{α/(α+β)} · π_t(y|x)^{β/(α+β)} · exp(A(x,y)/(α+β))
Projected with a forward KL and importance-sampled from π_t it becomes a weighted SFT loss:

    L(θ) = − E_{x, y~π_t} [ w(x,y) · log π_θ(y|x) ]                                     (DAR loss)
    w(x,y) = min( (π_ref(y|x) / π_t(y|x))^{α/(α+β)} · exp(A(x,y)/(α+β)),  w_clip )       (DAR weight)

α pulls toward the frozen reference π_ref, β is a trust region toward the sampling policy π_t.
"""

from __future__ import annotations

import torch

import math
from dataclasses import dataclass

from daralign.errors import ConfigError
from daralign.objectives.base import Objective, register_objective

NORMALIZATIONS = ("batch", "group", "none")


def advantages(rewards: torch.Tensor, normalization: str = "batch", eps: float = 1e-6) -> torch.Tensor:
    """A = r − V(x) with V(x) the Monte-Carlo mean of the K rewards of prompt x, then normalised.

    rewards: (num_prompts, K). With K = 1 the per-prompt mean is the sample itself (A ≡ 0), so the
    batch mean is the baseline instead (the paper reports DAR works with K = 1).
    """
    if normalization not in NORMALIZATIONS:
        raise ConfigError(f"advantage_normalization: {normalization!r} is not one of {NORMALIZATIONS}")
    rewards = rewards.double()
    if rewards.shape[1] == 1:
        adv = rewards - rewards.mean()  # K = 1 rule: batch-mean baseline
    else:
        adv = rewards - rewards.mean(dim=1, keepdim=True)  # A = r − V(x)
    if normalization == "batch":
        # torch.std on one element is NaN; a single sample has nothing to normalise against.
        std = adv.std() if adv.numel() > 1 else adv.new_tensor(0.0)
        adv = (adv - adv.mean()) / (std + eps)
    elif normalization == "group" and adv.shape[1] > 1:
        adv = (adv - adv.mean(dim=1, keepdim=True)) / (adv.std(dim=1, keepdim=True) + eps)
    return adv


def dar_log_weights(
    rewards: torch.Tensor,
    ref_logps: torch.Tensor,
    behaviour_logps: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    weight_clip: float,
    advantage_normalization: str = "batch",
) -> torch.Tensor:
    """log w, clipped above at log(weight_clip), in float64; see ``dar_weights``."""
    check_coefficients(alpha, beta, weight_clip)
    if not (rewards.shape == ref_logps.shape == behaviour_logps.shape) or rewards.dim() != 2:
        raise ValueError(
            f"rewards, ref_logps and behaviour_logps must all be (num_prompts, K); got "
            f"{tuple(rewards.shape)}, {tuple(ref_logps.shape)}, {tuple(behaviour_logps.shape)}"
        )
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf; refusing to compute DAR weights")
    adv = advantages(rewards, advantage_normalization)
    total = alpha + beta
    # log w = (α/(α+β))·(log π_ref − log π_t) + A/(α+β); stay in log space, clip before exp.
    log_w = (alpha / total) * (ref_logps.double() - behaviour_logps.double()) + adv / total
    return log_w.clamp(max=torch.log(torch.tensor(float(weight_clip), dtype=torch.float64)))


def dar_weights(
    rewards: torch.Tensor,
    ref_logps: torch.Tensor,
    behaviour_logps: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    weight_clip: float = 20.0,
    advantage_normalization: str = "batch",
) -> torch.Tensor:
    """DAR's per-sample regression weights, for use in any trainer.

    Args:
        rewards: (num_prompts, K) scalar AI rewards of K sampled responses per prompt.
        ref_logps: (num_prompts, K) log π_ref(y|x), summed over response tokens.
        behaviour_logps: (num_prompts, K) log π_t(y|x) of the sampling policy, summed likewise.
        alpha: weight of KL(π‖π_ref) (≥ 0).  beta: weight of KL(π‖π_t) (≥ 0); α+β > 0.
        weight_clip: upper clip w_clip of the weight (> 0); paper default 20.
        advantage_normalization: "batch" (default), "group" (per prompt) or "none".

    Returns:
        (num_prompts, K) detached weights, in the dtype of ``rewards``:
        w = min((π_ref/π_t)^{α/(α+β)} · exp(A/(α+β)), w_clip), with A = r − mean_K(r) normalised.
        Train with ``loss = -(w * policy_logps).mean()``.
    """
    log_w = dar_log_weights(
        rewards, ref_logps, behaviour_logps, alpha=alpha, beta=beta,
        weight_clip=weight_clip, advantage_normalization=advantage_normalization,
    )
    return log_w.exp().to(rewards.dtype if rewards.is_floating_point() else torch.float32).detach()


def check_coefficients(alpha: float, beta: float, weight_clip: float) -> None:
    if not all(math.isfinite(v) for v in (alpha, beta, weight_clip)):
        raise ConfigError(f"dar_alpha, dar_beta and weight_clip must be finite (got {alpha}, {beta}, {weight_clip})")
    if alpha < 0 or beta < 0:
        raise ConfigError(f"dar_alpha and dar_beta must be ≥ 0 (got dar_alpha={alpha}, dar_beta={beta})")
    if alpha + beta <= 0:
        raise ConfigError("dar_alpha + dar_beta must be > 0 (the weights divide by it)")
    if not weight_clip > 0:
        raise ConfigError(f"weight_clip must be > 0 (got {weight_clip})")


@dataclass
class DARConfig:
    """DAR's knobs. Give either (dar_alpha, dar_beta) or the paper's (dar_total, dar_ratio)."""

    dar_alpha: float | None = None  # α: KL toward the frozen reference π_ref (not TRL's `beta`)
    dar_beta: float | None = None  # β: KL toward the sampling policy π_t (trust region)
    dar_total: float = 0.05  # α+β (paper: 0.05 best); used when dar_alpha/dar_beta are not given
    dar_ratio: float = 0.1  # α/(α+β): larger = more conservative (shorter answers)
    weight_clip: float = 20.0  # w_clip (paper: 20 best)
    advantage_normalization: str = "batch"  # batch | group | none

    def __post_init__(self) -> None:
        if (self.dar_alpha is None) != (self.dar_beta is None):
            raise ConfigError("give both dar_alpha and dar_beta, or neither (then dar_total and dar_ratio are used)")
        if self.dar_alpha is None:
            if not 0 <= self.dar_ratio <= 1:
                raise ConfigError(f"dar_ratio must be in [0, 1] (got {self.dar_ratio})")
            self.dar_alpha = self.dar_total * self.dar_ratio
            self.dar_beta = self.dar_total * (1 - self.dar_ratio)
        check_coefficients(self.dar_alpha, self.dar_beta, self.weight_clip)
        if self.advantage_normalization not in NORMALIZATIONS:
            raise ConfigError(f"advantage_normalization: {self.advantage_normalization!r} is not one of {NORMALIZATIONS}")


@register_objective("dar")
class DAR(Objective):
    """Advantage-weighted SFT on the online samples, weights from ``dar_weights``."""

    Config = DARConfig
    feedback_kind = "score"

    def prepare(self, rollout, feedback, ref_token_logps, model):
        cfg = self.config
        P, K = rollout.num_prompts, rollout.num_generations
        behaviour = rollout.behaviour_logps.view(P, K)
        ref = ref_token_logps.sum(-1).view(P, K)
        log_w = dar_log_weights(
            feedback.rewards, ref, behaviour, alpha=cfg.dar_alpha, beta=cfg.dar_beta,
            weight_clip=cfg.weight_clip, advantage_normalization=cfg.advantage_normalization,
        )
        weights = log_w.exp().float()
        if feedback.valid is not None:
            weights = weights * feedback.valid.float()  # invalid labels: dropped from the update
        clip = float(torch.log(torch.tensor(cfg.weight_clip, dtype=torch.float64)))
        adv = advantages(feedback.rewards, cfg.advantage_normalization)
        metrics = {
            "dar/advantage_std": adv.std().item() if adv.numel() > 1 else 0.0,
            "dar/weight_mean": weights.mean().item(),
            "dar/weight_max": weights.max().item(),
            "dar/clip_frac": (log_w >= clip - 1e-9).double().mean().item(),
            "dar/log_ratio_ref_behaviour": (ref - behaviour).mean().item(),
        }
        return {"weights": weights.reshape(-1)}, metrics

    def loss(self, policy_logps, batch):
        # L = −mean_i w_i · log π_θ(y_i|x_i)   (w is a constant: no gradient flows through it)
        loss = -(batch["weights"].to(policy_logps.dtype) * policy_logps).mean()
        return loss, {}
