"""The online loop (Algorithm 1 of the DAR paper), the same for every objective:

    for t in steps:  prompts → sample K responses with π_t → annotate → π_ref log-probs
                     → objective.prepare → gradient step(s) → log, checkpoint

The loop owns ordering, timing, logging, checkpoints and the budget; rooms meet through
``Rollout`` and ``Feedback``. Runs under ``accelerate launch`` unchanged: each process takes its
share of each step's prompts, DDP averages gradients, and objectives get an all-reduce for
statistics of the global batch.

Who does what: a rollout engine samples (``rollout/``: HF ``generate``, vLLM colocated or served,
offline pairs — the loop never asks which), ``annotate.py`` turns the annotator's answers into
``Feedback``, the objective turns it into a loss, and the held-out check (``heldout.py``) measures
progress with requests counted apart.

Under ``async_steps: N`` the next N batches are sampled ahead and labelled on a background thread
while this one updates (``pipeline.py``; ``step_async``); the rest of a step (``learn``) is the same.

The budget (``annotation_budget``) is in annotator *requests*, counted by the run's one meter
(``annotators/base.py``). Before each step the step is cut to the prompts whose requests still fit
(or not taken) and the meter is capped at the requests left: every request is reserved before it
is sent, so retries can never pass the budget, and a run that reaches it mid-step ends cleanly.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from rich.progress import TimeRemainingColumn

from daralign.train import checkpoint, outputs
from daralign.annotators import Meter, build_annotator, describe_annotator
from daralign.core.config import TrainConfig, to_dict
from daralign.core.data import PromptSchedule, load_pairs, load_prompts
from daralign.core.errors import AnnotationError, ConfigError
from daralign.train.annotate import annotate, shuffled_control
from daralign.train.budget import Budget
from daralign.train.heldout import HeldoutCheck
from daralign.train.model_card import write_model_card
from daralign.train.pipeline import Pipeline
from daralign.train.step_metrics import nothing_spent, step_metrics
from daralign.core.models import disable_dropout, flush_denormals, load_causal_lm, load_tokenizer, own_weights, token_logps
from daralign.objectives import get_objective
from daralign.objectives.base import importance_weights
from daralign.core import sharding
from daralign.core.provenance import provenance
from daralign.rollout.base import (SamplingSettings, behaviour_check, behaviour_from_engine, build_engine, check_engine,
                                   engine_class, engine_of, settings_of_other_engines)
from daralign.core.tracking import MetricsLog, console, progress_bar

MB_KEYS = ("input_ids", "attention_mask", "completion_mask")
MAX_STEPS_WITHOUT_LABELS = 3  # then the annotator is broken for this task: stop, saying what it answered
# what --resume may change: how long, how often to save, log and evaluate — nothing that alters an update
RESUME_MAY_CHANGE = {"max_steps", "annotation_budget", "save_strategy", "save_steps", "save_total_limit", "logging_steps", "eval_steps",
                     "report", "report_to", "log_completions", "resume", "overwrite_output_dir"}


@dataclass
class Update:
    """What one update returns: its metrics and, when the objective took π_t from its own forward
    (``pi_t_from_update``), those per-token log-probs (N, L-1) — else None."""

    metrics: dict
    pi_t_token_logps: torch.Tensor | None = None


class OnlineTrainer:
    """Algorithm 1 for every objective. Built from the configs alone (the CLI), or with parts the
    Python API hands over already made: a loaded ``model`` and its ``tokenizer``, dataset rows in
    memory (``rows``, ``eval_rows``; written into the run folder so its config.yaml re-runs), a
    PEFT config, and ``on_step(step, metrics) -> stop?`` called after each logged step."""

    def __init__(self, train: TrainConfig, algo_config, *, model=None, tokenizer=None, rows: list[dict] | None = None,
                 eval_rows: list[dict] | None = None, peft_config=None, on_step=None) -> None:
        self.cfg, self.algo_config = train, algo_config
        self.on_step, self.in_memory = on_step, {"train_dataset": rows, "eval_dataset": eval_rows}
        self.out = Path(train.output_dir)
        precision = "bf16" if train.bf16 else "no"
        if AcceleratorState._shared_state.get("_mixed_precision", precision) != precision:
            # A later run in the same process (notebook, tests) with another precision: accelerate
            # refuses to change its initialised state, so reset it (as transformers' Trainer does);
            # the process-group state (PartialState) is kept.
            AcceleratorState._reset_state()
        self.accelerator = Accelerator(mixed_precision=precision, log_with=train.report_to or None,
                                       project_dir=str(self.out))
        set_seed(train.seed)
        flush_denormals()
        # statistics of the global batch (advantage normalisation, means over valid samples) sum over processes
        self.objective = get_objective(train.algorithm)(algo_config, train, reduce_sum=self._reduce_sum)
        self.kind = self.objective.feedback_kind  # score | compare | offline
        self.K = self.objective.num_generations()
        if train.resume and checkpoint.latest(self.out) is not None:  # the sampler of the run resumed, before any model loads
            self._check_resume_engine(checkpoint.latest(self.out), engine_class(train, self.kind))
        check_engine(train, self.kind, self._sampling_settings(), self.accelerator.num_processes, self.accelerator.device)
        load = load_pairs if self.kind == "offline" else load_prompts
        self.rows = load(rows if rows is not None else train.dataset, column=train.prompt_column, split=train.dataset_split,
                         config=train.dataset_config, name="train_dataset")
        eval_source = eval_rows if eval_rows is not None else train.eval_dataset
        self.eval_rows = (load_prompts(eval_source, column=train.prompt_column, name="eval_dataset")[: train.eval_max_prompts]
                          if eval_source else [])
        sharding.check_launch(self.accelerator, use_peft=train.use_peft or peft_config is not None,
                              extra_modules=self.objective.trains_extra_modules,
                              micro_batch=train.per_device_train_batch_size * self.K, max_grad_norm=train.max_grad_norm)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(train.model_name_or_path, train.trust_remote_code)
        # the reference is the starting weights: copied before the policy is wrapped or trained
        self.reference = self._load_reference(model)
        self.policy = self._load_policy(model, peft_config)
        self.objective.setup(self.policy)
        self.extra = self.objective.trainable_modules()
        params = [p for p in self.policy.parameters() if p.requires_grad]
        params += [p for m in self.extra.values() for p in m.parameters()]
        # fused: one kernel over all parameters, no per-step temporaries (135M on CPU: 0.17 s a step, foreach 0.8 s)
        optimizer = torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=train.weight_decay,
                                      fused=all(p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in params))
        from transformers import get_scheduler

        scheduler = get_scheduler(train.lr_scheduler_type, optimizer, num_warmup_steps=train.warmup_steps,
                                  num_training_steps=train.max_steps)  # one scheduler step per online batch
        self.policy, self.optimizer, self.scheduler = self.accelerator.prepare(self.policy, optimizer, scheduler)
        self.meter = Meter()  # every annotator request of this run: training (capped) and evaluation
        self._eval_seen = 0  # evaluation requests already reported
        self.annotator = build_annotator(train.annotator).use_meter(self.meter) if train.annotator is not None else None
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        if train.prompts_per_step % world:
            raise ConfigError(f"per_device_train_batch_size × gradient_accumulation_steps ({train.prompts_per_step}) "
                              f"must be divisible by the number of processes ({world})")
        self.schedule = PromptSchedule(self.rows, train.prompts_per_step * world, train.seed)
        self.rank, self.world = rank, world
        self.budget = Budget(train.annotation_budget, train.annotator if self.annotator is not None else None, self.meter,
                             self.objective, prompts_per_step=train.prompts_per_step, world=world)
        self.heldout_check = HeldoutCheck(
            train, self.eval_rows, self.annotator, self.meter, policy=lambda: self.unwrapped, tokenizer=self.tokenizer,
            reference_token_logps=self.reference_token_logps, autocast=self.accelerator.autocast, out=self.out,
            is_main=self.accelerator.is_main_process)
        self.engine = build_engine(train, self.kind, self._sampling_settings(), self.tokenizer, self.accelerator.device)
        # An engine that gives no π_t (vLLM): with one update per batch (and no dropout) DAR's and GRPO's
        # π_t is the detached value of the update's own forward, so no extra pass (objectives/base.py)
        # Not under async_steps: there the update's policy is not the one that sampled.
        self.pi_t_from_update = (not self.engine.gives_behaviour_logps and self.objective.behaviour_in_loss
                                 and train.num_updates_per_batch == 1 and train.disable_dropout and not train.async_steps)
        self.pipeline = None
        if train.async_steps and self.kind == "offline":  # so `compare --async_steps N` runs every method
            console.print(f"async_steps: {train.algorithm} trains on fixed pairs, with nothing to sample or annotate "
                          "ahead; it runs synchronously")
        elif train.async_steps:
            self.pipeline = Pipeline(train.async_steps, self.labels, self.budget, max_steps=train.max_steps,
                                     checkpoint_every=train.save_steps if train.save_strategy != "no" else 0,
                                     background_sampling=self.engine.samples_in_background)

    def _reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return t
        return self.accelerator.reduce(t.to(self.accelerator.device), "sum").to(t.device)

    def _sampling_settings(self) -> SamplingSettings:
        cfg, acc = self.cfg, self.accelerator
        return SamplingSettings(
            model_name_or_path=cfg.model_name_or_path, num_generations=self.K, max_completion_length=cfg.max_completion_length,
            max_prompt_length=cfg.max_prompt_length, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
            generation_batch_size=cfg.generation_batch_size, seed=cfg.seed, dtype=cfg.dtype,
            lora_rank=cfg.lora_r if cfg.use_peft else 0, is_main=acc.is_main_process,
            autocast=acc.autocast, wait_for_everyone=acc.wait_for_everyone)

    # ---------------------------------------------------------------- models
    def _load_policy(self, model=None, peft_config=None):
        cfg = self.cfg
        if model is None:
            model = load_causal_lm(cfg.model_name_or_path, cfg.dtype, cfg.trust_remote_code)
            if not cfg.use_peft and self.accelerator.device.type == "cpu" and not sharding.is_sharded(model):
                own_weights(model)  # the optimizer writes them (a GPU copies them anyway; ZeRO-3: placeholders)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
        if cfg.use_peft:
            from peft import LoraConfig, get_peft_model

            lora = peft_config or LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                             target_modules=cfg.lora_target_modules or "all-linear", task_type="CAUSAL_LM")
            model = get_peft_model(model, lora)
        if cfg.disable_dropout:
            disable_dropout(model)
        return model

    def _load_reference(self, model=None):
        cfg = self.cfg
        if not (self.objective.needs_reference or self.eval_rows):  # held-out KL needs it for every method
            return None
        if cfg.use_peft and cfg.ref_model_name_or_path is None:
            return None  # the policy with its adapter disabled *is* the reference: no second copy
        if model is not None and cfg.ref_model_name_or_path is None:
            import copy

            ref = copy.deepcopy(model)  # a model handed over in memory: its starting weights
        else:
            ref = load_causal_lm(cfg.ref_model_name_or_path or cfg.model_name_or_path, cfg.dtype, cfg.trust_remote_code)
        ref.eval().requires_grad_(False)
        return sharding.place_reference(ref, self.accelerator)  # sharded like the policy under ZeRO-3 / FSDP2

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.policy)

    @torch.no_grad()
    def reference_token_logps(self, rollout, temperature: float | None = None) -> torch.Tensor:
        """log π_ref of every completion token (0 elsewhere), at the training temperature unless given."""
        ctx = self.unwrapped.disable_adapter() if self.reference is None else nullcontext()
        return self._forward_token_logps(self.reference or self.unwrapped, rollout, temperature, ctx)

    def rows_per_micro_batch(self, rollout) -> int:
        """Sequences per micro-batch: whole prompt groups, ``per_device_train_batch_size`` of them, or
        as many as fit in ``max_micro_batch_tokens`` padded tokens (the cost and memory of a forward).

        With several processes the padded length is the longest over all of them (a collective: every
        process calls this for the same batch): each process pads to its own longest prompt, and under
        FSDP2 / ZeRO-3 every forward all-gathers, so a process running one micro-batch more than
        another would leave the collectives out of step — a hang."""
        K, length = rollout.num_generations, rollout.input_ids.shape[1]
        if self.cfg.max_micro_batch_tokens:
            if self.world > 1:
                length = int(self.accelerator.gather(torch.tensor([length], device=self.accelerator.device)).max())
            return K * max(1, self.cfg.max_micro_batch_tokens // (K * length))
        return K * self.cfg.per_device_train_batch_size

    @torch.no_grad()
    def _forward_token_logps(self, model, rollout, temperature: float | None = None, ctx=None) -> torch.Tensor:
        out = []
        mb = self.rows_per_micro_batch(rollout)
        was_training = model.training
        model.eval()
        with ctx or nullcontext(), self.accelerator.autocast():
            for s in range(0, rollout.input_ids.shape[0], mb):
                out.append(token_logps(model, rollout.input_ids[s:s + mb], rollout.attention_mask[s:s + mb],
                                       temperature or self.cfg.temperature, rollout.completion_mask[s:s + mb],
                                       share_prompts=self.cfg.share_prompt_forward).float())
        model.train(was_training)
        return torch.cat(out) * rollout.completion_mask[:, 1:]

    # ---------------------------------------------------------------- one step
    def rollout(self, step: int, num_prompts: int):
        """This process's share of the first ``num_prompts`` prompts of step ``step``, sampled by the
        engine; π_t computed by the trainer when the engine gives none (and the update will not)."""
        rows = self.schedule.batch(step)[:num_prompts][self.rank::self.world]
        rollout = self.engine.sample(self.unwrapped, rows, step)
        timing = {}
        if rollout.behaviour_token_logps is None and self.pipeline is not None and self.engine.samples_in_background:
            return behaviour_from_engine(rollout), timing  # sampled during an update (pipeline.py): the server's π_t
        if rollout.behaviour_token_logps is None and not self.pi_t_from_update:
            t = time.perf_counter()
            rollout.behaviour_token_logps = self._forward_token_logps(self.unwrapped, rollout)
            timing["timing/behaviour_forward"] = time.perf_counter() - t
        return rollout, timing

    def labels(self, rollout):
        """The annotator's labels for the rollout, as the objective learns from them (``annotate.py``).
        No collective: under ``async_steps`` this runs on the annotation thread."""
        return annotate(self.annotator, rollout, kind=self.kind, best_vs_worst=self.objective.best_vs_worst,
                        missing_eos_penalty=self.cfg.missing_eos_penalty)

    def feedback(self, rollout, step: int, labels=None):
        """The labels (bought now, or bought ahead: ``labels``); under ``shuffle_rewards``, the
        control's labels instead (bought the same way)."""
        fb = labels if labels is not None else self.labels(rollout)
        if self.cfg.shuffle_rewards:
            fb = shuffled_control(fb, seed=self.cfg.seed, step=step, rank=self.rank, gather=self.accelerator.gather)
        return fb

    def prepare(self, rollout, feedback, ref) -> tuple[dict, dict, bool]:
        """The objective's per-sample constants and metrics (no gradient), and whether any process
        has signal (the same decision on every process)."""
        with torch.no_grad():
            prepared, metrics = self.objective.prepare(rollout, feedback, ref, self.unwrapped)
        signal = self._sum(self.objective.has_signal(feedback, prepared)) > 0
        return prepared, metrics, signal

    def update(self, rollout, prepared: dict, signal: bool) -> Update:
        """``num_updates_per_batch`` optimizer steps on the batch — none when no process has signal —
        then one scheduler step: the schedule counts online batches, as ``max_steps`` does."""
        cfg = self.cfg
        N = rollout.input_ids.shape[0]
        batch = {k: getattr(rollout, k) for k in MB_KEYS} | prepared
        rows_per_mb = self.rows_per_micro_batch(rollout)  # whole prompt groups per micro-batch
        self.policy.train()
        losses, extra_metrics, grad_norms, pi_t = [], {}, [], []
        for _ in range(cfg.num_updates_per_batch if signal else 0):
            starts = list(range(0, N, rows_per_mb))
            for i, s in enumerate(starts):
                mb = {k: v[s:s + rows_per_mb] for k, v in batch.items()}
                sync = i == len(starts) - 1
                self.accelerator.gradient_state._set_sync_gradients(sync)  # DeepSpeed steps at the boundary only
                with (nullcontext() if sync else self.accelerator.no_sync(self.policy)), self.accelerator.autocast():
                    out = self.objective.compute_loss(self.policy, mb)
                    loss = out.loss * (mb["input_ids"].shape[0] / N)  # mean over the whole online batch
                self.accelerator.backward(loss)
                losses.append(loss.item())
                if out.pi_t_token_logps is not None:  # π_t from this forward (objectives/base.py)
                    pi_t.append(out.pi_t_token_logps)
                for k, v in out.metrics.items():
                    extra_metrics.setdefault(k, []).append(float(v))
            if self.world > 1:
                for module in self.extra.values():
                    for p in module.parameters():
                        if p.grad is not None:
                            p.grad = self.accelerator.reduce(p.grad, "mean")
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            norm = self.accelerator.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
            grad_norms.append(float(norm))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped update steps the schedule without the optimizer, on purpose
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            self.scheduler.scheduler.step()  # the raw scheduler: accelerate's wrapper steps once per process
        out = {"loss": sum(losses) / cfg.num_updates_per_batch if losses else 0.0,
               "learning_rate": self.scheduler.get_last_lr()[0], "update/skipped": 0.0 if signal else 1.0}
        if grad_norms:
            out["grad_norm"] = sum(grad_norms) / len(grad_norms)
        out.update({k: sum(v) / len(v) for k, v in extra_metrics.items()})
        return Update(metrics=out, pi_t_token_logps=torch.cat(pi_t) if pi_t else None)

    def pi_t_after_update(self, rollout, feedback, ref, update: Update, timing: dict) -> dict:
        """π_t left to the update (``pi_t_from_update``, see __init__): filled into the rollout from
        the update's forward (one forward here when no update ran); returns the objective's metrics,
        which need π_t and so are computed now (``prepare`` again: cheap, no forward)."""
        pi_t = update.pi_t_token_logps
        if pi_t is None:
            t = time.perf_counter()
            pi_t = self._forward_token_logps(self.unwrapped, rollout)
            timing["timing/behaviour_forward"] = time.perf_counter() - t
        rollout.behaviour_token_logps = pi_t.float() * rollout.completion_mask[:, 1:]
        with torch.no_grad():
            return self.objective.prepare(rollout, feedback, ref, self.unwrapped)[1]

    def _sum(self, x: float) -> float:
        return float(self.accelerator.reduce(torch.tensor(float(x), device=self.accelerator.device), "sum").item())

    def step(self, step: int, num_prompts: int, spent: dict) -> dict:
        """One iteration of Algorithm 1, in the paper's order."""
        t0 = time.perf_counter()
        rollout, timing = self.rollout(step, num_prompts)  # y_1..y_K ~ π_t(·|x) for each prompt x
        t1 = time.perf_counter()
        feedback = self.feedback(rollout, step)  # the AI annotator: r(x, y), or P(y_i ≻ y_j)
        t2 = time.perf_counter()
        return self.learn(step, num_prompts, rollout, feedback, spent, timing,
                          {"timing/rollout": t1 - t0, "timing/annotate": t2 - t1}, started=t0)

    def step_async(self, step: int, spent: dict) -> dict | None:
        """One step under ``async_steps`` (``pipeline.py``): sample ahead, take this step's batch
        and its labels bought meanwhile, learn from it. None when no batch was left to train."""
        t0 = time.perf_counter()
        sampling = self.pipeline.fill(step, spent["annotation_requests"], self.rollout)  # from θ_step, drained at checkpoints
        batch = self.pipeline.pop(step)
        if batch is None:
            return None
        t1 = time.perf_counter()
        rollout, sampling_s, timing = batch.sampled.result()  # a server's: generated meanwhile (pipeline.py)
        t2 = time.perf_counter()
        labels, annotate_s = batch.labels.result()  # an annotator's failure is raised here, on this thread
        waited = time.perf_counter() - t2
        feedback = self.feedback(rollout, step, labels)
        phases = {"timing/rollout": sampling_s, "timing/annotate": annotate_s}
        lag = {"async/staleness": float(step - batch.sampled_at), "async/wait_annotate": waited,
               "async/wait_rollout": sampling + (t2 - t1)}
        return self.learn(step, batch.num_prompts, rollout, feedback, spent, timing, phases, started=t0, extra=lag)

    def off_policy(self, rollout) -> tuple:
        """Under ``async_steps``, for an objective with an ``importance_ratio`` (RLOO, GRPO, PPO): the
        rollout as ``prepare`` sees it — π_old the current policy, from one forward — and the truncated
        importance weights min(π_θ/π_sampler, cap) with their metrics. Else the rollout as it is."""
        level = self.objective.importance_ratio
        if not (self.cfg.async_steps and level):
            return rollout, None, {}
        t = time.perf_counter()
        current = self._forward_token_logps(self.unwrapped, rollout)
        weights, metrics = importance_weights(current, rollout.behaviour_token_logps, rollout.completion_mask[:, 1:].float(),
                                              cap=self.cfg.importance_ratio_cap, level=level)
        metrics["timing/importance_forward"] = time.perf_counter() - t
        return dataclasses.replace(rollout, behaviour_token_logps=current), weights, metrics

    def learn(self, step: int, num_prompts: int, rollout, feedback, spent: dict, timing: dict, phases: dict, *,
              started: float, extra: dict | None = None) -> dict:
        """The rest of Algorithm 1 on a labelled batch: reference, prepare, update, sync; its metrics."""
        t2 = time.perf_counter()
        ref = self.reference_token_logps(rollout) if self.objective.needs_reference else None  # log π_ref(y|x)
        t3 = time.perf_counter()
        seen, weights, extra_metrics = self.off_policy(rollout)
        prepared, objective_metrics, signal = self.prepare(seen, feedback, ref)  # weights, advantages, pairs
        if weights is not None:
            prepared["importance_weight"] = weights
        update = self.update(rollout, prepared, signal)  # θ_t → θ_{t+1}
        if rollout.behaviour_token_logps is None:
            objective_metrics = self.pi_t_after_update(rollout, feedback, ref, update, timing)
        t4 = time.perf_counter()
        if signal:
            if self.pipeline is not None:  # a server still generating from θ_t finishes first (pipeline.py)
                extra = dict(extra or {})
                extra["async/wait_rollout"] = extra.get("async/wait_rollout", 0.0) + self.pipeline.wait_sampled()
            t5 = time.perf_counter()
            self.engine.sync_weights(self.unwrapped)  # the engine samples the next batch from θ_{t+1}
            if not self.engine.gives_behaviour_logps:
                update.metrics["timing/weight_sync"] = time.perf_counter() - t5
            t4 = time.perf_counter()
        if self.cfg.log_completions and self.accelerator.is_main_process:
            ids = self.schedule.indices(step)[:len(rollout.rows) * self.world][self.rank::self.world]
            outputs.log_completions(self.out / "completions.jsonl", step, rollout, feedback, ids)
        return step_metrics(
            rollout, feedback, ref, spent=spent, eval_requests=self._eval_requests_since(), num_prompts=num_prompts,
            objective=objective_metrics, update=update.metrics | timing | behaviour_check(rollout) | extra_metrics | (extra or {}),
            timing=phases | {"timing/reference": t3 - t2, "timing/update": t4 - t3, "step_time": t4 - started},
            sum_over_processes=self._sum, sampled=self.kind != "offline")

    # ---------------------------------------------------------------- budget
    def prompts_affordable(self, spent: dict) -> tuple[int, str | None]:
        """(prompts the next step may take, why it takes none): ``budget.py``."""
        return self.budget.prompts(spent["annotation_requests"])

    def _more_to_train(self, spent: dict) -> bool:
        """Whether a step follows this one (within ``max_steps``): the budget affords one, or (async) a
        batch is in flight."""
        if self.pipeline is None:
            return self.prompts_affordable(spent)[0] > 0
        return self.pipeline.more(spent["annotation_requests"])

    def _eval_requests_since(self) -> int:
        """Evaluation requests on this process since the last call (held-out scoring, win rates)."""
        now = self.meter.requests["eval"]
        new, self._eval_seen = now - self._eval_seen, now
        return new

    # ---------------------------------------------------------------- run
    @property
    def config_dict(self) -> dict:
        """The resolved config as JSON values (secrets redacted), as checkpoints record it."""
        return json.loads(json.dumps(to_dict(self.cfg, self.algo_config), default=str))

    def _check_resume_engine(self, path: Path, engine) -> None:
        """--resume samples with the engine the run sampled with (then the other engines' settings may
        differ: they change nothing it does)."""
        then = checkpoint.saved_config(path)
        before = engine_of(then, self.kind) if then is not None else engine
        if before is not engine:
            raise ConfigError(f"--resume: {path} was sampled by the {getattr(before, 'name', then.get('rollout_engine'))} "
                              f"engine and this config samples with {engine.name} (rollout_engine, use_vllm, "
                              f"vllm_mode); resume with the run's own settings, or start a new run in another output_dir")

    def _finished(self, step: int, spent: dict) -> str | None:
        if step >= self.cfg.max_steps:
            return f"max_steps ({self.cfg.max_steps}) done"
        return self.prompts_affordable(spent)[1]

    def train(self) -> dict:
        cfg, acc = self.cfg, self.accelerator
        outputs.prepare(self.out, resume=cfg.resume, overwrite=cfg.overwrite_output_dir, is_main=acc.is_main_process)
        acc.wait_for_everyone()
        if acc.is_main_process:
            checkpoint.clean_partial(self.out)  # half-written folders of a killed run (ours: the folder is marked)
        acc.wait_for_everyone()
        start = 0
        spent = nothing_spent()
        resume_from = checkpoint.latest(self.out) if cfg.resume else None
        if cfg.resume and resume_from is None:
            console.print(f"[yellow]--resume: no checkpoint in {self.out}; starting from scratch[/yellow]")
        if resume_from is not None:
            checkpoint.check_resume_config(resume_from, self.config_dict,
                                           RESUME_MAY_CHANGE | settings_of_other_engines(type(self.engine)))
            state = checkpoint.load(acc, resume_from, self.extra)
            start = state["step"]
            spent |= {k: state[k] for k in spent if k in state}
            console.print(f"resumed from {resume_from} (step {start}, {spent['annotation_requests']} requests, "
                          f"{spent['annotations']} annotations)")
            done = self._finished(start, spent)
            if done and (self.out / "final").is_dir():
                console.print(f"--resume: this run is finished ({done}); nothing to do, {self.out / 'final'} is kept")
                return {"annotations": spent["annotations"], "annotation_requests": spent["annotation_requests"],
                        "heldout_after": None, "finished_earlier": True}
        if acc.is_main_process:
            # rows handed over in memory go where the config points, so config.yaml re-runs from the CLI
            for path, rows in ((self.cfg.dataset, self.in_memory["train_dataset"]),
                               (self.cfg.eval_dataset, self.in_memory["eval_dataset"])):
                if rows is not None and path:
                    outputs.write_rows(Path(path), rows)
            (self.out / "config.yaml").write_text(yaml.safe_dump(to_dict(self.cfg, self.algo_config), sort_keys=False))
            (self.out / "provenance.json").write_text(json.dumps(provenance(), indent=1))
        if cfg.report_to:
            acc.init_trackers(self.out.name, config={k: v for k, v in to_dict(self.cfg, self.algo_config).items()
                                                    if isinstance(v, (int, float, str, bool))})
        log = MetricsLog(self.out, acc, resume_step=start if resume_from is not None else None) if acc.is_main_process else None
        if self.pipeline is not None:  # batches are planned against what is in flight; the meter is capped once
            self.pipeline.next_step = start
            self.budget.cap_run(spent["annotation_requests"])
        self.engine.sync_weights(self.unwrapped)  # an engine holding other weights (a server, a resumed run) starts at these
        if start == 0 and not (self.out / "heldout_before.json").exists():
            self._heldout_showing("before", "before training")
        progress = progress_bar(TimeRemainingColumn(), disable=not acc.is_main_process)
        step, saved, unlabelled = start, start if resume_from is not None else -1, 0
        checkpoints = cfg.save_strategy != "no"
        with progress:
            task = progress.add_task(f"{cfg.algorithm} steps", total=cfg.max_steps, completed=start)
            for step in range(start, cfg.max_steps):
                if self.pipeline is not None:
                    metrics = self.step_async(step, spent)
                    why = self.pipeline.stopped
                else:
                    num_prompts, why = self.prompts_affordable(spent)
                    metrics = self.step(step, num_prompts, spent) if num_prompts else None
                if metrics is None:
                    console.print(f"{why}; stopping after step {step}")
                    break
                unlabelled = unlabelled + 1 if self.kind != "offline" and metrics["annotations"] == spent["annotations"] else 0
                if unlabelled >= MAX_STEPS_WITHOUT_LABELS:
                    said = getattr(self.annotator, "last_answers", None)
                    raise AnnotationError(
                        f"annotator {describe_annotator(cfg.annotator)} gave no valid label in {unlabelled} consecutive "
                        f"steps" + (f"; its last answers: {said!r}" if said else "") + " — check its template, scale "
                        "and backend (`daralign annotate` shows what it returns)")
                spent = {k: metrics[k] for k in spent}
                if cfg.eval_steps and (step + 1) % cfg.eval_steps == 0 and step + 1 < cfg.max_steps \
                        and self._more_to_train(spent):  # the last step of a budget: "after" is this evaluation
                    if self.pipeline is not None:
                        self.pipeline.settle()  # no training request runs while evaluation's are counted
                    progress.update(task, description=f"{cfg.algorithm} · held-out evaluation ({len(self.eval_rows)} prompts)")
                    res = self.heldout_check.run(f"step{step + 1}")
                    if res:
                        metrics |= {"eval/score": res["score"], "eval/kl": res["kl"], "eval/mean_length": res["mean_length"]} \
                            | ({"eval/proxy_score": res["proxy_score"]} if res.get("proxy_score") is not None else {}) \
                            | res.get("win_rate", {})
                metrics["eval_annotation_requests"] += int(self._sum(self._eval_requests_since()))
                spent["eval_annotation_requests"] = metrics["eval_annotation_requests"]
                if log is not None:
                    log.log(metrics, step + 1, print_line=(step + 1) % cfg.logging_steps == 0)
                stop = self.on_step is not None and self.on_step(step + 1, metrics)
                reward = metrics.get("reward")
                progress.update(task, advance=1, description=f"{cfg.algorithm}" + (f" reward={reward:.3f}" if reward is not None else ""))
                if checkpoints and cfg.save_steps and (step + 1) % cfg.save_steps == 0:
                    checkpoint.save(acc, self.out, step + 1, {"step": step + 1, **spent, "config": self.config_dict}, cfg.save_total_limit, self.extra)
                    saved = step + 1
                if stop:
                    console.print(f"stopped by a callback after step {step + 1}")
                    step += 1
                    break
            else:
                step = cfg.max_steps
        if self.pipeline is not None:  # batches bought ahead and never trained were paid for
            spent = dict(spent)
            for fb in self.pipeline.unused():
                for key, n in (("annotations", fb.num_annotations), ("annotation_requests", fb.num_requests),
                               ("annotation_cache_hits", fb.num_cache_hits)):
                    spent[key] += int(self._sum(n))
        if checkpoints and saved != step:  # a checkpoint at the end: --resume of a finished run then does nothing
            checkpoint.save(acc, self.out, step, {"step": step, **spent, "config": self.config_dict}, cfg.save_total_limit, self.extra)
        after = self._heldout_showing("after", "after training")
        spent["eval_annotation_requests"] += int(self._sum(self._eval_requests_since()))
        if acc.is_main_process:
            (self.out / "annotation_requests.json").write_text(json.dumps(spent, indent=1))
        self.save_final()
        if acc.is_main_process:
            write_model_card(self.out, self.config_dict, provenance())
            outputs.finish(self.out)
        if cfg.report_to:
            acc.end_training()
        return {"annotations": spent["annotations"], "annotation_requests": spent["annotation_requests"],
                "eval_annotation_requests": spent["eval_annotation_requests"], "heldout_after": after}

    def _heldout_showing(self, tag: str, when: str) -> dict | None:
        """``heldout(tag)`` with a progress bar over its phases (sampling, then each scorer, the KL)."""
        if not (self.eval_rows and self.accelerator.is_main_process):
            return self.heldout_check.run(tag)
        title = f"held-out {when} ({len(self.eval_rows)} prompts)"
        with progress_bar() as bar:
            task = bar.add_task(title, total=None)
            return self.heldout_check.run(tag, progress=lambda what, done, total: bar.update(
                task, description=f"{title}: {what}", completed=done, total=total))

    def save_final(self) -> None:
        self.accelerator.wait_for_everyone()
        main, model = self.accelerator.is_main_process, self.unwrapped
        state = sharding.final_state(model, keep=main, merge_lora=self.cfg.use_peft and self.cfg.merge_lora)  # collective
        if main:
            outputs.save_final(self.out, model, self.tokenizer, self.extra, merge_lora=self.cfg.use_peft and self.cfg.merge_lora, state_dict=state)

    def close(self) -> None:
        if getattr(self, "pipeline", None) is not None:
            self.pipeline.close()
        if getattr(self, "heldout_check", None) is not None:
            self.heldout_check.close()
        if getattr(self, "annotator", None) is not None:
            self.annotator.close()
        if getattr(self, "engine", None) is not None:
            self.engine.close()
