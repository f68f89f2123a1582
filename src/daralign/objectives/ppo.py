"""PPO for RLHF (Schulman et al. 2017; Ziegler et al. 2019; Ouyang et al. 2022), one file.

A scalar value head V on the policy's last hidden state (shared trunk, as TRL's former
``AutoModelForCausalLMWithValueHead``). Per completion token t of a response (TRL names):

    r_t   = −kl_coef · (log π_t(y_t|·) − log π_ref(y_t|·))  [+ r(x, y) at the last token]
    δ_t   = r_t + γ·V(s_{t+1}) − V(s_t)                       (V = 0 after the last token)
    Â_t   = δ_t + γλ·Â_{t+1}                                  (GAE), returns R_t = Â_t + V_old(s_t)
    Â     ← (Â − mean) / std over the batch's tokens          (whitened)
    ρ_t   = π_θ(y_t|·) / π_t(y_t|·)
    L_pg  = max(−Â·ρ, −Â·clip(ρ, 1−cliprange, 1+cliprange))
    L_vf  = ½·max((V − R)², (V_old + clip(V − V_old, ±cliprange_value) − R)²)
    L     = token-level mean over the batch of L_pg + vf_coef·L_vf

The missing-EOS penalty is applied to r(x, y) by the loop (``missing_eos_penalty``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from daralign.core.errors import ConfigError
from daralign.objectives.base import LossOutput, Objective, register_objective
from daralign.core.models import first_completion_position
from daralign.objectives.grpo import clipped_surrogate


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Generalised advantage estimation with a plain reverse loop. All (n, T); ``mask`` marks each
    row's completion tokens (contiguous). Off-mask advantages are 0; the state after a row's last
    token is terminal (V = 0)."""
    mask = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    last_gae = torch.zeros_like(values[:, 0])
    T = values.shape[1]
    for t in reversed(range(T)):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < T else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # δ_t = r_t + γ·V(s_{t+1}) − V(s_t)
        last_gae = (delta + gamma * lam * last_gae) * mask[:, t]  # Â_t = δ_t + γλ·Â_{t+1}
        advantages[:, t] = last_gae
    return advantages


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, reduce_sum=lambda t: t) -> torch.Tensor:
    """(x − mean) / std over the masked entries (unbiased variance, as TRL); 0 off the mask.
    ``reduce_sum`` all-reduces the sums, so under DDP the statistics are the global batch's."""
    mask = mask.to(x.dtype)
    total, n = reduce_sum(torch.stack([(x * mask).sum(), mask.sum()]))
    mean = total / n.clamp(min=1)
    var = reduce_sum((((x - mean) * mask) ** 2).sum().reshape(1))[0] / (n - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def clipped_value_loss(values, old_values, returns, cliprange_value: float):
    """Per-token ½·max((V − R)², (V_old + clip(V − V_old, ±c) − R)²) and whether the clipped term won."""
    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped, clipped = (values - returns) ** 2, (values_clipped - returns) ** 2
    return 0.5 * torch.max(unclipped, clipped), clipped > unclipped


@dataclass
class PPOConfig:
    """PPO knobs (TRL names)."""

    kl_coef: float = field(default=0.05, metadata={"help": 'per-token KL penalty to π_ref inside the reward (0 = no reference model)'})
    cliprange: float = field(default=0.2, metadata={"help": 'policy ratio clipped to [1 − cliprange, 1 + cliprange]'})
    cliprange_value: float = field(default=0.2, metadata={"help": 'new value kept within ± cliprange_value of the old value'})
    vf_coef: float = field(default=0.1, metadata={"help": 'weight of the value loss'})
    gamma: float = field(default=1.0, metadata={"help": 'discount γ'})
    lam: float = field(default=0.95, metadata={"help": 'GAE λ'})

    def __post_init__(self) -> None:
        for name in ("kl_coef", "vf_coef"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"{name} must be a finite number ≥ 0 (got {value})")
        if not 0 < self.cliprange < 1:
            raise ConfigError(f"cliprange must be in (0, 1) (got {self.cliprange})")
        if not (self.cliprange_value > 0 and math.isfinite(self.cliprange_value)):
            raise ConfigError(f"cliprange_value must be a finite number > 0 (got {self.cliprange_value})")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in [0, 1] (got {getattr(self, name)})")


@register_objective("ppo")
class PPO(Objective):
    Config = PPOConfig
    feedback_kind = "score"
    paper = "PPO for RLHF (Ouyang et al., arXiv 2203.02155)"
    title = "PPO"
    trains_extra_modules = True  # the value head
    importance_ratio = "token"

    def __init__(self, config, train, **kw) -> None:
        super().__init__(config if config is not None else PPOConfig(), train, **kw)
        self.needs_reference = self.config.kl_coef > 0  # instance override: no reference forward when unused
        self.value_head: torch.nn.Linear | None = None  # created by setup(model)

    def setup(self, model: torch.nn.Module) -> None:
        """Create the value head for ``model`` (call once, before the optimizer is built)."""
        if self.value_head is not None:
            return
        hidden_size = model.config.get_text_config().hidden_size
        head = torch.nn.Linear(hidden_size, 1)
        # std 1/sqrt(d+1), bias 0 (the scalar-head init of the "N implementation details of RLHF" recipe)
        torch.nn.init.normal_(head.weight, std=1 / math.sqrt(hidden_size + 1))
        torch.nn.init.zeros_(head.bias)
        self.value_head = head.to(next(model.parameters()).device)

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        if self.value_head is None:
            raise RuntimeError("ppo: call objective.setup(model) before trainable_modules() (it creates the value head)")
        return {"value_head": self.value_head}

    def logps_and_values(self, model, input_ids, attention_mask, completion_mask):
        """One forward: token log-probs (n, L-1) as ``models.token_logps`` (completion positions
        only), and V(s_t) (n, L-1) from the last hidden state at position t (the state before token
        t+1 is emitted). Entries before the first completion position are 0."""
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        start = first_completion_position(completion_mask)
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    output_hidden_states=True, logits_to_keep=input_ids.shape[1] - start + 1)
        logits = out.logits[:, :-1].float() / self.train.temperature
        logps = F.pad(torch.gather(F.log_softmax(logits, dim=-1), 2, input_ids[:, start:, None]).squeeze(-1), (start - 1, 0))
        hidden = out.hidden_states[-1][:, start - 1:-1].float()
        values = F.pad(self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float(), (start - 1, 0))
        return logps, values

    def prepare(self, rollout, feedback, ref_token_logps, model):
        if self.value_head is None:
            raise RuntimeError("ppo: call objective.setup(model) before training (it creates the value head)")
        cfg = self.config
        P, K = rollout.num_prompts, rollout.num_generations
        N, device = P * K, rollout.input_ids.device
        scores, valid = self.rewards_and_valid(rollout, feedback)
        valid = valid.reshape(-1)
        mask = rollout.completion_mask[:, 1:].float() * valid[:, None].float()  # (N, L-1) tokens that enter the loss

        # Old values V_old(s_t): a no-grad forward in chunks of one micro-batch.
        chunk = max(self.train.per_device_train_batch_size * K, 1)
        values = torch.cat([
            self.logps_and_values(model, rollout.input_ids[s:s + chunk], rollout.attention_mask[s:s + chunk],
                                  rollout.completion_mask[s:s + chunk])[1]
            for s in range(0, N, chunk)
        ]) * mask

        behaviour = rollout.behaviour_token_logps.float() * mask
        kl = (behaviour - ref_token_logps.float() * mask) if cfg.kl_coef > 0 else torch.zeros_like(behaviour)
        rewards = -cfg.kl_coef * kl  # r_t = −kl_coef·(log π_t − log π_ref)
        score = scores.float().reshape(-1)
        has_tokens = mask.sum(-1) > 0
        last = (mask * torch.arange(mask.shape[1], device=device)).argmax(-1)  # index of each row's last token
        rows = torch.arange(N, device=device)[has_tokens]
        rewards[rows, last[has_tokens]] += score[has_tokens]  # + r(x, y) at the last completion token

        advantages = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        returns = advantages + values  # R_t = Â_t + V_old(s_t)
        advantages = masked_whiten(advantages, mask, reduce_sum=self.reduce_sum)  # Â ← (Â − mean) / std

        # Token-level mean over the whole batch: the loop weights a micro-batch of n rows by n/N, so each
        # row carries N / #tokens and a micro-batch returns Σ ℓ_t·(N/#tokens) / n.
        token_scale = torch.full((N,), self.global_mean_scale(float(mask.sum()), N), device=device)
        prepared = {
            "old_token_logps": behaviour,
            "old_values": values,
            "returns": returns,
            "advantages": advantages,
            "loss_mask": mask,
            "token_scale": token_scale,
        }
        seq_kl = kl.sum(-1)[valid]
        metrics = {
            "objective/kl": seq_kl.mean().item() if valid.any() else 0.0,
            "objective/non_score_reward": (-cfg.kl_coef * seq_kl).mean().item() if valid.any() else 0.0,
            "objective/rlhf_reward": (score[valid] - cfg.kl_coef * seq_kl).mean().item() if valid.any() else 0.0,
            "val/mean": ((values * mask).sum() / mask.sum().clamp(min=1)).item(),
        }
        return prepared, metrics

    def compute_loss(self, model, batch):
        cfg = self.config
        logps, vpred = self.logps_and_values(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        mask = batch["loss_mask"].to(logps.dtype)
        off = mask == 0  # zero log-probs off the loss tokens so exp() there cannot overflow into 0·inf
        logps = logps.masked_fill(off, 0.0)
        old_logps, old_values = batch["old_token_logps"].masked_fill(off, 0.0), batch["old_values"]
        returns, adv = batch["returns"], batch["advantages"]

        # L_pg = max(−Â·ρ, −Â·clip(ρ, 1−ε, 1+ε))
        pg_losses, pg_clipped = clipped_surrogate(logps, old_logps, adv, cfg.cliprange)
        if "importance_weight" in batch:  # async_steps: π_old is the current policy, w = min(π_old/π_sampler, cap)
            pg_losses = batch["importance_weight"].to(logps.dtype) * pg_losses
        # L_vf = ½·max((V − R)², (V_old + clip(V − V_old, ±c) − R)²)
        vf_losses, vf_clipped = clipped_value_loss(vpred, old_values, returns, cfg.cliprange_value)
        per_token = pg_losses + cfg.vf_coef * vf_losses  # ℓ_t = L_pg + vf_coef·L_vf
        row_sums = (per_token * mask).sum(-1)
        loss = (batch["token_scale"].to(logps.dtype) * row_sums).sum() / logps.shape[0]

        n_tokens = mask.sum().clamp(min=1)
        def masked_mean(x):
            return ((x.detach().float() * mask).sum() / n_tokens).item()
        metrics = {
            "policy/approxkl_avg": masked_mean(0.5 * (logps - old_logps) ** 2),
            "policy/clipfrac_avg": masked_mean(pg_clipped.float()),
            "loss/policy_avg": masked_mean(pg_losses),
            "loss/value_avg": masked_mean(vf_losses),
            "val/clipfrac_avg": masked_mean(vf_clipped.float()),
        }
        return LossOutput(loss, metrics)
