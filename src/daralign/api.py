"""The Python API, TRL-shaped: ``daralign.Trainer(model=..., reward_funcs=[...], args=daralign.TrainConfig(...),
train_dataset=...).train()`` runs the same trainer as ``daralign train`` (docs/python-api.md).

Everything is turned into what the CLI would have built — values checked by the CLI's own code,
callables registered as ``function`` annotators, rows in memory written into the run folder — so
the ``config.yaml`` a Python run saves re-runs from the command line (but for callables defined in
``__main__`` or inside a function, which the CLI cannot import: said once, in one line).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Iterable

from daralign.core.errors import ConfigError, DataError
from daralign.core.tracking import console

REWARD_ARGS = "reward_funcs"


class TrainConfig:
    """Every ``daralign train`` field — ``TrainConfig``'s, each rollout engine's own and the
    algorithm's own (``dar_total``, ``kl_coef``, ...) — as keyword arguments:
    ``TrainConfig(algorithm="dar", learning_rate=5e-5, output_dir="runs/x")``. Checked by the CLI's
    code when the ``Trainer`` is built; attributes read back what was given (or the default)."""

    def __init__(self, **values: Any) -> None:
        self.values = values

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        from daralign.core.config import TrainConfig as Settings
        from daralign.rollout.base import engine_config_classes

        # TrainConfig's fields and every rollout engine's: what ``daralign train`` takes
        defaults = {f.name: f.default for cls in (Settings, *engine_config_classes()) for f in dataclasses.fields(cls)
                    if f.default is not dataclasses.MISSING and not f.metadata.get("flatten")}
        if name in defaults:
            return defaults[name]
        raise AttributeError(name)

    def __repr__(self) -> str:
        return f"TrainConfig({', '.join(f'{k}={v!r}' for k, v in self.values.items())})"


@dataclasses.dataclass
class TrainerState:
    """What a run has done so far: ``global_step`` and every step's metrics (``log_history``)."""

    global_step: int = 0
    max_steps: int = 0
    log_history: list[dict] = dataclasses.field(default_factory=list)

    @property
    def metrics(self) -> dict:
        return self.log_history[-1] if self.log_history else {}


class Trainer:
    """``daralign.Trainer(model, reward_funcs, args, train_dataset, eval_dataset=None,
    processing_class=None, callbacks=None, peft_config=None, reward_weights=None).train()``.

    - ``model``: a Hub id / folder / ``bundled:NAME``, or a loaded ``PreTrainedModel`` (then its
      tokenizer as ``processing_class``).
    - ``reward_funcs``: one or a list of: a callable in TRL's shape (``prompts``, ``completions``,
      ``completion_ids``, dataset columns as keyword arguments; may return ``None`` per completion
      for "not applicable"; ``async def`` ones are awaited with a timeout, ``reward_timeout_s``), an
      annotator config (a dict or a YAML path: a judge, a reward model...). Several are summed with
      ``reward_weights`` (TRL's rule: a ``None`` leaves that function out of the sum). Not needed
      when ``args`` has an ``annotator``.
    - ``train_dataset`` / ``eval_dataset``: a ``datasets.Dataset``, a list of dicts or a path.
    - ``callbacks``: transformers ``TrainerCallback``s; ``on_log`` gets each step's metrics, and
      ``control.should_training_stop`` stops the run after that step.
    """

    def __init__(self, model: Any, reward_funcs: Any = None, args: TrainConfig | None = None, train_dataset: Any = None,
                 eval_dataset: Any = None, processing_class: Any = None, callbacks: Iterable | None = None,
                 peft_config: Any = None, reward_weights: list[float] | None = None, reward_timeout_s: float = 60.0) -> None:
        from daralign.train.args import train_configs_from_values

        values = dict((args or TrainConfig()).values)
        self._loaded_model = None if isinstance(model, (str, Path)) else model
        if self._loaded_model is not None:
            if processing_class is None:
                raise ConfigError("model: a loaded model needs its tokenizer as processing_class=")
            values["model_name_or_path"] = str(getattr(model, "name_or_path", "") or type(model).__name__)
        else:
            values["model_name_or_path"] = str(model)
        out = Path(values.get("output_dir", "runs/daralign"))
        self._rows = self._eval_rows = None
        if train_dataset is None and "dataset" not in values:
            raise ConfigError("train_dataset: no prompts given (a datasets.Dataset, a list of dicts or a path)")
        if train_dataset is not None:
            self._rows, values["dataset"] = _in_memory(train_dataset, "train_dataset", out)
        if eval_dataset is not None:
            self._eval_rows, values["eval_dataset"] = _in_memory(eval_dataset, "eval_dataset", out)
        if reward_funcs is not None:
            values["annotator"] = reward_annotator(reward_funcs, reward_weights, reward_timeout_s)
        if peft_config is not None:
            values["use_peft"] = True
        self.train_config, self.algo_config = train_configs_from_values(values, "TrainConfig")
        self.processing_class, self.peft_config = processing_class, peft_config
        self.callbacks = list(callbacks or [])
        self.state = TrainerState(max_steps=self.train_config.max_steps)
        self.result: dict | None = None

    @property
    def args(self):
        """The resolved settings (``daralign.core.config.TrainConfig``) this run trains with."""
        return self.train_config

    def train(self) -> dict:
        from daralign.train.command import run

        self.result = run(self.train_config, self.algo_config, model=self._loaded_model, tokenizer=self.processing_class,
                          rows=self._rows, eval_rows=self._eval_rows, peft_config=self.peft_config,
                          on_step=self._on_step if self.callbacks else self._record)
        return self.result

    def _record(self, step: int, metrics: dict) -> bool:
        self.state.global_step = step
        self.state.log_history.append({"step": step, **metrics})
        return False

    def _on_step(self, step: int, metrics: dict) -> bool:
        from transformers import TrainerControl

        self._record(step, metrics)
        control = TrainerControl()
        for cb in self.callbacks:
            cb.on_log(self.train_config, self.state, control, logs=dict(metrics))
            cb.on_step_end(self.train_config, self.state, control)
        return bool(control.should_training_stop)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token_env: str = "HF_TOKEN") -> str | None:
        """Upload ``final/`` (weights, tokenizer, model card) to the Hub as ``repo_id``; the token is
        read from the environment variable ``token_env``. Where the Hub cannot be reached, one line
        says so and nothing is raised (the run's files are untouched)."""
        import os

        from huggingface_hub import HfApi

        final = Path(self.train_config.output_dir) / "final"
        if not (final / "README.md").is_file():
            raise ConfigError(f"push_to_hub: {final} holds no finished model; call train() first")
        api = HfApi(token=os.environ.get(token_env) or None)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(folder_path=str(final), repo_id=repo_id, commit_message="daralign: trained model")
        except Exception as e:  # no network, no token, no rights: say which, in one line
            console.print(f"[yellow]push_to_hub: could not upload {final} to {repo_id} "
                          f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); the files stay where they are[/yellow]")
            return None
        return str(getattr(info, "commit_url", info))

    def save_model(self, output_dir: str | None = None) -> Path:
        """Where ``final/`` is (written when ``train`` ends); a different ``output_dir`` gets a copy."""
        import shutil

        final = Path(self.train_config.output_dir) / "final"
        if output_dir is None:
            return final
        shutil.copytree(final, output_dir, dirs_exist_ok=True)
        return Path(output_dir)


def _in_memory(dataset: Any, argument: str, out: Path) -> tuple[list[dict] | None, str]:
    """(rows to hand to the loop, the path the config records). A path passes through; rows in
    memory go into the run folder (the loop writes them) so config.yaml re-runs."""
    from daralign.core.data import rows_in_memory

    if isinstance(dataset, (str, Path)):
        return None, str(dataset)
    rows = rows_in_memory(dataset, argument)
    columns = sorted({k for r in rows for k in r})
    if "prompt" not in columns and not (argument == "train_dataset" and {"chosen", "rejected"} <= set(columns)):
        raise DataError(f"{argument}: no 'prompt' column (columns: {', '.join(columns)})")
    return rows, str(out / f"{argument}.jsonl")


def reward_annotator(reward_funcs: Any, weights: list[float] | None, timeout_s: float) -> dict:
    """One annotator config from TRL-style ``reward_funcs``: a callable, an annotator config (a
    dict, a YAML path, or an annotator built with ``daralign.annotators.build_annotator``'s config),
    or a list of these summed with ``weights``."""
    from daralign.annotators.functions import python_callable_spec
    from daralign.core.parsing import read_yaml

    funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    if not funcs:
        raise ConfigError("reward_funcs: an empty list")
    if weights is not None and len(weights) != len(funcs):
        raise ConfigError(f"reward_weights: {len(weights)} weights for {len(funcs)} reward functions")
    sources = []
    for i, f in enumerate(funcs):
        if isinstance(f, dict):
            sources.append(dict(f))
        elif isinstance(f, (str, Path)) and str(f).endswith((".yaml", ".yml")):
            sources.append(read_yaml(f))
        elif callable(f):
            spec = python_callable_spec(f)
            if spec.startswith("python:"):
                console.print(f"note: reward_funcs[{i}] {spec[7:]!r} is not importable by name: config.yaml names it "
                              f"{spec!r}, which only this Python process can run")
            sources.append({"type": "function", "function": spec, "timeout_s": float(timeout_s)})
        else:
            raise ConfigError(f"reward_funcs[{i}]: expected a callable, an annotator config (dict) or a YAML path, "
                              f"got {type(f).__name__}")
    if len(sources) == 1 and weights is None:
        return sources[0]
    weights = weights or [1.0] * len(sources)
    return {"type": "combined", "none_is": "not_applicable",
            "sources": [{**s, "weight": float(w)} for s, w in zip(sources, weights)]}


def as_reward_func(annotator: Any, *, name: str | None = None) -> Callable[..., list[float | None]]:
    """A daralign annotator as a TRL reward function: ``fn(prompts, completions, completion_ids=None,
    **columns) -> list[float | None]`` — strings or conversational (message-list) inputs, one float
    per completion (``None`` for an invalid label), logged by TRL under ``fn.__name__``. The judge's
    cache, retries and request counting work inside (``fn.annotator.num_requests``).

    ``annotator``: a config dict, a YAML path, or an annotator object."""
    from daralign.annotators import Annotator, build_annotator, describe_annotator

    built = annotator if isinstance(annotator, Annotator) else build_annotator(annotator)
    if not built.can_score:
        raise ConfigError(f"as_reward_func: annotator {built.name!r} cannot score single completions")

    def reward(prompts, completions, completion_ids=None, **columns):
        texts = [_text(c) for c in completions]
        rows = [{k: v[i] for k, v in columns.items() if isinstance(v, list) and len(v) == len(texts)}
                for i in range(len(texts))]
        return built.score(list(prompts), texts, rows).scores

    label = name or (f"{built.name}_{annotator.get('template', '')}".rstrip("_") if isinstance(annotator, dict) else built.name)
    reward.__name__ = reward.__qualname__ = label.replace("-", "_")
    reward.annotator = built
    reward.description = describe_annotator(annotator) if isinstance(annotator, dict) else repr(built)
    return reward


def _text(completion: Any) -> str:
    """A completion as text: TRL passes strings, or (conversational) a list of messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise ConfigError(f"reward function: a completion must be a string or a list of messages, got {type(completion).__name__}")
