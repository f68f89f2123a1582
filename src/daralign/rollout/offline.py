"""Offline preference pairs as a ``Rollout``: K = 2 fixed responses per prompt (chosen at k = 0,
rejected at k = 1), tokenised exactly as sampled ones are (left-padded prompt through the policy's
chat template, response tokens + EOS, right-padded), so offline DPO runs through the same loop,
objective and log-prob code as the online methods.
"""

from __future__ import annotations

import torch

from daralign.rollout.base import RolloutEngine, SamplingSettings, register_engine
from daralign.rollout.tokens import tokenize_prompts
from daralign.core.types import Rollout


def pair_rollout(tokenizer, rows: list[dict], *, max_prompt_length: int, max_completion_length: int, device) -> Rollout:
    """Rows from ``data.load_pairs``. A response longer than ``max_completion_length`` tokens is cut
    (``is_eos`` False for it, as for a sampled response that hit the length limit)."""
    enc = tokenize_prompts(tokenizer, [r["prompt"] for r in rows], max_prompt_length, device)
    prompt_ids = enc["input_ids"].repeat_interleave(2, 0)
    prompt_mask = enc["attention_mask"].repeat_interleave(2, 0)
    texts = [r[side] for r in rows for side in ("chosen", "rejected")]
    responses = [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    is_eos = torch.tensor([len(ids) <= max_completion_length for ids in responses], device=device)
    responses = [ids[:max_completion_length] for ids in responses]
    T = max(len(ids) for ids in responses)
    gen = torch.full((len(responses), T), tokenizer.pad_token_id, dtype=torch.long, device=device)
    gen_mask = torch.zeros((len(responses), T), dtype=torch.long, device=device)
    for i, ids in enumerate(responses):
        gen[i, :len(ids)] = torch.tensor(ids, device=device)
        gen_mask[i, :len(ids)] = 1
    N, Lp = prompt_ids.shape
    return Rollout(
        rows=rows, prompts=[r["prompt"] for r in rows], completions=texts,
        input_ids=torch.cat([prompt_ids, gen], 1), attention_mask=torch.cat([prompt_mask, gen_mask], 1),
        completion_mask=torch.cat([torch.zeros_like(prompt_mask), gen_mask], 1),
        behaviour_token_logps=torch.zeros((N, Lp + T - 1), device=device),  # not sampled: no π_t (zeros)
        is_eos=is_eos, num_generations=2,
    )


@register_engine("offline")
class OfflinePairs(RolloutEngine):
    """Offline DPO's "sampler": each prompt row's (chosen, rejected) pair from the dataset."""

    gives_behaviour_logps = True  # nothing was sampled: π_t is not used (zeros)
    auto_priority = 20  # a method that learns from fixed pairs samples nothing, whatever else is set

    def __init__(self, settings: SamplingSettings, tokenizer, device) -> None:
        self.s, self.tokenizer, self.device = settings, tokenizer, device

    @classmethod
    def auto_selects(cls, train, config, feedback_kind: str) -> bool:
        """a method learning from the dataset's fixed pairs"""
        return feedback_kind == "offline"

    @classmethod
    def from_config(cls, config: None, settings: SamplingSettings, tokenizer, device) -> "OfflinePairs":
        return cls(settings, tokenizer, device)

    def sample(self, model, rows: list[dict], step: int) -> Rollout:
        return pair_rollout(self.tokenizer, rows, max_prompt_length=self.s.max_prompt_length,
                            max_completion_length=self.s.max_completion_length, device=self.device)
