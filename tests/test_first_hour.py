"""A new user's first hour, on the tiny model through `daralign train`: nothing lost (output_dir
holds only what daralign wrote), nothing hidden (config.yaml re-runs, resume refuses a changed
config, a never-labelling annotator stops the run, reports name their parts), and the CLI says
what every option does."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from conftest import chat_reply, http_judge

import tiny
from daralign.cli import main as daralign_main

FN = f"{tiny.TINY_PY}:"


config = tiny.run_config


def train(cfg: Path, out: Path, *args: str) -> int:
    return daralign_main(["train", "--config", str(cfg), "--output_dir", str(out), *args])


# ---------------------------------------------------------------- nothing lost
def test_a_folder_daralign_did_not_write_is_refused_and_untouched(tmp_path, tiny_policy_dir, tiny_prompts_file, capsys):
    out = tmp_path / "trainer_run"
    (out / "checkpoint-500").mkdir(parents=True)  # a transformers Trainer's checkpoint
    (out / "checkpoint-500" / "trainer_state.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    cfg = config(tmp_path, tiny_policy_dir, tiny_prompts_file)
    for extra in ([], ["--overwrite_output_dir", "true"], ["--resume"]):
        capsys.readouterr()
        assert train(cfg, out, *extra) == 1
        err = capsys.readouterr().err
        assert "holds files daralign did not write (checkpoint-500, notes.txt)" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-500", "notes.txt"]  # nothing touched, nothing added


def test_a_failed_overwrite_keeps_the_earlier_run(tmp_path, tiny_policy_dir, tiny_prompts_file):
    out = tmp_path / "run"
    assert train(config(tmp_path, tiny_policy_dir, tiny_prompts_file), out) == 0
    final = (out / "final" / "model.safetensors").read_bytes()
    fn = tmp_path / "broken.py"
    fn.write_text("def reward(prompts, completions, **kw):\n    raise RuntimeError('service down')\n")
    broken = config(tmp_path, tiny_policy_dir, tiny_prompts_file, annotator={"type": "function", "function": f"{fn}:reward"})
    assert train(broken, out, "--overwrite_output_dir", "true") == 1
    kept = out / ".replaced"
    assert (kept / "final" / "model.safetensors").read_bytes() == final  # the earlier run is still there
    assert (kept / "metrics.jsonl").is_file() and not (out / "final").exists()  # and not mixed with the new one


# ---------------------------------------------------------------- nothing hidden
def test_config_yaml_reruns_as_it_is(tmp_path, tiny_policy_dir, tiny_prompts_file, judge_http):
    judge = http_judge(judge_http, max_new_tokens=5, tokenizer=None)
    out = tmp_path / "a"
    assert train(config(tmp_path, tiny_policy_dir, tiny_prompts_file, annotator=judge, dar_alpha=0.01, dar_beta=0.04), out) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["annotator"]["max_new_tokens"] == 5  # not '***': only declared secrets are redacted
    assert daralign_main(["train", "--config", str(out / "config.yaml"), "--output_dir", str(tmp_path / "b")]) == 0
    again = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())
    assert {k: v for k, v in again.items() if k != "output_dir"} == {k: v for k, v in saved.items() if k != "output_dir"}


def test_resume_refuses_a_changed_config_but_may_extend_the_run(tmp_path, tiny_policy_dir, tiny_prompts_file, capsys):
    cfg = config(tmp_path, tiny_policy_dir, tiny_prompts_file)
    out = tmp_path / "run"
    assert train(cfg, out) == 0
    capsys.readouterr()
    assert train(cfg, out, "--resume", "--algorithm", "rloo", "--learning_rate", "0.5") == 1
    err = capsys.readouterr().err
    assert "trained with another config" in err and "algorithm: 'dar' → 'rloo'" in err and "learning_rate" in err
    assert train(cfg, out, "--resume", "--max_steps", "3") == 0  # longer is fine: one more step
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    # the settings of an engine the run does not sample with change nothing it does
    assert train(cfg, out, "--resume", "--max_steps", "4", "--vllm_max_num_seqs", "7") == 0
    assert train(cfg, out, "--resume", "--max_steps", "5", "--use_vllm", "true") == 1  # but not the engine itself
    # (asked before the engine's own check: also where vLLM is not installed)
    assert "was sampled by the hf engine and this config samples with vllm-colocate" in capsys.readouterr().err


def test_other_algorithms_keys_are_ignored_with_a_note(tmp_path, tiny_policy_dir, tiny_prompts_file, capsys):
    cfg = config(tmp_path, tiny_policy_dir, tiny_prompts_file, dar_total=0.05, dar_ratio=0.1, max_steps=1)
    assert train(cfg, tmp_path / "run", "--algorithm", "rloo") == 0
    assert "dar_ratio, dar_total belong to other algorithms; ignored for rloo" in capsys.readouterr().err


def test_a_score_judge_is_switched_for_online_dpo_before_any_model_loads(tmp_path, tiny_policy_dir, tiny_prompts_file):
    from daralign.train.args import parse_train_args

    judge = {"type": "judge", "mode": "score", "template": "tone", "model": "bundled:qwen2.5-coder-0.5b-instruct"}
    train_cfg, _ = parse_train_args(["--config", str(config(tmp_path, tiny_policy_dir, tiny_prompts_file, annotator=judge)),
                                     "--algorithm", "online-dpo"])  # parsing only: nothing is loaded
    assert train_cfg.annotator["mode"] == "compare"


def test_a_judge_that_never_labels_stops_the_run_saying_what_it_answered(tmp_path, tiny_policy_dir, tiny_prompts_file, capsys, judge_http):
    judge_http.handler = lambda path, body, n: (200, chat_reply("I cannot rate this."), {})
    heldout = tiny.write_jsonl(tmp_path / "h.jsonl", [{"prompt": "Hi"}])
    cfg = config(tmp_path, tiny_policy_dir, tiny_prompts_file, annotator=http_judge(judge_http), max_steps=5,
                 eval_dataset=str(heldout))
    out = tmp_path / "run"
    assert train(cfg, out) == 1
    err = capsys.readouterr().err
    assert "gave no valid label in 3 consecutive steps" in err and "I cannot rate this." in err
    before = json.loads((out / "heldout_before.json").read_text())  # strict JSON: null, not NaN
    assert before["score"] is None and before["per_prompt"] == [None]


# ---------------------------------------------------------------- safetensors, provenance, help
def test_ppo_value_head_is_saved_as_safetensors_and_resumes(tmp_path, tiny_policy_dir, tiny_prompts_file):
    import torch
    from safetensors.torch import load_file

    cfg = config(tmp_path, tiny_policy_dir, tiny_prompts_file, algorithm="ppo", save_steps=1)
    out = tmp_path / "run"
    assert train(cfg, out) == 0
    ckpt = out / "checkpoint-2"
    assert (ckpt / "value_head.safetensors").is_file() and not list(ckpt.glob("custom_checkpoint_*"))
    head = load_file(str(ckpt / "value_head.safetensors"))
    assert torch.equal(head["weight"], load_file(str(out / "final" / "value_head.safetensors"))["weight"])
    assert train(cfg, out, "--resume", "--max_steps", "3") == 0


def test_runs_record_provenance_and_reports_name_their_parts(tmp_path, tiny_policy_dir, tiny_prompts_file):
    out = tmp_path / "run"
    assert train(config(tmp_path, tiny_policy_dir, tiny_prompts_file, report=True, max_steps=1), out) == 0
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["daralign"] and prov["libraries"]["torch"] == metadata.version("torch") and "transformers" in prov["libraries"]
    assert prov["cpu"]  # a timing names what it ran on
    report = (out / "report.md").read_text()
    assert str(tiny_policy_dir) in report and "reward function" in report and str(tiny_prompts_file) in report
    assert "annotator requests (trained): 4 for training (the budget's unit), 0 for evaluation" in report


def test_every_train_option_has_help_with_its_default(capsys):
    for algorithm in ("dar", "rloo", "grpo", "ppo", "online-dpo", "dpo"):
        with pytest.raises(SystemExit):
            daralign_main(["train", "--algorithm", algorithm, "--help"])
        text = capsys.readouterr().out
        options = [line.split()[0] for line in text.splitlines() if line.startswith("  --")]
        assert len(options) > 50
        assert " ".join(text.split()).count("(default:") == len(options) - 1  # all but --config
    assert daralign_main(["--version"]) == 0 and capsys.readouterr().out.startswith("daralign ")


def test_a_reward_model_always_sees_the_whole_response(tiny_rm_dir, capsys):
    from daralign.annotators import build_annotator

    rm = build_annotator({"type": "reward_model", "model": str(tiny_rm_dir), "max_length": 120})
    long_prompt = "Tell me about the ocean and its waves. " * 60  # far past max_length on its own
    responses = ["The sea is calm.", "Great question, here is a short answer about the ocean!"]
    result = rm.score([long_prompt] * 2, responses, [{}, {}])
    assert result.scores[0] != result.scores[1]  # a right cut would have scored only the prompt: equal scores
    assert result.metrics["annotator/truncated_prompts"] == 2.0
    assert "cut from the left" in capsys.readouterr().err
    for response in responses:
        text, cut = rm._fit(long_prompt, response)
        assert cut and response in text and len(rm.tokenizer(text, add_special_tokens=False)["input_ids"]) <= 120


def test_every_judge_field_is_documented():
    import dataclasses

    from daralign.annotators.backends import BACKENDS
    from daralign.annotators.judge import JudgeConfig

    doc = (Path(__file__).resolve().parents[1] / "docs" / "annotators.md").read_text()
    # the judge's own keys and those of the backends shipped in daralign (each backend's Config)
    keys = [f.name for f in dataclasses.fields(JudgeConfig) if f.name != "backend_config"]
    keys += [f.name for b in BACKENDS.values() if b.__module__.startswith("daralign.") for f in dataclasses.fields(b.Config)]
    missing = [k for k in keys if f"| `{k}` |" not in doc]
    assert not missing, f"document these judge fields in docs/annotators.md: {missing}"
    no_help = [f"{name}.{f.name}" for name, b in BACKENDS.items() for f in dataclasses.fields(b.Config) if not f.metadata.get("help")]
    assert not no_help, f"give these backend fields metadata={{'help': ...}}: {no_help}"
