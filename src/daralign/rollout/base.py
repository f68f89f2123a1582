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

``samples_in_background`` declares an engine that samples in another process and needs nothing
of the trainer's model meanwhile (a server): under ``async_steps`` its sampling runs on a
background thread while the trainer updates, and its own log-probs are π_t (the trainer's
weights have moved on by the time the batch is back; ``behaviour_from_engine``).

A new engine is one file here with ``@register_engine("name")`` on a class built by
``from_config(config, settings, tokenizer, device)`` — ``config`` an instance of its own ``Config``
dataclass (None without one; its fields are YAML keys and flags of ``daralign train``) — and one
import line in ``rollout/__init__.py``. ``rollout_engine: name`` selects it; under ``auto`` the
engines whose ``auto_selects`` says yes compete by ``auto_priority`` (``docs/architecture.md``).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, fields
from types import SimpleNamespace
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
    lora_rank: int = 0  # the policy trains a LoRA adapter of this rank (0: full weights)
    is_main: bool = True  # the main process (server engines push weights from it alone)
    autocast: Callable[[], ContextManager] = nullcontext  # the trainer's mixed-precision context
    wait_for_everyone: Callable[[], None] = lambda: None  # a barrier across processes


class RolloutEngine:
    """Base class; see the module docstring."""

    name: ClassVar[str] = "engine"  # set by ``@register_engine``
    Config: ClassVar[type | None] = None  # the engine's own dataclass config (fields join the CLI and YAML)
    gives_behaviour_logps: ClassVar[bool] = True
    samples_in_background: ClassVar[bool] = False  # async_steps: sample during the update (module docstring)
    auto_priority: ClassVar[int] = 0  # under ``rollout_engine: auto``, the highest that selects itself wins

    @classmethod
    def auto_selects(cls, train, config, feedback_kind: str) -> bool:
        """Whether ``rollout_engine: auto`` may pick this engine for the run (``config``: its own
        ``Config`` as read, ``feedback_kind``: the objective's). No by default: named engines only."""
        return False

    @classmethod
    def check(cls, config, settings: SamplingSettings, num_processes: int, device: torch.device) -> None:
        """Refuse, with one ConfigError line, a setup this engine cannot run (before any model loads):
        ``config`` its own Config, ``settings`` how the run samples."""

    @classmethod
    def from_config(cls, config, settings: SamplingSettings, tokenizer, device) -> "RolloutEngine":
        raise NotImplementedError

    def sample(self, model: torch.nn.Module, rows: list[dict[str, Any]], step: int) -> Rollout:
        raise NotImplementedError

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from ``model``'s current weights (in-process engines already do)."""

    def close(self) -> None:
        """Release the engine. Safe to call twice."""


ENGINES: dict[str, type[RolloutEngine]] = {}
register_engine = registrar(ENGINES)  # ``@register_engine("hf")``: ``rollout_engine: hf`` builds it


def engine_config_classes() -> list[type]:
    """Every registered engine's ``Config``, each once (engines may share one), in registration
    order: their fields are ``daralign train``'s keys whichever engine samples."""
    return list(dict.fromkeys(cls.Config for cls in ENGINES.values() if cls.Config is not None))


def engine_config(train, engine: type[RolloutEngine]):
    """``engine``'s config as the run's settings hold it (``TrainConfig.engine_configs``, filled when
    the config is read; its defaults for a ``TrainConfig`` built directly); None without a Config."""
    if engine.Config is None:
        return None
    held = [c for c in train.engine_configs if type(c) is engine.Config]
    return held[0] if held else engine.Config()


def settings_of_other_engines(engine: type[RolloutEngine]) -> set[str]:
    """The keys of every engine config but ``engine``'s own: a change to them (a default moved by a
    later daralign, say) alters nothing a run sampled by ``engine`` does (--resume, compare's reuse)."""
    return {f.name for c in engine_config_classes() if c is not engine.Config for f in fields(c)}


def engine_of(values: dict, feedback_kind: str) -> type[RolloutEngine] | None:
    """The engine a run's saved flat config (config.yaml's keys) was sampled by, by ``engine_class``'s
    rule; None when it names an engine not registered here."""
    name = values.get("rollout_engine", "auto")
    if name != "auto":
        return ENGINES.get(name)
    for cls in auto_order():
        config = None
        if cls.Config is not None:
            known = {f.name for f in fields(cls.Config)}
            config = cls.Config(**{k: v for k, v in values.items() if k in known})
        if cls.auto_selects(SimpleNamespace(**values), config, feedback_kind):
            return cls
    return None


def auto_order() -> list[type[RolloutEngine]]:
    """The registered engines in the order ``auto`` asks them (ties: registration order)."""
    return sorted(ENGINES.values(), key=lambda c: -c.auto_priority)


def describe_engines() -> str:
    """The registered engines for help text, in ``auto``'s order, each with when ``auto`` takes it
    (its ``auto_selects`` docstring)."""
    def rule(cls) -> str:
        own = cls.auto_selects.__func__ is not RolloutEngine.auto_selects.__func__
        return (cls.auto_selects.__doc__ or "").strip() if own else "only when named"

    return "; ".join(f"{cls.name} ({rule(cls)})" for cls in auto_order())


def engine_class(train, feedback_kind: str) -> type[RolloutEngine]:
    """Which engine a run uses: ``rollout_engine`` when named; under ``auto`` the engine of highest
    ``auto_priority`` whose ``auto_selects`` takes the run."""
    if train.rollout_engine != "auto":
        if train.rollout_engine not in ENGINES:
            raise ConfigError(f"rollout engine {train.rollout_engine!r} is not registered (known: {sorted(ENGINES)})")
        return ENGINES[train.rollout_engine]
    for cls in auto_order():
        if cls.auto_selects(train, engine_config(train, cls), feedback_kind):
            return cls
    raise ConfigError(f"rollout_engine auto: none of the registered engines {sorted(ENGINES)} takes this run; "
                      "name one with rollout_engine")


def check_engine(train, feedback_kind: str, settings: SamplingSettings, num_processes: int, device) -> None:
    """The run's engine refuses a setup it cannot run, before any model loads."""
    cls = engine_class(train, feedback_kind)
    cls.check(engine_config(train, cls), settings, num_processes, device)


def build_engine(train, feedback_kind: str, settings: SamplingSettings, tokenizer, device) -> RolloutEngine:
    cls = engine_class(train, feedback_kind)
    return cls.from_config(engine_config(train, cls), settings, tokenizer, device)


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


def behaviour_from_engine(rollout: Rollout) -> Rollout:
    """π_t from the engine's own per-token log-probs, laid out as the trainer's (one per position
    after the first, zero off the completion): for a batch sampled while the trainer updated, no
    forward on the sampling weights is possible any more. The engine's log-probs are then π_t, not a
    check on it (``rollout/logp_abs_diff`` is not logged for such a batch)."""
    engine = rollout.engine_token_logps
    Lp = rollout.input_ids.shape[1] - engine.shape[1]
    behaviour = torch.zeros(rollout.input_ids.shape[0], rollout.input_ids.shape[1] - 1, dtype=torch.float32,
                            device=engine.device)
    behaviour[:, Lp - 1:] = engine.float()
    rollout.behaviour_token_logps = behaviour * rollout.completion_mask[:, 1:]
    rollout.engine_token_logps = None
    return rollout
