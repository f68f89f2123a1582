"""Annotators for evaluation: one config, a scorer and a comparer that never swaps orders itself
(evaluation does the swap, so each order's verdict stays visible)."""

from __future__ import annotations


def build_annotators(cfg: dict, need_score: bool, need_compare: bool):
    """(scorer, comparer) from one annotator config: one annotator serves both roles (a judge
    compares through ``single_order()``: the same loaded model, its own debiasing off); None
    where it is not needed or cannot."""
    from daralign.annotators import build_annotator

    ann = build_annotator(cfg)
    scorer = ann if need_score and ann.can_score else None
    comparer = ann.single_order() if need_compare and ann.can_compare else None
    return scorer, comparer
