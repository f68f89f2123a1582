"""Evaluation: win rate against a reference (both orders, bootstrap CI, length buckets),
MT-bench with the FastChat single-answer judge, and the human–AI agreement study.

During training: ``evaluate_win_rate(policy_model, tokenizer, prompts, reference_answers,
annotator)`` → ``{"eval/win_rate", "eval/win_rate_ci_low", "eval/win_rate_ci_high",
"eval/mean_length", ...}``, with the annotator from ``build_annotators(cfg, need_score=False,
need_compare=True)[1]`` (a judge with its own order debiasing off: the function swaps orders). On the command line: ``daralign eval`` and ``daralign agreement``.
"""

from daralign.evaluation.annotators import build_annotators
from daralign.evaluation.agreement import agreement_summary, annotate_pairs, load_preference_pairs, split_hh_pair
from daralign.evaluation.generate import count_tokens, generate_responses
from daralign.evaluation.mtbench import (answer_mtbench, grade_mtbench, load_judge_prompts, load_mtbench_questions,
                                         mtbench_scores, parse_rating)
from daralign.evaluation.winrate import (bootstrap_ci, combine_orders, evaluate_win_rate, judge_both_orders,
                                         length_buckets, outcomes, win_rate_summary)

__all__ = [
    "agreement_summary", "annotate_pairs", "build_annotators", "answer_mtbench", "bootstrap_ci", "combine_orders", "count_tokens",
    "evaluate_win_rate", "generate_responses", "grade_mtbench", "judge_both_orders", "length_buckets",
    "load_judge_prompts", "load_mtbench_questions", "load_preference_pairs", "mtbench_scores", "outcomes",
    "parse_rating", "split_hh_pair", "win_rate_summary",
]
