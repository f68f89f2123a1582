"""The online loop (Algorithm 1 of the DAR paper), the same for every objective:

    for t in steps:  prompts → sample K responses with π_t → annotate → π_ref log-probs
                     → objective.prepare → gradient step(s) → log, checkpoint

The loop owns ordering, timing, logging and checkpoints; rooms meet through ``Rollout`` and
``Feedback``. Runs under ``accelerate launch`` unchanged: each process takes its share of each
step's prompts, and DDP averages gradients.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from daralign import checkpoint
from daralign.annotators import build_annotator
from daralign.config import TrainConfig, to_dict
from daralign.data import PromptSchedule, load_prompts
from daralign.feedback import compare_feedback, score_feedback
from daralign.heldout import judge_heldout
from daralign.models import load_causal_lm, load_tokenizer, token_logps
from daralign.objectives import get_objective
from daralign.rollout.hf import sample_rollout
from daralign.tracking import MetricsLog, console

MB_KEYS = ("input_ids", "attention_mask", "completion_mask")


class OnlineTrainer:
    def __init__(self, train: TrainConfig, algo_config, *, offline_batches=None) -> None:
        self.cfg, self.algo_config = train, algo_config
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
        # DAR weights of far-below-average samples can be ~1e-30; denormal floats make CPU matmuls
        # ~100x slower. Flushing them to zero changes nothing measurable in the update.
        torch.set_flush_denormal(True)
        self.objective = get_objective(train.algorithm)(algo_config, train)
        self.rows = load_prompts(train.dataset, column=train.prompt_column, split=train.dataset_split, config=train.dataset_config)
        self.eval_rows = (load_prompts(train.eval_dataset, column=train.prompt_column)[: train.eval_max_prompts]
                          if train.eval_dataset else [])
        self.tokenizer = load_tokenizer(train.model_name_or_path, train.trust_remote_code)
        self.policy = self._load_policy()
        self.reference = self._load_reference()
        self.objective.setup(self.policy)
        self.extra = self.objective.trainable_modules()
        params = [p for p in self.policy.parameters() if p.requires_grad]
        params += [p for m in self.extra.values() for p in m.parameters()]
        optimizer = torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=train.weight_decay)
        from transformers import get_scheduler

        scheduler = get_scheduler(train.lr_scheduler_type, optimizer, num_warmup_steps=train.warmup_steps,
                                  num_training_steps=train.max_steps)
        self.policy, self.optimizer, self.scheduler = self.accelerator.prepare(self.policy, optimizer, scheduler)
        for module in self.extra.values():
            self.accelerator.register_for_checkpointing(module)
        self.annotator = build_annotator(train.annotator)
        self.eval_annotator = self._eval_annotator()
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        if train.prompts_per_step % world:
            from daralign.errors import ConfigError

            raise ConfigError(f"per_device_train_batch_size × gradient_accumulation_steps ({train.prompts_per_step}) "
                              f"must be divisible by the number of processes ({world})")
        self.schedule = PromptSchedule(self.rows, train.prompts_per_step * world, train.seed)
        self.rank, self.world = rank, world

    # ---------------------------------------------------------------- models
    def _load_policy(self):
        cfg = self.cfg
        model = load_causal_lm(cfg.model_name_or_path, cfg.dtype, cfg.trust_remote_code)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
        if cfg.use_peft:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                              target_modules=cfg.lora_target_modules or "all-linear", task_type="CAUSAL_LM")
            model = get_peft_model(model, lora)
        return model

    def _load_reference(self):
        cfg = self.cfg
        if not self.objective.needs_reference:
            return None
        if cfg.use_peft and cfg.ref_model_name_or_path is None:
            return None  # the policy with its adapter disabled *is* the reference: no second copy
        ref = load_causal_lm(cfg.ref_model_name_or_path or cfg.model_name_or_path, cfg.dtype, cfg.trust_remote_code)
        ref.eval().requires_grad_(False)
        return ref.to(self.accelerator.device)

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.policy)

    @torch.no_grad()
    def reference_token_logps(self, rollout) -> torch.Tensor | None:
        if not self.objective.needs_reference:
            return None
        out = []
        mb = self.cfg.per_device_train_batch_size * rollout.num_generations
        model = self.reference or self.unwrapped
        ctx = self.unwrapped.disable_adapter() if self.reference is None else nullcontext()
        with ctx, self.accelerator.autocast():
            for s in range(0, rollout.input_ids.shape[0], mb):
                out.append(token_logps(model, rollout.input_ids[s:s + mb], rollout.attention_mask[s:s + mb],
                                       self.cfg.temperature).float())
        return torch.cat(out) * rollout.completion_mask[:, 1:]

    def _reference_answers(self) -> list[str]:
        """Answers to beat for ``eval/win_rate``: the eval set's ``reference``/``output`` column, else
        the starting policy's own answers (made once before training, kept for resume)."""
        path = self.out / "heldout_reference_answers.json"
        if path.exists():
            return json.loads(path.read_text())
        col = next((c for c in ("reference", "output") if all(isinstance(r.get(c), str) for r in self.eval_rows)), None)
        if col:
            answers = [r[col] for r in self.eval_rows]
        else:
            from daralign.evaluation.generate import generate_responses

            answers = generate_responses(self.unwrapped, self.tokenizer, [r["prompt"] for r in self.eval_rows],
                                         max_new_tokens=self.cfg.max_completion_length, temperature=self.cfg.eval_temperature,
                                         batch_size=self.cfg.generation_batch_size, seed=self.cfg.seed + 104729)
        if self.accelerator.is_main_process:
            path.write_text(json.dumps(answers))
        return answers

    def _comparer(self):
        """A compare-mode judge sharing the loaded judge model; orders are swapped by the evaluation."""
        cfg = self.cfg.annotator
        if isinstance(cfg, dict) and cfg.get("type") == "judge":
            from daralign.annotators.judge import JudgeAnnotator, JudgeConfig

            return JudgeAnnotator(JudgeConfig(**{**cfg, "mode": "compare", "debias": "none"}), client=self.annotator.client)
        from daralign.errors import ConfigError

        raise ConfigError("eval_win_rate: needs a `type: judge` annotator (it compares two answers)")

    def win_rate(self) -> dict:
        from daralign.evaluation.winrate import evaluate_win_rate

        if not hasattr(self, "_win_rate_refs"):
            self._win_rate_refs, self._win_rate_judge = self._reference_answers(), self._comparer()
        res = evaluate_win_rate(self.unwrapped, self.tokenizer, [r["prompt"] for r in self.eval_rows], self._win_rate_refs,
                                self._win_rate_judge, rows=self.eval_rows, max_new_tokens=self.cfg.max_completion_length,
                                temperature=self.cfg.eval_temperature, batch_size=self.cfg.generation_batch_size,
                                seed=self.cfg.seed + 7919)
        return {k: v for k, v in res.items() if k.startswith("eval/") and isinstance(v, (int, float))}

    def _eval_annotator(self):
        """Held-out answers are always *scored*. A judge in ``mode: compare`` (preference methods)
        gets a score-mode twin (same model, backend, template) that shares its loaded model."""
        cfg = self.cfg.annotator
        if not (self.eval_rows and isinstance(cfg, dict) and cfg.get("type") == "judge" and cfg.get("mode") == "compare"):
            return self.annotator
        from daralign.annotators.judge import JudgeAnnotator, JudgeConfig

        return JudgeAnnotator(JudgeConfig(**{**cfg, "mode": "score"}), client=self.annotator.client)

    # ---------------------------------------------------------------- one step
    def rollout(self, step: int):
        rows = self.schedule.batch(step)[self.rank::self.world]
        with self.accelerator.autocast():
            return sample_rollout(
                self.unwrapped, self.tokenizer, rows, num_generations=self.cfg.num_generations,
                max_completion_length=self.cfg.max_completion_length, temperature=self.cfg.temperature,
                top_p=self.cfg.top_p, top_k=self.cfg.top_k, max_prompt_length=self.cfg.max_prompt_length,
                generation_batch_size=self.cfg.generation_batch_size,
            )

    def feedback(self, rollout, step: int):
        if self.objective.feedback_kind == "compare":
            return compare_feedback(self.annotator, rollout, best_vs_worst=getattr(self.algo_config, "best_vs_worst", True))
        shuffle = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step) if self.cfg.shuffle_rewards else None
        return score_feedback(self.annotator, rollout, missing_eos_penalty=self.cfg.missing_eos_penalty,
                              shuffle_generator=shuffle)

    def update(self, rollout, prepared: dict) -> dict:
        cfg, K = self.cfg, rollout.num_generations
        N = rollout.input_ids.shape[0]
        batch = {k: getattr(rollout, k) for k in MB_KEYS} | prepared
        rows_per_mb = cfg.per_device_train_batch_size * K  # whole prompt groups per micro-batch
        self.policy.train()
        losses, extra_metrics = [], {}
        for _ in range(cfg.num_updates_per_batch):
            starts = list(range(0, N, rows_per_mb))
            for i, s in enumerate(starts):
                mb = {k: v[s:s + rows_per_mb] for k, v in batch.items()}
                sync = i == len(starts) - 1
                with (nullcontext() if sync else self.accelerator.no_sync(self.policy)), self.accelerator.autocast():
                    loss, m = self.objective.compute_loss(self.policy, mb)
                    loss = loss * (mb["input_ids"].shape[0] / N)  # mean over the whole online batch
                self.accelerator.backward(loss)
                losses.append(loss.item())
                for k, v in m.items():
                    extra_metrics.setdefault(k, []).append(float(v))
            if self.world > 1:
                for module in self.extra.values():
                    for p in module.parameters():
                        if p.grad is not None:
                            p.grad = self.accelerator.reduce(p.grad, "mean")
            if cfg.max_grad_norm > 0:
                params = [p for group in self.optimizer.param_groups for p in group["params"]]
                self.accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        out = {"loss": sum(losses) / cfg.num_updates_per_batch, "learning_rate": self.scheduler.get_last_lr()[0]}
        out.update({k: sum(v) / len(v) for k, v in extra_metrics.items()})
        return out

    def step(self, step: int, annotations: int) -> dict:
        t0 = time.perf_counter()
        rollout = self.rollout(step)
        t1 = time.perf_counter()
        feedback = self.feedback(rollout, step)
        t2 = time.perf_counter()
        ref = self.reference_token_logps(rollout)
        t3 = time.perf_counter()
        with torch.no_grad():
            prepared, obj_metrics = self.objective.prepare(rollout, feedback, ref, self.unwrapped)
        upd = self.update(rollout, prepared)
        t4 = time.perf_counter()
        lengths = rollout.completion_lengths.float()
        n_ann = int(self.accelerator.reduce(torch.tensor(feedback.num_annotations), "sum").item())
        m = {"annotations": annotations + n_ann}
        if feedback.rewards is not None:
            r = feedback.rewards[feedback.valid] if feedback.valid is not None else feedback.rewards
            m |= {"reward": r.mean().item(), "reward_std": r.std().item() if r.numel() > 1 else 0.0}
        if ref is not None:
            # KL(π_t‖π_ref) per sequence, Monte-Carlo over the samples: E[log π_t − log π_ref]
            m["kl"] = (rollout.behaviour_logps - ref.sum(-1)).mean().item()
        m |= {
            "entropy": (-rollout.behaviour_logps / lengths.clamp(min=1)).mean().item(),  # per-token MC estimate
            "completions/mean_length": lengths.mean().item(),
            "completions/clipped_ratio": 1.0 - rollout.is_eos.float().mean().item(),
            **obj_metrics, **feedback.metrics, **upd,
            "timing/rollout": t1 - t0, "timing/annotate": t2 - t1, "timing/reference": t3 - t2,
            "timing/update": t4 - t3, "step_time": t4 - t0,
        }
        if self.cfg.log_completions and self.accelerator.is_main_process:
            self._log_completions(step, rollout, feedback)
        return m

    def _log_completions(self, step: int, rollout, feedback) -> None:
        K = rollout.num_generations
        ids = self.schedule.indices(step)[self.rank::self.world]
        rewards = feedback.rewards.reshape(-1).tolist() if feedback.rewards is not None else [None] * len(rollout.completions)
        with open(self.out / "completions.jsonl", "a") as f:
            for i, text in enumerate(rollout.completions):
                f.write(json.dumps({"step": step + 1, "prompt_index": ids[i // K], "completion": text,
                                    "reward": rewards[i], "eos": bool(rollout.is_eos[i])}) + "\n")

    # ---------------------------------------------------------------- run
    def heldout(self, tag: str) -> dict | None:
        if not self.eval_rows:
            return None
        with self.accelerator.autocast():
            res = judge_heldout(self.unwrapped, self.tokenizer, self.eval_annotator, self.eval_rows,
                                max_new_tokens=self.cfg.max_completion_length, temperature=self.cfg.eval_temperature,
                                seed=self.cfg.seed + 7919, batch_size=self.cfg.generation_batch_size)
        if self.cfg.eval_win_rate:
            res["win_rate"] = self.win_rate()
        if self.accelerator.is_main_process:
            (self.out / f"heldout_{tag}.json").write_text(json.dumps(res, indent=1))
        return res

    def train(self) -> dict:
        cfg, acc = self.cfg, self.accelerator
        self.out.mkdir(parents=True, exist_ok=True)
        checkpoint.clean_partial(self.out)
        stale = checkpoint.checkpoints(self.out) if not cfg.resume else []
        if acc.is_main_process and not cfg.resume and (stale or (self.out / "metrics.jsonl").exists()):
            # A fresh run in an output_dir an earlier run used: that run's checkpoints would be taken
            # for this run's by a later --resume (and crowd its own out of save_total_limit), and its
            # held-out scores would be reused. metrics.jsonl is restarted the same way. (A
            # heldout_before.json placed in an unused folder, as `daralign compare` does, is kept.)
            if stale:
                console.print(f"[yellow]fresh run: removing {len(stale)} checkpoint(s) of an earlier run in "
                              f"{self.out} (continue a run with --resume)[/yellow]")
            for _, path in stale:
                shutil.rmtree(path, ignore_errors=True)
            for path in self.out.glob("heldout_*.json"):
                path.unlink()
        acc.wait_for_everyone()
        start, annotations = 0, 0
        resume_from = checkpoint.latest(self.out) if cfg.resume else None
        if cfg.resume and resume_from is None:
            console.print(f"[yellow]--resume: no checkpoint in {self.out}; starting from scratch[/yellow]")
        if resume_from is not None:
            state = checkpoint.load(acc, resume_from)
            start, annotations = state["step"], state["annotations"]
            console.print(f"resumed from {resume_from} (step {start}, {annotations} annotations)")
        if acc.is_main_process:
            (self.out / "config.yaml").write_text(yaml.safe_dump(to_dict(self.cfg, self.algo_config), sort_keys=False))
        if cfg.report_to:
            acc.init_trackers(self.out.name, config={k: v for k, v in to_dict(self.cfg, self.algo_config).items()
                                                    if isinstance(v, (int, float, str, bool))})
        log = MetricsLog(self.out, acc, resume_step=start if resume_from is not None else None) if acc.is_main_process else None
        if start == 0 and not (self.out / "heldout_before.json").exists():
            self.heldout("before")
        progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not acc.is_main_process)
        with progress:
            task = progress.add_task(f"{cfg.algorithm} steps", total=cfg.max_steps, completed=start)
            for step in range(start, cfg.max_steps):
                metrics = self.step(step, annotations)
                annotations = metrics["annotations"]
                if cfg.eval_steps and (step + 1) % cfg.eval_steps == 0 and step + 1 < cfg.max_steps:
                    res = self.heldout(f"step{step + 1}")
                    if res:
                        metrics |= {"eval/score": res["score"], "eval/mean_length": res["mean_length"]} | res.get("win_rate", {})
                if log is not None:
                    log.log(metrics, step + 1, print_line=(step + 1) % cfg.logging_steps == 0)
                progress.update(task, advance=1, description=f"{cfg.algorithm} reward={metrics.get('reward', float('nan')):.3f}")
                budget_spent = cfg.annotation_budget and annotations >= cfg.annotation_budget
                if cfg.save_steps and (step + 1) % cfg.save_steps == 0 or budget_spent:
                    checkpoint.save(acc, self.out, step + 1, {"step": step + 1, "annotations": annotations}, cfg.save_total_limit)
                if budget_spent:
                    console.print(f"annotation budget reached ({annotations} ≥ {cfg.annotation_budget}) after step {step + 1}")
                    break
        after = self.heldout("after")
        self.save_final()
        if cfg.report_to:
            acc.end_training()
        return {"annotations": annotations, "heldout_after": after}

    def save_final(self) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return
        final, tmp = self.out / "final", self.out / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model = self.unwrapped
        if self.cfg.use_peft and self.cfg.merge_lora:
            import copy

            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(tmp, safe_serialization=True)
        self.tokenizer.save_pretrained(tmp)
        for name, module in self.extra.items():
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(tmp / f"{name}.safetensors"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)

    def close(self) -> None:
        if self.eval_annotator is not self.annotator:
            self.eval_annotator.close()  # its client is shared; closing twice is safe
        self.annotator.close()
