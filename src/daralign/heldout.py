"""Held-out check: answers to a fixed prompt set, sampled with a fixed seed, measured three ways.

- ``score``: the *evaluator's* mean score (``eval_annotator``, else the training annotator — the
  record says which, and whether they are the same);
- ``kl``: KL(π‖π_ref) per sequence in nats, Monte-Carlo over the held-out samples,
  E_y~π[log π(y|x) − log π_ref(y|x)] with both at the sampling temperature — measured for every
  method, so every method has a point on the score-vs-KL frontier;
- ``mean_length`` and ``eos_frac``.

Run before and after training (and every ``eval_steps``), it measures progress on prompts the
policy never trained on; per-prompt values allow a paired before/after difference with its
standard error. Sampling runs inside ``rng.fork_rng`` so the training RNG streams (and hence exact
resume) are untouched. Its annotations are not counted in the training budget. A number that
could not be measured is ``None`` (JSON ``null``), never NaN.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable

import torch

from daralign.rng import fork_rng
from daralign.rollout.hf import sample_rollout


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _score_per_prompt(annotator, prompts, completions, rows, K) -> list[float | None]:
    """Mean score of each prompt's K answers; all None without an annotator. The training budget's
    request cap is lifted meanwhile: held-out requests are not the run's to spend."""
    if annotator is None:
        return [None] * len(rows)
    limit, annotator.request_limit = annotator.request_limit, None
    try:
        scores = annotator.score(prompts, completions, [rows[i // K] for i in range(len(prompts))]).scores
    finally:
        annotator.request_limit = limit
    return [_mean(scores[p * K:(p + 1) * K]) for p in range(len(rows))]


def judge_heldout(model, tokenizer, annotator, rows: list[dict], *, max_new_tokens: int, temperature: float,
                  seed: int, samples_per_prompt: int = 2, bf16: bool = False, batch_size: int = 32,
                  ref_token_logps: Callable | None = None, proxy=None,
                  progress: Callable[[str, int, int], None] | None = None) -> dict:
    """``annotator`` may be None (nothing scores: ``score`` is None); ``ref_token_logps(rollout)``
    gives the reference's per-token log-probs for the KL (None: not measured); ``proxy``, a second
    scorer of the same answers (the training annotator beside an independent evaluator), gives
    ``proxy_score``. Neither is held to the training budget's request limit. ``progress(what,
    done, total)`` is told before each phase (sampling, each scorer, the KL) and at the end."""
    phases = ["sampling"] + [name for name, on in [("scoring", annotator is not None),
                                                   ("scoring by the training annotator", proxy is not None),
                                                   ("KL to the reference", ref_token_logps is not None)] if on]
    counter = itertools.count()

    def tell():  # phase i is starting (or, past the last, all are done)
        i = next(counter)
        if progress is not None:
            progress(phases[i] if i < len(phases) else "done", i, len(phases))

    tell()
    with fork_rng():
        torch.manual_seed(seed)
        rollout = sample_rollout(model, tokenizer, rows, num_generations=samples_per_prompt,
                                 max_completion_length=max_new_tokens, temperature=temperature,
                                 generation_batch_size=batch_size, bf16=bf16)
    K = samples_per_prompt
    prompts = [rollout.prompt_of(i) for i in range(len(rollout.completions))]
    tell()
    per_prompt = _score_per_prompt(annotator, prompts, rollout.completions, rows, K)
    if annotator is not None:
        tell()
    proxy_per_prompt = _score_per_prompt(proxy, prompts, rollout.completions, rows, K)
    if proxy is not None:
        tell()
    kl_per_prompt: list[float | None] = [None] * len(rows)
    if ref_token_logps is not None:
        kl = (rollout.behaviour_logps - ref_token_logps(rollout).sum(-1)).view(len(rows), K).mean(1)
        kl_per_prompt = kl.tolist()
        tell()
    lengths = rollout.completion_lengths.float()
    return {
        "score": _mean(per_prompt),
        "per_prompt": per_prompt,
        "proxy_score": _mean(proxy_per_prompt) if proxy is not None else None,
        "proxy_per_prompt": proxy_per_prompt if proxy is not None else None,
        "kl": _mean(kl_per_prompt),
        "kl_per_prompt": kl_per_prompt,
        "mean_length": lengths.mean().item(),
        "eos_frac": rollout.is_eos.float().mean().item(),
        "completions": rollout.completions[::K],
    }


def paired_difference(before: list, after: list) -> tuple[float | None, float | None]:
    """Mean and standard error over prompts of (after − before); None where not measurable."""
    diffs = [a - b for a, b in zip(after, before)
             if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    n = len(diffs)
    if n < 2:
        return (diffs[0] if diffs else None), None
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    return mean, math.sqrt(var / n)
