"""Offline DPO as a user runs it: `daralign train --algorithm dpo --dataset pairs.jsonl`, no
annotator, TRL's preference formats (strings, chat messages, implicit-prompt conversations) and
HH-RLHF transcripts split at the last Assistant turn; resume and held-out evaluation shared with
the online loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tiny
from daralign.cli import main as daralign_main
from daralign.core.data import load_pairs
from daralign.core.errors import DataError

SHARED_HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"


def hh(*turns: str) -> str:
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


def test_every_trl_preference_format_loads(tmp_path):
    rows = [
        {"prompt": "Hi?", "chosen": "Hello there!", "rejected": "No.", "id": 0},  # standard strings
        {"prompt": [{"role": "user", "content": "Sea?"}],  # conversational, explicit prompt
         "chosen": [{"role": "assistant", "content": "Blue and vast."}],
         "rejected": [{"role": "assistant", "content": "Wet."}]},
        {"chosen": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Bright."}],  # implicit prompt
         "rejected": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Up."}]},
        {"chosen": hh("Pen pranks?", "Ideas?", "yes", "Draw a smile."),  # HH-RLHF transcripts
         "rejected": hh("Pen pranks?", "Ideas?", "yes", "Stab it.")},
    ]
    pairs = load_pairs(str(tiny.write_jsonl(tmp_path / "p.jsonl", rows)))
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [
        ("Hello there!", "No."), ("Blue and vast.", "Wet."), ("Bright.", "Up."), ("Draw a smile.", "Stab it.")]
    assert pairs[0]["prompt"] == "Hi?" and pairs[0]["id"] == 0  # extra columns pass through
    assert pairs[2]["prompt"] == [{"role": "user", "content": "Sky?"}]
    assert pairs[3]["prompt"] == [{"role": "user", "content": "Pen pranks?"}, {"role": "assistant", "content": "Ideas?"},
                                  {"role": "user", "content": "yes"}]


def test_bad_rows_name_the_file_row_and_field(tmp_path):
    path = tiny.write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "x"}])
    with pytest.raises(DataError, match=r"p.jsonl: row 0: field 'rejected' is missing"):
        load_pairs(str(path))
    path = tiny.write_jsonl(tmp_path / "q.jsonl", [{"chosen": "just text", "rejected": "other"}])
    with pytest.raises(DataError, match=r"q.jsonl: row 0: fields 'chosen'/'rejected'.*give a 'prompt' field"):
        load_pairs(str(path))
    convs = [{"chosen": [{"role": "user", "content": "A?"}, {"role": "assistant", "content": "y"}],
              "rejected": [{"role": "user", "content": "B?"}, {"role": "assistant", "content": "n"}]}]
    with pytest.raises(DataError, match=r"c.jsonl: row 0: .*share every turn but the last"):
        load_pairs(str(tiny.write_jsonl(tmp_path / "c.jsonl", convs)))
    # HH transcripts that differ before the last turn: split inside their shared prefix (TRL's rule)
    pairs = load_pairs(str(tiny.write_jsonl(tmp_path / "m.jsonl", [{"chosen": hh("A?", "x", "B?", "yes"),
                                                                    "rejected": hh("A?", "z", "B?", "no")}])))
    assert pairs[0]["prompt"] == [{"role": "user", "content": "A?"}]
    assert pairs[0]["chosen"].startswith("x") and pairs[0]["rejected"].startswith("z")


@pytest.mark.skipif(not SHARED_HH.exists(), reason="the HH-RLHF file lives in ../shared/data (CI has it, a clone does not)")
def test_real_hh_rlhf_pairs_load():
    pairs = load_pairs(str(SHARED_HH))
    assert len(pairs) >= 2300 and all(p["chosen"] != p["rejected"] for p in pairs[:50])
    assert all(isinstance(p["prompt"], (str, list)) for p in pairs)


def test_train_dpo_without_an_annotator_then_resume(tmp_path, tiny_policy_dir, tiny_prompts_file, capsys):
    pairs = tiny.write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": p, "chosen": "Here we see the sea, free and serene.", "rejected": "No."} for p in tiny.PROMPTS[:4]])
    heldout = tiny.write_jsonl(tmp_path / "heldout.jsonl", [{"prompt": p} for p in tiny.PROMPTS[4:]])
    out = tmp_path / "dpo"
    argv = ["train", "--algorithm", "dpo", "--model_name_or_path", str(tiny_policy_dir), "--dataset", str(pairs),
            "--per_device_train_batch_size", "2", "--max_steps", "3", "--learning_rate", "1e-3", "--beta", "0.5",
            "--eval_dataset", str(heldout), "--report", "false", "--output_dir", str(out)]
    assert daralign_main(argv) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert metrics[-1]["rewards/margins"] > metrics[0]["rewards/margins"]  # it learns the preference
    assert all(m["annotation_requests"] == 0 for m in metrics)
    after = json.loads((out / "heldout_after.json").read_text())
    assert after["score"] is None and after["kl"] not in (None, 0.0)  # no evaluator: score not measured; KL is (an MC estimate: any sign)
    capsys.readouterr()
    assert daralign_main(argv + ["--resume"]) == 0
    assert "this run is finished" in capsys.readouterr().err
