"""Generation helpers of evaluation: answers to prompts (``generate_responses``, sampled by the
rollout room: rollout/generate.py) and their lengths in tokens."""

from __future__ import annotations

from typing import Sequence

from daralign.rollout.generate import generate_responses  # noqa: F401  (re-exported: evaluation's callers import it here)


def count_tokens(tokenizer, texts: Sequence[str]) -> list[int]:
    """Length of each text in tokens of ``tokenizer`` (the unit of ``eval/mean_length``)."""
    return [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
