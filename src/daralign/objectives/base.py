"""The objective interface. One algorithm = one file in this package + ``@register_objective``.

The loop calls, per online batch:
  1. ``prepare(rollout, feedback, ref_token_logps, model)`` once, without gradients: per-sample
     constants (weights, advantages, pair signs, old values ...) as tensors whose first dim is
     N = num_prompts * K, plus metrics. Token log-prob tensors are (N, L-1), already zero outside
     the completion; ``x.sum(-1)`` gives the sequence log-prob.
  2. ``compute_loss(model, micro_batch) -> LossOutput`` per micro-batch (by default the sequence
     log-probs, then ``loss``); micro-batches always hold whole prompt groups (all K samples of a
     prompt), so pairwise losses see both members of a pair.
Objectives never call annotators and never step the optimizer.

π_t without an extra forward (``behaviour_in_loss``): when the rollout backend gives no log-probs
(vLLM) and the batch gets one update, the loop may hand ``prepare`` a rollout whose
``behaviour_token_logps`` is None. An objective that allows it then uses the detached log-prob of
its own update forward as π_t (exact: θ = θ_t at that forward) and returns those per-token
log-probs as ``LossOutput.pi_t_token_logps``; the loop fills the rollout with them afterwards and
calls ``prepare`` again, for the metrics only.

Under DDP each process holds its share of the prompts. Statistics that span the batch (DAR's
advantage normalisation, PPO's whitening, "mean over valid samples") must span the *global*
batch: the loop builds the objective with ``reduce_sum`` an all-reduce, and objectives compute such statistics from
sums passed through it (``global_mean_scale``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from daralign.core.models import sequence_logps
from daralign.core.registry import registrar
from daralign.core.types import Feedback, Rollout


@dataclass
class LossOutput:
    """What ``compute_loss`` gives the loop for one micro-batch."""

    loss: torch.Tensor  # scalar: Σ_rows(·)/n over the micro-batch's n rows (the loop weights it by n/N)
    metrics: dict[str, float] = field(default_factory=dict)  # averaged over micro-batches, then logged
    pi_t_token_logps: torch.Tensor | None = None  # this forward's detached (n, L-1) log-probs, when π_t is left to it


def candidate_pairs(num_prompts: int, K: int, best_vs_worst: bool) -> list[tuple[int, int]]:
    """The (i, j) flattened sample pairs a compare objective has judged, prompt by prompt: with
    K > 2 and ``best_vs_worst`` all K(K-1)/2 pairs (a round-robin), else K//2 disjoint pairs
    (0, 1), (2, 3), ... — for K = 2 the one pair (0, 1), as OAIF samples it."""
    if K > 2 and best_vs_worst:
        within = [(a, b) for a in range(K) for b in range(a + 1, K)]
    else:
        within = [(a, a + 1) for a in range(0, K - 1, 2)]
    return [(p * K + a, p * K + b) for p in range(num_prompts) for a, b in within]


class Objective:
    Config: ClassVar[type | None] = None  # the objective's own dataclass config (fields join the CLI and the model card)
    feedback_kind: ClassVar[str] = "score"  # "score" | "compare" | "offline" (labels come with the data)
    paper: ClassVar[str] = ""  # the paper of the method's protocol, as the model card cites it
    title: ClassVar[str | None] = None  # how reports name the method in prose (default: its registered name)
    # Its part in `daralign compare`'s headline numbers (docs/testbed.md): the "subject" is the method
    # under study (P1's numerator, the reference of the paired differences, --sweep_algorithm's
    # default); the "reference" is the baseline whose final gold P1 asks the subject to reach.
    # At most one registered method plays each, declared on its own class: a subclass does not inherit
    # the part (``objectives.method_in_role``).
    compare_role: ClassVar[str | None] = None
    behaviour_in_loss: ClassVar[bool] = False  # may take π_t from its update's own forward (module docstring)
    # How it learns from a batch sampled by an older policy (``async_steps``): None needs nothing (DAR's
    # π_t is the sampling policy by definition; preference and SFT losses do not ask who sampled);
    # "sequence" or "token": the loop hands ``prepare`` the current policy as π_old and adds a truncated
    # importance weight min(π_θ/π_sampler, cap) at that level (``importance_weights``) to the batch.
    importance_ratio: ClassVar[str | None] = None
    needs_reference: ClassVar[bool] = True  # the loop computes frozen-reference log-probs
    trains_extra_modules: ClassVar[bool] = False  # ``trainable_modules`` returns some (known before setup)

    def __init__(self, config: Any, train: Any, reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.config = config  # instance of ``Config`` (or None)
        self.train = train  # the shared TrainConfig
        self.reduce_sum = reduce_sum or (lambda t: t)  # sum over processes (an all-reduce under DDP)

    def num_generations(self) -> int:
        """K, the responses sampled per prompt; OAIF overrides it (one pair by default)."""
        return self.train.num_generations

    @property
    def best_vs_worst(self) -> bool:
        """The pair rule of a compare method with K > 2 (``candidate_pairs``): judge every pair and
        train on most wins against fewest wins (True), or judge and train on K//2 disjoint pairs."""
        return True

    def labels_per_prompt(self) -> int:
        """Labels one prompt asks of the annotator: K scores, the judged pairs, or none (offline)."""
        if self.feedback_kind == "score":
            return self.num_generations()
        if self.feedback_kind == "compare":
            return len(candidate_pairs(1, self.num_generations(), self.best_vs_worst))
        return 0

    def global_mean_scale(self, count: float, num_rows: int) -> float:
        """Row weight that makes the loop's per-process Σ_rows(w·ℓ)/N, averaged over the W
        processes by DDP, a mean over ``count`` items (samples, pairs, tokens) of the global
        batch: w = N·W / Σ_processes count."""
        total = self.reduce_sum(torch.tensor([float(count), 1.0], dtype=torch.float64))
        return num_rows * float(total[1]) / max(float(total[0]), 1.0)

    def has_signal(self, feedback: Feedback, prepared: dict[str, torch.Tensor]) -> bool:
        """Whether this batch can move the policy on its own process: a judged, untied pair, or
        valid rewards that differ. (An AdamW step on a zero gradient still moves the weights
        through its momentum and weight decay; the loop skips the step when no process has signal.)"""
        if "pair_weight" in prepared:
            return bool(prepared["pair_weight"].sum() > 0)
        if feedback.rewards is None:
            return True
        valid = feedback.valid if feedback.valid is not None else torch.ones_like(feedback.rewards, dtype=torch.bool)
        r = feedback.rewards[valid].double().cpu()
        total, n = self.reduce_sum(torch.stack([r.sum(), torch.tensor(float(r.numel()), dtype=torch.float64)]))
        if n == 0:
            return False
        spread = self.reduce_sum((r - total / n).abs().sum().reshape(1))  # two passes: exact, however small
        return bool(spread[0] > 0)

    def setup(self, model: torch.nn.Module) -> None:
        """Called once with the (unwrapped) policy before the optimizer is built, e.g. to create a
        value head of the right size."""

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        """Extra modules this objective trains beside the policy (e.g. PPO's value head). The loop
        adds their parameters to the optimizer and saves them in checkpoints."""
        return {}

    def prepare(
        self, rollout: Rollout, feedback: Feedback, ref_token_logps: torch.Tensor | None, model: torch.nn.Module
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        raise NotImplementedError

    @staticmethod
    def rewards_and_valid(rollout: Rollout, feedback: Feedback) -> tuple[torch.Tensor, torch.Tensor]:
        """Score feedback as (num_prompts, K) rewards and valid mask on the rollout's device."""
        P, K, device = rollout.num_prompts, rollout.num_generations, rollout.input_ids.device
        rewards = feedback.rewards.to(device).view(P, K)
        valid = feedback.valid.to(device).view(P, K) if feedback.valid is not None else torch.ones_like(rewards, dtype=torch.bool)
        return rewards, valid

    def loss(self, policy_logps: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """Loss from the policy's sequence log-probs (n,) of this micro-batch."""
        raise NotImplementedError

    def compute_loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        """Default: sequence log-probs of the completion tokens, then ``loss``. PPO overrides."""
        logps = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                               self.train.temperature, share_prompts=self.train.share_prompt_forward)
        return LossOutput(*self.loss(logps, batch))


def importance_weights(current: torch.Tensor, sampled: torch.Tensor, mask: torch.Tensor, *, cap: float,
                       level: str) -> tuple[torch.Tensor, dict[str, float]]:
    """Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly brings you
    off-policy RL training"): w = min(π_θ(y|x) / π_sampler(y|x), cap), detached, per completion token
    (N, L-1) or per sequence (N,), from token log-probs that are 0 off the completion. Computed in log
    space and clipped before exp, so a sequence ratio cannot overflow."""
    log_ratio = (current.double() - sampled.double()) * mask
    counted = mask.bool()
    if level == "sequence":
        log_ratio, counted = log_ratio.sum(-1), counted.any(-1)
    elif level != "token":
        raise ValueError(f"importance ratio level {level!r}: 'token' or 'sequence'")
    weights = log_ratio.clamp(max=math.log(cap)).exp()
    kept = log_ratio[counted]
    metrics = {"async/is_weight_mean": weights[counted].mean().item() if kept.numel() else 1.0,
               "async/is_truncated_frac": (kept > math.log(cap)).double().mean().item() if kept.numel() else 0.0,
               "async/is_log_ratio_max": kept.abs().max().item() if kept.numel() else 0.0}
    return weights.float() * counted, metrics


OBJECTIVES: dict[str, type[Objective]] = {}
register_objective = registrar(OBJECTIVES)  # ``@register_objective("dar")``: ``--algorithm dar`` uses it
