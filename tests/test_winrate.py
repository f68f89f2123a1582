"""Win-rate arithmetic, ties, bootstrap, length buckets and the order swap, on constructed
judgments and a real (deterministic) judge whose position bias is known."""

import math

import numpy as np
import pytest

from daralign.annotators.base import Annotator, CompareResult
from daralign.core.errors import AnnotationError
from daralign.evaluation.winrate import (bootstrap_ci, combine_orders, judge_both_orders, length_buckets, outcomes,
                                         win_rate_summary)


class SecondPositionJudge(Annotator):
    """P(A better) = σ(q(A) − q(B) − bias): quality q is the count of the word "good"; ``bias`` > 0
    pushes every verdict towards position 2, like small LLM judges do."""

    name = "second-position-judge"

    def __init__(self, bias: float = 3.0):
        super().__init__()
        self.bias = bias

    def _compare(self, prompts, completions_a, completions_b, rows):
        q = lambda t: t.split().count("good")  # noqa: E731
        probs = [1 / (1 + math.exp(-(q(a) - q(b) - self.bias))) for a, b in zip(completions_a, completions_b)]
        return CompareResult(prob_a=probs)


def test_outcomes_and_ties():
    assert outcomes([0.9, 0.1, 0.5, 0.5 + 1e-12, 0.51], tie_margin=0.0).tolist() == [1, 0, 0.5, 0.5, 1]
    # default margin: a probability judge that is indifferent (0.500009 from bf16 noise) ties
    assert outcomes([0.500009, 0.495, 0.51, 0.52, 0.47]).tolist() == [0.5, 0.5, 0.5, 1, 0]


def test_combine_orders():
    # model first says 0.8; reference first says 0.3 (=> model better with 0.7) -> 0.75
    assert combine_orders([0.8, 1.0, None, 0.4], [0.3, 1.0, 0.5, None]) == [pytest.approx(0.75), 0.5, None, None]
    with pytest.raises(ValueError):
        combine_orders([0.5], [])


def test_win_rate_counts_ties_as_half():
    prefs = [1.0, 1.0, 0.0, 0.5, 0.5, None]  # 2 wins, 1 loss, 2 ties, 1 invalid
    m = win_rate_summary(prefs, [10] * 6, [10] * 6, n_boot=200)
    assert (m["eval/wins"], m["eval/losses"], m["eval/ties"], m["eval/num_invalid"], m["eval/num_judged"]) == (2, 1, 2, 1, 5)
    assert m["eval/win_rate"] == pytest.approx((2 + 0.5 * 2) / 5)
    assert m["eval/win_rate_soft"] == pytest.approx(3.0 / 5)
    assert m["eval/win_rate_ci_low"] <= m["eval/win_rate"] <= m["eval/win_rate_ci_high"]


def test_soft_and_hard_views_differ_for_probabilities():
    m = win_rate_summary([0.6, 0.6, 0.3], [1, 1, 1], [1, 1, 1], n_boot=100)
    assert m["eval/win_rate"] == pytest.approx(2 / 3)
    assert m["eval/win_rate_soft"] == pytest.approx(0.5)


def test_mean_lengths_cover_all_prompts():
    m = win_rate_summary([1.0, None], [10, 30], [5, 7], n_boot=50)
    assert m["eval/mean_length"] == 20 and m["eval/ref_mean_length"] == 6


def test_bootstrap_interval_properties():
    rng = np.random.default_rng(1)
    x = (rng.random(400) < 0.5).astype(float)
    lo, hi = bootstrap_ci(x, n_boot=4000, seed=0)
    # Binomial normal approximation: half-width 1.96*sqrt(p(1-p)/n) ≈ 0.049.
    assert lo < x.mean() < hi
    assert (hi - lo) / 2 == pytest.approx(1.96 * math.sqrt(x.mean() * (1 - x.mean()) / 400), rel=0.1)
    assert bootstrap_ci(x, n_boot=500, seed=3) == bootstrap_ci(x, n_boot=500, seed=3)  # seeded
    assert bootstrap_ci(np.ones(30)) == (1.0, 1.0)  # no variation, no width
    assert all(math.isnan(v) for v in bootstrap_ci([]))
    # paired columns need a statistic
    with pytest.raises(ValueError):
        bootstrap_ci(np.ones((5, 2)))
    d_lo, d_hi = bootstrap_ci(np.stack([np.ones(50), np.zeros(50)], 1), stat=lambda s: s[..., 0].mean(-1) - s[..., 1].mean(-1))
    assert (d_lo, d_hi) == (1.0, 1.0)


def test_bootstrap_covers_truth_at_about_95_percent():
    rng = np.random.default_rng(0)
    hits = 0
    for rep in range(200):
        x = (rng.random(100) < 0.7).astype(float)
        lo, hi = bootstrap_ci(x, n_boot=1000, seed=rep)
        hits += lo <= 0.7 <= hi
    assert 0.88 <= hits / 200 <= 0.99


def test_length_buckets_and_length_controlled_view():
    assert length_buckets([5, 10, 10, 20, 0], [10, 10, 12, 10, 0]) == ["shorter", "similar", "similar", "longer", "shorter"]
    # The model wins only when it is much longer: the buckets expose it.
    prefs = [1.0] * 4 + [0.0] * 4 + [0.5, 0.0]
    m_len = [40] * 4 + [10] * 4 + [7, 10]
    r_len = [10] * 10
    m = win_rate_summary(prefs, m_len, r_len, n_boot=200)
    assert m["eval/len_longer/n"] == 4 and m["eval/len_longer/win_rate"] == 1.0
    assert m["eval/len_similar/n"] == 5 and m["eval/len_similar/win_rate"] == pytest.approx(0.0)
    assert m["eval/len_shorter/n"] == 1 and m["eval/len_shorter/win_rate"] == pytest.approx(0.5)
    assert m["eval/win_rate"] == pytest.approx(4.5 / 10)


def test_empty_bucket_is_nan_not_an_error():
    m = win_rate_summary([1.0], [10], [10], n_boot=10)
    assert math.isnan(m["eval/len_longer/win_rate"]) and m["eval/len_longer/n"] == 0


def test_order_swap_cancels_known_position_bias():
    judge = SecondPositionJudge(bias=3.0)
    # Model answers are truly better on 6 of 10 prompts, worse on 4, by margins (1–2 "good"s)
    # smaller than the bias, so any single order gives the wrong verdict on some prompts.
    margins = [1, 2, 1, 2, 1, 1, -1, -2, -1, -1]
    refs = ["good " * 3] * 10
    answers = ["good " * (3 + d) for d in margins]
    prompts, rows = [f"q{i}" for i in range(10)], [{} for _ in range(10)]
    judged = judge_both_orders(judge, prompts, answers, refs, rows)

    model_first = outcomes(judged["prob_model_first"]).mean()  # model in position 1: always loses
    ref_first = outcomes([1 - p for p in judged["prob_ref_first"]]).mean()  # model in position 2: always wins
    assert model_first == 0.0 and ref_first == 1.0
    m = win_rate_summary(judged["prefs"], [1] * 10, [1] * 10, n_boot=200)
    assert m["eval/win_rate"] == pytest.approx(0.6)  # the truth
    assert judged["metrics"]["eval/prefers_second_rate"] == 1.0
    assert judged["metrics"]["eval/position_flip_rate"] == 1.0
    assert judge.num_annotations == 20  # both orders were asked


def test_equal_answers_with_biased_judge_are_exact_ties():
    judged = judge_both_orders(SecondPositionJudge(2.0), ["q"] * 3, ["same"] * 3, ["same"] * 3, [{}] * 3)
    m = win_rate_summary(judged["prefs"], [1] * 3, [1] * 3, n_boot=50)
    assert m["eval/ties"] == 3 and m["eval/win_rate"] == 0.5


class BrokenJudge(Annotator):
    def __init__(self, probs):
        super().__init__()
        self.probs = probs

    def _compare(self, prompts, a, b, rows):
        return CompareResult(prob_a=list(self.probs))


def test_annotator_output_is_validated():
    with pytest.raises(AnnotationError, match="2 preferences for 3"):
        judge_both_orders(BrokenJudge([0.5, 0.5]), ["q"] * 3, ["a"] * 3, ["b"] * 3, [{}] * 3)
    with pytest.raises(AnnotationError, match="preference 0 is nan"):
        judge_both_orders(BrokenJudge([float("nan")]), ["q"], ["a"], ["b"], [{}])
    judged = judge_both_orders(BrokenJudge([None]), ["q"], ["a"], ["b"], [{}])
    assert judged["prefs"] == [None]


def test_eval_annotators_turn_off_the_judges_own_swap():
    """Built from a training-style judge config (mode: score, debias on), the comparer asks one
    order per call; no model is loaded until a label is asked for."""
    from daralign.evaluation import build_annotators

    cfg = {"type": "judge", "mode": "score", "template": "helpfulness", "debias": "both_orders",
           "model": "bundled:qwen2.5-coder-0.5b-instruct"}
    scorer, comparer = build_annotators(cfg, need_score=False, need_compare=True)
    assert scorer is None and comparer.can_compare and comparer.config.debias == "none"
    scorer, comparer = build_annotators({**cfg, "mode": "compare"}, need_score=True, need_compare=False)
    assert comparer is None and scorer.can_score  # one judge serves both modes
    assert comparer is None and scorer._client is None  # nothing loaded yet
