"""One step's metrics, assembled in one place from what the step produced: the running spend
(annotations, requests, cache hits, cost), TRL's reward / KL / entropy / completion-length keys,
then the objective's, the annotator's, the update's and the timings (every key: docs/metrics.md).

Counts are summed over processes (``sum_over_processes``: an all-reduce under DDP); per-sample
statistics are this process's (TRL logs the main process's too)."""

from __future__ import annotations

from typing import Callable

import torch

from daralign.core.types import Feedback, Rollout

SPENT_KEYS = ("annotations", "annotation_requests", "annotation_cache_hits", "eval_annotation_requests", "annotation_cost")


def nothing_spent() -> dict:
    """The running totals of a run that has not started (``SPENT_KEYS``; the cost in currency)."""
    return {k: 0.0 if k == "annotation_cost" else 0 for k in SPENT_KEYS}


def step_metrics(rollout: Rollout, feedback: Feedback, ref_token_logps: torch.Tensor | None, *, spent: dict,
                 eval_requests: int, num_prompts: int, objective: dict, update: dict, timing: dict,
                 sum_over_processes: Callable[[float], float], sampled: bool = True) -> dict:
    """``spent``: the running totals before this step (``SPENT_KEYS``); ``eval_requests``: evaluation
    requests on this process since the last step; ``sampled``: False for offline pairs (no π_t)."""
    total = sum_over_processes
    m = {"annotations": spent["annotations"] + int(total(feedback.num_annotations)),
         "annotation_requests": spent["annotation_requests"] + int(total(feedback.num_requests)),
         "annotation_cache_hits": spent["annotation_cache_hits"] + int(total(feedback.num_cache_hits)),
         "eval_annotation_requests": spent["eval_annotation_requests"] + int(total(eval_requests)),
         # what training's judge requests cost at the configured prices (0 without prices)
         "annotation_cost": spent["annotation_cost"] + total(feedback.metrics.get("judge/cost", 0.0)),
         "num_prompts": float(num_prompts)}
    if feedback.rewards is not None:
        r = feedback.rewards[feedback.valid] if feedback.valid is not None else feedback.rewards
        m |= {"reward": r.mean().item() if r.numel() else None, "reward_std": r.std().item() if r.numel() > 1 else 0.0}
    lengths = rollout.completion_lengths.float()
    if sampled:  # offline responses were not sampled: no π_t, so no KL or entropy of it
        if ref_token_logps is not None:
            # KL(π_t‖π_ref) per sequence, Monte-Carlo over the samples: E[log π_t − log π_ref]
            m["kl"] = (rollout.behaviour_logps - ref_token_logps.sum(-1)).mean().item()
        m["entropy"] = (-rollout.behaviour_logps / lengths.clamp(min=1)).mean().item()  # per-token MC estimate
    return m | {
        "num_tokens": float(lengths.sum().item()),
        "completions/mean_length": lengths.mean().item(),
        "completions/min_length": lengths.min().item(),
        "completions/max_length": lengths.max().item(),
        "completions/clipped_ratio": 1.0 - rollout.is_eos.float().mean().item(),
        **objective, **feedback.metrics, **update, **timing,
    }
