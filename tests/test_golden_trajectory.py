"""Golden trajectories (the idea of TRL's ``tests/invariant/``): three steps of each method on the
tiny model, every per-step number that says what the update did — loss, reward, KL, and each
method's own metrics — compared with the values recorded in ``tests/data/golden/``.

A refactor that moves code keeps these green *without re-recording*. Re-record only when a change
is meant to alter training (say why in the commit), with::

    DARALIGN_RECORD_GOLDEN=1 python -m pytest tests/test_golden_trajectory.py

Score methods learn from a reward function; online DPO from a real judge server on 127.0.0.1
(a deterministic keyword judge); offline DPO from a pairs file.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import yaml
from conftest import chat_reply, http_judge

import tiny
from daralign.cli import main as daralign_main

GOLDEN = Path(__file__).resolve().parent / "data" / "golden"
METHODS = ["dar", "rloo", "grpo", "ppo", "online-dpo", "dpo"]
# wall-clock and bookkeeping numbers, not behaviour
VOLATILE = ("timing/", "step_time", "time", "judge/latency_s")
# fp32 on two CPU makes: recorded on an AMD EPYC, an Intel Xeon (AMX) differs by ~1e-7 in a log-prob,
# grown to 1.5e-4 of RLOO's step-3 KL by three steps at lr 1e-3; a change to what an update does moves
# these numbers by far more
RTOL, ATOL = 1e-3, 1e-6


def longer_judge(path, body, n):
    """A deterministic judge server handler: prefers the longer response (ties: "A")."""
    text = body["messages"][-1]["content"]
    a, b = (re.search(rf"<{t}>\n(.*?)\n</{t}>", text, re.S).group(1) for t in ("response_a", "response_b"))
    return 200, chat_reply("A" if len(a) >= len(b) else "B"), {}


def _config(algorithm: str, tmp: Path, policy: Path, prompts: Path, judge_http) -> dict:
    cfg = {"algorithm": algorithm, "model_name_or_path": str(policy), "dataset": str(prompts), "num_generations": 4,
           "per_device_train_batch_size": 2, "max_completion_length": 6, "max_steps": 3, "learning_rate": 1e-3,
           "seed": 11, "report": False, "log_completions": False,
           "annotator": {"type": "function", "function": f"{tiny.TINY_PY}:length_reward"}}
    if algorithm == "online-dpo":
        judge_http.handler = longer_judge
        cfg["annotator"] = http_judge(judge_http, "compare")
    if algorithm == "dpo":
        rows = [{"prompt": p, "chosen": "Here we see the sea, free and serene.", "rejected": "No."}
                for p in tiny.PROMPTS if isinstance(p, str)]
        cfg["dataset"] = str(tiny.write_jsonl(tmp / "pairs.jsonl", rows))
        del cfg["annotator"]
    return cfg


def _behaviour(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(VOLATILE) and isinstance(v, (int, float))}


@pytest.mark.parametrize("algorithm", METHODS)
def test_golden_trajectory(algorithm, tmp_path, tiny_policy_dir, tiny_prompts_file, judge_http):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(_config(algorithm, tmp_path, tiny_policy_dir, tiny_prompts_file, judge_http)))
    out = tmp_path / "run"
    assert daralign_main(["train", "--config", str(path), "--output_dir", str(out)]) == 0
    steps = [_behaviour(json.loads(line)) for line in (out / "metrics.jsonl").read_text().splitlines()]
    golden = GOLDEN / f"{algorithm}.json"
    if os.environ.get("DARALIGN_RECORD_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(json.dumps(steps, indent=1) + "\n")
    expected = json.loads(golden.read_text())
    assert len(steps) == len(expected) == 3
    for i, (got, want) in enumerate(zip(steps, expected)):
        # every method has a loss; score methods a reward; sampled ones a KL to the reference
        needed = ["loss"] + (["reward"] if algorithm not in ("online-dpo", "dpo") else []) + (["kl"] if algorithm != "dpo" else [])
        assert set(needed) <= set(want), f"{algorithm}: the golden file lacks {set(needed) - set(want)}"
        assert want["update/skipped"] == 0.0 or i > 0, f"{algorithm}: the first recorded step must train"
        # a metric may be added (new accounting), never lost
        assert set(want) <= set(got), f"{algorithm} step {i + 1}: metrics lost: {sorted(set(want) - set(got))}"
        for key, value in want.items():
            if key == "rewards/accuracies" and abs(want.get("rewards/margins", 1.0)) < ATOL:
                continue  # the policy is still the reference: each margin is 0 but for rounding, its sign the CPU's
            same = got[key] == value or (value is not None and got[key] is not None
                                         and math.isclose(got[key], value, rel_tol=RTOL, abs_tol=ATOL))
            assert same, f"{algorithm} step {i + 1}: {key} = {got[key]!r}, golden {value!r}"
