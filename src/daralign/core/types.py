"""The small dataclasses that rooms exchange: rollout -> annotate -> objective -> update.

Shapes use N = num_prompts * K (flattened, prompt-major: sample k of prompt p is row p*K + k)
and L = padded prompt+completion length.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Rollout:
    """K sampled completions per prompt, tokenised, with behaviour (sampling-policy) log-probs."""

    rows: list[dict[str, Any]]  # the dataset rows (num_prompts); extra columns pass through
    prompts: list[Any]  # the raw prompt of each row: str or list of chat messages
    completions: list[str]  # N decoded completions (special tokens stripped)
    input_ids: torch.Tensor  # (N, L) left-padded prompt followed by right-padded completion
    attention_mask: torch.Tensor  # (N, L) 1 on real tokens
    completion_mask: torch.Tensor  # (N, L) 1 on completion tokens (EOS counted once)
    behaviour_token_logps: torch.Tensor | None  # (N, L-1) sampling-policy log-prob of token t+1, 0 off-completion;
    #                                             None until the trainer computes it (rollout/base.py)
    is_eos: torch.Tensor  # (N,) bool: the completion ended with EOS (not cut by length)
    num_generations: int  # K
    engine_token_logps: torch.Tensor | None = None  # (N, T) an engine's own log-probs of its samples, checked against π_t

    @property
    def num_prompts(self) -> int:
        return len(self.rows)

    @property
    def behaviour_logps(self) -> torch.Tensor:
        """(N,) log π_t(y|x): the sum over completion tokens."""
        return self.behaviour_token_logps.sum(-1)

    @property
    def completion_lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)

    def prompt_of(self, i: int) -> Any:
        """Raw prompt of flattened sample i."""
        return self.prompts[i // self.num_generations]


@dataclass
class Feedback:
    """What the annotator said about a rollout.

    Score feedback fills ``rewards`` (num_prompts, K). Compare feedback fills ``pairs``: for each
    judged pair of flattened sample indices (i, j), ``preference`` is P(i better than j).
    ``valid`` marks samples the annotator could label; invalid ones are dropped from the update.
    """

    num_annotations: int  # annotator labels produced for this rollout
    num_requests: int = 0  # annotator requests paid for them (the budget's unit; see Annotator)
    num_cache_hits: int = 0  # requests answered from the cache, for free
    rewards: torch.Tensor | None = None  # (num_prompts, K) float
    valid: torch.Tensor | None = None  # (num_prompts, K) bool
    pairs: list[tuple[int, int]] | None = None
    preference: torch.Tensor | None = None  # (num_pairs,) P(first better)
    metrics: dict[str, float] = field(default_factory=dict)
