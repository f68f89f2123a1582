"""Bad input → one clear line naming the file / row / field, exit code 1, no traceback, and nothing
written to output_dir/final. Everything runs through ``daralign.cli.main(["train", ...])``
in-process, exactly what the console script calls."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import tiny
from daralign.cli import main as daralign_main
from daralign.train.args import parse_train_args
from daralign.core.data import load_prompts, read_rows
from daralign.core.errors import ConfigError, DataError


@pytest.fixture
def run_cli(tmp_path, tiny_policy_dir, tiny_prompts_file, capsys):
    """run_cli(yaml_overrides, *cli_args) → (rc, stderr, output_dir) on the tiny policy."""

    def run(overrides: dict | None = None, *args: str, drop: tuple[str, ...] = ()):
        out = tmp_path / "out"
        cfg = {
            "model_name_or_path": str(tiny_policy_dir), "dataset": str(tiny_prompts_file),
            "annotator": {"type": "function", "function": f"{tiny.TINY_PY}:length_reward"},
            "num_generations": 2, "per_device_train_batch_size": 2, "max_completion_length": 4,
            "max_steps": 2, "output_dir": str(out), "report": False,
        }
        cfg.update(overrides or {})
        for k in drop:
            cfg.pop(k)
        path = tmp_path / "cfg.yaml"
        path.write_text(yaml.safe_dump(cfg))
        capsys.readouterr()
        rc = daralign_main(["train", "--config", str(path), *args])
        return rc, capsys.readouterr().err, out

    return run


def assert_one_clear_line(rc: int, err: str, out: Path, *needles: str, only_line: bool = True) -> str:
    assert rc == 1
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("daralign train: error: ")]
    assert len(errors) == 1, err
    if only_line:  # failed before loading anything: the error is all the user sees
        assert lines == errors, err
    else:
        assert lines[-1] == errors[0], err
    for n in needles:
        assert n in errors[0], (n, errors[0])
    assert not (out / "final").exists()
    return errors[0]


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# ---------------------------------------------------------------- data
@pytest.mark.parametrize("lines,needles", [
    (['{"prompt": "ok"}', '{"prompt": "ok too"}', '{"prompt": "   "}'], ["row 2", "'prompt'", "empty"]),
    (['{"prompt": "ok"}', '{"question": "where is the prompt?"}'], ["row 1", "'prompt'", "missing"]),
    (['{"prompt": 5}'], ["row 0", "'prompt'", "must be a string or a non-empty list", "int"]),
    (['{"prompt": ["just", "strings"]}'], ["row 0", "'prompt'[0]", "role"]),
    (['{"prompt": []}'], ["row 0", "'prompt'", "non-empty list"]),
    (['{"prompt": [{"role": "robot", "content": "hi"}]}'], ["row 0", "'prompt'[0]", "robot"]),
    (['{"prompt": [{"role": "user", "content": 3}]}'], ["row 0", "'prompt'[0]"]),
    (['{"prompt": [{"role": "user", "content": "  "}]}'], ["row 0", "'prompt'", "only empty messages"]),
    (['{"prompt": "ok"}', '{"prompt": "broken", ', '{"prompt": "fine"}'], ["line 2", "not valid JSON"]),
    (['{"prompt": "ok"}', '["a", "list"]'], ["row 1", "expected a JSON object"]),
    ([], ["no rows"]),
], ids=["empty", "missing", "int", "list_of_str", "empty_list", "bad_role", "bad_content", "blank_messages",
        "malformed_line", "not_object", "no_rows"])
def test_bad_prompt_files(tmp_path, run_cli, lines, needles):
    data = write(tmp_path, "bad.jsonl", "\n".join(lines) + ("\n" if lines else ""))
    rc, err, out = run_cli({"dataset": str(data)})
    line = assert_one_clear_line(rc, err, out, str(data), *needles)
    assert not out.joinpath("config.yaml").exists(), line  # failed before the run started


def test_bad_json_file_and_missing_file(tmp_path, run_cli):
    data = write(tmp_path, "bad.json", '{"not": "a list"}')
    assert_one_clear_line(*run_cli({"dataset": str(data)}), str(data), "expected a JSON list")
    data = write(tmp_path, "bad2.json", '[{"prompt": "a"}, {"prompt": ""}]')
    assert_one_clear_line(*run_cli({"dataset": str(data)}), str(data), "row 1", "'prompt'", "empty")
    assert_one_clear_line(*run_cli({"dataset": str(tmp_path / "nope.jsonl")}), "nope.jsonl", "file not found")


def test_custom_prompt_column(tmp_path):
    data = write(tmp_path, "q.jsonl", '{"question": "Hi?", "ref": "x"}\n{"question": ""}\n')
    with pytest.raises(DataError, match=r"row 1: field 'question' is empty"):
        load_prompts(str(data), column="question")
    data = write(tmp_path, "q2.jsonl", '{"question": "Hi?", "ref": "x"}\n')
    rows = load_prompts(str(data), column="question")
    assert rows == [{"question": "Hi?", "ref": "x", "prompt": "Hi?"}]  # extra columns pass through


def test_gzip_and_json_data_wrapper(tmp_path):
    import gzip

    p = tmp_path / "p.jsonl.gz"
    with gzip.open(p, "wt") as f:
        f.write('{"prompt": "a"}\n\n{"prompt": [{"role": "user", "content": "b"}]}\n')
    assert [r["prompt"] for r in load_prompts(str(p))] == ["a", [{"role": "user", "content": "b"}]]
    q = write(tmp_path, "d.json", json.dumps({"data": [{"prompt": "x"}]}))
    assert read_rows(q) == [{"prompt": "x"}]


# ---------------------------------------------------------------- config
def test_unknown_yaml_key(run_cli, tmp_path):
    rc, err, out = run_cli({"learning_rat": 0.1})
    assert_one_clear_line(rc, err, out, "cfg.yaml", "unknown config key", "learning_rat")
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--nonsense_field", "--learning_rat"], ids=["unknown", "prefix_typo"])
def test_unknown_cli_flag(run_cli, flag):
    rc, err, out = run_cli(None, flag, "0.1")
    assert_one_clear_line(rc, err, out, "command line", "unrecognized arguments", flag)
    assert not out.exists()


@pytest.mark.parametrize("args,needles", [
    (["--max_steps", "two"], ["--max_steps", "invalid int"]),
    (["--bf16", "maybe"], ["--bf16", "true/false"]),
    (["--config"], ["--config", "expected one argument"]),
])
def test_bad_cli_values(run_cli, args, needles):
    rc, err, out = run_cli(None, *args)
    assert_one_clear_line(rc, err, out, "command line", *needles)


@pytest.mark.parametrize("overrides,needles", [
    ({"num_generations": "four"}, ["cfg.yaml", "num_generations", "int"]),
    ({"learning_rate": [1, 2]}, ["cfg.yaml", "learning_rate", "float"]),
    ({"use_peft": "perhaps"}, ["cfg.yaml", "use_peft"]),
    ({"lora_target_modules": 5}, ["cfg.yaml", "lora_target_modules", "list"]),
])
def test_wrong_yaml_types(run_cli, overrides, needles):
    assert_one_clear_line(*run_cli(overrides), *needles)


@pytest.mark.parametrize("args,needles", [
    (["--num_generations", "0"], ["num_generations must be ≥ 1"]),
    (["--max_steps", "0"], ["max_steps must be ≥ 1"]),
    (["--weight_clip", "0"], ["weight_clip must be > 0"]),
    (["--weight_clip", "-3"], ["weight_clip must be > 0"]),
    (["--dar_alpha", "-0.1", "--dar_beta", "0.1"], ["dar_alpha", "≥ 0", "-0.1"]),
    (["--dar_alpha", "0.1", "--dar_beta", "-0.5"], ["dar_beta", "≥ 0", "-0.5"]),
    (["--dar_alpha", "0", "--dar_beta", "0"], ["dar_alpha + dar_beta must be > 0"]),
    (["--dar_alpha", "0.1"], ["dar_alpha and dar_beta"]),
    (["--dar_ratio", "1.5"], ["dar_ratio"]),
    (["--advantage_normalization", "prompt"], ["advantage_normalization", "'prompt'"]),
    (["--temperature", "0"], ["temperature must be > 0"]),
    (["--top_p", "1.5"], ["top_p"]),
    (["--save_steps", "-1"], ["save_steps"]),
    (["--report_to", "mlflow"], ["report_to", "mlflow"]),
    (["--algorithm", "nope"], ["algorithm", "'nope'"]),
    (["--dtype", "int8"], ["dtype", "'int8'"]),
])
def test_impossible_values(run_cli, args, needles):
    rc, err, out = run_cli(None, *args)
    assert_one_clear_line(rc, err, out, *needles, only_line=args[0] != "--dtype")


def test_impossible_values_in_yaml_name_the_field(run_cli):
    assert_one_clear_line(*run_cli({"num_generations": 0}), "num_generations must be ≥ 1")
    assert_one_clear_line(*run_cli({"weight_clip": 0}), "weight_clip must be > 0")
    assert_one_clear_line(*run_cli({"dar_alpha": 0.1, "dar_beta": -1}), "dar_beta")


def test_missing_dataset_and_annotator(run_cli, tmp_path):
    assert_one_clear_line(*run_cli(None, drop=("dataset",)), "dataset", "no prompt dataset")
    assert_one_clear_line(*run_cli(None, drop=("annotator",)), "annotator", "no annotator")
    assert_one_clear_line(*run_cli({"annotator": str(tmp_path / "missing.yaml")}), "missing.yaml", "not found")
    bad = write(tmp_path, "bad.yaml", "a: [unclosed\n")
    assert_one_clear_line(*run_cli(None, "--config", str(bad)), "bad.yaml", "not valid YAML at line 2")


@pytest.mark.parametrize("annotator,needles", [
    ({"type": "function", "function": f"{tiny.TINY_PY}:length_reward", "weights": 1}, ["unknown key", "weights"]),
    ({"type": "function"}, ["missing key 'function'"]),
    ({"type": "function", "function": "no_colon"}, ["module:function"]),
    ({"type": "function", "function": "daralign_no_such_module:f"}, ["cannot import", "daralign_no_such_module"]),
    ({"type": "function", "function": f"{tiny.TINY_PY}:no_such_fn"}, ["no callable", "no_such_fn"]),
    ({"type": "oracle"}, ["annotator.type", "'oracle'"]),
    ({"function": "x:y"}, ["needs a mapping with a 'type'"]),
    ({"type": "combined", "sources": []}, ["sources"]),
    ({"type": "reward_model"}, ["missing key 'model'"]),
])
def test_bad_annotator_configs(run_cli, annotator, needles):
    rc, err, out = run_cli({"annotator": annotator})
    assert_one_clear_line(rc, err, out, *needles, only_line=False)


# ---------------------------------------------------------------- rewards that cannot be trained on
@pytest.mark.parametrize("fn,needles", [
    ("nan_reward", ["score 0 is nan", "non-finite"]),
    ("inf_reward", ["score 3 is inf", "non-finite"]),
    ("short_reward", ["returned 3 scores for 4 completions"]),
])
def test_bad_reward_function(run_cli, fn, needles):
    rc, err, out = run_cli({"annotator": {"type": "function", "function": f"{tiny.TINY_PY}:{fn}"}})
    assert_one_clear_line(rc, err, out, f"tiny.py:{fn}", *needles, only_line=False)
    assert not any(out.glob("checkpoint-*"))


def test_parse_errors_are_config_errors_in_the_library(tmp_path):
    """Library users get exceptions (no sys.exit) from the same parser."""
    ann = write(tmp_path, "a.yaml", "type: function\nfunction: math:fsum\n")
    with pytest.raises(ConfigError, match="unrecognized arguments: --nope"):
        parse_train_args(["--dataset", "x.jsonl", "--annotator", str(ann), "--nope", "1"])
    train, algo = parse_train_args(["--dataset", "x.jsonl", "--annotator", str(ann), "--max_steps", "3",
                                    "--report_to", "tensorboard", "--lora_target_modules", "q_proj,v_proj"])
    assert train.max_steps == 3 and train.report_to == ["tensorboard"]
    assert train.lora_target_modules == ["q_proj", "v_proj"] and train.annotator["type"] == "function"


def test_cli_overrides_yaml(tmp_path):
    cfg = write(tmp_path, "c.yaml", yaml.safe_dump({"dataset": "a.jsonl", "max_steps": 5, "seed": 1,
                                                     "annotator": {"type": "function", "function": "math:fsum"}}))
    train, _ = parse_train_args(["--config", str(cfg), "--max_steps", "2", "--output_dir", "runs/demo", "--seed", "3"])
    assert (train.max_steps, train.output_dir, train.seed, train.dataset) == (2, "runs/demo", 3, "a.jsonl")


def test_engine_keys_are_read_written_and_read_back(tmp_path):
    """A rollout engine's keys are its own ``Config``'s: they load whichever engine samples (vLLM's
    with use_vllm off, as before), a YAML value and a flag reach the engine's config, and config.yaml
    (``to_dict``) writes them flat, so the saved config reads back to the same settings."""
    from daralign.core.config import to_dict
    from daralign.rollout.base import engine_class

    cfg = write(tmp_path, "c.yaml", yaml.safe_dump({"dataset": "a.jsonl", "vllm_mode": "server",
                                                     "annotator": {"type": "function", "function": "math:fsum"}}))
    train, algo = parse_train_args(["--config", str(cfg), "--vllm_gpu_memory_utilization", "0.5"])
    assert (train.vllm_mode, train.vllm_gpu_memory_utilization, train.use_vllm) == ("server", 0.5, False)
    assert engine_class(train, "score").name == "hf"  # auto: vLLM only with use_vllm
    saved = to_dict(train, algo)
    assert saved["vllm_mode"] == "server" and "engine_configs" not in saved
    again = write(tmp_path, "saved.yaml", yaml.safe_dump(saved))
    train2, _ = parse_train_args(["--config", str(again), "--use_vllm", "true"])
    assert to_dict(train2) == {**to_dict(train), "use_vllm": True} and engine_class(train2, "score").name == "vllm-server"
    with pytest.raises(ConfigError, match="vllm_mode: 'both' is not one of colocate, server"):
        parse_train_args(["--config", str(cfg), "--vllm_mode", "both"])


def test_train_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as e:
        daralign_main(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--num_generations", "--dar_alpha", "--dar_total", "--weight_clip", "--advantage_normalization",
                 "--resume", "--use_peft", "--use_vllm", "--vllm_mode", "--vllm_server_url"):  # the engines' own too
        assert flag in text


# ---------------------------------------------------------------- a new user's first hour: each a single line
@pytest.mark.parametrize("overrides,args,needles", [
    ({}, ["--lr_scheduler_type", "foo"], ["lr_scheduler_type", "'foo'", "cosine"]),
    ({"weight_decay": -5}, [], ["weight_decay must be ≥ 0"]),
    ({"learning_rate": float("nan")}, [], ["learning_rate must be a finite number"]),
    ({"temperature": float("inf")}, [], ["temperature must be a finite number"]),
    ({"max_steps": True}, [], ["max_steps must be int", "True"]),
    ({}, ["--learning_rate", "-1e-3"], ["learning_rate must be ≥ 0", "-0.001"]),  # reaches validation, not argparse
    ({"algorithm": "online-dpo"}, [], ["online-dpo", "cannot compare", "type: judge"]),
], ids=["scheduler", "weight_decay", "lr_nan", "temperature_inf", "max_steps_bool", "negative_cli_number",
        "online_dpo_function"])
def test_first_hour_mistakes_are_one_line(run_cli, overrides, args, needles):
    rc, err, out = run_cli(overrides, *args)
    assert_one_clear_line(rc, err, out, *needles)


def test_missing_model_folder_and_non_utf8_data_are_one_line(tmp_path, run_cli):
    rc, err, out = run_cli({"model_name_or_path": str(tmp_path / "no-such-model")})
    assert_one_clear_line(rc, err, out, "no-such-model", "cannot be loaded", only_line=False)
    data = tmp_path / "latin1.jsonl"
    data.write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    assert_one_clear_line(*run_cli({"dataset": str(data)}), "latin1.jsonl", "not UTF-8")


def test_a_raising_reward_function_shows_the_users_frame(tmp_path, run_cli):
    fn = write(tmp_path, "my_reward.py", "def reward(prompts, completions, **kw):\n    return [1 / 0 for _ in completions]\n")
    rc, err, out = run_cli({"annotator": {"type": "function", "function": f"{fn}:reward"}})
    line = assert_one_clear_line(rc, err, out, "reward function", "ZeroDivisionError", f"{fn}:2", only_line=False)
    assert "daralign/" not in line.split("(at ")[1]  # the user's own code, not ours


def test_a_string_from_a_reward_function_is_not_a_list_of_digits(tmp_path, run_cli):
    fn = write(tmp_path, "str_reward.py", "def reward(prompts, completions, **kw):\n    return '1234'\n")
    rc, err, out = run_cli({"annotator": {"type": "function", "function": f"{fn}:reward"}, "num_generations": 2,
                            "per_device_train_batch_size": 2})
    assert_one_clear_line(rc, err, out, "returned str '1234'", "expected a list of 4 numbers", only_line=False)


def test_bf16_auto_resolves_to_what_the_hardware_computes_in(tmp_path):
    from daralign.core.models import resolve_dtype

    native = resolve_dtype("auto", "cpu") == "bfloat16"  # this machine: read from /proc/cpuinfo
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"dataset": "x.jsonl", "annotator": {"type": "function"}, "bf16": "auto"}))
    assert parse_train_args(["--config", str(tmp_path / "c.yaml")])[0].bf16 is native  # a bool, as config.yaml saves it
    assert parse_train_args(["--config", str(tmp_path / "c.yaml"), "--bf16", "auto"])[0].bf16 is native
    assert parse_train_args(["--config", str(tmp_path / "c.yaml"), "--bf16", "false"])[0].bf16 is False
