"""Settings: ``TrainConfig``, everything an online run shares whatever the algorithm (each
objective adds its own small dataclass), and its groups (``TrainConfig.vllm``). Field names follow
TRL where the meaning matches. Reading them from YAML and flags is ``core/parsing.py`` and
``train/args.py``; an impossible value is a ``ConfigError`` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from daralign.core.errors import ConfigError

# reward-function keyword arguments whose values are secrets (redacted in config.yaml and trackers)
SECRET_KWARGS = ("api_key", "token", "access_token", "secret", "password")


@dataclass(frozen=True)
class VLLMSettings:
    """The vLLM engines' settings, grouped (in YAML and flags they are the ``vllm_*`` keys)."""

    mode: str  # colocate | server
    server_url: str
    sync_dir: str | None
    gpu_memory_utilization: float
    enforce_eager: bool | None  # None: eager on CPU, CUDA graphs on CUDA
    dtype: str = "auto"  # the engine's weights: auto = bfloat16 on CUDA, else the policy's dtype
    tensor_parallel_size: int = 1
    max_num_batched_tokens: int | None = None
    enable_sleep_mode: bool = False
    weight_transfer: str = "auto"  # server mode: auto | nccl | gloo | file (rollout/vllm_transfer.py)
    lora_rank: int = 0  # vllm_lora_sync adapter: the policy's LoRA rank (0: merged pushes, no adapters in the engine)


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
    rollout_engine: str = field(default="auto", metadata={"help": "who samples: auto (hf, or vllm-colocate / vllm-server with use_vllm, offline for dpo) or a registered engine's name (rollout/base.py)"})
    use_vllm: bool = field(default=False, metadata={"help": "sample with vLLM instead of transformers generate (weights pushed after every step; docs/performance.md)"})
    vllm_mode: str = field(default="colocate", metadata={"help": "colocate: the engine in the training process (TRL's naming) | server: a `daralign vllm-serve` process at vllm_server_url"})
    vllm_server_url: str = field(default="http://127.0.0.1:8000", metadata={"help": "vllm_mode server: where `daralign vllm-serve` listens"})
    vllm_sync_dir: str | None = field(default=None, metadata={"help": "vllm_mode server: a folder the server can read, for the weights pushed after each step (default /dev/shm: one host; a shared filesystem across nodes)"})
    vllm_weight_transfer: str = field(default="auto", metadata={"help": "vllm_mode server: how pushed weights reach the server: nccl (vLLM's NCCL transfer, GPU to GPU, no file) | gloo (the same without CUDA) | file (safetensors through vllm_sync_dir) | auto (what the server was started with: `daralign vllm-serve --weight_transfer`, else file)"})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={"help": "GPU memory share of a colocated vLLM engine (CPU: VLLM_CPU_KVCACHE_SPACE sets its KV cache, in GiB)"})
    vllm_enforce_eager: bool | None = field(default=None, metadata={"help": "no graph capture or compilation; default: eager on CPU (compiling took minutes there), CUDA graphs on CUDA"})
    vllm_dtype: str = field(default="auto", metadata={"help": "the colocated engine's weight dtype: auto = bfloat16 on CUDA, else the policy's dtype (pushed weights are cast to it)"})
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "colocate on CUDA: GPUs per engine; with N training processes, N / this engines, each rank in a group sampling the group's prompts (TRL's vllm_tensor_parallel_size)"})
    vllm_max_num_batched_tokens: int | None = field(default=None, metadata={"help": "the colocated engine's cap on tokens per scheduler step, vLLM's own when unset; a lower cap lowers its activation memory"})
    vllm_enable_sleep_mode: bool = field(default=False, metadata={"help": "colocate on CUDA: the engine frees its KV cache and weights through the update and wakes to the freshly pushed weights (never reloaded from disk)"})
    vllm_lora_sync: str = field(default="merged", metadata={"help": "use_peft, colocate: merged = the adapter merged into the base weights for each push (in place, no copy) | adapter = only the adapter's files pushed, the engine applies it as a vLLM LoRA (no merge; vLLM decodes adapters ~1.3x slower)"})
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
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number (got {value})")
        if self.learning_rate < 0:
            raise ConfigError(f"learning_rate must be ≥ 0 (got {self.learning_rate})")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be ≥ 0 (got {self.weight_decay})")
        if self.max_grad_norm < 0:
            raise ConfigError(f"max_grad_norm must be ≥ 0 (got {self.max_grad_norm})")
        from transformers import SchedulerType

        schedulers = [t.value for t in SchedulerType]
        if self.lr_scheduler_type not in schedulers:
            raise ConfigError(f"lr_scheduler_type: {self.lr_scheduler_type!r} is not one of {schedulers}")
        if self.save_strategy not in ("steps", "no"):
            raise ConfigError(f"save_strategy: {self.save_strategy!r} is not one of steps, no")
        for name in ("save_steps", "eval_steps", "warmup_steps", "annotation_budget", "max_micro_batch_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be ≥ 0 (got {getattr(self, name)})")
        if not self.dataset:
            raise ConfigError("dataset: no prompt dataset given (a .jsonl/.json file or a datasets name)")
        if self.vllm_mode not in ("colocate", "server"):
            raise ConfigError(f"vllm_mode: {self.vllm_mode!r} is not one of colocate, server")
        if self.vllm_weight_transfer not in ("auto", "nccl", "gloo", "file"):
            raise ConfigError(f"vllm_weight_transfer: {self.vllm_weight_transfer!r} is not one of auto, nccl, gloo, file")
        if self.vllm_lora_sync not in ("merged", "adapter"):
            raise ConfigError(f"vllm_lora_sync: {self.vllm_lora_sync!r} is not one of merged, adapter")
        if self.use_vllm and self.vllm_lora_sync == "adapter" and (not self.use_peft or self.vllm_mode != "colocate"
                                                                    or self.vllm_enable_sleep_mode or self.vllm_tensor_parallel_size > 1):
            raise ConfigError("vllm_lora_sync adapter: for a LoRA policy (use_peft) in vllm_mode colocate, without sleep mode "
                              "(level-2 sleep drops the base weights the adapter rides on) or tensor parallelism; use merged")
        if self.vllm_tensor_parallel_size < 1 or (self.vllm_max_num_batched_tokens or 1) < 1:
            raise ConfigError("vllm_tensor_parallel_size and vllm_max_num_batched_tokens must be ≥ 1")
        if self.vllm_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"vllm_dtype: {self.vllm_dtype!r} is not one of auto, float32, bfloat16, float16")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ConfigError(f"vllm_gpu_memory_utilization must be in (0, 1] (got {self.vllm_gpu_memory_utilization})")
        bad = set(self.report_to) - {"tensorboard", "wandb"}
        if bad:
            raise ConfigError(f"report_to: unknown {sorted(bad)} (choose tensorboard, wandb)")

    @property
    def vllm(self) -> "VLLMSettings":
        """The vLLM engine's own settings group (read by ``rollout/vllm_*.py`` only)."""
        return VLLMSettings(mode=self.vllm_mode, server_url=self.vllm_server_url, sync_dir=self.vllm_sync_dir,
                            gpu_memory_utilization=self.vllm_gpu_memory_utilization, enforce_eager=self.vllm_enforce_eager,
                            dtype=self.vllm_dtype, tensor_parallel_size=self.vllm_tensor_parallel_size,
                            max_num_batched_tokens=self.vllm_max_num_batched_tokens, enable_sleep_mode=self.vllm_enable_sleep_mode,
                            weight_transfer=self.vllm_weight_transfer,
                            lora_rank=self.lora_r if self.use_peft and self.vllm_lora_sync == "adapter" else 0)

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
    out = {}
    for c in configs:
        if c is not None:
            out.update(dataclasses.asdict(c))
    return redact(out)
