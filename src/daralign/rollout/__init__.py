"""Rollout backends: produce a ``Rollout`` (K samples per prompt with behaviour log-probs)."""

from daralign.rollout.hf import generate_text, sample_rollout

__all__ = ["sample_rollout", "generate_text"]
