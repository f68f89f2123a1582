"""Micro-batches sized by tokens (``max_micro_batch_tokens``) train the same model as micro-batches
sized by prompts: they only change how the online batch is cut for the forward passes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tiny
from daralign.train.args import parse_train_args
from daralign.train.command import run


def train(tmp, policy, prompts, name, **over):
    cfg = tiny.run_config(tmp, policy, prompts, per_device_train_batch_size=4, num_generations=2, **over)
    out = tmp / name
    run(*parse_train_args(["--config", str(cfg), "--output_dir", str(out)]))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, load_file(str(out / "final" / "model.safetensors"))


def test_token_sized_micro_batches_train_the_same_model(tmp_path, tiny_policy_dir, tiny_prompts_file):
    rows_a, weights_a = train(tmp_path, tiny_policy_dir, tiny_prompts_file, "by_prompts")
    # 4 prompts × K=2 of ~20 padded tokens: 50 tokens holds one group, so 4 micro-batches instead of 1
    rows_b, weights_b = train(tmp_path, tiny_policy_dir, tiny_prompts_file, "by_tokens", max_micro_batch_tokens=50)
    for a, b in zip(rows_a, rows_b):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6) and a["kl"] == pytest.approx(b["kl"], abs=1e-5)
    for name, w in weights_a.items():
        torch.testing.assert_close(w, weights_b[name], rtol=1e-3, atol=1e-5)  # only the summation order differs


def test_micro_batch_tokens_is_validated(tmp_path, tiny_policy_dir, tiny_prompts_file):
    from daralign.core.errors import ConfigError

    cfg = tiny.run_config(tmp_path, tiny_policy_dir, tiny_prompts_file, max_micro_batch_tokens=-5)
    with pytest.raises(ConfigError, match="max_micro_batch_tokens"):
        parse_train_args(["--config", str(cfg)])


def test_rows_per_micro_batch():
    from types import SimpleNamespace

    from daralign.train.loop import OnlineTrainer

    rollout = SimpleNamespace(num_generations=4, input_ids=torch.zeros(32, 100))
    def rows(**cfg):
        return OnlineTrainer.rows_per_micro_batch(SimpleNamespace(cfg=SimpleNamespace(**cfg), world=1), rollout)
    assert rows(max_micro_batch_tokens=0, per_device_train_batch_size=8) == 32
    assert rows(max_micro_batch_tokens=1000, per_device_train_batch_size=8) == 8  # 2 groups of 4 × 100 tokens
    assert rows(max_micro_batch_tokens=10, per_device_train_batch_size=8) == 4  # never less than one group


@pytest.mark.slow
def test_processes_run_the_same_micro_batches_whatever_their_prompt_lengths(tmp_path, tiny_policy_dir):
    """Two processes (torchrun + gloo), each padding to its own longest prompt: with token-sized
    micro-batches every process still runs as many forwards as the others in every step — under
    FSDP2 / ZeRO-3 each forward all-gathers, so one forward more on one process is a hang."""
    import os
    import subprocess
    import sys

    short, long = "Hi.", " ".join(["Tell me a long story about the sea and the ships on it."] * 4)
    prompts = tiny.write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in (short, "Yo.", long, long + " Now.")])
    cfg = tiny.run_config(tmp_path, tiny_policy_dir, prompts, per_device_train_batch_size=2, num_generations=2,
                          max_steps=4, max_micro_batch_tokens=120, output_dir=str(tmp_path / "run"))
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    worker = Path(__file__).resolve().parent / "micro_batch_worker.py"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(worker), str(cfg),
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 4
    unequal = [a["step"] for a, b in zip(*ranks) if a["padded_length"] != b["padded_length"]]
    assert unequal, "the seed gave no step where the processes' prompts differ in length: the test tests nothing"
    for a, b in zip(*ranks):
        assert (a["update_forwards"], a["reference_micro_batches"]) == (b["update_forwards"], b["reference_micro_batches"])
    assert max(r["update_forwards"] for r in ranks[0]) > 1  # the token cap did cut the batch
