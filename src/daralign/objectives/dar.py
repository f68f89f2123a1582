"""Direct Advantage Regression (He et al., arXiv 2504.14177), one readable file.

Target (per prompt x):   π*(y|x) ∝ π_ref(y|x)^{α/(α+β)} · π_t(y|x)^{β/(α+β)} · exp(A(x,y)/(α+β))
Projected with a forward KL and importance-sampled from π_t it becomes a weighted SFT loss:

    L(θ) = − E_{x, y~π_t} [ w(x,y) · log π_θ(y|x) ]                                     (DAR loss)
    w(x,y) = min( (π_ref(y|x) / π_t(y|x))^{α/(α+β)} · exp(A(x,y)/(α+β)),  w_clip )       (DAR weight)

α pulls toward the frozen reference π_ref, β is a trust region toward the sampling policy π_t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from daralign.core.errors import ConfigError
from daralign.core.models import token_logps
from daralign.objectives.base import LossOutput, Objective, register_objective

NORMALIZATIONS = ("batch", "group", "none")


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def advantages(rewards: torch.Tensor, normalization: str = "batch", eps: float = 1e-6, *,
               valid: torch.Tensor | None = None, reduce_sum=_identity) -> torch.Tensor:
    """A = r − V(x) with V(x) the Monte-Carlo mean of the valid rewards of prompt x, then normalised.

    rewards, valid: (num_prompts, K). With K = 1 the per-prompt mean is the sample itself (A ≡ 0), so
    the batch mean is the baseline instead (the paper reports DAR works with K = 1). Every
    statistic (baseline, batch mean and std) is taken over valid entries only; invalid entries
    get A = 0. ``reduce_sum`` all-reduces sums so that "batch" means the global batch under DDP.
    """
    if normalization not in NORMALIZATIONS:
        raise ConfigError(f"advantage_normalization: {normalization!r} is not one of {NORMALIZATIONS}")
    r = rewards.double()
    v = torch.ones_like(r, dtype=torch.bool) if valid is None else valid.bool().to(r.device)
    vf = v.double()
    r = torch.where(v, r, 0.0)
    if r.shape[1] == 1:
        total, n = reduce_sum(torch.stack([r.sum(), vf.sum()]))
        adv = r - total / n.clamp(min=1)  # K = 1 rule: batch-mean baseline
    else:
        adv = r - r.sum(1, keepdim=True) / vf.sum(1, keepdim=True).clamp(min=1)  # A = r − V(x)
    adv = torch.where(v, adv, 0.0)
    if normalization == "batch":
        total, n = reduce_sum(torch.stack([adv.sum(), vf.sum()]))
        mean = total / n.clamp(min=1)
        sq = reduce_sum((torch.where(v, adv - mean, 0.0) ** 2).sum().reshape(1))[0]
        # unbiased std; a single sample has nothing to normalise against (std 0)
        std = (sq / (n - 1)).sqrt() if n > 1 else adv.new_tensor(0.0)
        adv = (adv - mean) / (std + eps)
    elif normalization == "group" and adv.shape[1] > 1:
        n = vf.sum(1, keepdim=True)
        mean = adv.sum(1, keepdim=True) / n.clamp(min=1)
        std = ((torch.where(v, adv - mean, 0.0) ** 2).sum(1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
        adv = (adv - mean) / (std + eps)
    return torch.where(v, adv, 0.0)


def dar_log_weights(
    rewards: torch.Tensor,
    ref_logps: torch.Tensor,
    behaviour_logps: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    weight_clip: float,
    advantage_normalization: str = "batch",
    valid: torch.Tensor | None = None,
    reduce_sum=_identity,
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
    adv = advantages(rewards, advantage_normalization, valid=valid, reduce_sum=reduce_sum)
    return clipped_log_weights(ref_logps, behaviour_logps, adv, alpha=alpha, beta=beta, weight_clip=weight_clip)


def clipped_log_weights(ref_logps: torch.Tensor, behaviour_logps: torch.Tensor, adv: torch.Tensor, *,
                        alpha: float, beta: float, weight_clip: float) -> torch.Tensor:
    """log w = (α/(α+β))·(log π_ref − log π_t) + A/(α+β), clipped above at log w_clip (DAR weight),
    in float64: stay in log space, clip before exp. The one place the formula is written."""
    total = alpha + beta
    log_w = (alpha / total) * (ref_logps.double() - behaviour_logps.double()) + adv.double() / total
    return log_w.clamp(max=math.log(weight_clip))


def dar_weights(
    rewards: torch.Tensor,
    ref_logps: torch.Tensor,
    behaviour_logps: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    weight_clip: float = 20.0,
    advantage_normalization: str = "batch",
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """DAR's per-sample regression weights, for use in any trainer.

    Args:
        rewards: (num_prompts, K) scalar AI rewards of K sampled responses per prompt.
        ref_logps: (num_prompts, K) log π_ref(y|x), summed over response tokens.
        behaviour_logps: (num_prompts, K) log π_t(y|x) of the sampling policy, summed likewise.
        alpha: weight of KL(π‖π_ref) (≥ 0).  beta: weight of KL(π‖π_t) (≥ 0); α+β > 0.
        weight_clip: upper clip w_clip of the weight (> 0); paper default 20.
        advantage_normalization: "batch" (default), "group" (per prompt) or "none".
        valid: optional (num_prompts, K) bool; invalid labels take no part in any statistic.

    Returns:
        (num_prompts, K) detached weights, in the dtype of ``rewards``:
        w = min((π_ref/π_t)^{α/(α+β)} · exp(A/(α+β)), w_clip), with A = r − mean_K(r) normalised.
        Train with ``loss = -(w * policy_logps).mean()``.
    """
    log_w = dar_log_weights(
        rewards, ref_logps, behaviour_logps, alpha=alpha, beta=beta,
        weight_clip=weight_clip, advantage_normalization=advantage_normalization, valid=valid,
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
    """DAR's knobs. Give either (dar_alpha, dar_beta) or the paper's (dar_total, dar_ratio).

    The ICLR-2026 version of the paper writes the regulariser as β·(α·KL_ref + (1−α)·KL_t): *its*
    α is ``dar_ratio`` and *its* β is ``dar_total`` here ("α=0.1, β=0.05" there = the defaults).
    """

    dar_alpha: float | None = field(default=None, metadata={"help": "α: weight of KL(π‖π_ref), the pull toward the frozen reference (not TRL's `beta`); default dar_total·dar_ratio"})
    dar_beta: float | None = field(default=None, metadata={"help": "β: weight of KL(π‖π_t), the trust region toward the sampling policy; default dar_total·(1−dar_ratio)"})
    dar_total: float = field(default=0.05, metadata={"help": "α+β (paper: 0.05 best); used when dar_alpha/dar_beta are not given"})
    dar_ratio: float = field(default=0.1, metadata={"help": "α/(α+β) in [0, 1]: larger = more conservative (shorter answers); 0 = no reference term"})
    weight_clip: float = field(default=20.0, metadata={"help": "w_clip, the upper clip of the weight (paper: 20 best)"})
    advantage_normalization: str = field(default="batch", metadata={"help": "A = r − V(x) normalised over the batch | per prompt (group) | none"})

    # Two spellings of the same two numbers: a later config source giving one replaces the other
    # from an earlier source (see ``config.parse_train_args``).
    PARAMETERISATIONS: ClassVar = (("dar_alpha", "dar_beta"), ("dar_total", "dar_ratio"))

    def __post_init__(self) -> None:
        if (self.dar_alpha is None) != (self.dar_beta is None):
            raise ConfigError("give both dar_alpha and dar_beta, or neither (then dar_total and dar_ratio are used)")
        # resolved both ways, so a saved config.yaml states one consistent pair of each
        if self.dar_alpha is None:
            if not 0 <= self.dar_ratio <= 1:
                raise ConfigError(f"dar_ratio must be in [0, 1] (got {self.dar_ratio})")
            self.dar_alpha = self.dar_total * self.dar_ratio
            self.dar_beta = self.dar_total * (1 - self.dar_ratio)
            check_coefficients(self.dar_alpha, self.dar_beta, self.weight_clip)
        else:
            check_coefficients(self.dar_alpha, self.dar_beta, self.weight_clip)
            self.dar_total = self.dar_alpha + self.dar_beta
            self.dar_ratio = self.dar_alpha / self.dar_total
        if self.advantage_normalization not in NORMALIZATIONS:
            raise ConfigError(f"advantage_normalization: {self.advantage_normalization!r} is not one of {NORMALIZATIONS}")


@register_objective("dar")
class DAR(Objective):
    """Advantage-weighted SFT on the online samples, weights from ``dar_weights``."""

    Config = DARConfig
    feedback_kind = "score"
    paper = "Direct Advantage Regression (He et al., arXiv 2504.14177)"
    title = "DAR"
    compare_role = "subject"  # the method compare studies: P1's numerator, paired differences against it

    # π_t may be left to the loss: w depends only on the sample's own log π_t(y|x), which with one
    # update per batch is the detached log-prob of the update's own forward (no extra pass).
    behaviour_in_loss = True

    def prepare(self, rollout, feedback, ref_token_logps, model):
        cfg = self.config
        P, K = rollout.num_prompts, rollout.num_generations
        rewards, valid = self.rewards_and_valid(rollout, feedback)
        ref = ref_token_logps.sum(-1).view(P, K)
        scale = self.global_mean_scale(int(valid.sum()), P * K)
        if rollout.behaviour_token_logps is None:  # π_t comes from the update's forward: see ``loss``
            adv = advantages(rewards, cfg.advantage_normalization, valid=valid, reduce_sum=self.reduce_sum)
            return {"ref_logps": ref.double().reshape(-1), "advantages": adv.reshape(-1),
                    "row_scale": (valid.double() * scale).reshape(-1)}, {}
        behaviour = rollout.behaviour_logps.view(P, K)
        log_w = dar_log_weights(
            rewards, ref, behaviour, alpha=cfg.dar_alpha, beta=cfg.dar_beta, weight_clip=cfg.weight_clip,
            advantage_normalization=cfg.advantage_normalization, valid=valid, reduce_sum=self.reduce_sum,
        )
        weights = log_w.exp().float() * valid.float()  # invalid labels: dropped from the update
        clip = float(torch.log(torch.tensor(cfg.weight_clip, dtype=torch.float64)))
        adv = advantages(rewards, cfg.advantage_normalization, valid=valid, reduce_sum=self.reduce_sum)[valid]
        n_valid = int(valid.sum())
        metrics = {
            "dar/advantage_std": adv.std().item() if adv.numel() > 1 else 0.0,
            "dar/weight_mean": weights[valid].mean().item() if n_valid else 0.0,
            "dar/weight_max": weights.max().item(),
            "dar/clip_frac": (log_w[valid] >= clip - 1e-9).double().mean().item() if n_valid else 0.0,
            "dar/log_ratio_ref_behaviour": (ref - behaviour)[valid].mean().item() if n_valid else 0.0,
        }
        # L = −Σ_valid w·log π / #valid (global batch): the loop computes Σ_rows(·)/N per process
        return {"weights": (weights * scale).reshape(-1)}, metrics

    def loss(self, policy_logps, batch):
        weights = batch["weights"] if "weights" in batch else self.weights_from_update(policy_logps.detach(), batch)
        # L = −mean_i w_i · log π_θ(y_i|x_i) over valid samples (w is a constant: no gradient flows through it)
        loss = -(weights.to(policy_logps.dtype) * policy_logps).mean()
        return loss, {}

    def weights_from_update(self, behaviour_logps: torch.Tensor, batch) -> torch.Tensor:
        """w with log π_t = the update's own (detached) log-prob: the same clip as ``dar_log_weights``."""
        cfg = self.config
        log_w = clipped_log_weights(batch["ref_logps"], behaviour_logps, batch["advantages"], alpha=cfg.dar_alpha,
                                    beta=cfg.dar_beta, weight_clip=cfg.weight_clip)
        return (log_w.exp().float() * batch["row_scale"]).float()

    def compute_loss(self, model, batch):
        if "weights" in batch:
            return super().compute_loss(model, batch)
        per_token = token_logps(model, batch["input_ids"], batch["attention_mask"], self.train.temperature,
                                batch["completion_mask"], self.train.share_prompt_forward)
        logps = (per_token * batch["completion_mask"][:, 1:].to(per_token.dtype)).sum(-1)
        loss, metrics = self.loss(logps, batch)
        return LossOutput(loss, metrics, pi_t_token_logps=per_token.detach())
