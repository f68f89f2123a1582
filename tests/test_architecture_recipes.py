"""The four recipes of docs/architecture.md, each done the way the page says — a toy registered
through the public registry — and trained through the real loop on the tiny model."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml

import tiny
from daralign.annotators.clients import BACKENDS, Client, Reply, register_backend
from daralign.cli import main as daralign_main
from daralign.objectives.base import OBJECTIVES, Objective, register_objective
from daralign.rollout.base import ENGINES, RolloutEngine, register_engine
from daralign.rollout.hf import sample_rollout


def train(tmp: Path, policy: Path, prompts: Path, **over) -> list[dict]:
    cfg = tiny.run_config(tmp, policy, prompts, **over)
    out = tmp / "run"
    assert daralign_main(["train", "--config", str(cfg), "--output_dir", str(out)]) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- an objective, and a metric
@dataclass
class ToyConfig:
    toy_temperature: float = field(default=1.0, metadata={"help": "softmax temperature of the toy weights"})


@pytest.fixture
def toy_objective():
    @register_objective("toy-softmax-sft")
    class ToySoftmaxSFT(Objective):
        """SFT weighted by softmax(r / τ) within each prompt."""

        Config = ToyConfig
        feedback_kind = "score"
        needs_reference = False

        def prepare(self, rollout, feedback, ref_token_logps, model):
            rewards, valid = self.rewards_and_valid(rollout, feedback)
            w = torch.softmax(torch.where(valid, rewards, -torch.inf) / self.config.toy_temperature, dim=1)
            return {"w": w.reshape(-1)}, {"toy/weight_max": w.max().item()}  # a metric: returned, then logged

        def loss(self, policy_logps, batch):
            return -(batch["w"] * policy_logps).mean(), {}

    yield ToySoftmaxSFT
    OBJECTIVES.pop("toy-softmax-sft")


def test_recipe_add_an_objective_and_a_metric(toy_objective, tmp_path, tiny_policy_dir, tiny_prompts_file):
    m = train(tmp_path, tiny_policy_dir, tiny_prompts_file, algorithm="toy-softmax-sft", toy_temperature=0.5)
    assert [x["step"] for x in m] == [1, 2]
    assert all(0.5 <= x["toy/weight_max"] <= 1.0 for x in m)  # K = 2: the larger softmax weight
    assert m[0]["update/skipped"] == 0.0 and m[0]["loss"] != 0.0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["algorithm"] == "toy-softmax-sft" and saved["toy_temperature"] == 0.5  # its knob is a config key


# ---------------------------------------------------------------- a judge backend
@pytest.fixture
def echo_backend():
    @register_backend("toy-echo")
    class EchoClient(Client):
        """Answers P(Yes) = 0.9 for responses holding an 'e', else 0.2 — for the requests it may send."""

        def __init__(self) -> None:
            self.sent = 0

        @classmethod
        def from_config(cls, config) -> "EchoClient":
            return cls()

        def complete(self, requests, on_reply=None, reserve=lambda: True):
            replies = []
            for i, req in enumerate(requests):
                if not reserve():
                    replies.append(None)
                    continue
                self.sent += 1
                p = 0.9 if "e" in req.messages[-1][1].split("<response>")[-1] else 0.2
                replies.append(Reply(text="Yes", probs={"Yes": p, "No": 1 - p}, tokens=1))
                if on_reply:
                    on_reply(i, replies[-1])
            return replies

    yield EchoClient
    BACKENDS.pop("toy-echo")


def test_recipe_add_a_judge_backend(echo_backend, tmp_path, tiny_policy_dir, tiny_prompts_file):
    judge = {"type": "judge", "backend": "toy-echo", "model": "toy", "template": "tone"}
    m = train(tmp_path, tiny_policy_dir, tiny_prompts_file, annotator=judge, annotation_budget=6)
    assert m[-1]["annotation_requests"] == 6 and m[-1]["annotations"] == 6  # the meter counted its requests
    assert all(0.2 - 1e-6 <= x["reward"] <= 0.9 + 1e-6 for x in m)


# ---------------------------------------------------------------- a rollout engine
@pytest.fixture
def toy_engine():
    @register_engine("toy-counting-hf")
    class CountingHF(RolloutEngine):
        """HF sampling (π_t recorded while sampling) that counts the weight syncs it is asked for."""

        gives_behaviour_logps = True
        syncs = 0

        def __init__(self, settings, tokenizer) -> None:
            self.s, self.tokenizer = settings, tokenizer

        @classmethod
        def from_config(cls, train, settings, tokenizer, device):
            return cls(settings, tokenizer)

        def sample(self, model, rows, step):
            return sample_rollout(model, self.tokenizer, rows, num_generations=self.s.num_generations,
                                  max_completion_length=self.s.max_completion_length, temperature=self.s.temperature)

        def sync_weights(self, model):
            type(self).syncs += 1

    yield CountingHF
    ENGINES.pop("toy-counting-hf")


def test_recipe_add_a_rollout_engine(toy_engine, tmp_path, tiny_policy_dir, tiny_prompts_file):
    m = train(tmp_path, tiny_policy_dir, tiny_prompts_file, rollout_engine="toy-counting-hf")
    assert [x["step"] for x in m] == [1, 2] and all("kl" in x for x in m)
    assert toy_engine.syncs >= 1 + sum(x["update/skipped"] == 0.0 for x in m)  # at start, after each update


def test_an_unknown_engine_is_one_line(tmp_path, tiny_policy_dir, tiny_prompts_file, capsys):
    cfg = tiny.run_config(tmp_path, tiny_policy_dir, tiny_prompts_file, rollout_engine="nope")
    assert daralign_main(["train", "--config", str(cfg), "--output_dir", str(tmp_path / "run")]) == 1
    assert "rollout engine 'nope' is not registered" in capsys.readouterr().err
