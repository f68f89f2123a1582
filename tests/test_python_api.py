"""The Python API (``daralign.Trainer``, ``daralign.TrainConfig``, ``daralign.as_reward_func``) on the
tiny model: the same code path as the CLI (a Python run's config.yaml re-runs from the command
line to the same numbers), loaded models, callables (sync, async with a timeout, several with
weights), callbacks that stop a run, one-line errors, and a daralign judge inside TRL's
``GRPOTrainer`` against a real loopback judge server."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
import yaml
from conftest import chat_reply, http_judge

import daralign
import tiny
from daralign.cli import main as daralign_main
from daralign.core.errors import AnnotationError, ConfigError, DataError

ROWS = [{"prompt": p, "target": i} for i, p in enumerate(tiny.PROMPTS)]


def small(tmp_path, **over) -> daralign.TrainConfig:
    return daralign.TrainConfig(**{"num_generations": 2, "per_device_train_batch_size": 2, "max_completion_length": 4,
                                   "max_steps": 2, "learning_rate": 1e-3, "seed": 7, "report": False,
                                   "output_dir": str(tmp_path / "run"), **over})


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_python_run_is_the_cli_run(tmp_path, tiny_policy_dir):
    trainer = daralign.Trainer(model=str(tiny_policy_dir), reward_funcs=tiny.length_reward, args=small(tmp_path),
                               train_dataset=ROWS)
    result = trainer.train()
    run = tmp_path / "run"
    assert result["annotation_requests"] == 2 * 2 * 2 and trainer.state.global_step == 2
    assert trainer.state.metrics["step"] == 2 and "reward" in trainer.state.metrics
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["annotator"]["function"] == "tiny:length_reward"  # importable: the CLI can run it
    assert saved["dataset"] == str(run / "train_dataset.jsonl") and (run / "train_dataset.jsonl").is_file()
    assert daralign_main(["train", "--config", str(run / "config.yaml"), "--output_dir", str(tmp_path / "cli")]) == 0
    py, cli = metrics(run), metrics(tmp_path / "cli")
    assert [m["loss"] for m in py] == pytest.approx([m["loss"] for m in cli], rel=1e-6)
    assert [m["reward"] for m in py] == pytest.approx([m["reward"] for m in cli], rel=1e-6)
    assert py[0]["rewards/length_reward/mean"] == pytest.approx(py[0]["reward"])  # TRL's per-function name


def test_a_loaded_model_its_tokenizer_a_lambda_and_a_stopping_callback(tmp_path, tiny_policy, capsys):
    from transformers import TrainerCallback

    model, tok = tiny_policy
    import copy

    model = copy.deepcopy(model)  # the session fixture is shared: train a copy
    seen = []

    class StopAfterOne(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append((state.global_step, logs["reward"]))

        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = True

    trainer = daralign.Trainer(model=model, processing_class=tok, reward_funcs=lambda prompts, completions, **kw: [
        float(len(c)) for c in completions], args=small(tmp_path, max_steps=5), train_dataset=ROWS,
        callbacks=[StopAfterOne()])
    trainer.train()
    assert [s for s, _ in seen] == [1] and trainer.state.global_step == 1
    assert len(metrics(tmp_path / "run")) == 1 and (tmp_path / "run" / "final" / "model.safetensors").is_file()
    out = capsys.readouterr().err
    assert "stopped by a callback after step 1" in out and "python:<lambda>" in out  # said, in one line each


def test_async_rewards_run_concurrently_and_time_out(tmp_path, tiny_policy_dir):
    both = threading.Barrier(2, timeout=20)  # passes only if the two functions are awaited at once

    async def first(prompts, completions, **kw):
        await asyncio.get_running_loop().run_in_executor(None, both.wait)
        return [1.0] * len(completions)

    async def second(prompts, completions, target=None, **kw):
        await asyncio.get_running_loop().run_in_executor(None, both.wait)
        return [None if t == 0 else float(t) for t in target]  # None: not applicable to this row

    trainer = daralign.Trainer(model=str(tiny_policy_dir), reward_funcs=[first, second], reward_weights=[1.0, 0.5],
                               args=small(tmp_path, max_steps=1), train_dataset=ROWS)
    trainer.train()
    m = metrics(tmp_path / "run")[0]
    assert m["rewards/first/mean"] == 1.0 and m["rewards/first/timeouts"] == 0.0 and "rewards/second/std" in m
    assert m["annotator/invalid_frac"] == 0.0  # TRL's rule: a None leaves that function out of the sum

    async def hangs(prompts, completions, **kw):
        await asyncio.sleep(30)
        return [1.0] * len(completions)

    trainer = daralign.Trainer(model=str(tiny_policy_dir), reward_funcs=hangs, reward_timeout_s=0.2,
                               args=small(tmp_path, max_steps=1, output_dir=str(tmp_path / "hang")), train_dataset=ROWS)
    trainer.train()
    m = metrics(tmp_path / "hang")[0]
    assert m["rewards/hangs/timeouts"] == 1.0 and m["annotator/invalid_frac"] == 1.0 and m["update/skipped"] == 1.0


def wrong_count(prompts, completions, **kw):
    return [1.0]


def not_finite(prompts, completions, **kw):
    return [float("inf")] * len(completions)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(reward_funcs=wrong_count), AnnotationError, "reward function test_python_api:wrong_count returned 1 scores for 4"),
    (dict(reward_funcs=not_finite), AnnotationError, "score 0 is inf"),
    (dict(train_dataset=[{"question": "hi"}]), DataError, "train_dataset: no 'prompt' column (columns: question)"),
    (dict(train_dataset=42), DataError, "train_dataset: expected a datasets.Dataset, a list of dicts or a path, got int"),
    (dict(model="LOADED"), ConfigError, "model: a loaded model needs its tokenizer as processing_class="),
    (dict(reward_funcs=[tiny.length_reward], reward_weights=[1.0, 2.0]), ConfigError, "reward_weights: 2 weights for 1"),
    (dict(args=daralign.TrainConfig(learning_rat=1.0)), ConfigError, "unknown config key(s) ['learning_rat']"),
])
def test_bad_input_is_one_line_naming_the_argument(kwargs, error, message, tmp_path, tiny_policy_dir, tiny_policy):
    given = {"model": str(tiny_policy_dir), "reward_funcs": tiny.length_reward, "args": small(tmp_path),
             "train_dataset": ROWS, **kwargs}
    if given["model"] == "LOADED":
        given["model"] = tiny_policy[0]
    with pytest.raises(error) as e:
        daralign.Trainer(**given).train()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_as_reward_func_is_a_trl_reward_function(judge_http):
    judge_http.handler = lambda path, body, n: (200, chat_reply("Yes" if "!" in body["messages"][-1]["content"]
                                                                else "No"), {})
    fn = daralign.as_reward_func(http_judge(judge_http))
    assert fn.__name__ == "judge_tone"
    conversational = [[{"role": "user", "content": "hi"}]] * 2
    scores = fn(prompts=conversational, completions=[[{"role": "assistant", "content": "Great!"}],
                                                     [{"role": "assistant", "content": "ok"}]], completion_ids=[[1], [2]])
    assert scores == [1.0, 0.0] and fn.annotator.num_requests == 2
    assert fn(prompts=["hi"], completions=["Wow!"], target=[3]) == [1.0]


@pytest.mark.slow  # importing TRL's trainers imports vLLM where it is installed (~6 s)
def test_trl_grpo_trains_on_a_daralign_judge(tmp_path, tiny_policy_dir, judge_http):
    """TRL's own GRPOTrainer, two steps on the tiny model, rewarded by a daralign judge served on
    127.0.0.1: TRL logs it under the function's name, and the server saw every request counted."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    judge_http.handler = lambda path, body, n: (200, chat_reply("Yes" if "e" in body["messages"][-1]["content"]
                                                                .split("<response>")[-1] else "No"), {})
    fn = daralign.as_reward_func(http_judge(judge_http))
    args = trl.GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, num_generations=2,
                          max_completion_length=4, max_steps=2, learning_rate=1e-3, logging_steps=1, report_to=[],
                          use_cpu=True, save_strategy="no", seed=0)
    trainer = trl.GRPOTrainer(model=str(tiny_policy_dir), reward_funcs=[fn], args=args,
                              train_dataset=Dataset.from_list([{"prompt": p} for p in tiny.PROMPTS if isinstance(p, str)]))
    trainer.train()
    logged = [h for h in trainer.state.log_history if "rewards/judge_tone/mean" in h]
    assert len(logged) == 2
    assert fn.annotator.num_requests == len(judge_http.requests) == 2 * 4  # 4 completions a step


def test_final_has_a_model_card_and_push_to_hub_says_it_cannot_reach_the_hub(tmp_path, tiny_policy_dir, capsys,
                                                                             monkeypatch):
    heldout = [{"prompt": p} for p in tiny.PROMPTS[:2]]
    trainer = daralign.Trainer(model=str(tiny_policy_dir), reward_funcs=tiny.length_reward, args=small(tmp_path),
                               train_dataset=ROWS, eval_dataset=heldout)
    trainer.train()
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == str(tiny_policy_dir) and "dar" in meta["tags"] and meta["library_name"] == "transformers"
    for text in ("Direct Advantage Regression", "tiny:length_reward", "## Held-out results", "KL(π‖π_ref)",
                 "not an independent yardstick", "Annotator requests: 8 for training", "## Provenance", "`learning_rate`"):
        assert text in card, text
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no Hub from here (and never from CI): the failure path, for real
    assert trainer.push_to_hub("someone/tiny-dar") is None
    err = " ".join(capsys.readouterr().err.split())
    assert "push_to_hub: could not upload" in err and "the files stay where they are" in err
    assert (tmp_path / "run" / "final" / "README.md").is_file()
