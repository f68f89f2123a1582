"""Settings: ``TrainConfig``, everything an online run shares whatever the algorithm (each
objective adds its own small dataclass, and so does each rollout engine: ``engine_configs``).
Field names follow TRL where the meaning matches. Reading them from YAML and flags is
``core/parsing.py`` and ``train/args.py``; an impossible value is a ``ConfigError`` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from daralign.core.errors import ConfigError

# reward-function keyword arguments whose values are secrets (redacted in config.yaml and trackers)
SECRET_KWARGS = ("api_key", "token", "access_token", "secret", "password")


@dataclass
class TrainConfig:
    """Everything an online run shares, whatever the algorithm."""

    algorithm: str = field(default="dar", metadata={"help": "objective to train with: a registered objective (listed at the top of `daralign train --help`; docs/algorithms.md)"})
    # --- model
    model_name_or_path: str = field(default="bundled:smollm2-135m-instruct", metadata={"help": "policy: hub id, local folder, .gguf file or bundled:NAME"})
    ref_model_name_or_path: str | None = field(default=None, metadata={"help": "frozen reference; default: the policy's starting weights"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow model repos to run their own code (off by default)"})
    dtype: str = field(default="float32", metadata={"help": "weights dtype: float32 | bfloat16"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast for forward passes (fp32 master weights); auto: where the hardware computes in bf16 (CUDA with bf16, CPUs with AVX512-BF16/AMX; emulated bf16 is several times slower), resolved when the config is read"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for activation memory"})
    use_peft: bool = field(default=False, metadata={"help": "train a LoRA adapter instead of full weights"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    lora_target_modules: list[str] | None = field(default=None, metadata={"help": "module names to adapt; default: all linear layers"})
    merge_lora: bool = field(default=True, metadata={"help": "final/: merge the adapter into full weights (true) or save the adapter (false)"})
    # --- data
    dataset: str = field(default="", metadata={"help": "prompts: .jsonl/.json file, or a datasets name"})
    dataset_config: str | None = field(default=None, metadata={"help": "datasets config name"})
    dataset_split: str = field(default="train", metadata={"help": "datasets split"})
    prompt_column: str = field(default="prompt", metadata={"help": "column holding the prompt (str or chat messages)"})
    max_prompt_length: int = field(default=256, metadata={"help": "prompts longer than this (tokens) are truncated from the left"})
    # --- rollout
    num_generations: int = field(default=4, metadata={"help": "K: responses sampled per prompt by reward methods (OAIF methods use oaif_num_generations)"})
    max_completion_length: int = field(default=48, metadata={"help": "max new tokens per response"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling"})
    top_k: int = field(default=0, metadata={"help": "top-k sampling (0 = off)"})
    generation_batch_size: int = field(default=32, metadata={"help": "sequences per generate() call"})
    rollout_engine: str = field(default="auto", metadata={"help": "who samples: a registered engine's name (listed at the top of `daralign train --help`), or auto: the engine that takes the run (each engine's own rule: rollout/)"})
    # The rollout engines' own settings, one instance per engine ``Config`` (rollout/*.py), filled
    # when the config is read (train/args.py). Not a key itself: the configs' fields are, and
    # ``to_dict`` writes them flat, where this field sits (config.yaml re-runs).
    engine_configs: tuple = field(default=(), repr=False, metadata={"help": "the rollout engines' configs (their fields are the keys)", "flatten": True})
    # --- annotation
    annotator: Any = field(default=None, metadata={"help": "the annotator training learns from: a mapping or a path to its YAML (see docs/annotators.md); not used by offline dpo"})
    eval_annotator: Any = field(default=None, metadata={"help": "the yardstick: scores held-out answers and judges win rates (same forms as annotator); default: the training annotator, which the report then says plainly"})
    missing_eos_penalty: float | None = field(default=None, metadata={"help": "subtract from the reward of responses cut by the length limit"})
    # --- optimisation
    per_device_train_batch_size: int = field(default=8, metadata={"help": "prompts per micro-batch (each with its K responses)"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per online step"})
    share_prompt_forward: bool = field(default=True, metadata={"help": "in the update and every log-prob forward, run each prompt shared by K samples through the model once and its completions on its KV cache (same log-probs and gradients to float rounding; ~1.5-2x fewer tokens); false: every sequence in full"})
    max_micro_batch_tokens: int = field(default=0, metadata={"help": "size micro-batches by tokens instead: as many whole prompt groups (K padded sequences each) as fit in this many tokens, for the update and every log-prob forward; one group at least; 0 = per_device_train_batch_size prompts"})
    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "transformers scheduler: constant | constant_with_warmup | linear | cosine | cosine_with_restarts | polynomial | inverse_sqrt | ... (stepped once per online batch)"})
    warmup_steps: int = field(default=0, metadata={"help": "scheduler warm-up steps"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0 = off)"})
    num_updates_per_batch: int = field(default=1, metadata={"help": "optimizer epochs over one online batch"})
    disable_dropout: bool = field(default=True, metadata={"help": "dropout off in every forward, so the log-probs of the update are those of the policy that sampled (as TRL)"})
    max_steps: int = field(default=12, metadata={"help": "online iterations"})
    annotation_budget: int = field(default=0, metadata={"help": "annotator requests a run may spend (both orders = 2, retries and invalid answers count, cache hits are free); the last step is cut to fit (0 = no limit)"})
    seed: int = field(default=42, metadata={"help": "seed of data order, sampling and init"})
    # --- asynchrony (docs/algorithms.md, "Asynchronous training")
    async_steps: int = field(default=0, metadata={"help": "sample the next N steps' batches, and buy their labels on a background thread, while this step updates: a batch trains at most N updates after the policy that sampled it (0 = the synchronous loop, exactly). DAR's π_t term is the sampling policy's; RLOO, GRPO and PPO apply a truncated importance ratio"})
    importance_ratio_cap: float = field(default=2.0, metadata={"help": "with async_steps: the truncated importance ratio min(π_θ/π_sampler, cap) that RLOO (per sequence), GRPO and PPO (per token) weight stale samples by (truncated importance sampling, Yao et al. 2025, as in TRL's and verl's vLLM correction)"})
    # --- evaluation
    eval_dataset: str | None = field(default=None, metadata={"help": "held-out prompts: judged before/after and every eval_steps"})
    eval_steps: int = field(default=0, metadata={"help": "evaluate every N steps (0 = only before and after)"})
    eval_max_prompts: int = field(default=64, metadata={"help": "held-out prompts used"})
    eval_samples_per_prompt: int = field(default=2, metadata={"help": "held-out answers sampled per prompt (more answers: a smaller standard error of the held-out score)"})
    eval_seed: int | None = field(default=None, metadata={"help": "seed of the held-out sampling, independent of the training seed: runs of every seed then share their before-training answers and score (compare scores them once); default: seed + 7919"})
    eval_temperature: float = field(default=0.7, metadata={"help": "sampling temperature for held-out answers"})
    eval_proxy_score: bool = field(default=True, metadata={"help": "with an eval_annotator, also score the held-out answers with the training annotator (the proxy): eval/proxy_score rising while eval/score falls is the annotator being hacked"})
    eval_win_rate: bool = field(default=False, metadata={"help": "also judge held-out answers against reference answers (the eval set's reference/output column, else the starting policy's) in both orders: eval/win_rate"})
    shuffle_rewards: bool = field(default=False, metadata={"help": "control run (learning vs drift): rewards permuted across the batch; for preference methods (online and offline DPO/IPO/SLiC) every label replaced by a fair coin flip (ties stay ties)"})
    # --- output
    output_dir: str = field(default="runs/daralign", metadata={"help": "metrics, checkpoints and final model"})
    save_strategy: str = field(default="steps", metadata={"help": "'steps': a checkpoint every save_steps and one at the end (what --resume continues from); 'no': no checkpoints, final/ only (TRL's save_strategy='no'; saves writing the optimizer state, ~1.6 GB and ~4 s for a 135M model on a CPU, but the run cannot be resumed)"})
    save_steps: int = field(default=0, metadata={"help": "checkpoint every N steps (0 = only at the end)"})
    save_total_limit: int = field(default=2, metadata={"help": "checkpoints kept"})
    logging_steps: int = field(default=1, metadata={"help": "print metrics every N steps"})
    report_to: list[str] = field(default_factory=list, metadata={"help": "also log to: tensorboard, wandb"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest checkpoint in output_dir (the config must be the same but for length, saving, logging and eval cadence)"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "replace an earlier daralign run in output_dir (kept in output_dir/.replaced until this run finishes); files daralign did not write are never touched"})
    report: bool = field(default=True, metadata={"help": "write report.md with plots at the end"})
    log_completions: bool = field(default=True, metadata={"help": "write every sampled completion and its reward to completions.jsonl"})

    def validate(self) -> None:
        positive = ["num_generations", "max_completion_length", "per_device_train_batch_size", "eval_samples_per_prompt",
                    "gradient_accumulation_steps", "max_steps", "generation_batch_size", "num_updates_per_batch"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be ≥ 1 (got {getattr(self, name)})")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1] (got {self.top_p})")
        for part in (self, *self.engine_configs):
            for f in dataclasses.fields(part):
                value = getattr(part, f.name)
                if isinstance(value, float) and not math.isfinite(value):
                    raise ConfigError(f"{f.name} must be a finite number (got {value})")
        if self.learning_rate < 0:
            raise ConfigError(f"learning_rate must be ≥ 0 (got {self.learning_rate})")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be ≥ 0 (got {self.weight_decay})")
        if not self.importance_ratio_cap > 0:
            raise ConfigError(f"importance_ratio_cap must be > 0 (got {self.importance_ratio_cap})")
        if self.max_grad_norm < 0:
            raise ConfigError(f"max_grad_norm must be ≥ 0 (got {self.max_grad_norm})")
        from transformers import SchedulerType

        schedulers = [t.value for t in SchedulerType]
        if self.lr_scheduler_type not in schedulers:
            raise ConfigError(f"lr_scheduler_type: {self.lr_scheduler_type!r} is not one of {schedulers}")
        if self.save_strategy not in ("steps", "no"):
            raise ConfigError(f"save_strategy: {self.save_strategy!r} is not one of steps, no")
        for name in ("save_steps", "eval_steps", "warmup_steps", "annotation_budget", "max_micro_batch_tokens", "async_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be ≥ 0 (got {getattr(self, name)})")
        if not self.dataset:
            raise ConfigError("dataset: no prompt dataset given (a .jsonl/.json file or a datasets name)")
        for engine_config in self.engine_configs:  # an engine's own checks (its Config's ``validate``), whichever samples
            if hasattr(engine_config, "validate"):
                engine_config.validate(self)
        bad = set(self.report_to) - {"tensorboard", "wandb"}
        if bad:
            raise ConfigError(f"report_to: unknown {sorted(bad)} (choose tensorboard, wandb)")

    def __getattr__(self, name: str) -> Any:
        """An engine's field read as any other (``train.<its field>``), from the engine config holding it."""
        for part in self.__dict__.get("engine_configs", ()):
            if name in {f.name for f in dataclasses.fields(part)}:
                return getattr(part, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def heldout_seed(self) -> int:
        """The held-out sampling seed: ``eval_seed``, else derived from the training seed."""
        return self.eval_seed if self.eval_seed is not None else self.seed + 7919

    @property
    def prompts_per_step(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps


def redact(obj: Any) -> Any:
    """A copy of a config with the values of *declared* secret fields replaced: a reward function's
    ``kwargs`` named in ``SECRET_KWARGS``. (Keys are secrets by declaration, not by guessing from
    their names: ``max_new_tokens`` and ``tokenizer`` stay as they are. API keys never enter a
    config at all: ``api_key_env`` names the environment variable.)"""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if k == "kwargs" and isinstance(v, dict):
                out[k] = {name: "***" if name in SECRET_KWARGS else redact(x) for name, x in v.items()}
            else:
                out[k] = redact(v)
        return out
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def to_dict(*configs) -> dict:
    """The configs as one flat mapping of key → value (what config.yaml holds, secrets redacted);
    a field marked ``flatten`` (the engines' configs) contributes its configs' fields in its place."""
    out = {}
    for c in configs:
        if c is None:
            continue
        values = dataclasses.asdict(c)
        for f in dataclasses.fields(c):
            if f.metadata.get("flatten"):
                for part in getattr(c, f.name):
                    out.update(dataclasses.asdict(part))
            else:
                out[f.name] = values[f.name]
    return redact(out)
