"""Every algorithm through the real loop (`daralign train`) on the tiny model, trained by a real
judge server on 127.0.0.1 and evaluated by an independent yardstick (a reward function): the
budget unit is what the server itself counts, every method gets a held-out KL, and OAIF samples
one pair per prompt whatever the shared ``num_generations``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import http_judge, keyword_judge, undocumented_metrics

import tiny
from daralign.cli import main as daralign_main
from daralign.objectives import OBJECTIVES

P = 2  # prompts per step
# every registered method, by what it learns from: a new one is covered (metrics glossary included) as it registers
KIND = {name: cls.feedback_kind for name, cls in OBJECTIVES.items()}


def write_pairs(path: Path) -> Path:
    rows = [{"prompt": p, "chosen": "Here we see the sea, free and serene.", "rejected": "No."}
            for p in tiny.PROMPTS if isinstance(p, str)]
    return tiny.write_jsonl(path, rows)


def run_train(tmp: Path, **cfg) -> tuple[Path, list[dict]]:
    out = tmp / "run"
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert daralign_main(["train", "--config", str(path), "--output_dir", str(out)]) == 0
    return out, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algorithm", list(KIND))
def test_every_algorithm_trains_through_the_loop(algorithm, tmp_path, tiny_policy_dir, tiny_prompts_file, judge_http):
    judge_http.handler = keyword_judge
    heldout = tiny.write_jsonl(tmp_path / "heldout.jsonl", [{"prompt": p} for p in tiny.PROMPTS[:2]])
    kind = KIND[algorithm]
    cfg = {"algorithm": algorithm, "model_name_or_path": str(tiny_policy_dir), "num_generations": 4,
           "per_device_train_batch_size": P, "max_completion_length": 5, "max_steps": 2, "learning_rate": 1e-3,
           "seed": 3, "report": False, "eval_dataset": str(heldout), "eval_max_prompts": 2,
           "eval_annotator": {"type": "function", "function": f"{tiny.TINY_PY}:length_reward"}}
    if kind == "offline":
        cfg["dataset"] = str(write_pairs(tmp_path / "pairs.jsonl"))  # no annotator at all
    else:
        cfg |= {"dataset": str(tiny_prompts_file), "annotator": http_judge(judge_http, kind)}
    out, metrics = run_train(tmp_path, **cfg)

    assert [m["step"] for m in metrics] == [1, 2]
    assert not undocumented_metrics(metrics), "add these to docs/metrics.md"
    for m in metrics:
        assert m["update/skipped"] in (0.0, 1.0) and m["num_prompts"] == P
        assert m["completions/min_length"] <= m["completions/mean_length"] <= m["completions/max_length"]
    # the budget unit is what the judge server received for training: the held-out yardstick is a
    # function (no HTTP), and the judge's held-out proxy score (2 prompts × 2 answers, before and
    # after) is not charged to the run
    proxy = 0 if kind == "offline" else 2 * 2 * 2
    assert metrics[-1]["annotation_requests"] == len(judge_http.requests) - proxy
    assert (json.loads((out / "heldout_after.json").read_text())["proxy_score"] is None) == (kind == "offline")
    if kind == "score":
        assert metrics[-1]["annotation_requests"] == metrics[-1]["annotations"] == 2 * P * 4  # K = 4 scores per prompt
    elif kind == "compare":
        assert metrics[-1]["annotations"] == 2 * P  # one pair per prompt (OAIF), not K(K-1)/2 of K = 4
        assert metrics[-1]["annotation_requests"] == 2 * 2 * P  # each pair asked in both orders
        assert len((out / "completions.jsonl").read_text().splitlines()) == 2 * P * 2  # 2 responses per prompt
    else:
        assert metrics[-1]["annotation_requests"] == metrics[-1]["annotations"] == 0
        assert "rewards/accuracies" in metrics[0] and "kl" not in metrics[0]  # offline: no π_t to compare with
    # every method has a held-out score from the yardstick and a held-out KL to the reference
    before, after = (json.loads((out / f"heldout_{t}.json").read_text()) for t in ("before", "after"))
    assert before["kl"] == pytest.approx(0.0, abs=1e-4)  # π = π_ref before training
    assert after["kl"] is not None and after["score"] is not None
    assert after["evaluator"].startswith("reward function") and after["evaluator_is_training_annotator"] is False
    assert (out / "final" / "model.safetensors").is_file()


def test_oaif_round_robin_and_disjoint_pairs(tmp_path, tiny_policy_dir, tiny_prompts_file, judge_http):
    """oaif_num_generations > 2: best_vs_worst judges all K(K-1)/2 pairs and trains on one per
    prompt; without it, K//2 disjoint pairs are judged and all trained on."""
    judge_http.handler = keyword_judge
    base = {"algorithm": "online-dpo", "model_name_or_path": str(tiny_policy_dir), "dataset": str(tiny_prompts_file),
            "annotator": http_judge(judge_http, "compare", debias="none"), "per_device_train_batch_size": P,
            "max_completion_length": 5, "max_steps": 1, "learning_rate": 1e-3, "seed": 3, "report": False,
            "oaif_num_generations": 4}
    (tmp_path / "rr").mkdir()
    _, rr = run_train(tmp_path / "rr", **base)
    assert rr[0]["annotations"] == rr[0]["annotation_requests"] == P * 6 == len(judge_http.requests)
    assert rr[0]["pairs/used"] <= P  # (most wins, fewest wins) per prompt
    judge_http.requests.clear()
    (tmp_path / "dj").mkdir()
    _, dj = run_train(tmp_path / "dj", **base, best_vs_worst=False)
    assert dj[0]["annotations"] == P * 2 == len(judge_http.requests)  # pairs (0,1) and (2,3)
    assert dj[0]["pairs/used"] + dj[0]["pairs/ties_skipped"] == P * 2
