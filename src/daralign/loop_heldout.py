"""The loop's held-out evaluation: which annotator is the yardstick, the before/after/every
``eval_steps`` check (score, KL to the reference, length; ``heldout.judge_heldout``) and in-training
win rates. A part of ``OnlineTrainer``, kept apart so the loop file stays about the loop."""

from __future__ import annotations

import json

from daralign.annotators import build_annotator, describe_annotator, same_annotator
from daralign.annotators.base import Annotator
from daralign.errors import ConfigError
from daralign.heldout import judge_heldout


class HeldoutEvaluation:
    """Needs from the trainer: ``cfg``, ``out``, ``eval_rows``, ``annotator``, ``eval_annotator``,
    ``evaluator_name``, ``evaluator_is_training``, ``proxy_scorer``, ``unwrapped``, ``tokenizer``, ``accelerator``
    and ``reference_token_logps``."""

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

    def _evaluator_config(self) -> dict | None:
        return self.cfg.eval_annotator if self.cfg.eval_annotator is not None else self.cfg.annotator

    def _comparer(self):
        """A compare-mode judge sharing the evaluator's loaded model; orders are swapped by the evaluation."""
        cfg = self._evaluator_config()
        if isinstance(cfg, dict) and cfg.get("type") == "judge":
            from daralign.annotators.judge import JudgeAnnotator, JudgeConfig

            return JudgeAnnotator(JudgeConfig(**{**cfg, "mode": "compare", "debias": "none"}), client=self.eval_annotator.client)
        raise ConfigError("eval_win_rate: needs a `type: judge` evaluator (eval_annotator, else annotator): it compares two answers")

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
        """(scorer of held-out answers, its description, whether it is the training annotator).

        ``eval_annotator`` when given; else the training annotator (a compare-mode judge gets a
        score-mode twin sharing its loaded model); else none (offline dpo without one: held-out
        KL and length are still measured)."""
        from daralign.annotators.judge import JudgeAnnotator, JudgeConfig

        cfg = self._evaluator_config()
        if not self.eval_rows or cfg is None:
            return None, None, False
        same = self.cfg.eval_annotator is None or same_annotator(self.cfg.eval_annotator, self.cfg.annotator)
        name = describe_annotator(cfg)
        if self.cfg.eval_annotator is None and not (cfg.get("type") == "judge" and cfg.get("mode") == "compare"):
            return self.annotator, name, True
        if cfg.get("type") == "judge":
            cfg = {**cfg, "mode": "score"}  # held-out answers are scored; win rates use a compare twin
            train = self.cfg.annotator
            if isinstance(train, dict) and train.get("type") == "judge" and \
                    all(train.get(k) == cfg.get(k) for k in ("backend", "model", "dtype", "device", "base_url")):
                return JudgeAnnotator(JudgeConfig(**cfg), client=self.annotator.client), name, same  # one loaded model
        return build_annotator(cfg), name, same

    def _proxy_scorer(self):
        """The training annotator, in score mode, for ``proxy_score`` beside an independent
        evaluator's ``score`` (None when the evaluator is the training annotator, or when there is
        no training annotator, or it cannot score)."""
        from daralign.annotators.judge import JudgeAnnotator, JudgeConfig

        cfg = self.cfg.annotator
        if not (self.eval_rows and self.cfg.eval_proxy_score and isinstance(cfg, dict)) or self.evaluator_is_training:
            return None
        if cfg.get("type") == "judge":
            if cfg.get("mode") == "score":
                return self.annotator
            return JudgeAnnotator(JudgeConfig(**{**cfg, "mode": "score"}), client=self.annotator.client)  # one loaded model
        return self.annotator if type(self.annotator).score is not Annotator.score else None

    def heldout(self, tag: str, progress=None) -> dict | None:
        if not self.eval_rows:
            return None
        T = self.cfg.eval_temperature
        with self.accelerator.autocast():
            res = judge_heldout(self.unwrapped, self.tokenizer, self.eval_annotator, self.eval_rows,
                                max_new_tokens=self.cfg.max_completion_length, temperature=T,
                                seed=self.cfg.seed + 7919, batch_size=self.cfg.generation_batch_size,
                                ref_token_logps=lambda rollout: self.reference_token_logps(rollout, T),
                                proxy=self.proxy_scorer, progress=progress)
        res["evaluator"] = self.evaluator_name
        res["evaluator_is_training_annotator"] = self.evaluator_is_training
        if self.cfg.eval_win_rate:
            res["win_rate"] = self.win_rate()
        if self.accelerator.is_main_process:
            (self.out / f"heldout_{tag}.json").write_text(json.dumps(res, indent=1))
        return res
