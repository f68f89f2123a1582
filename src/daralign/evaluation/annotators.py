"""Annotators for evaluation: one config, a scorer and a comparer that never swap orders
themselves (evaluation does the swap, so each order's verdict stays visible)."""

from __future__ import annotations


def build_annotators(cfg: dict, need_score: bool, need_compare: bool):
    """(scorer, comparer) from one annotator config.

    A ``type: judge`` config is built twice from one loaded model: ``mode: score`` and
    ``mode: compare`` with the judge's own order debiasing off — evaluation swaps orders itself,
    so that each order is visible (position bias) and the swap holds for any annotator. Other
    types serve both roles with the same object (None where they cannot).
    """
    from daralign.annotators import build_annotator

    if cfg.get("type") == "judge":
        from daralign.annotators.judge import JudgeAnnotator, JudgeConfig

        scorer = comparer = None
        if need_compare:
            comparer = build_annotator({**cfg, "mode": "compare", "debias": "none"})
        if need_score:
            score_cfg = {**cfg, "mode": "score"}
            scorer = build_annotator(score_cfg) if comparer is None else \
                JudgeAnnotator(JudgeConfig(**score_cfg), client=comparer.client)  # keys already validated
        return scorer, comparer
    from daralign.annotators.base import Annotator

    ann = build_annotator(cfg)
    can_compare = type(ann).compare is not Annotator.compare
    return (ann if need_score else None), (ann if need_compare and can_compare else None)
