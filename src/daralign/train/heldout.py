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
resume) are untouched. Its requests are evaluation's: counted on the meter's ``eval`` account
(``eval_annotation_requests``), never against the training budget. A number that could not be
measured is ``None`` (JSON ``null``), never NaN.

``HeldoutCheck`` is the component the loop calls: which annotator is the yardstick (and whether it
is the training annotator), the training annotator as the proxy beside an independent yardstick,
and in-training win rates.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Callable

import torch

from daralign.core.rng import fork_rng
from daralign.annotators import build_annotator, describe_annotator, same_annotator
from daralign.core.errors import ConfigError
from daralign.rollout.hf import sample_rollout


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _score_per_prompt(annotator, prompts, completions, rows, K) -> list[float | None]:
    """Mean score of each prompt's K answers; all None without an annotator. The requests are
    evaluation's (the meter's ``eval`` account), never capped by the training budget."""
    if annotator is None:
        return [None] * len(rows)
    with annotator.meter.evaluation():
        scores = annotator.score(prompts, completions, [rows[i // K] for i in range(len(prompts))]).scores
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


class HeldoutCheck:
    """The held-out check the loop calls before, after and every ``eval_steps``.

    The yardstick is ``eval_annotator`` when given (the training annotator itself when the config
    is the same annotator), else the training annotator; beside an independent yardstick the
    training annotator also scores the answers (``proxy_score``). Every request goes on the run's
    meter under ``eval``."""

    def __init__(self, cfg, rows: list[dict], annotator, meter, *, policy, tokenizer, reference_token_logps,
                 autocast, out: Path, is_main: bool) -> None:
        self.cfg, self.rows, self.out, self.is_main = cfg, rows, out, is_main
        self.policy, self.tokenizer, self.reference_token_logps, self.autocast = policy, tokenizer, reference_token_logps, autocast
        self.evaluator, self.evaluator_name, self.evaluator_is_training = self._evaluator(annotator)
        self._owned = self.evaluator if self.evaluator is not annotator else None
        if self._owned is not None:
            self._owned.use_meter(meter)
        self.proxy = annotator if (rows and cfg.eval_proxy_score and annotator is not None
                                   and self._owned is not None and annotator.can_score) else None
        self._win_rate_refs: list[str] | None = None

    def _evaluator(self, annotator):
        cfg = self.cfg
        given = cfg.eval_annotator if cfg.eval_annotator is not None else cfg.annotator
        if not self.rows or given is None:
            return None, None, False
        same = cfg.eval_annotator is None or same_annotator(cfg.eval_annotator, cfg.annotator)
        if same and annotator is not None:
            return annotator, describe_annotator(given), True
        return build_annotator(given), describe_annotator(given), same

    def run(self, tag: str, progress=None) -> dict | None:
        if not self.rows:
            return None
        T = self.cfg.eval_temperature
        with self.autocast():
            res = judge_heldout(self.policy(), self.tokenizer, self.evaluator, self.rows,
                                max_new_tokens=self.cfg.max_completion_length, temperature=T,
                                seed=self.cfg.heldout_seed, batch_size=self.cfg.generation_batch_size,
                                samples_per_prompt=self.cfg.eval_samples_per_prompt,
                                ref_token_logps=lambda rollout: self.reference_token_logps(rollout, T),
                                proxy=self.proxy, progress=progress)
        res["evaluator"] = self.evaluator_name
        res["evaluator_is_training_annotator"] = self.evaluator_is_training
        if self.cfg.eval_win_rate:
            res["win_rate"] = self.win_rate()
        if self.is_main:
            (self.out / f"heldout_{tag}.json").write_text(json.dumps(res, indent=1))
        return res

    def win_rate(self) -> dict:
        """``eval/win_rate`` against reference answers, both orders asked by the evaluation itself."""
        from daralign.evaluation.winrate import evaluate_win_rate

        if self.evaluator is None or not self.evaluator.can_compare:
            raise ConfigError("eval_win_rate: needs an evaluator that compares two answers (a judge: type: judge)")
        if self._win_rate_refs is None:
            self._win_rate_refs = self._reference_answers()
        with self.evaluator.meter.evaluation():
            res = evaluate_win_rate(self.policy(), self.tokenizer, [r["prompt"] for r in self.rows], self._win_rate_refs,
                                    self.evaluator.single_order(), rows=self.rows,
                                    max_new_tokens=self.cfg.max_completion_length, temperature=self.cfg.eval_temperature,
                                    batch_size=self.cfg.generation_batch_size, seed=self.cfg.heldout_seed)
        return {k: v for k, v in res.items() if k.startswith("eval/") and isinstance(v, (int, float))}

    def _reference_answers(self) -> list[str]:
        """Answers to beat: the eval set's ``reference``/``output`` column, else the starting
        policy's own answers (made once before training, kept for resume)."""
        path = self.out / "heldout_reference_answers.json"
        if path.exists():
            return json.loads(path.read_text())
        col = next((c for c in ("reference", "output") if all(isinstance(r.get(c), str) for r in self.rows)), None)
        if col:
            answers = [r[col] for r in self.rows]
        else:
            from daralign.evaluation.generate import generate_responses

            answers = generate_responses(self.policy(), self.tokenizer, [r["prompt"] for r in self.rows],
                                         max_new_tokens=self.cfg.max_completion_length, temperature=self.cfg.eval_temperature,
                                         batch_size=self.cfg.generation_batch_size, seed=self.cfg.seed + 104729)
        if self.is_main:
            path.write_text(json.dumps(answers))
        return answers

    def close(self) -> None:
        if self._owned is not None:
            self._owned.close()
