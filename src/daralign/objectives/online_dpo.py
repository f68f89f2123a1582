"""OAIF: online DPO / IPO / SLiC from AI preferences (Guo et al., arXiv 2402.04792), one file.

Each step the loop samples K ≥ 2 responses per prompt from the current policy, the AI judge
compares a pair (y_i, y_j) and says P(y_i better than y_j); the winner is y_w, the loser y_l.
With the implicit-reward margin against the frozen reference

    h = (log π_θ(y_w|x) − log π_ref(y_w|x)) − (log π_θ(y_l|x) − log π_ref(y_l|x))

the three direct-alignment losses (TRL's ``loss_type`` spelling) are

    sigmoid (DPO):  −log σ(β·h)
    ipo     (IPO):  (h − 1/(2β))²
    hinge   (SLiC): max(0, 1 − β·h)

``preference_loss`` and the pair mechanics (``PairwisePreference``) are reused by offline DPO
(``offline_dpo.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from daralign.core.errors import ConfigError
from daralign.objectives.base import Objective, register_objective

LOSS_TYPES = ("sigmoid", "ipo", "hinge")
TIE_TOLERANCE = 1e-6  # |P(i ≻ j) − 0.5| below this is a tie (0.7 and 0.3 averaged is 0.49999999999999994)


def preference_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO/IPO/SLiC losses from sequence log-probs (all (num_pairs,)).

    Returns (losses, chosen_rewards, rejected_rewards); the implicit rewards β·(log π_θ − log π_ref)
    are detached (TRL's ``rewards/chosen`` and ``rewards/rejected``).
    """
    chosen_ratio = chosen_logps - ref_chosen_logps  # log π_θ(y_w|x) − log π_ref(y_w|x)
    rejected_ratio = rejected_logps - ref_rejected_logps  # log π_θ(y_l|x) − log π_ref(y_l|x)
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)  # DPO: −log σ(β·h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2  # IPO: (h − 1/(2β))²
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)  # SLiC: max(0, 1 − β·h)
    else:
        raise ConfigError(f"loss_type: {loss_type!r} is not one of {LOSS_TYPES}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


@dataclass
class PreferenceLossConfig:
    """The direct-alignment loss (TRL names), shared by online (OAIF) and offline DPO."""

    beta: float = field(default=0.1, metadata={"help": "β: strength of the implicit KL to the frozen reference π_ref (TRL's `beta`)"})
    loss_type: str = field(default="sigmoid", metadata={"help": "sigmoid (DPO) | ipo (IPO) | hinge (SLiC)"})

    def __post_init__(self) -> None:
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise ConfigError(f"beta must be a finite number > 0 (got {self.beta})")
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"loss_type: {self.loss_type!r} is not one of {LOSS_TYPES}")


@dataclass
class OnlineDPOConfig(PreferenceLossConfig):
    """OAIF knobs. As in the OAIF paper, each prompt gets one pair of two fresh samples; the shared
    ``num_generations`` (the K of reward methods) does not apply to these methods."""

    oaif_num_generations: int = field(default=2, metadata={"help": "responses sampled per prompt (2 = one judged pair, as OAIF); more needs best_vs_worst"})
    best_vs_worst: bool = field(default=True, metadata={"help": "with oaif_num_generations > 2: judge all K(K-1)/2 pairs and train on most-wins vs fewest-wins (true), or judge and train on K//2 disjoint pairs (false)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.oaif_num_generations, bool) or not isinstance(self.oaif_num_generations, int) or self.oaif_num_generations < 2:
            raise ConfigError(f"oaif_num_generations must be an integer ≥ 2 (a pair needs two responses; got {self.oaif_num_generations})")


@dataclass
class OnlineIPOConfig(OnlineDPOConfig):
    loss_type: str = field(default="ipo", metadata={"help": "sigmoid (DPO) | ipo (IPO) | hinge (SLiC)"})


@dataclass
class OnlineSLiCConfig(OnlineDPOConfig):
    loss_type: str = field(default="hinge", metadata={"help": "sigmoid (DPO) | ipo (IPO) | hinge (SLiC)"})


class PairwisePreference(Objective):
    """Pairwise loss on preference pairs, against the fixed reference: the mechanics the three OAIF
    methods below and offline DPO (``offline_dpo.py``) share. Not registered itself.

    Micro-batches are sliced by rows, so ``prepare`` stores pair m of prompt p on row p*K + m as
    offsets to its chosen and rejected rows (offsets survive slicing whole prompt groups).
    """

    Config = PreferenceLossConfig

    def __init__(self, config, train, **kw) -> None:
        super().__init__(config if config is not None else self.Config(), train, **kw)

    def prepare(self, rollout, feedback, ref_token_logps, model):
        N, K = rollout.input_ids.shape[0], rollout.num_generations
        if feedback.pairs is None or feedback.preference is None:
            raise ValueError(f"{self.name} needs compare feedback (pairs and preference)")
        preference = feedback.preference.detach().double().cpu()
        if len(feedback.pairs) != preference.numel():
            raise ValueError(f"{len(feedback.pairs)} pairs but {preference.numel()} preferences")
        valid = feedback.valid.reshape(-1).cpu() if feedback.valid is not None else torch.ones(N, dtype=torch.bool)

        chosen_offset = torch.zeros(N, dtype=torch.long)
        rejected_offset = torch.zeros(N, dtype=torch.long)
        used = torch.zeros(N, dtype=torch.bool)
        pairs_in_prompt = [0] * rollout.num_prompts
        ties = invalid = 0
        for (i, j), pref in zip(feedback.pairs, preference.tolist()):
            if i // K != j // K or i == j:
                raise ValueError(f"pair ({i}, {j}) must be two different samples of the same prompt (K={K})")
            if not math.isfinite(pref) or not (valid[i] and valid[j]):
                invalid += 1
                continue
            if abs(pref - 0.5) < TIE_TOLERANCE:  # the judge cannot tell them apart (e.g. both orders disagree): no label
                ties += 1
                continue
            winner, loser = (i, j) if pref > 0.5 else (j, i)
            p = i // K
            if pairs_in_prompt[p] == K:
                raise ValueError(f"more than K={K} pairs for prompt {p}; at most one pair per sample row is supported")
            slot = p * K + pairs_in_prompt[p]  # the row that carries this pair through micro-batching
            pairs_in_prompt[p] += 1
            chosen_offset[slot], rejected_offset[slot], used[slot] = winner - slot, loser - slot, True
        num_pairs = int(used.sum())
        # Σ_rows w·ℓ / N = mean over used pairs (of the global batch); the loop weights a micro-batch of n rows by n/N.
        pair_weight = used.float() * self.global_mean_scale(num_pairs, N)
        device = rollout.input_ids.device
        prepared = {
            "ref_logps": ref_token_logps.sum(-1).float(),  # log π_ref(y|x), (N,)
            "chosen_offset": chosen_offset.to(device),
            "rejected_offset": rejected_offset.to(device),
            "pair_weight": pair_weight.to(device),
        }
        metrics = {"pairs/used": float(num_pairs), "pairs/ties_skipped": float(ties), "pairs/invalid_skipped": float(invalid)}
        return prepared, metrics

    def loss(self, policy_logps, batch):
        rows = torch.arange(policy_logps.shape[0], device=policy_logps.device)
        w, l = rows + batch["chosen_offset"], rows + batch["rejected_offset"]  # unused rows: w = l = row, h = 0
        ref = batch["ref_logps"].to(policy_logps.dtype)
        losses, chosen_rewards, rejected_rewards = preference_loss(
            policy_logps[w], policy_logps[l], ref[w], ref[l], beta=self.config.beta, loss_type=self.config.loss_type
        )
        weight = batch["pair_weight"].to(losses.dtype)
        loss = (weight * losses).sum() / policy_logps.shape[0]
        used = weight > 0
        if not used.any():
            return loss, {}
        margins = chosen_rewards[used] - rejected_rewards[used]
        metrics = {
            "rewards/chosen": chosen_rewards[used].mean().item(),
            "rewards/rejected": rejected_rewards[used].mean().item(),
            "rewards/margins": margins.mean().item(),
            "rewards/accuracies": (margins > 0).float().mean().item(),
            "logps/chosen": policy_logps[w][used].mean().item(),
            "logps/rejected": policy_logps[l][used].mean().item(),
        }
        return loss, metrics


OAIF_PAPER = "Online AI Feedback (Guo et al., arXiv 2402.04792)"


class OAIF(PairwisePreference):
    """Online: judged pairs of the current policy's own samples (``oaif_num_generations`` a prompt)."""

    Config = OnlineDPOConfig
    feedback_kind = "compare"

    def num_generations(self) -> int:
        return self.config.oaif_num_generations

    @property
    def best_vs_worst(self) -> bool:
        return self.config.best_vs_worst


@register_objective("online-dpo")
class OnlineDPO(OAIF):
    Config = OnlineDPOConfig
    paper = f"{OAIF_PAPER} with DPO (Rafailov et al., arXiv 2305.18290)"
    title = "OAIF-DPO"
    compare_role = "reference"  # the baseline of compare's P1: its final gold is the subject's target


@register_objective("online-ipo")
class OnlineIPO(OAIF):
    Config = OnlineIPOConfig
    paper = f"{OAIF_PAPER} with IPO (Azar et al., arXiv 2310.12036)"
    title = "OAIF-IPO"


@register_objective("online-slic")
class OnlineSLiC(OAIF):
    Config = OnlineSLiCConfig
    paper = f"{OAIF_PAPER} with SLiC (Zhao et al., arXiv 2305.10425)"
    title = "OAIF-SLiC"
