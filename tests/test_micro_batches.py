"""Micro-batches sized by tokens (``max_micro_batch_tokens``) train the same model as micro-batches
sized by prompts: they only change how the online batch is cut for the forward passes."""

from __future__ import annotations

import json

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
        return OnlineTrainer.rows_per_micro_batch(SimpleNamespace(cfg=SimpleNamespace(**cfg)), rollout)
    assert rows(max_micro_batch_tokens=0, per_device_train_batch_size=8) == 32
    assert rows(max_micro_batch_tokens=1000, per_device_train_batch_size=8) == 8  # 2 groups of 4 × 100 tokens
    assert rows(max_micro_batch_tokens=10, per_device_train_batch_size=8) == 4  # never less than one group
