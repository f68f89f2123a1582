"""Offline DPO (Rafailov et al. 2023) on a fixed ``prompt/chosen/rejected`` dataset.

Same loss as online DPO (``online_dpo.preference_loss``: −log σ(β·h), or IPO/SLiC via
``loss_type``); only the data differ. The loop builds a Rollout with K = 2 per prompt (chosen at
k = 0, rejected at k = 1; ``rollout/offline.py``) and Feedback with pairs [(2p, 2p+1)] and
preference 1.0 (``feedback.offline_feedback``) — no annotator, no annotation spent.
"""

from __future__ import annotations

from dataclasses import dataclass

from daralign.objectives.base import register_objective
from daralign.objectives.online_dpo import PairwisePreference, PreferenceLossConfig


@dataclass
class DPOConfig(PreferenceLossConfig):
    """Offline DPO knobs (TRL names): ``beta`` (KL to the reference), ``loss_type``."""


@register_objective("dpo")
class DPO(PairwisePreference):
    """Rows of ``dataset`` are ``prompt, chosen, rejected`` (see ``data.load_pairs``); no annotator."""

    Config = DPOConfig
    feedback_kind = "offline"
    paper = "DPO (Rafailov et al., arXiv 2305.18290), offline"
    title = "DPO"

    def num_generations(self) -> int:
        return 2  # chosen, rejected
