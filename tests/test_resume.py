"""Exact resume, for real: `python -m daralign.cli train ...` is SIGKILLed mid-run, the same command
plus `--resume` continues it, and the result must EQUAL an uninterrupted run with the same seed:
metrics.jsonl line for line (timing keys excepted) and every tensor of final/model.safetensors.

The killed run gets a slow reward function (env DARALIGN_TEST_REWARD_DELAY, same rewards) so the
kill surely lands inside a step. 6 prompts at 2 per step: the 4 steps cross an epoch boundary of
the prompt schedule, so the data position is exercised too.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import tiny
from daralign.cli import main as daralign_main

REPO = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, policy_dir: Path, prompts: Path) -> Path:
    cfg = {
        "model_name_or_path": str(policy_dir), "dataset": str(prompts),
        "annotator": {"type": "function", "function": f"{tiny.TINY_PY}:length_reward"},
        "num_generations": 2, "per_device_train_batch_size": 2, "max_completion_length": 8,
        "max_steps": 4, "learning_rate": 1e-3, "temperature": 1.0, "seed": 7, "report": False,
        "lr_scheduler_type": "linear", "warmup_steps": 1,  # scheduler state matters on resume
        # held-out sampling every 2 steps must not disturb the training RNG stream
        "eval_dataset": str(prompts), "eval_steps": 2, "eval_max_prompts": 2,
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if not k.startswith(("timing/", "async/wait_")) and k != "step_time"} for r in rows]


def _assert_same_run(a: Path, b: Path) -> None:
    ma, mb = _metrics(a), _metrics(b)
    assert [m["step"] for m in ma] == [1, 2, 3, 4]
    assert ma == mb
    assert all("eval/score" in m for m in ma if m["step"] == 2)
    assert json.loads((a / "heldout_after.json").read_text()) == json.loads((b / "heldout_after.json").read_text())
    ta, tb = load_file(str(a / "final" / "model.safetensors")), load_file(str(b / "final" / "model.safetensors"))
    assert ta.keys() == tb.keys() and ta
    for k in ta:
        assert (ta[k] == tb[k]).all(), f"final tensor {k} differs after resume"


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _launch_and_kill(args: list[str], out: Path, ready, timeout: float = 240.0) -> None:
    """Start the CLI in a subprocess, SIGKILL it as soon as ``ready()`` holds (polled)."""
    env = {**os.environ, "DARALIGN_TEST_REWARD_DELAY": "0.5", "PYTHONUNBUFFERED": "1"}
    log = open(out.parent / f"{out.name}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "daralign.cli", "train", *args], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert proc.poll() is None, f"run ended (rc {proc.returncode}) before the kill point:\n" + \
                (out.parent / f"{out.name}.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "timed out waiting for the kill point"
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert not (out / "final").exists()


@pytest.mark.slow  # kills a training subprocess
@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_kill9_then_resume_equals_straight_run(tmp_path, tiny_policy_dir, tiny_prompts_file, peft):
    cfg = _config(tmp_path, tiny_policy_dir, tiny_prompts_file)
    extra = ["--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8"] if peft else []
    straight, killed = tmp_path / "straight", tmp_path / "killed"

    assert daralign_main(["train", "--config", str(cfg), "--output_dir", str(straight), "--save_steps", "1", *extra]) == 0

    if not peft:
        # save every step; kill as soon as checkpoint-2 is complete (i.e. during step 3)
        args = ["--config", str(cfg), "--output_dir", str(killed), "--save_steps", "1", *extra]
        _launch_and_kill(args, killed, lambda: (killed / "checkpoint-2" / "trainer_state.json").is_file())
    else:
        # save every 2 steps; kill after step 3 was logged: its metrics line is past the newest
        # checkpoint and must be dropped and recomputed. Also leave a torn last line, as a kill
        # in the middle of a write would.
        args = ["--config", str(cfg), "--output_dir", str(killed), "--save_steps", "2", *extra]
        _launch_and_kill(args, killed, lambda: _lines(killed / "metrics.jsonl") >= 3
                         and (killed / "checkpoint-2" / "trainer_state.json").is_file())
        assert not (killed / "checkpoint-3").exists()
        with open(killed / "metrics.jsonl", "a") as f:
            f.write('{"step": 4, "annotations": 1')

    assert daralign_main(["train", *args, "--resume"]) == 0
    _assert_same_run(straight, killed)
    if peft:  # merged LoRA: a plain causal-LM folder, no adapter files
        assert not (killed / "final" / "adapter_config.json").exists()


def test_resume_without_checkpoint_starts_fresh(tmp_path, tiny_policy_dir, tiny_prompts_file, capsys):
    cfg = _config(tmp_path, tiny_policy_dir, tiny_prompts_file)
    out = tmp_path / "fresh"
    assert daralign_main(["train", "--config", str(cfg), "--output_dir", str(out), "--max_steps", "1", "--resume"]) == 0
    assert "no checkpoint" in capsys.readouterr().err
    assert [m["step"] for m in _metrics(out)] == [1]


def test_save_strategy_no_writes_final_only_and_trains_the_same(tmp_path, tiny_policy_dir, tiny_prompts_file, capsys):
    """`save_strategy: no` (TRL's spelling) skips every checkpoint, final/ is the same model; a
    --resume of such a run finds nothing to continue and says so; an unknown value is one line."""
    cfg = _config(tmp_path, tiny_policy_dir, tiny_prompts_file)
    runs = {}
    for strategy in ("steps", "no"):
        out = runs[strategy] = tmp_path / strategy
        assert daralign_main(["train", "--config", str(cfg), "--output_dir", str(out), "--max_steps", "2",
                              "--save_steps", "1", "--save_strategy", strategy]) == 0
    assert sorted(p.name for p in runs["steps"].glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not list(runs["no"].glob("checkpoint-*"))
    assert _metrics(runs["no"]) == _metrics(runs["steps"])
    a, b = (load_file(str(runs[s] / "final" / "model.safetensors")) for s in ("steps", "no"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert daralign_main(["train", "--config", str(cfg), "--output_dir", str(tmp_path / "bad"), "--save_strategy", "epoch"]) == 1
    assert "save_strategy: 'epoch' is not one of steps, no" in capsys.readouterr().err


def test_resume_after_last_checkpoint_only_writes_final(tmp_path, tiny_policy_dir, tiny_prompts_file):
    """Killed after the last step's checkpoint but before final/: resume trains nothing more."""
    cfg = _config(tmp_path, tiny_policy_dir, tiny_prompts_file)
    out = tmp_path / "run"
    args = ["train", "--config", str(cfg), "--output_dir", str(out), "--max_steps", "2", "--save_steps", "1"]
    assert daralign_main(args) == 0
    before = load_file(str(out / "final" / "model.safetensors"))
    lines = (out / "metrics.jsonl").read_text()
    import shutil

    shutil.rmtree(out / "final")
    (out / ".final.tmp").mkdir()  # a half-written final folder from the killed run
    assert daralign_main(args + ["--resume"]) == 0
    assert (out / "metrics.jsonl").read_text() == lines
    assert not (out / ".final.tmp").exists()
    after = load_file(str(out / "final" / "model.safetensors"))
    assert all((before[k] == after[k]).all() for k in before)


def test_fresh_run_in_a_used_output_dir_drops_the_old_runs_state(tmp_path, tiny_policy_dir, tiny_prompts_file, capsys):
    """Without --resume, an earlier run's checkpoints and held-out scores in output_dir must not
    leak into the new run: a later --resume would otherwise continue the OLD run's checkpoint-3.
    Replacing it takes --overwrite_output_dir; until the new run finishes the old one is kept aside."""
    cfg = _config(tmp_path, tiny_policy_dir, tiny_prompts_file)
    out = tmp_path / "run"
    base = ["train", "--config", str(cfg), "--output_dir", str(out), "--save_steps", "1", "--save_total_limit", "5"]
    assert daralign_main(base + ["--max_steps", "3", "--seed", "1"]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    old_before = (out / "heldout_before.json").read_text()
    capsys.readouterr()
    assert daralign_main(base + ["--max_steps", "1", "--seed", "2"]) == 1  # refused, nothing touched
    assert "holds an earlier daralign run" in capsys.readouterr().err and (out / "checkpoint-3").is_dir()
    assert daralign_main(base + ["--max_steps", "1", "--seed", "2", "--overwrite_output_dir", "true"]) == 0
    assert "moved to" in capsys.readouterr().err and not (out / ".replaced").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert (out / "heldout_before.json").read_text() != old_before  # judged again for this run
    assert [m["step"] for m in _metrics(out)] == [1]
    # continuing the new run resumes from ITS checkpoint-1
    assert daralign_main(base + ["--max_steps", "2", "--seed", "2", "--resume"]) == 0
    assert re.search(r"checkpoint-1\s*\(step 1,", capsys.readouterr().err)
    assert [m["step"] for m in _metrics(out)] == [1, 2]


def test_fresh_run_keeps_a_heldout_before_placed_in_an_unused_folder(tmp_path, tiny_policy_dir, tiny_prompts_file):
    """`daralign compare` seeds a new run folder with the cached pre-training held-out score."""
    cfg = _config(tmp_path, tiny_policy_dir, tiny_prompts_file)
    out = tmp_path / "seeded"
    out.mkdir()
    seeded = {"score": 0.123, "per_prompt": [0.1, 0.146], "mean_length": 3.0, "eos_frac": 1.0, "completions": ["a", "b"]}
    (out / "heldout_before.json").write_text(json.dumps(seeded))
    assert daralign_main(["train", "--config", str(cfg), "--output_dir", str(out), "--max_steps", "1"]) == 0
    assert json.loads((out / "heldout_before.json").read_text()) == seeded
