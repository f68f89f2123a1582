"""Configs: a shared ``TrainConfig`` plus one small dataclass per objective.

Values come from the dataclass defaults, then a YAML file (``--config``), then command-line flags
(``--field value``). An unknown key, a wrong type or an impossible value is a ``ConfigError`` that
names the field (and the file). Field names follow TRL where the meaning matches.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from daralign.errors import ConfigError

# reward-function keyword arguments whose values are secrets (redacted in config.yaml and trackers)
SECRET_KWARGS = ("api_key", "token", "access_token", "secret", "password")


@dataclass
class TrainConfig:
    """Everything an online run shares, whatever the algorithm."""

    algorithm: str = field(default="dar", metadata={"help": "objective to train with: dar | rloo | grpo | ppo | bon-sft | online-dpo | online-ipo | online-slic | dpo (docs/algorithms.md)"})
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
    use_vllm: bool = field(default=False, metadata={"help": "sample with vLLM instead of transformers generate (weights pushed after every step; docs/performance.md)"})
    vllm_mode: str = field(default="colocate", metadata={"help": "colocate: the engine in the training process (TRL's naming) | server: a `daralign vllm-serve` process at vllm_server_url"})
    vllm_server_url: str = field(default="http://127.0.0.1:8000", metadata={"help": "vllm_mode server: where `daralign vllm-serve` listens"})
    vllm_sync_dir: str | None = field(default=None, metadata={"help": "vllm_mode server: a folder the server can read, for the weights pushed after each step (default /dev/shm: one host; a shared filesystem across nodes)"})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={"help": "GPU memory share of a colocated vLLM engine (CPU: VLLM_CPU_KVCACHE_SPACE sets its KV cache, in GiB)"})
    vllm_enforce_eager: bool = field(default=True, metadata={"help": "no graph compilation (starts in seconds; compile mode took minutes on CPU)"})
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
    eval_temperature: float = field(default=0.7, metadata={"help": "sampling temperature for held-out answers"})
    eval_proxy_score: bool = field(default=True, metadata={"help": "with an eval_annotator, also score the held-out answers with the training annotator (the proxy): eval/proxy_score rising while eval/score falls is the annotator being hacked"})
    eval_win_rate: bool = field(default=False, metadata={"help": "also judge held-out answers against reference answers (the eval set's reference/output column, else the starting policy's) in both orders: eval/win_rate"})
    shuffle_rewards: bool = field(default=False, metadata={"help": "control run: permute rewards across the batch (learning vs drift)"})
    # --- output
    output_dir: str = field(default="runs/daralign", metadata={"help": "metrics, checkpoints and final model"})
    save_steps: int = field(default=0, metadata={"help": "checkpoint every N steps (0 = only at the end)"})
    save_total_limit: int = field(default=2, metadata={"help": "checkpoints kept"})
    logging_steps: int = field(default=1, metadata={"help": "print metrics every N steps"})
    report_to: list[str] = field(default_factory=list, metadata={"help": "also log to: tensorboard, wandb"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest checkpoint in output_dir (the config must be the same but for length, saving, logging and eval cadence)"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "replace an earlier daralign run in output_dir (kept in output_dir/.replaced until this run finishes); files daralign did not write are never touched"})
    report: bool = field(default=True, metadata={"help": "write report.md with plots at the end"})
    log_completions: bool = field(default=True, metadata={"help": "write every sampled completion and its reward to completions.jsonl"})

    def validate(self) -> None:
        positive = ["num_generations", "max_completion_length", "per_device_train_batch_size",
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
        for name in ("save_steps", "eval_steps", "warmup_steps", "annotation_budget", "max_micro_batch_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be ≥ 0 (got {getattr(self, name)})")
        if not self.dataset:
            raise ConfigError("dataset: no prompt dataset given (a .jsonl/.json file or a datasets name)")
        from daralign.objectives import get_objective

        if self.annotator is None and get_objective(self.algorithm).feedback_kind != "offline":
            raise ConfigError(f"annotator: no annotator given (a mapping or a path to its YAML); {self.algorithm} learns from one")
        if self.vllm_mode not in ("colocate", "server"):
            raise ConfigError(f"vllm_mode: {self.vllm_mode!r} is not one of colocate, server")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ConfigError(f"vllm_gpu_memory_utilization must be in (0, 1] (got {self.vllm_gpu_memory_utilization})")
        bad = set(self.report_to) - {"tensorboard", "wandb"}
        if bad:
            raise ConfigError(f"report_to: unknown {sorted(bad)} (choose tensorboard, wandb)")

    @property
    def prompts_per_step(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is a ``ConfigError`` (one clear line from the CLI, exit 1) instead
    of a usage dump and ``SystemExit(2)``."""

    def error(self, message: str):
        raise ConfigError(f"command line: {message}")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _parse_bool_or_auto(text: str) -> bool | str:
    return "auto" if text.lower() == "auto" else _parse_bool(text)


def _base_type(tp):
    """(scalar type, is_list) of a field annotation such as ``int | None`` or ``list[str]``."""
    if isinstance(tp, str):
        tp = eval(tp, vars(typing) | {"Any": Any})  # annotations are strings under `from __future__`
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _base_type(args[0])
    if origin is list:
        return args[0], True
    return tp, False


def _coerce(name: str, value: Any, tp, source: str) -> Any:
    """Check/convert a YAML value against the field's type; errors name the field and file."""
    base, is_list = _base_type(tp)
    if value is None or base is Any:
        return value
    if name == "bf16" and str(value).lower() == "auto":  # saved configs record what it resolved to
        from daralign.models import resolve_dtype

        return resolve_dtype("auto", "cuda" if _cuda_available() else "cpu") == "bfloat16"
    if is_list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {name} must be a list (got {value!r})")
        return [_coerce(name, v, base, source) for v in value]
    if base in (int, float) and isinstance(value, bool):  # YAML `true` is not a number
        raise ConfigError(f"{source}: {name} must be {base.__name__} (got {value!r})")
    try:
        if base is bool and not isinstance(value, bool):
            return _parse_bool(str(value))
        if base is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            return float(value)
        if base is int and (isinstance(value, int) and not isinstance(value, bool) or isinstance(value, str)):
            return int(value)
        if base is str and isinstance(value, (str, int, float)):
            return str(value)
    except (ValueError, argparse.ArgumentTypeError):
        pass
    if isinstance(value, base):
        return value
    raise ConfigError(f"{source}: {name} must be {getattr(base, '__name__', base)} (got {value!r})")


def _fields(*classes) -> dict[str, tuple[type, dataclasses.Field]]:
    out = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out[f.name] = (cls, hints[f.name], f)
    return out


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:  # one line: where, then what (PyYAML's own message spans lines)
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or " ".join(str(e).split())
        raise ConfigError(f"{path}: not valid YAML{where}: {what}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of field: value")
    return data


def parse_train_args(argv: list[str]) -> tuple[TrainConfig, Any]:
    """YAML (``--config``) then CLI overrides → (TrainConfig, the algorithm's config)."""
    from daralign.objectives import OBJECTIVES, get_objective

    pre = _ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    pre.add_argument("--algorithm")
    known, _ = pre.parse_known_args(argv)
    values = read_yaml(known.config) if known.config else {}
    source = known.config or "command line"
    algorithm = known.algorithm or values.get("algorithm", TrainConfig.algorithm)
    objective_cls = get_objective(algorithm)
    classes = [TrainConfig] + ([objective_cls.Config] if objective_cls.Config else [])
    fields = _fields(*classes)
    others = {f.name for cls in OBJECTIVES.values() if cls.Config for f in dataclasses.fields(cls.Config)} - set(fields)
    unknown = sorted(set(values) - set(fields) - others)
    if unknown:
        raise ConfigError(f"{source}: unknown config key(s) {unknown} for algorithm {algorithm!r}")
    ignored = sorted(set(values) & others)
    if ignored:
        from daralign.tracking import console

        console.print(f"note: {source}: {', '.join(ignored)} belong to other algorithms; ignored for {algorithm}")
    values = {k: _coerce(k, v, fields[k][1], source) for k, v in values.items() if k not in others}
    yaml_values = dict(values)

    # allow_abbrev=False: a misspelt prefix such as --learning_rat must be an error, as in YAML
    parser = _ArgumentParser(
        prog="daralign train", allow_abbrev=False,
        description=f"Online alignment from AI feedback. Options below are for --algorithm {algorithm}; "
                    f"algorithms: {', '.join(sorted(OBJECTIVES))} (`--algorithm NAME --help` shows its own). "
                    "Values: YAML (--config) first, then these flags.")
    parser.add_argument("--config", help="YAML file of field: value (flags override it)")
    parser.add_argument("--with_control", type=_parse_bool, nargs="?", const=True, metavar="BOOL",
                        help="`daralign train` only: after the run, repeat it with rewards shuffled across each batch "
                             "(a control that separates learning from drift) in output_dir/control, and report both "
                             "(default: False)")
    for name, (_, tp, f) in fields.items():
        base, is_list = _base_type(tp)
        kwargs: dict[str, Any] = {"help": _help(f), "default": argparse.SUPPRESS}
        if base is bool:
            kwargs.update(type=_parse_bool_or_auto if name == "bf16" else _parse_bool, nargs="?", const=True, metavar="BOOL")
        elif is_list:
            kwargs.update(type=str)  # comma-separated
        elif base in (int, float, str):
            kwargs.update(type=base)
        parser.add_argument(f"--{name}", **kwargs)
    cli = vars(parser.parse_args(_attach_negative_numbers(argv)))
    cli.pop("config", None)
    cli.pop("with_control", None)  # read by `daralign train` itself
    cli = {k: _coerce(k, v, fields[k][1], "command line") for k, v in cli.items()}
    values = _reconcile_parameterisations(objective_cls.Config, [(source, yaml_values), ("command line", cli)])

    train = TrainConfig(**{k: v for k, v in values.items() if fields[k][0] is TrainConfig})
    algo = objective_cls.Config(**{k: v for k, v in values.items() if fields[k][0] is objective_cls.Config}) if objective_cls.Config else None
    if isinstance(train.annotator, str):
        train.annotator = read_yaml(train.annotator)
    if isinstance(train.eval_annotator, str):
        train.eval_annotator = read_yaml(train.eval_annotator)
    train.validate()
    if algo is not None and hasattr(algo, "validate"):
        algo.validate()
    _fit_annotators(train, objective_cls.feedback_kind)
    return train, algo


def _fit_annotators(train: TrainConfig, kind: str) -> None:
    """Before any model loads: the annotator must give what the method learns from (a judge is
    switched to the mode the method needs, and that is said), and the evaluator must score."""
    from daralign.annotators import annotator_for

    if train.annotator is not None and kind != "offline":
        fitted = annotator_for(train.annotator, kind, train.algorithm,
                               needs_score=bool(train.eval_dataset) and train.eval_annotator is None)
        if fitted.get("type") == "judge" and fitted["mode"] != train.annotator.get("mode", "score"):
            from daralign.tracking import console

            console.print(f"note: {train.algorithm} learns from {'preferences' if kind == 'compare' else 'scores'}: "
                          f"the judge is used in mode {fitted['mode']!r}")
        train.annotator = fitted
    if train.eval_annotator is not None:
        train.eval_annotator = annotator_for(train.eval_annotator, "score", "eval_annotator", needs_score=True)


def _help(f: dataclasses.Field) -> str:
    """A field's help with its default (argparse's %(default)s cannot show it: defaults are suppressed
    so that only given flags override the YAML)."""
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
    text = f.metadata.get("help", "")
    return (text + f" (default: {default!r})").replace("%", "%%")


def _attach_negative_numbers(argv: list[str]) -> list[str]:
    """``--learning_rate -1e-3`` → ``--learning_rate=-1e-3``: argparse takes "-1e-3" for a flag."""
    out = []
    for tok in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and tok.startswith("-") and not tok.startswith("--"):
            try:
                float(tok)
            except ValueError:
                pass
            else:
                out[-1] = f"{out[-1]}={tok}"
                continue
        out.append(tok)
    return out


def _reconcile_parameterisations(cls, sources: list[tuple[str, dict]]) -> dict:
    """Merge config sources (earliest first). ``cls.PARAMETERISATIONS`` lists alternative spellings
    of the same numbers (DAR: α/β or total/ratio). One source giving two spellings that disagree
    is an error naming both; a later source giving one spelling drops the others from earlier
    sources (said in one line), so a sweep over dar_total/dar_ratio means what it says even when
    the base config sets dar_alpha/dar_beta."""
    groups = getattr(cls, "PARAMETERISATIONS", ())
    merged: dict = {}
    for name, values in sources:
        given = [g for g in groups if any(k in values for k in g)]
        if len(given) > 1:
            resolved = [cls(**{k: values[k] for k in g if k in values}) for g in given]
            keys = [k for g in groups for k in g]
            if any(abs(getattr(resolved[0], k) - getattr(r, k)) > 1e-9 * max(1.0, abs(getattr(r, k)))
                   for r in resolved[1:] for k in keys):
                shown = " and ".join("/".join(f"{k}={values[k]}" for k in g if k in values) for g in given)
                raise ConfigError(f"{name}: {shown} are two different settings of the same knobs; give one of them")
        for g in given:
            dropped = sorted(k for other in groups if other is not g for k in other if k in merged)
            if dropped and len(given) == 1:
                from daralign.tracking import console

                console.print(f"note: {name} sets {'/'.join(k for k in g if k in values)}, which replaces "
                              f"{'/'.join(dropped)} from an earlier source")
                for k in dropped:
                    merged.pop(k)
        merged.update(values)
    return merged


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
