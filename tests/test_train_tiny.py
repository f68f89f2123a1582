"""The full online loop on the tiny model, through `daralign train` in-process: metrics.jsonl keys,
config.yaml with secrets redacted, final/ as a safetensors save_pretrained folder, LoRA merged vs
adapter-only, bf16 autocast, tensorboard events, the shuffled-reward control, micro-batching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import tiny
from daralign.cli import main as daralign_main
from daralign.train.args import parse_train_args

REQUIRED_KEYS = {
    "step", "annotations", "reward", "reward_std", "kl", "completions/mean_length", "completions/clipped_ratio",
    "dar/advantage_std", "dar/weight_mean", "dar/weight_max", "dar/clip_frac", "dar/log_ratio_ref_behaviour",
    "loss", "timing/rollout", "timing/annotate", "timing/reference", "timing/update", "step_time",
}
SECRET = "sk-test-secret-value"
K, PROMPTS_PER_STEP = 2, 2


def base_config(tmp: Path, policy: Path, prompts: Path, **over) -> Path:
    cfg = {
        "model_name_or_path": str(policy), "dataset": str(prompts),
        "annotator": {"type": "function", "function": f"{tiny.TINY_PY}:length_reward"},
        "num_generations": K, "per_device_train_batch_size": PROMPTS_PER_STEP, "max_completion_length": 6,
        "max_steps": 2, "learning_rate": 1e-3, "seed": 11, "report": False,
    }
    cfg.update(over)
    path = tmp / f"cfg_{len(list(tmp.glob('cfg_*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train(cfg: Path, out: Path, *args: str) -> list[dict]:
    assert daralign_main(["train", "--config", str(cfg), "--output_dir", str(out), *args]) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def main_run(tmp_path_factory, tiny_policy_dir, tiny_prompts_file):
    """2 steps with a held-out set, the report, tensorboard, and a secret in the annotator config."""
    tmp = tmp_path_factory.mktemp("train_main")
    cfg = base_config(tmp, tiny_policy_dir, tiny_prompts_file, report=True, eval_dataset=str(tiny_prompts_file),
                      eval_max_prompts=3, report_to=["tensorboard"],
                      annotator={"type": "function", "function": f"{tiny.TINY_PY}:secret_reward",
                                 "kwargs": {"api_key": SECRET}})
    out = tmp / "run"
    return out, train(cfg, out)


def test_metrics_have_the_documented_keys(main_run):
    from conftest import undocumented_metrics

    out, metrics = main_run
    assert not undocumented_metrics(metrics), "add these to docs/metrics.md"
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        missing = REQUIRED_KEYS - set(m)
        assert not missing, missing
        for k in REQUIRED_KEYS:
            assert isinstance(m[k], (int, float)) and m[k] == m[k], (k, m[k])  # numbers, not NaN/None
        assert 0 <= m["dar/clip_frac"] <= 1 and 0 <= m["completions/clipped_ratio"] <= 1
        assert 0 < m["dar/weight_max"] <= 20.0 + 1e-6 and m["dar/weight_mean"] <= m["dar/weight_max"]
        assert 1 <= m["completions/mean_length"] <= 6
        assert m["step_time"] >= m["timing/update"] >= 0
    n = K * PROMPTS_PER_STEP
    assert [m["annotations"] for m in metrics] == [n, 2 * n]  # cumulative, one per scored response
    assert metrics[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # π_t = π_ref before the first update
    assert metrics[0]["dar/log_ratio_ref_behaviour"] == pytest.approx(0.0, abs=1e-4)
    assert metrics[1]["kl"] != pytest.approx(0.0, abs=1e-6)  # the policy moved


def test_config_yaml_is_resolved_and_redacted(main_run):
    out, _ = main_run
    text = (out / "config.yaml").read_text()
    assert SECRET not in text
    cfg = yaml.safe_load(text)
    assert cfg["annotator"]["kwargs"]["api_key"] == "***"
    assert cfg["dar_alpha"] == pytest.approx(0.005) and cfg["dar_beta"] == pytest.approx(0.045)  # resolved
    assert cfg["num_generations"] == K and cfg["output_dir"] == str(out)
    # the written config is a valid config again (minus the redacted secret)
    train_cfg, _ = parse_train_args(["--config", str(out / "config.yaml")])
    assert train_cfg.max_steps == 2


def test_final_is_a_safetensors_save_pretrained_folder(main_run, tiny_policy_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = main_run
    final = out / "final"
    assert (final / "model.safetensors").is_file()
    assert not list(final.glob("*.bin")) and not list(final.glob("*.pt"))
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    start = load_file(str(Path(tiny_policy_dir) / "model.safetensors"))
    trained = load_file(str(final / "model.safetensors"))
    assert any(not torch.equal(start[k], trained[k]) for k in start)  # trained
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    gen = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert gen.shape[1] > ids["input_ids"].shape[1]
    # save_steps 0: one checkpoint, at the end (so that --resume of the finished run does nothing)
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]


def test_heldout_report_and_tensorboard(main_run):
    out, _ = main_run
    before = json.loads((out / "heldout_before.json").read_text())
    after = json.loads((out / "heldout_after.json").read_text())
    assert len(before["per_prompt"]) == len(after["per_prompt"]) == 3
    assert (out / "report.md").is_file() and list(out.glob("*.png"))
    events = list(out.rglob("events.out.tfevents.*"))
    assert events, "report_to tensorboard wrote no event file"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for e in events:
        acc = EventAccumulator(str(e))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"reward", "loss", "dar/clip_frac"} <= tags


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, tiny_policy_dir, tiny_prompts_file):
    tmp = tmp_path_factory.mktemp("train_lora")
    cfg = base_config(tmp, tiny_policy_dir, tiny_prompts_file, use_peft=True, lora_r=4, lora_alpha=8)
    merged, adapter = tmp / "merged", tmp / "adapter"
    return merged, adapter, train(cfg, merged), train(cfg, adapter, "--merge_lora", "false")


def test_a_lora_push_reads_the_merged_weights_out_of_place(tiny_policy_dir):
    """The weights a vLLM push reads from a LoRA policy: W + BA made into a fresh tensor per layer
    (``sharding.whole``), by a plain causal LM's names; the base weights (the frozen reference too)
    are never written."""
    from peft import LoraConfig, get_peft_model

    from daralign.core.models import load_causal_lm
    from daralign.core.sharding import merged_weights, whole

    plain = load_causal_lm(str(tiny_policy_dir))
    model = get_peft_model(load_causal_lm(str(tiny_policy_dir)), LoraConfig(r=4, target_modules=["q_proj"], lora_alpha=8))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # B starts at zero: give the adapter a delta
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * layer.scaling["default"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with merged_weights(model) as weights:
        weights = dict(weights)
        assert set(weights) == set(plain.state_dict())  # names a plain causal LM has
        q = whole(weights["model.layers.0.self_attn.q_proj.weight"])
        assert q.data_ptr() != layer.base_layer.weight.data_ptr()  # a fresh tensor, not the base weight
        torch.testing.assert_close(q, plain.state_dict()["model.layers.0.self_attn.q_proj.weight"] + delta)
    for k, v in model.state_dict().items():  # never written: bit for bit
        assert torch.equal(v, before[k]), k
    with merged_weights(plain) as weights:  # a plain model: its own tensors, by their own names
        assert {k: v.data_ptr() for k, v in weights} == {k: v.data_ptr() for k, v in plain.state_dict().items()}


def test_a_push_sends_a_tied_weight_once(tiny_policy_dir):
    """A tied LM head is the embedding itself: a push sends it once, under the embedding's name
    (vLLM ties the head itself), and every process leaves out the same name."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from daralign.core.sharding import merged_weights

    config = AutoConfig.from_pretrained(tiny_policy_dir)
    config.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(config)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    with merged_weights(model) as weights:
        names = [k for k, _ in weights]
    assert names == [k for k in model.state_dict() if k != "lm_head.weight"]


def mapped_from(t: torch.Tensor) -> set[str]:
    """The files whose memory maps hold ``t``'s first byte (/proc/self/maps)."""
    ptr, files = t.data_ptr(), set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        low, high = (int(x, 16) for x in fields[0].split("-"))
        if low <= ptr < high and len(fields) == 6:
            files.add(fields[5])
    return files


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the memory maps of Linux's /proc")
def test_own_weights_moves_them_out_of_the_checkpoints_memory_map(tmp_path, tiny_policy_dir, tiny_prompts_file):
    """transformers maps the checkpoint; own_weights copies the weights out of it (same values, a
    tied LM head still the embedding), and the trainer does so for the policy it trains, not for the
    frozen reference. benchmarks/first_step.py times why."""
    import shutil
    import sys

    from transformers import AutoConfig, AutoModelForCausalLM

    from daralign.core.models import load_causal_lm, own_weights
    from daralign.train.loop import OnlineTrainer

    config = AutoConfig.from_pretrained(tiny_policy_dir)
    config.tie_word_embeddings = True
    shutil.copytree(tiny_policy_dir, tmp_path / "tied")  # its tokenizer; the weights, tied, written over
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "tied")
    checkpoint = str(tmp_path / "tied" / "model.safetensors")
    model = load_causal_lm(str(tmp_path / "tied"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert checkpoint in mapped_from(model.get_input_embeddings().weight)
    own_weights(model)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) and checkpoint not in mapped_from(v), k

    trainer = OnlineTrainer(*parse_train_args(["--config", str(base_config(tmp_path, tmp_path / "tied", tiny_prompts_file,
                                                                           output_dir=str(tmp_path / "o")))]))
    try:
        assert checkpoint not in mapped_from(trainer.unwrapped.get_input_embeddings().weight)
        assert checkpoint in mapped_from(trainer.reference.get_input_embeddings().weight)
    finally:
        trainer.close()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import first_step

    assert first_step.main(["--model", str(tiny_policy_dir), "--repeats", "1", "--json", str(tmp_path / "b.json")]) == 0
    res = json.loads((tmp_path / "b.json").read_text())
    assert res["median"]["own_copy"]["copy_s"] > 0 and res["median"]["memory_map"]["copy_s"] == 0
    assert res["copy_and_first_step_over_mapped_first_step"] > 0 and res["cpu"]


def test_lora_merged_vs_adapter_only(lora_runs, tiny_policy_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged, adapter, m1, m2 = lora_runs
    strip = lambda ms: [{k: v for k, v in m.items() if not k.startswith("timing/") and k != "step_time"} for m in ms]  # noqa: E731
    assert strip(m1) == strip(m2)  # same seed, same training
    # merged: a plain causal-LM folder
    assert (merged / "final" / "model.safetensors").is_file() and not (merged / "final" / "adapter_config.json").exists()
    merged_model = AutoModelForCausalLM.from_pretrained(merged / "final")
    assert not any("lora" in n for n, _ in merged_model.named_parameters())
    # adapter only: adapter files, no full weights
    files = {p.name for p in (adapter / "final").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    base = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)
    start = {k: v.clone() for k, v in base.state_dict().items()}
    via_adapter = PeftModel.from_pretrained(base, adapter / "final").merge_and_unload()
    sd_m, sd_a = merged_model.state_dict(), via_adapter.state_dict()
    changed = 0
    for k in sd_m:
        assert torch.allclose(sd_m[k], sd_a[k], atol=1e-6), k
        changed += not torch.equal(sd_m[k], start[k])
    assert changed > 0  # the adapter did train something


def test_bf16_autocast_run_with_reward_model(tmp_path, tiny_policy_dir, tiny_prompts_file, tiny_rm_dir):
    cfg = base_config(tmp_path, tiny_policy_dir, tiny_prompts_file, bf16=True, max_steps=1, annotator={
        "type": "combined", "sources": [{"type": "reward_model", "model": str(tiny_rm_dir)},
                                        {"type": "function", "function": f"{tiny.TINY_PY}:length_reward", "weight": 0.1}]})
    metrics = train(cfg, tmp_path / "bf16")
    m = metrics[0]
    assert all(isinstance(m[k], (int, float)) and m[k] == m[k] for k in REQUIRED_KEYS)
    assert "rewards/0_reward_model/mean" in m
    final = load_file(str(tmp_path / "bf16" / "final" / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in final.values())  # fp32 master weights under autocast


def test_shuffle_rewards_permutes_in_the_loop(tmp_path, tiny_policy_dir, tiny_prompts_file):
    from daralign.train.loop import OnlineTrainer

    cfg = base_config(tmp_path, tiny_policy_dir, tiny_prompts_file, shuffle_rewards=True, num_generations=3,
                      per_device_train_batch_size=3, output_dir=str(tmp_path / "o"))
    train_cfg, algo = parse_train_args(["--config", str(cfg)])
    trainer = OnlineTrainer(train_cfg, algo)
    try:
        rollout, _ = trainer.rollout(0, 3)
        shuffled = trainer.feedback(rollout, 0).rewards
        assert torch.equal(trainer.feedback(rollout, 0).rewards, shuffled)  # seeded by (seed, step)
        other_step = trainer.feedback(rollout, 1).rewards
        trainer.cfg.shuffle_rewards = False
        plain = trainer.feedback(rollout, 0).rewards
    finally:
        trainer.close()
    assert len(set(plain.reshape(-1).tolist())) > 3
    assert sorted(shuffled.reshape(-1).tolist()) == sorted(plain.reshape(-1).tolist())
    assert not torch.equal(shuffled, plain) and not torch.equal(shuffled, other_step)


def test_micro_batching_does_not_change_the_update(tmp_path, tiny_policy_dir, tiny_prompts_file):
    """2 prompts per step as one micro-batch, or as 2 micro-batches of 1 prompt (gradient
    accumulation): the same tokens give the same update (loss scaled by micro-batch / batch)."""
    one = base_config(tmp_path, tiny_policy_dir, tiny_prompts_file, max_steps=1)
    two = base_config(tmp_path, tiny_policy_dir, tiny_prompts_file, max_steps=1, per_device_train_batch_size=1,
                      gradient_accumulation_steps=2)
    m1, m2 = train(one, tmp_path / "one"), train(two, tmp_path / "two")
    assert m1[0]["reward"] == m2[0]["reward"] and m1[0]["dar/weight_mean"] == pytest.approx(m2[0]["dar/weight_mean"])
    assert m1[0]["loss"] == pytest.approx(m2[0]["loss"], rel=1e-5)
    a = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    for k in a:  # float rounding only: Adam's first step (lr 1e-3) divides by |g|, so ~1e-6 in a weight
        assert torch.allclose(a[k], b[k], atol=5e-6, rtol=1e-5), k


def test_eval_win_rate_during_training(tmp_path, tiny_policy_dir, tiny_prompts_file):
    """`eval_win_rate` judges held-out answers against the starting policy's answers in both orders
    every `eval_steps` (a tiny model stands in as a real, if meaningless, transformers judge)."""
    judge = {"type": "judge", "mode": "score", "template": "tone", "backend": "transformers",
             "model": str(tiny_policy_dir), "dtype": "float32", "min_label_mass": 0.0, "invalid_policy": "drop"}
    cfg = base_config(tmp_path, tiny_policy_dir, tiny_prompts_file, annotator=judge, eval_dataset=str(tiny_prompts_file),
                      eval_max_prompts=3, eval_win_rate=True, eval_steps=1, max_steps=2)
    out = tmp_path / "run"
    metrics = train(cfg, out)
    assert 0.0 <= metrics[0]["eval/win_rate"] <= 1.0 and metrics[0]["eval/mean_length"] > 0
    from conftest import undocumented_metrics

    assert not undocumented_metrics(metrics), "add these to docs/metrics.md"
    refs = json.loads((out / "heldout_reference_answers.json").read_text())
    assert len(refs) == 3 and all(isinstance(r, str) for r in refs)
    before = json.loads((out / "heldout_before.json").read_text())
    # before training the policy is the reference: any win rate is noise around a tie
    assert 0.0 <= before["win_rate"]["eval/win_rate"] <= 1.0
    assert "eval/win_rate" in json.loads((out / "heldout_after.json").read_text())["win_rate"]


@pytest.mark.slow  # two gloo processes
def test_two_process_ddp_on_cpu(tmp_path, tiny_policy_dir, tiny_prompts_file):
    """Several processes without code changes: torchrun + gloo on CPU (`accelerate launch` on GPUs).
    Each rank samples its share of the step's prompts; annotations are summed over ranks."""
    import os
    import subprocess
    import sys

    cfg = base_config(tmp_path, tiny_policy_dir, tiny_prompts_file, max_steps=2)
    out = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    # one launch runs the run and its shuffled-reward control (`--with_control`), as a user would
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "daralign.cli",
                           "train", "--config", str(cfg), "--output_dir", str(out), "--with_control", "true"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ctl = out / "control"
    per_step = 2 * PROMPTS_PER_STEP * K  # two ranks, each with its own prompts
    for run in (out, ctl):
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [m["annotations"] for m in metrics] == [per_step, 2 * per_step]
        assert [m["annotation_requests"] for m in metrics] == [per_step, 2 * per_step]  # summed over ranks too
        assert (run / "final" / "model.safetensors").is_file()
    assert "shuffle_rewards: true" in (ctl / "config.yaml").read_text()
    # the shuffled-reward control permutes across the global batch (gathered from both ranks, one
    # permutation on both): rank 0 then logs rewards that include rank 1's
    plain = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    shuffled = [json.loads(line) for line in (ctl / "completions.jsonl").read_text().splitlines()]
    assert len(shuffled) == len(plain) == 2 * PROMPTS_PER_STEP * K  # rank 0's samples, 2 steps
    step1 = [sorted(r["reward"] for r in rows if r["step"] == 1) for rows in (plain, shuffled)]  # same samples at step 1
    assert step1[0] != step1[1]  # a local permutation would keep rank 0's multiset of rewards


def test_heldout_progress_names_each_phase(tiny_policy_dir, tiny_prompts_file):
    """The held-out check tells its progress bar each phase before it starts, then that it is done."""
    from daralign.annotators import build_annotator
    from daralign.core.data import read_rows
    from daralign.train.heldout import judge_heldout
    from daralign.core.models import load_causal_lm, load_tokenizer, token_logps

    model, tok = load_causal_lm(str(tiny_policy_dir)), load_tokenizer(str(tiny_policy_dir))
    scorer = build_annotator({"type": "function", "function": f"{tiny.TINY_PY}:length_reward"})
    calls = []
    res = judge_heldout(model, tok, scorer, read_rows(tiny_prompts_file)[:3], max_new_tokens=4, temperature=1.0, seed=0,
                        ref_token_logps=lambda r: token_logps(model, r.input_ids, r.attention_mask, 1.0, r.completion_mask),
                        progress=lambda *a: calls.append(a))
    assert calls == [("sampling", 0, 3), ("scoring", 1, 3), ("KL to the reference", 2, 3), ("done", 3, 3)]
    assert len(res["per_prompt"]) == 3 and res["kl"] is not None


@pytest.mark.parametrize("algorithm", ["online-dpo", "dpo"])
def test_the_shuffled_control_flips_fair_coins_for_preference_methods(algorithm, tmp_path, tiny_policy_dir,
                                                                      tiny_prompts_file, judge_http):
    """Preference methods have no rewards to permute: their control replaces every decided label by
    a seeded fair coin flip (never silently trains on the real labels)."""
    from conftest import http_judge, keyword_judge

    from daralign.train.loop import OnlineTrainer

    judge_http.handler = keyword_judge
    over = {"algorithm": algorithm, "num_generations": 2, "per_device_train_batch_size": 4, "output_dir": str(tmp_path / "o")}
    if algorithm == "dpo":
        rows = [{"prompt": f"question {i}", "chosen": "Here we see the sea.", "rejected": "No."} for i in range(4)]
        over |= {"dataset": str(tiny.write_jsonl(tmp_path / "pairs.jsonl", rows)), "annotator": None}
    else:
        over |= {"annotator": http_judge(judge_http, "compare")}
    cfg = base_config(tmp_path, tiny_policy_dir, tiny_prompts_file, shuffle_rewards=True, **over)
    trainer = OnlineTrainer(*parse_train_args(["--config", str(cfg)]))
    try:
        flips = []
        for step in range(6):
            rollout, _ = trainer.rollout(step, 4)
            shuffled = trainer.feedback(rollout, step)
            assert torch.equal(trainer.feedback(rollout, step).preference, shuffled.preference)  # seeded by (seed, step)
            trainer.cfg.shuffle_rewards = False
            real = trainer.feedback(rollout, step)
            trainer.cfg.shuffle_rewards = True
            decided = (real.preference - 0.5).abs() > 1e-6
            assert torch.equal(shuffled.preference[~decided], real.preference[~decided])  # ties stay ties
            assert set(shuffled.preference[decided].tolist()) <= {0.0, 1.0}
            flips += (shuffled.preference[decided] != real.preference[decided]).tolist()
    finally:
        trainer.close()
    assert 0 < sum(flips) < len(flips)  # some labels kept, some flipped: coins, not the labels


def test_an_eval_seed_shares_the_held_out_answers_across_training_seeds(tmp_path, tiny_policy_dir, tiny_prompts_file):
    heldout = tiny.write_jsonl(tmp_path / "heldout.jsonl", [{"prompt": p} for p in tiny.PROMPTS[:2]])
    before = []
    for seed in (1, 2):
        out = tmp_path / f"seed{seed}"
        cfg = base_config(tmp_path, tiny_policy_dir, tiny_prompts_file, seed=seed, eval_seed=5, eval_samples_per_prompt=3,
                          eval_dataset=str(heldout), max_steps=1)
        m = train(cfg, out)
        before.append(json.loads((out / "heldout_before.json").read_text()))
        spent = json.loads((out / "annotation_requests.json").read_text())
        assert spent["eval_annotation_requests"] == 2 * 3 * 2  # 2 prompts × 3 answers, before and after
        assert m[0]["eval_annotation_requests"] == 2 * 3
    assert before[0]["per_prompt"] == before[1]["per_prompt"] and before[0]["completions"] == before[1]["completions"]
