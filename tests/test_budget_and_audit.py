"""The comparison's accounting and the audit fixes, through the real loop on the tiny model:
the budget is in requests and never exceeded (last step cut, hard cap under retries), a finished
run resumed does nothing, the schedule counts online batches, a batch without signal takes no
optimizer step, the recorded π_t is the distribution sampled from, and sweeps over DAR's two
parameterisations mean what they say."""

from __future__ import annotations

import collections
import json
import threading
from pathlib import Path

import pytest
import torch
from conftest import chat_reply, http_judge
from safetensors.torch import load_file

import tiny
from daralign.cli import main as daralign_main
from daralign.compare.run import build_plan
from daralign.train.args import parse_train_args
from daralign.core.errors import ConfigError

FN = f"{tiny.TINY_PY}:"


def config(tmp: Path, policy: Path, prompts: Path, **over) -> Path:
    return tiny.run_config(tmp, policy, prompts, **{"max_completion_length": 5, "max_steps": 6, **over})


def train(cfg: Path, out: Path, *args: str) -> list[dict]:
    assert daralign_main(["train", "--config", str(cfg), "--output_dir", str(out), *args]) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_budget_cuts_the_last_step_and_a_finished_run_resumed_does_nothing(tmp_path, tiny_policy_dir, tiny_prompts_file, capsys):
    cfg = config(tmp_path, tiny_policy_dir, tiny_prompts_file, annotation_budget=7)
    out = tmp_path / "run"
    m = train(cfg, out)
    # 2 prompts × K=2 = 4 requests, then 3 left: one prompt (2 requests) fits, then none
    assert [x["annotation_requests"] for x in m] == [4, 6] and [x["num_prompts"] for x in m] == [2, 1]
    assert "annotation budget reached: 6 of 7 requests spent" in capsys.readouterr().err
    final = (out / "final" / "model.safetensors").stat().st_mtime_ns
    before = (out / "metrics.jsonl").read_text()
    m2 = train(cfg, out, "--resume")
    assert "this run is finished" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == before and m2 == m  # no step was taken
    assert (out / "final" / "model.safetensors").stat().st_mtime_ns == final  # final/ untouched


def test_retries_and_invalid_answers_are_paid_and_the_cap_holds(tmp_path, tiny_policy_dir, tiny_prompts_file, judge_http):
    """A judge whose first answer is unreadable: every label costs a retry. The nominal cost of a
    step fits the budget, the real one does not: the hard cap stops asking at the budget, and the
    server's own count equals ``annotation_requests``."""
    judge_http.handler = lambda path, body, n: (200, chat_reply("Yes" if body["temperature"] > 0 else "maybe"), {})
    judge = http_judge(judge_http, invalid_policy="retry", invalid_retries=1)
    cfg = config(tmp_path, tiny_policy_dir, tiny_prompts_file, annotation_budget=6, annotator=judge)
    m = train(cfg, tmp_path / "run")
    assert len(m) == 1 and m[0]["annotation_requests"] == 6 == len(judge_http.requests)  # never more than the budget
    assert m[0]["annotations"] == 2  # 4 first answers (invalid) + 2 paid retries: 2 labels
    assert m[0]["judge/budget_cut"] == 2 and m[0]["annotator/invalid_frac"] == pytest.approx(0.5)


def test_scheduler_steps_once_per_online_batch(tmp_path, tiny_policy_dir, tiny_prompts_file):
    cfg = config(tmp_path, tiny_policy_dir, tiny_prompts_file, max_steps=4, num_updates_per_batch=2,
                 lr_scheduler_type="linear")
    m = train(cfg, tmp_path / "run")
    assert [x["learning_rate"] for x in m] == pytest.approx([7.5e-4, 5e-4, 2.5e-4, 0.0])  # 4 steps, not 8


def test_a_batch_without_signal_takes_no_optimizer_step(tmp_path, tiny_policy_dir, tiny_prompts_file):
    cfg = config(tmp_path, tiny_policy_dir, tiny_prompts_file, max_steps=2, weight_decay=0.1,
                 annotator={"type": "function", "function": FN + "constant_reward"})
    m = train(cfg, tmp_path / "run")
    assert [x["update/skipped"] for x in m] == [1.0, 1.0]
    start = load_file(str(tiny_policy_dir / "model.safetensors"))
    final = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert all(torch.equal(start[k], final[k]) for k in start)  # AdamW's decay and momentum did not move it


def test_k1_with_invalid_labels_trains_on_the_valid_ones(tmp_path, tiny_policy_dir, tiny_prompts_file):
    cfg = config(tmp_path, tiny_policy_dir, tiny_prompts_file, max_steps=2, num_generations=1,
                 per_device_train_batch_size=4, annotator={"type": "function", "function": FN + "sometimes_invalid_reward"})
    m = train(cfg, tmp_path / "run")
    for x in m:
        assert x["annotations"] < x["annotation_requests"]  # the unlabelled item was still a request
        assert x["annotator/invalid_frac"] == pytest.approx(0.25)
        assert 0 < x["dar/weight_mean"] <= 20 and torch.isfinite(torch.tensor(x["loss"]))


def test_sampling_ignores_the_checkpoints_generation_processors(tmp_path, tiny_prompts_file):
    """A checkpoint whose generation_config suppresses EOS (and adds a repetition penalty): π_t is
    recorded from the raw distribution, so sampling must not apply them — EOS still ends answers,
    and the recorded log-probs equal a fresh forward's."""
    from daralign.core.models import load_causal_lm, load_tokenizer, token_logps
    from daralign.rollout.hf import sample_rollout

    folder = tiny.save_policy(tmp_path / "policy")
    model, tok = load_causal_lm(str(folder)), load_tokenizer(str(folder))
    model.generation_config.suppress_tokens = [tok.eos_token_id]
    model.generation_config.repetition_penalty = 3.0
    torch.manual_seed(0)
    rows = [{"prompt": p} for p in tiny.PROMPTS]
    r = sample_rollout(model, tok, rows, num_generations=4, max_completion_length=6)
    assert r.is_eos.any()  # under the checkpoint's processors EOS could never be sampled
    fresh = token_logps(model, r.input_ids, r.attention_mask) * r.completion_mask[:, 1:]
    assert torch.allclose(r.behaviour_token_logps, fresh, atol=2e-4)
    assert model.generation_config.repetition_penalty == 3.0  # the model's own config is restored


def test_dropout_is_off_in_the_update_forward(tiny_policy_dir):
    from daralign.core.models import disable_dropout, load_causal_lm

    model = load_causal_lm(str(tiny_policy_dir))
    model.config.attention_dropout = 0.5
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    disable_dropout(model)
    assert all(layer.self_attn.attention_dropout == 0.0 for layer in model.model.layers)
    model.train()
    ids = torch.tensor([[5, 6, 7, 8]])
    a, b = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.equal(a, b)  # training mode, yet deterministic


# ---------------------------------------------------------------- sweeps: α/β vs total/ratio
def test_sweep_over_total_and_ratio_overrides_alpha_beta_from_the_base_config(tmp_path, tiny_policy_dir, tiny_prompts_file):
    cfg = config(tmp_path, tiny_policy_dir, tiny_prompts_file, dar_alpha=0.005, dar_beta=0.045)
    plan, _ = build_plan(["--config", str(cfg), "--algorithms", "dar", "--annotation_budget", "8",
                          "--output_dir", str(tmp_path / "o"), "--sweep", "dar_total=0.01,0.2", "dar_ratio=0,0.5"])
    got = [(r.point["dar_total"], r.point["dar_ratio"], r.algo.dar_alpha, r.algo.dar_beta) for r in plan.runs]
    for total, ratio, alpha, beta in got:
        assert alpha == pytest.approx(float(total) * float(ratio)) and beta == pytest.approx(float(total) * (1 - float(ratio)))
    assert len({(a, b) for *_, a, b in got}) == 4  # four different runs, not four copies of α=0.005, β=0.045


def test_both_parameterisations_in_one_source_must_agree(tmp_path, tiny_policy_dir, tiny_prompts_file):
    bad = config(tmp_path, tiny_policy_dir, tiny_prompts_file, dar_alpha=0.005, dar_beta=0.045, dar_total=0.2)
    with pytest.raises(ConfigError, match="dar_alpha=0.005/dar_beta=0.045 and dar_total=0.2"):
        parse_train_args(["--config", str(bad)])
    # a saved config.yaml states both, consistently, and re-runs as it is
    ok = config(tmp_path, tiny_policy_dir, tiny_prompts_file, dar_alpha=0.005, dar_beta=0.045, dar_total=0.05, dar_ratio=0.1)
    _, algo = parse_train_args(["--config", str(ok)])
    assert (algo.dar_alpha, algo.dar_beta) == pytest.approx((0.005, 0.045))
    _, algo = parse_train_args(["--config", str(ok), "--dar_ratio", "0.5"])  # the later source wins
    assert (algo.dar_alpha, algo.dar_beta) == pytest.approx((0.025, 0.025))


def test_a_flaky_judge_never_passes_the_budget_and_evaluation_is_counted_apart(tmp_path, tiny_policy_dir, tiny_prompts_file,
                                                                              judge_http, capsys):
    """A judge server that fails every second request (HTTP 503): each retry is a paid request,
    reserved on the meter before it is sent. Budget 11: at most 11 training requests, the run ends
    cleanly when retries spend the budget mid-step (no "no valid label" error), and the server's
    own count is training + evaluation requests (held-out scoring by the same judge).

    Every second request *of the same text*: each request's first attempt fails and its retry
    succeeds. Counted over all requests, two requests in flight at once (the judge keeps up to 8) could
    take turns so that one of them got every failing number and ran out of retries."""
    seen, lock = collections.Counter(), threading.Lock()

    def every_second(path, body, n):
        with lock:  # the server answers each request in a thread of its own
            text = json.dumps(body["messages"])
            seen[text] += 1
            fail = seen[text] % 2 == 1
        return (503, {"error": "busy"}, {}) if fail else (200, chat_reply("Yes"), {})

    judge_http.handler = every_second
    judge = http_judge(judge_http, max_retries=3, backoff_s=0.0)
    heldout = tiny.write_jsonl(tmp_path / "heldout.jsonl", [{"prompt": p} for p in tiny.PROMPTS[:2]])
    cfg = config(tmp_path, tiny_policy_dir, tiny_prompts_file, annotation_budget=11, annotator=judge,
                 eval_dataset=str(heldout), eval_max_prompts=2)
    m = train(cfg, tmp_path / "run")
    spent = json.loads((tmp_path / "run" / "annotation_requests.json").read_text())
    assert m[-1]["annotation_requests"] == spent["annotation_requests"] <= 11
    # held-out: 2 prompts × 2 answers, before and after: 8 answers, each paid once or twice (a 503 first)
    assert 8 < spent["eval_annotation_requests"] <= 16
    assert len(judge_http.requests) == spent["annotation_requests"] + spent["eval_annotation_requests"]
    err = capsys.readouterr().err
    assert "annotation budget reached" in err and "no valid label" not in err
    assert 4 < m[-1]["eval_annotation_requests"] <= 8  # the "before" check, reported in the step's metrics


def test_a_priced_judge_reports_what_training_cost(tmp_path, tiny_policy_dir, tiny_prompts_file, judge_http):
    """Usage the server reports (6 prompt + 1 completion tokens a request), priced per 1k tokens."""
    judge_http.handler = lambda path, body, n: (200, chat_reply("Yes"), {})
    judge = http_judge(judge_http, price_per_1k_input_tokens=1.0, price_per_1k_output_tokens=2.0)
    cfg = config(tmp_path, tiny_policy_dir, tiny_prompts_file, annotator=judge, max_steps=2, report=True)
    m = train(cfg, tmp_path / "run")
    assert [x["judge/cost"] for x in m] == pytest.approx([4 * 0.008, 4 * 0.008])  # 4 requests a step
    assert [x["annotation_cost"] for x in m] == pytest.approx([0.032, 0.064])
    assert json.loads((tmp_path / "run" / "annotation_requests.json").read_text())["annotation_cost"] == pytest.approx(0.064)
    assert "training requests cost 0.064 at the judge's prices" in (tmp_path / "run" / "report.md").read_text()
