"""How often does an AI annotator agree with human preference labels — as a reward, and as a
preference?

The DAR paper's argument for reward-based online alignment: scoring each response on its own
(AI reward) agrees with humans more often than asking which of two is better (AI preference), and
preference judges favour whichever answer is shown second. This module measures both on human
preference pairs:

- reward agreement: score chosen and rejected separately; agree when chosen scores higher
  (ties reported on their own and counted as half in the headline rate);
- preference agreement: compare with the human-chosen answer first, then second, and the
  both-order combination (mean of P(chosen better) over the two orders);
- position effect: agreement with chosen in position 2 minus agreement with it in position 1.

Every rate comes with a 95% bootstrap interval over pairs; differences use a paired bootstrap.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from daralign.core.data import load_pairs, split_hh_pair, transcript_to_messages  # noqa: F401  (re-exported)
from daralign.core.errors import AnnotationError
from daralign.evaluation.winrate import TIE_EPS, TIE_MARGIN, _checked_probs, bootstrap_ci

# --- data -------------------------------------------------------------------------------------


def load_preference_pairs(path: str | Path, limit: int | None = None) -> list[dict]:
    """Human preference pairs as rows ``{prompt, chosen, rejected, row}`` (``data.load_pairs``:
    HH-RLHF transcripts, or rows with ``prompt``, ``chosen``, ``rejected``)."""
    pairs = load_pairs(str(path))
    pairs = pairs if limit is None else pairs[:limit]
    return [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"], "row": i} for i, p in enumerate(pairs)]


# --- judging ----------------------------------------------------------------------------------


def _checked_scores(result, n: int, who: str) -> list[float | None]:
    scores = list(result.scores)
    if len(scores) != n:
        raise AnnotationError(f"{who}: annotator returned {len(scores)} scores for {n} responses")
    for i, s in enumerate(scores):
        if s is not None and not np.isfinite(float(s)):
            raise AnnotationError(f"{who}: score {s!r} for response {i} is not finite")
    return [None if s is None else float(s) for s in scores]


def annotate_pairs(pairs: list[dict], scorer=None, comparer=None, batch_size: int = 16, progress=None) -> list[dict]:
    """Ask the annotators about every pair; returns one record per pair with the raw labels.

    ``scorer.score`` is called on chosen and rejected (reward); ``comparer.compare`` twice, with the
    chosen answer first and second (preference). Either may be None to skip that half. Batches
    keep memory flat and let ``progress(done, total)`` report.
    """
    records = [{"row": p["row"]} for p in pairs]
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        prompts = [p["prompt"] for p in chunk]
        chosen, rejected = [p["chosen"] for p in chunk], [p["rejected"] for p in chunk]
        # Rows reach the annotator without the answers: a reward function must not see the label.
        rows = [{k: v for k, v in p.items() if k not in ("chosen", "rejected")} for p in chunk]
        n, out = len(chunk), records[start : start + len(chunk)]
        if scorer is not None:
            s_c = _checked_scores(scorer.score(prompts, chosen, rows), n, "score(chosen)")
            s_r = _checked_scores(scorer.score(prompts, rejected, rows), n, "score(rejected)")
            for rec, a, b in zip(out, s_c, s_r):
                rec.update(score_chosen=a, score_rejected=b)
        if comparer is not None:
            p1 = _checked_probs(comparer.compare(prompts, chosen, rejected, rows), n, "compare(chosen, rejected)")
            p2 = _checked_probs(comparer.compare(prompts, rejected, chosen, rows), n, "compare(rejected, chosen)")
            for rec, a, b in zip(out, p1, p2):
                # Both stored as P(chosen better): position 1 directly, position 2 as 1 − P(A).
                rec.update(p_chosen_first=a, p_chosen_second=None if b is None else 1.0 - b)
        if progress is not None:
            progress(min(start + batch_size, len(pairs)), len(pairs))
    return records


# --- statistics -------------------------------------------------------------------------------


def _outcome(diff: float, margin: float = 0.0) -> float:
    """1 agree, 0 disagree, 0.5 tie (|diff| ≤ margin), from (chosen − rejected) or (P(chosen better) − 0.5)."""
    return 0.5 if abs(diff) <= margin + TIE_EPS else float(diff > 0)


def _rate(outcomes: list[float], n_boot: int, seed: int) -> dict:
    o = np.asarray(outcomes, dtype=float)
    lo, hi = bootstrap_ci(o, n_boot=n_boot, seed=seed)
    return {
        "n": int(len(o)),
        "agree": int((o == 1).sum()),
        "disagree": int((o == 0).sum()),
        "ties": int((o == 0.5).sum()),
        "agreement": float(o.mean()) if len(o) else float("nan"),  # ties count half
        "agreement_strict": float((o == 1).mean()) if len(o) else float("nan"),  # ties count as misses
        "ci_low": lo,
        "ci_high": hi,
    }


def _paired_diff(a: list[float | None], b: list[float | None], n_boot: int, seed: int) -> dict:
    """mean(a) − mean(b) over pairs where both are defined, with a paired bootstrap interval."""
    ab = np.array([(x, y) for x, y in zip(a, b) if x is not None and y is not None], dtype=float).reshape(-1, 2)
    lo, hi = bootstrap_ci(ab, stat=lambda s: s[..., 0].mean(-1) - s[..., 1].mean(-1), n_boot=n_boot, seed=seed)
    diff = float(ab[:, 0].mean() - ab[:, 1].mean()) if len(ab) else float("nan")
    return {"n": int(len(ab)), "diff": diff, "ci_low": lo, "ci_high": hi}


SCORE_TIE_MARGIN = 1e-4  # scores closer than this are numerically equal (batching/bf16 noise is ~1e-5)


def agreement_summary(records: list[dict], n_boot: int = 2000, seed: int = 0, tie_margin: float = TIE_MARGIN,
                      score_tie_margin: float = SCORE_TIE_MARGIN) -> dict:
    """Counts, rates and bootstrap intervals from ``annotate_pairs`` records.

    Keys: ``reward``, ``preference_chosen_first``, ``preference_chosen_second``,
    ``preference_both_orders`` (each: n, agree, disagree, ties, agreement, agreement_strict,
    ci_low, ci_high), ``invalid`` counts, ``position_effect`` (second − first, paired),
    ``reward_minus_preference`` (reward − both-order preference, paired on pairs valid for both),
    ``position_flip_rate`` and ``prefers_second_rate`` of the preference judge.
    Reward ties are scores within ``score_tie_margin`` (numerically equal: a bf16 judge's
    probabilities come in steps of ~0.03 and differ by ~1e-5 of batching noise within a step); a
    preference is a tie when P(chosen better) is within ``tie_margin`` of 0.5, as in the win rate.
    """
    def col(key):
        return [r.get(key) for r in records]

    reward = [None if a is None or b is None else _outcome(a - b, score_tie_margin)
              for a, b in zip(col("score_chosen"), col("score_rejected"))]
    first = [None if p is None else _outcome(p - 0.5, tie_margin) for p in col("p_chosen_first")]
    second = [None if p is None else _outcome(p - 0.5, tie_margin) for p in col("p_chosen_second")]
    both = [None if a is None or b is None else _outcome((a + b) / 2 - 0.5, tie_margin)
            for a, b in zip(col("p_chosen_first"), col("p_chosen_second"))]
    has_reward = any("score_chosen" in r for r in records)
    has_pref = any("p_chosen_first" in r for r in records)
    out: dict = {"num_pairs": len(records), "invalid": {}}
    sections = []
    if has_reward:
        sections.append(("reward", reward))
    if has_pref:
        sections += [("preference_chosen_first", first), ("preference_chosen_second", second), ("preference_both_orders", both)]
    for name, outs in sections:
        out[name] = _rate([o for o in outs if o is not None], n_boot, seed)
        out["invalid"][name] = sum(o is None for o in outs)
    if has_pref:
        out["position_effect"] = _paired_diff(second, first, n_boot, seed)
        decided = [(a, b) for a, b in zip(col("p_chosen_first"), col("p_chosen_second"))
                   if a is not None and b is not None and abs(a - 0.5) > TIE_EPS and abs(b - 0.5) > TIE_EPS]
        # position 2 picked: in order 1 when P(chosen first wins) < 0.5; in order 2 when chosen (2nd) wins.
        picks_second = [x for a, b in decided for x in (a < 0.5, b > 0.5)]
        out["position_flip_rate"] = float(np.mean([(a > 0.5) != (b > 0.5) for a, b in decided])) if decided else float("nan")
        out["prefers_second_rate"] = float(np.mean(picks_second)) if picks_second else float("nan")
    if has_reward and has_pref:
        out["reward_minus_preference"] = _paired_diff(reward, both, n_boot, seed)
    return out
