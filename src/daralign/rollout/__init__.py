"""Rollout engines: K samples per prompt → ``Rollout`` (base.py holds the interface and registry).
hf.py (transformers ``generate``), vllm_colocate.py and vllm_server.py (vLLM; with vllm_worker.py,
vllm_transfer.py and vllm_gloo.py the only modules that import it, and only when an engine is
built), offline.py (fixed preference pairs, offline DPO).

The imports below register the built-in engines (``@register_engine`` in each file): a new engine
is its file plus one line here."""

from daralign.rollout import hf, offline, vllm_colocate, vllm_server  # noqa: F401  (register the built-ins)
from daralign.rollout.base import ENGINES, RolloutEngine, SamplingSettings, build_engine, register_engine
from daralign.rollout.hf import sample_rollout

__all__ = ["ENGINES", "RolloutEngine", "SamplingSettings", "build_engine", "register_engine", "sample_rollout"]
