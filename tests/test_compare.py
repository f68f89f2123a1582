"""`daralign compare` on the tiny model: every method sees the same prompts in the same order, the
annotation counter in metrics matches the annotator's own count and the budget, summary.json and
report.html are complete, finished runs are skipped, sweeps expand to a grid, bad input is a
ConfigError. The annotator is a small real one (score and compare, by a keyword count)."""

from __future__ import annotations

import html
import json
from pathlib import Path

import pytest
import yaml

import tiny
from daralign.annotators.base import Annotator, CompareResult, ScoreResult, register_annotator
from daralign.cli import main as daralign_main
from daralign.annotators import annotator_for
from daralign.compare.run import build_plan, check_existing, expand_sweep
from daralign.compare.report import machines_note, prompt_stream
from daralign.core.errors import ConfigError

BUDGET = 8  # requests. P=2 prompts: dar/rloo (K=2) spend 4 per step (2 steps), online-dpo (one pair) 2 (4 steps)


@register_annotator("test-keyword")
class KeywordAnnotator(Annotator):
    """Scores a response by how many 'e' it has; prefers the response with more. Keeps its own
    count of labels given to held-out rows (``split == "heldout"``) so training labels can be
    checked against the loop's counter. Every instance is recorded in ``LOG``."""

    LOG: list["KeywordAnnotator"] = []

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.heldout_labels = 0
        self.kinds: set[str] = set()
        KeywordAnnotator.LOG.append(self)

    @classmethod
    def from_config(cls, cfg: dict) -> "KeywordAnnotator":
        return cls(cfg)

    def _score(self, prompts, completions, rows):
        self.kinds.add("score")
        self.heldout_labels += sum(r.get("split") == "heldout" for r in rows)
        return ScoreResult([float(c.count("e")) for c in completions])

    def _compare(self, prompts, completions_a, completions_b, rows):
        self.kinds.add("compare")
        return CompareResult([1.0 if a.count("e") > b.count("e") else 0.0 if a.count("e") < b.count("e") else 0.5
                              for a, b in zip(completions_a, completions_b)])


def write_config(tmp: Path, policy: Path, prompts: Path, **over) -> Path:
    cfg = {"model_name_or_path": str(policy), "dataset": str(prompts), "annotator": {"type": "test-keyword"},
           "num_generations": 2, "per_device_train_batch_size": 2, "max_completion_length": 6,
           "learning_rate": 1e-3, "seed": 5, "dar_total": 0.05, **over}
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory, tiny_policy_dir, tiny_prompts_file):
    tmp = tmp_path_factory.mktemp("compare")
    heldout = tiny.write_jsonl(tmp / "heldout.jsonl", [{"prompt": p, "split": "heldout"} for p in tiny.PROMPTS[:2]])
    cfg = write_config(tmp, tiny_policy_dir, tiny_prompts_file, eval_dataset=str(heldout), eval_max_prompts=2)
    out = tmp / "out"
    KeywordAnnotator.LOG.clear()
    argv = ["compare", "--config", str(cfg), "--algorithms", "dar,online-dpo,rloo", "--annotation_budget", str(BUDGET),
            "--seeds", "1,2", "--output_dir", str(out), "--max_completion_length", "5"]
    assert daralign_main(argv) == 0
    return out, argv, list(KeywordAnnotator.LOG)


def test_same_prompts_in_the_same_order(compare_run):
    out, _, _ = compare_run
    for seed in (1, 2):
        per_step = {}
        for algo in ("dar", "online-dpo", "rloo"):
            rows = [json.loads(line) for line in (out / algo / f"seed{seed}" / "completions.jsonl").read_text().splitlines()]
            steps: dict[int, list[int]] = {}
            for r in rows:
                steps.setdefault(r["step"], []).append(r["prompt_index"])
            per_step[algo] = steps
        # same prompts per step (K=2 for all): on every step both dar and rloo ran, all three agree
        for step in per_step["dar"]:
            assert per_step["dar"][step] == per_step["rloo"][step] == per_step["online-dpo"][step], (seed, step)
        assert len(per_step["online-dpo"]) > len(per_step["dar"])  # a pair costs 1, a score 1 per response
    assert prompt_stream(out / "dar" / "seed1", 2) != prompt_stream(out / "dar" / "seed2", 2)  # seeds differ
    summary = json.loads((out / "summary.json").read_text())
    assert summary["same_prompt_order"] == {"1": True, "2": True}


def test_annotation_counter_matches_annotator_and_budget(compare_run):
    out, _, annotators = compare_run
    runs = [(a, s) for a in ("dar", "online-dpo", "rloo") for s in (1, 2)]
    assert len(annotators) == len(runs)  # one annotator per run, built by the loop in run order
    for (algo, seed), ann in zip(runs, annotators):
        m = metrics(out / algo / f"seed{seed}")
        assert ann.num_annotations - ann.heldout_labels == m[-1]["annotations"]
        assert ann.num_requests - ann.heldout_labels == m[-1]["annotation_requests"] == BUDGET  # spent exactly, never more
        assert ann.kinds == ({"score", "compare"} if algo == "online-dpo" else {"score"})
    per_step = {"dar": 4, "rloo": 4, "online-dpo": 2}
    for algo, cost in per_step.items():
        assert [x["annotation_requests"] for x in metrics(out / algo / "seed1")] == list(range(cost, BUDGET + 1, cost))


def test_summary_and_report(compare_run):
    out, _, _ = compare_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["annotation_budget"] == BUDGET and summary["seeds"] == [1, 2]
    assert [g["group"] for g in summary["groups"]] == ["dar", "online-dpo", "rloo"]
    for rec in summary["runs"]:
        for key in ("annotations", "annotation_requests", "budget_reached", "steps", "train_reward_final",
                    "train_reward_best", "kl_final", "mean_length_final", "wall_time_s", "train_time_s",
                    "heldout_before", "heldout_after", "heldout_diff", "cpu"):
            assert key in rec, key
        assert rec["cpu"] == json.loads((out / rec["dir"] / "provenance.json").read_text())["cpu"]
        assert rec["budget_reached"] and rec["annotation_requests"] == rec["annotations"] == BUDGET and rec["wall_time_s"] > 0
        assert rec["kl_final"] is not None  # held-out KL: every method has a point on the frontier
        assert rec["evaluator_is_training_annotator"] is True
        assert (rec["train_reward_final"] is None) == (rec["algorithm"] == "online-dpo")
    for g in summary["groups"]:
        assert g["n"] == 2 and g["mean"]["heldout_after"] is not None and g["std"]["annotations"] == 0
    # the pre-training held-out score is the same for every run of a seed (same model, prompts, judge)
    for seed in (1, 2):
        assert len({r["heldout_before"] for r in summary["runs"] if r["seed"] == seed}) == 1
    page = (out / "report.html").read_text()
    for png in ("reward_vs_annotations.png", "reward_vs_kl.png", "length_vs_step.png"):
        assert f'src="{png}"' in page and (out / png).stat().st_size > 1000
    assert "online-dpo" in page and "seed 1: yes" in page
    assert html.escape(f"Every run on one machine: {summary['runs'][0]['cpu']}.") in page
    two = [{"seed": 1, "cpu": "Intel Xeon"}, {"seed": 2, "cpu": "AMD EPYC"}, {"seed": 2, "cpu": "AMD EPYC"}]
    assert machines_note(two).endswith("Intel Xeon: seeds 1; AMD EPYC: seeds 2.") and "SEVERAL MACHINES" in machines_note(two)
    assert "requests" in page and "the SAME annotator the methods trained on" in page
    assert not list(out.glob("*/seed*/checkpoint-*"))  # only final/ is kept
    assert (out / "configs" / "rloo.yaml").exists() and "dar_total" not in (out / "configs" / "rloo.yaml").read_text()


def test_repeating_the_command_skips_finished_runs(compare_run):
    out, argv, _ = compare_run
    before = (out / "dar" / "seed1" / "metrics.jsonl").read_text()
    KeywordAnnotator.LOG.clear()
    assert daralign_main(argv) == 0
    assert KeywordAnnotator.LOG == []  # no run was started
    assert (out / "dar" / "seed1" / "metrics.jsonl").read_text() == before
    changed = [a if a != "5" else "4" for a in argv]  # --max_completion_length 4: another config
    plan, _ = build_plan(changed[1:])
    with pytest.raises(ConfigError, match="another config.*max_completion_length"):
        check_existing(plan.runs[0])
    assert daralign_main(changed) == 1  # one clear line, nothing run
    # the settings of an engine the runs do not sample with change nothing they did; the engine does
    check_existing(build_plan(argv[1:] + ["--vllm_max_num_seqs", "7"])[0].runs[0])
    with pytest.raises(ConfigError, match="another config.*use_vllm"):
        check_existing(build_plan(argv[1:] + ["--use_vllm", "true"])[0].runs[0])


def test_sweep_runs_the_grid_with_a_plot_per_knob(tmp_path, tiny_policy_dir, tiny_prompts_file, capsys):
    cfg = write_config(tmp_path, tiny_policy_dir, tiny_prompts_file)
    out = tmp_path / "out"
    argv = ["compare", "--config", str(cfg), "--algorithms", "dar,rloo", "--annotation_budget", "4", "--seeds", "3",
            "--output_dir", str(out), "--sweep", "weight_clip=5,20", "num_generations=1,2"]
    assert daralign_main(argv) == 0
    shown = capsys.readouterr().err
    assert "[1/5] dar[weight_clip=5,num_generations=1] · seed 3" in shown  # names, not swallowed as rich markup
    summary = json.loads((out / "summary.json").read_text())
    assert [g["group"] for g in summary["groups"]] == [
        "dar[weight_clip=5,num_generations=1]", "dar[weight_clip=5,num_generations=2]",
        "dar[weight_clip=20,num_generations=1]", "dar[weight_clip=20,num_generations=2]", "rloo"]
    assert (out / "dar" / "weight_clip=5,num_generations=1" / "seed3" / "final").is_dir()
    k1 = metrics(out / "dar" / "weight_clip=20,num_generations=1" / "seed3")
    assert [m["annotations"] for m in k1] == [2, 4]  # K=1: 2 per step
    assert set(summary["sweep_effects"]) == {"weight_clip", "num_generations"}
    assert summary["sweep_effects"]["weight_clip"]["5"]["n"] == 2
    page = (out / "report.html").read_text()
    assert 'src="sweep_weight_clip.png"' in page and (out / "sweep_num_generations.png").exists()
    assert summary["same_prompt_order"] == {"3": True}


def test_expand_sweep():
    knobs, grid = expand_sweep(["dar_total=0.01,0.05,0.2", "dar_ratio=0.1,0.5", "weight_clip=5,20,100",
                                "num_generations=1,2,4"])
    assert len(grid) == 3 * 2 * 3 * 3 and list(knobs) == ["dar_total", "dar_ratio", "weight_clip", "num_generations"]
    assert grid[0] == {"dar_total": "0.01", "dar_ratio": "0.1", "weight_clip": "5", "num_generations": "1"}
    assert grid[1]["num_generations"] == "2" and grid[-1]["dar_total"] == "0.2"
    assert expand_sweep([]) == ({}, [{}])
    for bad in (["dar_total"], ["=1,2"], ["dar_total="], ["a=1", "a=2"], ["a=1,1"]):
        with pytest.raises(ConfigError):
            expand_sweep(bad)


def test_judge_mode_follows_the_method():
    judge = {"type": "judge", "mode": "score", "template": "tone", "model": "bundled:qwen2.5-coder-0.5b-instruct"}
    assert annotator_for(judge, "compare", "online-dpo", needs_score=True) == {**judge, "mode": "compare"}
    assert annotator_for({**judge, "mode": "compare"}, "score", "dar", needs_score=True) == judge
    fn = {"type": "function", "function": f"{tiny.TINY_PY}:length_reward"}
    assert annotator_for(fn, "score", "rloo", needs_score=False) == fn
    with pytest.raises(ConfigError, match="cannot compare"):
        annotator_for(fn, "compare", "online-dpo", needs_score=False)


@pytest.mark.parametrize("extra, message", [
    (["--algorithms", "dar,nope"], "unknown 'nope'"),
    (["--algorithms", "dar,dpo"], "dpo \\(pair labels\\).*cannot compare"),
    (["--algorithms", "dar,online-dpo", "--eval_requests", "6"], "not a multiple of dar's 4"),
    (["--algorithms", "dar", "--max_steps", "3"], "derives max_steps"),
    (["--algorithms", "dar", "--seed", "3"], "use --seeds"),
    (["--algorithms", "dar", "--beta", "0.2"], "not a config field"),
    (["--algorithms", "rloo", "--sweep", "weight_clip=5,20"], "not in --algorithms"),
    (["--algorithms", "dar,rloo", "--sweep", "kl_coef=0,1"], "not a config field of dar"),
    (["--algorithms", "dar", "--sweep", "weight_clip=-1,5"], "weight_clip must be > 0"),
    (["--algorithms", "dar", "--seeds", "1,x"], "not an integer"),
    (["--algorithms", "dar", "--override", "rloo:kl_coef=0"], "not in --algorithms"),
    (["--algorithms", "dar,online-dpo"], "cannot compare"),
])
def test_bad_input_is_a_config_error(tmp_path, tiny_policy_dir, tiny_prompts_file, extra, message):
    cfg = write_config(tmp_path, tiny_policy_dir, tiny_prompts_file,
                       annotator={"type": "function", "function": f"{tiny.TINY_PY}:length_reward"})
    with pytest.raises(ConfigError, match=message):
        build_plan(["--config", str(cfg), "--annotation_budget", "4", "--output_dir", str(tmp_path / "o"), *extra])


def test_one_judge_config_drives_both_modes(tmp_path, tiny_policy_dir, tiny_prompts_file, judge_http):
    """A score-mode judge config (a real HTTP judge on 127.0.0.1): online-dpo trains on its
    compare mode, and its held-out answers are scored by the score mode (the loop's twin)."""
    import re

    from conftest import chat_reply

    def answer(path, body, n):
        text = body["messages"][-1]["content"]
        if "<response_a>" in text:
            a, b = (re.search(rf"<{t}>\n(.*?)\n</{t}>", text, re.S).group(1) for t in ("response_a", "response_b"))
            return 200, chat_reply("A" if a.count("e") >= b.count("e") else "B"), {}
        return 200, chat_reply("Yes" if "e" in text.split("<response>")[-1] else "No"), {}

    judge_http.handler = answer
    heldout = tiny.write_jsonl(tmp_path / "heldout.jsonl", [{"prompt": p} for p in tiny.PROMPTS[:2]])
    judge = {"type": "judge", "mode": "score", "template": "tone", "backend": "openai", "base_url": judge_http.base_url,
             "model": "m", "use_logprobs": False, "max_retries": 0, "timeout_s": 5}
    cfg = write_config(tmp_path, tiny_policy_dir, tiny_prompts_file, annotator=judge, eval_dataset=str(heldout),
                       eval_max_prompts=2)
    out = tmp_path / "out"
    assert daralign_main(["compare", "--config", str(cfg), "--algorithms", "online-dpo", "--annotation_budget", "4",
                          "--seeds", "1", "--output_dir", str(out)]) == 0
    texts = [body["messages"][-1]["content"] for _, body, _ in judge_http.requests]
    compares = [t for t in texts if "<response_a>" in t]
    scores = [t for t in texts if "<response_a>" not in t]
    assert len(compares) == 4  # one step: one pair per prompt × 2 prompts, each asked in both orders
    assert len(scores) == 2 * 2 * 2  # held-out before and after: 2 prompts × 2 samples
    run = out / "online-dpo" / "seed1"
    m = metrics(run)
    assert m[-1]["annotations"] == 2 and m[-1]["annotation_requests"] == len(compares) == 4  # the server's own count
    assert yaml.safe_load((run / "config.yaml").read_text())["annotator"]["mode"] == "compare"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runs"][0]["heldout_after"] is not None
