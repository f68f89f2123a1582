"""The recipes of docs/architecture.md, followed exactly as the page says on a copy of the package:
a new objective, annotator kind, judge backend and rollout engine are each one new file plus one registration line
(its import in its package's ``__init__.py``), and a new metric is one row in docs/metrics.md —
nothing else edited, which the test checks line by line. The copy then runs them in a fresh
process through the real loop and ``daralign compare``; its help text, metrics (against the
glossary), model card and annotation budget are checked here."""

from __future__ import annotations

import difflib
import filecmp
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import undocumented_metrics

import tiny

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]

OBJECTIVE = '''
"""SFT weighted by softmax(r / τ) within each prompt: the architecture recipe's objective."""

from dataclasses import dataclass, field

import torch

from daralign.objectives.base import Objective, register_objective


@dataclass
class ToyConfig:
    toy_temperature: float = field(default=1.0, metadata={"help": "softmax temperature of the toy weights"})


@register_objective("toy-softmax-sft")
class ToySoftmaxSFT(Objective):
    Config = ToyConfig
    feedback_kind = "score"
    paper = "Softmax-weighted SFT (the recipe's toy, arXiv 0000.00000)"
    needs_reference = False

    def prepare(self, rollout, feedback, ref_token_logps, model):
        rewards, valid = self.rewards_and_valid(rollout, feedback)
        w = torch.softmax(torch.where(valid, rewards, -torch.inf) / self.config.toy_temperature, dim=1)
        return {"w": w.reshape(-1)}, {"toy/weight_max": w.max().item()}  # the new metric

    def loss(self, policy_logps, batch):
        return -(batch["w"] * policy_logps).mean(), {}
'''

BACKEND = '''
"""A chat-only judge backend that answers with text: 9 for a response holding its letter, else 2."""

from dataclasses import dataclass, field

from daralign.annotators.backends import register_backend
from daralign.annotators.clients import Client, Reply


@register_backend("toy-echo")
class EchoClient(Client):
    @dataclass
    class Config:
        echo_letter: str = field(default="e", metadata={"help": "the letter that earns a response a 9"})

    supports_logprobs = False  # text answers only

    @classmethod
    def supports_prefix(cls, config) -> bool:
        return False  # a chat endpoint: no assistant prefix to continue

    def __init__(self, letter: str) -> None:
        self.letter = letter

    @classmethod
    def from_config(cls, config):
        return cls(config.echo_letter)

    def complete(self, requests, on_reply=None, reserve=lambda: True):
        replies = []
        for i, req in enumerate(requests):
            if not reserve():
                replies.append(None)
                continue
            response = req.messages[-1][1].split("<response>")[-1]
            replies.append(Reply(text="9" if self.letter in response else "2", probs=None, tokens=1))
            if on_reply:
                on_reply(i, replies[-1])
        return replies
'''

ENGINE = '''
"""HF sampling (π_t recorded while sampling) that notes each weight sync it is asked for in a file."""

from dataclasses import dataclass, field
from pathlib import Path

from daralign.rollout.base import RolloutEngine, register_engine
from daralign.rollout.hf import sample_rollout


@dataclass
class CountingConfig:
    toy_sync_log: str = field(default="syncs.log", metadata={"help": "file the toy engine notes each weight sync in"})


@register_engine("toy-counting-hf")
class CountingHF(RolloutEngine):
    Config = CountingConfig
    gives_behaviour_logps = True

    def __init__(self, config, settings, tokenizer) -> None:
        self.config, self.s, self.tokenizer = config, settings, tokenizer

    @classmethod
    def from_config(cls, config, settings, tokenizer, device):
        return cls(config, settings, tokenizer)

    def sample(self, model, rows, step):
        return sample_rollout(model, self.tokenizer, rows, num_generations=self.s.num_generations,
                              max_completion_length=self.s.max_completion_length, temperature=self.s.temperature)

    def sync_weights(self, model):
        with open(self.config.toy_sync_log, "a") as f:
            f.write("sync\\n")
'''

ANNOTATOR = '''
"""A reward for the share of vowels in a response: the recipe's annotator kind."""

from daralign.annotators.base import Annotator, ScoreResult, register_annotator


@register_annotator("toy-vowels")
class VowelShare(Annotator):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    @classmethod
    def from_config(cls, cfg):
        return cls(float(cfg.get("scale", 1.0)))

    @classmethod
    def describe(cls, cfg):
        return f"toy vowel share x{cfg.get('scale', 1.0)}"

    def _score(self, prompts, completions, rows):
        return ScoreResult([self.scale * sum(c in "aeiou" for c in text) / max(len(text), 1) for text in completions])
'''

PLUGINS = [("objectives", "toy_softmax_sft", OBJECTIVE), ("annotators", "toy_echo", BACKEND),
           ("annotators", "toy_vowels", ANNOTATOR), ("rollout", "toy_counting_hf", ENGINE)]
METRIC_ROW = "| `toy/weight_max` | toy-softmax-sft: the largest softmax weight in the batch | fraction | — |\n"

# What the fresh process runs: the help text, a training run, then `compare` on the same config.
CHILD = '''
import contextlib, io, json, sys
from daralign.cli import main

help_text = io.StringIO()
with contextlib.redirect_stdout(help_text), contextlib.suppress(SystemExit):
    main(["train", "--algorithm", "toy-softmax-sft", "--help"])
cfg, out = sys.argv[1], sys.argv[2]
trained = main(["train", "--config", cfg, "--output_dir", out + "/run"])
compared = main(["compare", "--config", cfg, "--algorithms", "toy-softmax-sft,dar", "--seeds", "1",
                 "--annotation_budget", "8", "--output_dir", out + "/compare"])
json.dump({"help": help_text.getvalue(), "trained": trained, "compared": compared}, open(out + "/child.json", "w"))
'''


def follow_the_recipes(copy: Path) -> None:
    """What the page tells a contributor to do, and nothing more."""
    shutil.copytree(REPO / "src" / "daralign", copy / "src" / "daralign", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "docs", copy / "docs", ignore=shutil.ignore_patterns("img"))
    for room, module, source in PLUGINS:
        package = copy / "src" / "daralign" / room
        (package / f"{module}.py").write_text(textwrap.dedent(source).lstrip())
        with open(package / "__init__.py", "a") as f:
            f.write(f"from daralign.{room} import {module}  # noqa: E402, F401  (register)\n")
    glossary = copy / "docs" / "metrics.md"
    glossary.write_text(glossary.read_text() + METRIC_ROW)


def edits(copy: Path) -> dict[str, list[str]]:
    """Every file of the copy that differs from the repository: its added and removed lines."""
    out = {}
    for root in ("src/daralign", "docs"):
        for path in sorted((copy / root).rglob("*")):
            if not path.is_file() or "__pycache__" in path.parts:
                continue
            original = REPO / path.relative_to(copy)
            if original.is_file() and filecmp.cmp(path, original, shallow=False):
                continue
            old = original.read_text().splitlines() if original.is_file() else []
            out[str(path.relative_to(copy))] = [line for line in difflib.unified_diff(old, path.read_text().splitlines(), lineterm="", n=0)
                                                if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    return out


def test_each_recipe_is_one_file_and_one_registration_line(tmp_path, tiny_policy_dir, tiny_prompts_file):
    copy = tmp_path / "copy"
    follow_the_recipes(copy)
    changed = edits(copy)
    for room, module, _ in PLUGINS:
        assert len(changed.pop(f"src/daralign/{room}/{module}.py")) > 10  # the new file
    for room in {room for room, _, _ in PLUGINS}:
        assert changed.pop(f"src/daralign/{room}/__init__.py") == [f"+from daralign.{room} import {module}  # noqa: E402, F401  (register)"
                                                                   for r, module, _ in PLUGINS if r == room]
    assert changed.pop("docs/metrics.md") == ["+" + METRIC_ROW.rstrip("\n")]
    assert changed == {}  # nothing else edited

    heldout = tiny.write_jsonl(tmp_path / "heldout.jsonl", [{"prompt": p} for p in tiny.PROMPTS[:2]])
    judge = {"type": "judge", "backend": "toy-echo", "echo_letter": "e", "model": "toy", "template": "tone", "scale": "1-10"}
    cfg = tiny.run_config(tmp_path, tiny_policy_dir, tiny_prompts_file, algorithm="toy-softmax-sft", toy_temperature=0.5,
                          annotator=judge, annotation_budget=12, max_steps=5, rollout_engine="toy-counting-hf",
                          toy_sync_log=str(tmp_path / "syncs.log"), eval_dataset=str(heldout), eval_max_prompts=2,
                          eval_annotator={"type": "toy-vowels", "scale": 2.0})
    env = {**os.environ, "PYTHONPATH": str(copy / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(cfg), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    child = json.loads((tmp_path / "child.json").read_text())
    assert child["trained"] == 0 and child["compared"] == 0, proc.stderr[-3000:]

    # help: the objective's knob and the engine's setting are flags with their help; both are listed
    flat = " ".join(child["help"].split())
    for text in ("--toy_temperature", "softmax temperature of the toy weights", "--toy_sync_log",
                 "file the toy engine notes each weight sync in", "toy-softmax-sft", "toy-counting-hf"):
        assert text in flat, text

    # the loop: the metric is logged and documented; the chat-only backend costs one request a label
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(0.5 <= r["toy/weight_max"] <= 1.0 for r in rows)  # K = 2: the larger softmax weight
    assert not undocumented_metrics(rows, glossary=copy / "docs" / "metrics.md")
    assert undocumented_metrics(rows) == {"toy/weight_max"}  # the row the recipe adds is what documents it
    assert [r["num_prompts"] for r in rows] == [2.0] * 3  # 12 requests: 3 whole steps of 2 prompts × K=2 × 1
    assert rows[-1]["annotation_requests"] == 12 and rows[-1]["annotations"] == 12
    syncs = (tmp_path / "syncs.log").read_text().count("sync")
    assert syncs >= 1 + sum(r["update/skipped"] == 0.0 for r in rows)  # at the start, then after each update

    # the model card cites the method's paper and lists its knob
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    assert "Scored by toy vowel share x2.0." in card  # the annotator kind describes itself
    held_out = json.loads((tmp_path / "run" / "heldout_after.json").read_text())
    assert 0 <= held_out["score"] <= 2.0
    assert "Softmax-weighted SFT (the recipe's toy, arXiv 0000.00000)" in card and "| `toy_temperature` | 0.5 |" in card
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["toy_sync_log"] == str(tmp_path / "syncs.log")

    # compare: the new method runs beside DAR on the same budget
    summary = json.loads((tmp_path / "compare" / "summary.json").read_text())
    assert sorted(g["group"] for g in summary["groups"]) == ["dar", "toy-softmax-sft"]
    assert [r["annotation_requests"] for r in summary["runs"]] == [8, 8]
