"""The rollout-engine interface: one protocol every sampler implements, so the loop has no branch
per engine.

    engine.sample(model, rows, step)  -> Rollout   K completions per prompt, per-prompt seeds
    engine.sync_weights(model)                     after each optimizer step (no-op in-process)
    engine.close()

``gives_behaviour_logps`` declares who provides π_t, the sampling policy's log-probs the
objectives need: the engine itself (HF ``generate`` records them while sampling), or the trainer
(vLLM samples a copy of the policy: the rollout comes back with ``behaviour_token_logps = None``
and the engine's own log-probs in ``engine_token_logps``, which the loop checks against the
trainer's; ``rollout/logp_abs_diff``).

A new engine is one file here with ``@register_engine("name")`` on a class built by
``from_config(settings, tokenizer, device)``; ``build_engine`` picks it from the config
(``docs/architecture.md``).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, ContextManager

import torch

from daralign.core.errors import ConfigError
from daralign.core.registry import registrar
from daralign.core.types import Rollout


@dataclass
class SamplingSettings:
    """What every engine needs to sample the way the run asks (from ``TrainConfig``)."""

    model_name_or_path: str
    num_generations: int
    max_completion_length: int
    max_prompt_length: int
    temperature: float
    top_p: float
    top_k: int
    generation_batch_size: int
    seed: int
    dtype: str
    is_main: bool = True  # the main process (server engines push weights from it alone)
    autocast: Callable[[], ContextManager] = nullcontext  # the trainer's mixed-precision context
    wait_for_everyone: Callable[[], None] = lambda: None  # a barrier across processes


class RolloutEngine:
    """Base class; see the module docstring."""

    name: ClassVar[str] = "engine"
    gives_behaviour_logps: ClassVar[bool] = True

    @classmethod
    def check(cls, train, num_processes: int, device: torch.device) -> None:
        """Refuse, with one ConfigError line, a setup this engine cannot run (before any model loads)."""

    def sample(self, model: torch.nn.Module, rows: list[dict[str, Any]], step: int) -> Rollout:
        raise NotImplementedError

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from ``model``'s current weights (in-process engines already do)."""

    def close(self) -> None:
        """Release the engine. Safe to call twice."""


ENGINES: dict[str, type[RolloutEngine]] = {}
register_engine = registrar(ENGINES)  # ``@register_engine("hf")``: ``rollout_engine: hf`` builds it


def engine_name(train, feedback_kind: str) -> str:
    """Which engine a run uses: ``rollout_engine`` when named; else offline pairs for offline DPO,
    vLLM when asked, HF ``generate`` otherwise."""
    if train.rollout_engine != "auto":
        return train.rollout_engine
    if feedback_kind == "offline":
        return "offline"
    if train.use_vllm:
        return f"vllm-{train.vllm.mode}"
    return "hf"


def engine_class(train, feedback_kind: str) -> type[RolloutEngine]:
    from daralign.rollout import hf, offline  # noqa: F401  (register; the vLLM engines import vllm only when used)

    name = engine_name(train, feedback_kind)
    if name.startswith("vllm-"):
        from daralign.rollout import vllm_colocate, vllm_server  # noqa: F401
    if name not in ENGINES:
        raise ConfigError(f"rollout engine {name!r} is not registered (known: {sorted(ENGINES)})")
    return ENGINES[name]


def build_engine(train, feedback_kind: str, settings: SamplingSettings, tokenizer, device) -> RolloutEngine:
    return engine_class(train, feedback_kind).from_config(train, settings, tokenizer, device)


def behaviour_check(rollout: Rollout) -> dict[str, float]:
    """How far the engine's own per-token log-probs are from the trainer's π_t (engines that give
    none: nothing to check)."""
    if rollout.engine_token_logps is None or rollout.behaviour_token_logps is None:
        return {}
    engine = rollout.engine_token_logps
    Lp = rollout.input_ids.shape[1] - engine.shape[1]
    mask = rollout.completion_mask[:, Lp:].bool()
    trainer = rollout.behaviour_token_logps[:, Lp - 1:]
    diff = (trainer - engine).abs()[mask]
    return {"rollout/logp_abs_diff": diff.mean().item() if diff.numel() else 0.0,
            "rollout/logp_abs_diff_max": diff.max().item() if diff.numel() else 0.0}
