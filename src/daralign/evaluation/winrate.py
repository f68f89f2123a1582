"""Win rate of a model against a reference, from pairwise judgments in both orders.

A judge is asked twice per prompt: (model, reference) and (reference, model). Averaging
P(model better) over the two orders cancels a constant position bias, which small LLM judges
have in abundance (they favour the second answer). The combined preference p ∈ [0, 1] is turned
into an outcome: win (p > 0.5), loss (p < 0.5) or tie (p within ``tie_margin`` of 0.5: a discrete
judge whose two orders disagree or that says "tie", or a probability judge that cannot tell the
answers apart — its two orders then differ only by bf16 noise, ~1e-5). Win rate =
(wins + ties/2) / n — the AlpacaEval / MT-bench-pairwise convention. The soft view (mean of p,
AlpacaEval 2's use of judge probabilities) is reported beside it.

Everything here is plain numpy on already-made judgments, so it is unit-tested exactly.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

TIE_EPS = 1e-9  # float noise from averaging two orders
TIE_MARGIN = 0.01  # default: a combined P(model better) in [0.49, 0.51] is a tie
DEFAULT_LENGTH_RATIO_EDGES = (0.8, 1.25)  # model/reference length: shorter | similar | longer


def combine_orders(prob_model_first: Sequence[float | None], prob_ref_first: Sequence[float | None]) -> list[float | None]:
    """P(model better) from both orders.

    ``prob_model_first[i]`` is the judge's P(A better) with the model's answer as A;
    ``prob_ref_first[i]`` is P(A better) with the reference as A, so P(model better) = 1 − it.
    A pair is invalid (None) when either order is invalid: keeping a single order would bring
    back the position bias the swap exists to remove.
    """
    if len(prob_model_first) != len(prob_ref_first):
        raise ValueError(f"{len(prob_model_first)} vs {len(prob_ref_first)} judgments")
    out: list[float | None] = []
    for a, b in zip(prob_model_first, prob_ref_first):
        out.append(None if a is None or b is None else 0.5 * (float(a) + 1.0 - float(b)))
    return out


def outcomes(prefs: Sequence[float], tie_margin: float = TIE_MARGIN) -> np.ndarray:
    """1 = win, 0 = loss, 0.5 = tie (|p − 0.5| ≤ tie_margin), per preference P(model better)."""
    p = np.asarray(prefs, dtype=float)
    return np.where(np.abs(p - 0.5) <= tie_margin + TIE_EPS, 0.5, (p > 0.5).astype(float))


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    stat: Callable[[np.ndarray], np.ndarray] | None = None,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of a statistic over items (resampled with replacement).

    ``values`` is (n,) or (n, k) (k paired columns resampled together, e.g. for a difference);
    ``stat`` maps the resampled (n_boot, n, ...) array to (n_boot,), default the mean over items.
    Returns (nan, nan) for no items.
    """
    v = np.asarray(values, dtype=float)
    if stat is None and v.ndim != 1:
        raise ValueError("paired (n, k) values need a `stat` that reduces them to one number per resample")
    if len(v) == 0:
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, len(v), size=(n_boot, len(v)))
    stats = v[idx].mean(axis=1) if stat is None else stat(v[idx])
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def length_buckets(
    model_lengths: Sequence[float], ref_lengths: Sequence[float], edges: Sequence[float] = DEFAULT_LENGTH_RATIO_EDGES
) -> list[str]:
    """Bucket name per pair from the length ratio model/reference: with the default edges
    ``shorter`` (< 0.8), ``similar`` (0.8–1.25), ``longer`` (≥ 1.25)."""
    lo, hi = edges
    names = []
    for m, r in zip(model_lengths, ref_lengths):
        ratio = float(m) / max(float(r), 1.0)
        names.append("shorter" if ratio < lo else "similar" if ratio < hi else "longer")
    return names


def win_rate_summary(
    prefs: Sequence[float | None],
    model_lengths: Sequence[float],
    ref_lengths: Sequence[float],
    *,
    n_boot: int = 2000,
    seed: int = 0,
    length_ratio_edges: Sequence[float] = DEFAULT_LENGTH_RATIO_EDGES,
    tie_margin: float = TIE_MARGIN,
    prefix: str = "eval/",
) -> dict[str, float | int]:
    """All win-rate numbers from per-prompt combined preferences (None = invalid, excluded).

    Lengths cover every prompt (the mean length of each side is about what was generated, valid
    judgment or not). The length-controlled view repeats the win rate inside each length-ratio
    bucket: a model that only wins where it is longer is buying wins with length.
    """
    if not (len(prefs) == len(model_lengths) == len(ref_lengths)):
        raise ValueError(f"lengths differ: {len(prefs)} prefs, {len(model_lengths)} model, {len(ref_lengths)} reference")
    valid = np.array([p is not None for p in prefs], dtype=bool)
    p = np.array([x for x in prefs if x is not None], dtype=float)
    o = outcomes(p, tie_margin)
    m_len = np.asarray(model_lengths, dtype=float)
    r_len = np.asarray(ref_lengths, dtype=float)
    nan = float("nan")
    out: dict[str, float | int] = {
        f"{prefix}num_prompts": len(prefs),
        f"{prefix}num_judged": int(valid.sum()),
        f"{prefix}num_invalid": int((~valid).sum()),
        f"{prefix}wins": int((o == 1).sum()),
        f"{prefix}losses": int((o == 0).sum()),
        f"{prefix}ties": int((o == 0.5).sum()),
        f"{prefix}win_rate": float(o.mean()) if len(o) else nan,
        f"{prefix}win_rate_soft": float(p.mean()) if len(p) else nan,
        f"{prefix}mean_length": float(m_len.mean()) if len(m_len) else nan,
        f"{prefix}ref_mean_length": float(r_len.mean()) if len(r_len) else nan,
    }
    lo, hi = bootstrap_ci(o, n_boot=n_boot, seed=seed)
    out[f"{prefix}win_rate_ci_low"], out[f"{prefix}win_rate_ci_high"] = lo, hi
    buckets = np.array(length_buckets(m_len[valid], r_len[valid], length_ratio_edges))
    for name in ("shorter", "similar", "longer"):
        sel = buckets == name
        out[f"{prefix}len_{name}/n"] = int(sel.sum())
        out[f"{prefix}len_{name}/win_rate"] = float(o[sel].mean()) if sel.any() else nan
        lo, hi = bootstrap_ci(o[sel], n_boot=n_boot, seed=seed)
        out[f"{prefix}len_{name}/ci_low"], out[f"{prefix}len_{name}/ci_high"] = lo, hi
    return out


# --- judging with an Annotator ---------------------------------------------------------------


def _checked_probs(result, n: int, who: str) -> list[float | None]:
    """The annotator's P(A better) list, validated: right count, None or a number in [0, 1]."""
    from daralign.core.errors import AnnotationError

    probs = list(result.prob_a)
    if len(probs) != n:
        raise AnnotationError(f"{who}: annotator returned {len(probs)} preferences for {n} pairs")
    for i, p in enumerate(probs):
        if p is not None and not (0.0 <= float(p) <= 1.0):  # also rejects NaN
            raise AnnotationError(f"{who}: preference {p!r} for pair {i} is not a probability in [0, 1]")
    return [None if p is None else float(p) for p in probs]


def judge_both_orders(annotator, prompts: list, answers: list[str], references: list[str], rows: list[dict]) -> dict:
    """Ask ``annotator.compare`` with the model's answer first, then with the reference first.

    The swap is done here, not inside the judge, so it holds for any annotator (and a judge's own
    debiasing, if switched on, only adds work). Returns per-pair lists ``prob_model_first``,
    ``prob_ref_first``, ``prefs`` (combined P(model better), None if either order is invalid) and
    ``metrics``: how often the two orders disagree and how often position 2 was picked — the
    judge's position bias, measured on this very evaluation.
    """
    n = len(prompts)
    if not (len(answers) == len(references) == len(rows) == n):
        raise ValueError(f"{n} prompts, {len(answers)} answers, {len(references)} references, {len(rows)} rows")
    first = _checked_probs(annotator.compare(prompts, answers, references, rows), n, "model first")
    second = _checked_probs(annotator.compare(prompts, references, answers, rows), n, "reference first")
    prefs = combine_orders(first, second)
    both = [(a, b) for a, b in zip(first, second) if a is not None and b is not None]
    picks_b = [x < 0.5 for a, b in both for x in (a, b) if abs(x - 0.5) > TIE_EPS]
    flips = [(a > 0.5) != (b < 0.5) for a, b in both if abs(a - 0.5) > TIE_EPS and abs(b - 0.5) > TIE_EPS]
    metrics = {
        "eval/position_flip_rate": float(np.mean(flips)) if flips else float("nan"),
        "eval/prefers_second_rate": float(np.mean(picks_b)) if picks_b else float("nan"),
    }
    return {"prob_model_first": first, "prob_ref_first": second, "prefs": prefs, "metrics": metrics}


def evaluate_win_rate(
    policy_model,
    tokenizer,
    prompts: list,
    reference_answers: list[str],
    annotator,
    *,
    rows: list[dict] | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    batch_size: int = 8,
    seed: int = 0,
    n_boot: int = 2000,
    tie_margin: float = TIE_MARGIN,
    return_details: bool = False,
):
    """Generate from ``policy_model`` and report its win rate against fixed reference answers.

    For use during training every ``eval_steps``: greedy by default (so a change in the number is
    a change of the policy, not sampling noise), the model's mode and the global RNG restored.
    Pass the unwrapped model (``accelerator.unwrap_model``) and a comparing annotator that does
    not swap orders itself (``evaluation.build_annotators(cfg, False, True)[1]``): the swap is
    done here; a judge with ``debias: both_orders`` still works but pays twice and hides its bias.
    Returns a metrics dict with ``eval/win_rate``, ``eval/win_rate_ci_low``/``_high``,
    ``eval/mean_length`` (policy answer, in tokens of ``tokenizer``), ``eval/ref_mean_length``,
    the length buckets and judge position-bias numbers. With ``return_details`` also returns the
    per-prompt answers and judgments: ``(metrics, details)``.
    """
    from daralign.evaluation.generate import count_tokens, generate_responses

    rows = rows if rows is not None else [{} for _ in prompts]
    answers = generate_responses(policy_model, tokenizer, prompts, max_new_tokens, temperature, batch_size, seed)
    judged = judge_both_orders(annotator, prompts, answers, reference_answers, rows)
    m_len, r_len = count_tokens(tokenizer, answers), count_tokens(tokenizer, reference_answers)
    metrics = win_rate_summary(judged["prefs"], m_len, r_len, n_boot=n_boot, seed=seed, tie_margin=tie_margin)
    metrics.update(judged["metrics"])
    if not return_details:
        return metrics
    details = dict(judged, answers=answers, model_lengths=m_len, ref_lengths=r_len)
    details.pop("metrics")
    return metrics, details
