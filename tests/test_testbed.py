"""The gold-reward testbed: the gold scorer on its real models, the best-of-n estimator, the
ensemble annotator, the held-out proxy score beside an independent evaluator, and a compare with
gold curves, offline DPO on pairs bought from the budget and the best-of-n reference."""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path

import pytest
import yaml

import tiny
from conftest import undocumented_metrics
from daralign.annotators import build_annotator
from daralign.cli import main as daralign_main
from daralign.compare.curves import group_curve, mean_ci, peak, requests_to_reach
from daralign.compare.paired import t_interval
from daralign.core.errors import ConfigError
from daralign.evaluation.best_of_n import best_of_n_curve, best_of_n_expectation

ROOT = Path(__file__).resolve().parents[1]
GOLD = f"{ROOT / 'examples' / 'testbed' / 'gold.py'}:gold"


def fn(name: str) -> dict:
    return {"type": "function", "function": f"{tiny.TINY_PY}:{name}"}


# ---------------------------------------------------------------- gold scorer (real MiniLM + VADER)
def test_gold_rewards_on_topic_warmth_not_flattery_or_gloom():
    sys.path.insert(0, str(ROOT / "examples" / "testbed"))
    import gold

    prompt = "Tell me about rivers."
    good = "Rivers are wonderful! They carve beautiful valleys and bring fresh water to forests and towns."
    flattery = "I am so happy to help! Have a wonderful, amazing day!"
    gloom = "Rivers flood, drown people and destroy homes. They are dirty and dangerous."
    g = gold.gold([prompt] * 3, [good, flattery, gloom])
    assert g[0] > 0.4 and g[0] > 5 * g[1] and g[0] > 5 * g[2]
    relevance, positivity = gold.gold_parts([prompt] * 3, [good, flattery, gloom])
    assert relevance[0] > 0.4 > 0.1 > relevance[1] and relevance[2] > 0.3  # gloom is on topic ...
    assert positivity[2] < 0.2 < 0.9 < positivity[1]  # ... but negative; flattery is positive
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]
    assert gold.gold([chat], [good]) == pytest.approx(g[:1], abs=1e-5)  # chat prompts: the user's words
    assert gold.gold([], []) == []


# ---------------------------------------------------------------- best-of-n
def test_best_of_n_expectation_equals_brute_force():
    proxy = [0.3, 0.9, 0.1, 0.5, 0.7]
    gold = [1.0, 0.2, 3.0, 0.4, 2.0]
    for n in range(1, 6):
        subsets = list(itertools.combinations(range(5), n))
        brute_gold = sum(gold[max(s, key=lambda i: proxy[i])] for s in subsets) / len(subsets)
        brute_proxy = sum(max(proxy[i] for i in s) for s in subsets) / len(subsets)
        assert best_of_n_expectation(proxy, gold, n) == pytest.approx((brute_gold, brute_proxy))
    curve = best_of_n_curve([proxy, [None, 1, 2, 3, 4]], [gold, gold], [1, 4])
    assert curve[0]["prompts"] == 1 and curve[0]["kl"] == 0.0 and curve[0]["gold"] == pytest.approx(sum(gold) / 5)
    assert curve[1]["kl"] == pytest.approx(math.log(4) - 3 / 4)


# ---------------------------------------------------------------- curves
def test_curve_statistics():
    m, ci = mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and ci == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    assert mean_ci([5.0]) == (5.0, None) and mean_ci([None]) == (None, None)

    def pts(golds, proxies, xs):
        return [{"requests": x, "gold": g, "proxy": p, "kl": x / 10, "length": 30.0} for x, g, p in zip(xs, golds, proxies)]

    a = pts([0.5, 0.7, 0.6], [0.1, 0.3, 0.5], [0, 64, 100])
    b = pts([0.5, 0.9, 0.4, 0.3], [0.1, 0.3, 0.5, 0.6], [0, 64, 96, 128])  # its last step was not cut
    curve = group_curve([a, b])
    assert [p["requests"] for p in curve] == [0, 64, 114]  # common counts, then each run's final point
    assert curve[1]["gold"] == pytest.approx(0.8) and curve[-1]["gold"] == pytest.approx(0.45) and curve[0]["gold_ci"] == 0
    assert requests_to_reach(curve, 0.65) == pytest.approx(64 * 0.15 / 0.3)
    assert requests_to_reach(curve, 0.95) is None and requests_to_reach(curve, None) is None
    p = peak(curve)
    assert p["peak_requests"] == 64 and p["peak_gold"] == pytest.approx(0.8)
    assert p["turn_down"] is (0.8 - 0.45 > curve[1]["gold_ci"])  # proxy rose from 0.3 to 0.55
    assert peak(group_curve([pts([0.5, 0.6], [0.1, 0.2], [0, 64])]))["turn_down"] is False


# ---------------------------------------------------------------- ensemble
def test_ensemble_aggregates_and_counts_every_member():
    members = [fn("length_reward"), fn("constant_reward")]
    texts = ["eee", "a", "hello there"]
    length = [0.05 * len(c) + c.count("e") for c in texts]
    for aggregate, expect in [("mean", [(x + 0.5) / 2 for x in length]), ("min", [min(x, 0.5) for x in length]),
                              ("uwo", [(x + 0.5) / 2 - 2.0 * abs(x - 0.5) / 2 for x in length])]:
        ens = build_annotator({"type": "ensemble", "aggregate": aggregate, "uwo_lambda": 2.0, "members": members})
        res = ens.score(["p"] * 3, texts, [{}] * 3)
        assert res.scores == pytest.approx(expect)
        assert ens.num_requests == 6 and ens.num_annotations == 3  # each member paid per response
        assert res.metrics["rewards/ensemble_std"] == pytest.approx(sum(abs(x - 0.5) / 2 for x in length) / 3)
    var = build_annotator({"type": "ensemble", "aggregate": "uwo", "uwo_penalty": "variance", "members": members})
    assert var.score(["p"], ["eee"], [{}]).scores == pytest.approx([(length[0] + 0.5) / 2 - (length[0] - 0.5) ** 2 / 4])
    invalid = build_annotator({"type": "ensemble", "members": [fn("length_reward"), fn("sometimes_invalid_reward")]})
    assert invalid.score(["p"] * 2, ["ab", "cd"], [{}] * 2).scores[1] is None  # invalid for one member: invalid
    capped = build_annotator({"type": "ensemble", "members": members})
    capped.meter.allow(4)  # the budget's hard cap is on the meter the members share: the second gets what is left
    assert capped.score(["p"] * 3, texts, [{}] * 3).scores == [pytest.approx((length[0] + 0.5) / 2), None, None]
    assert capped.num_requests == 4


@pytest.mark.parametrize("cfg, message", [
    ({"members": [fn("length_reward")]}, "at least two"),
    ({"members": [fn("length_reward")] * 2, "aggregate": "max"}, "not one of mean, min, uwo"),
    ({"members": [fn("length_reward")] * 2, "uwo_lambda": -1}, "uwo_lambda must be a number ≥ 0"),
    ({"members": [fn("length_reward")] * 2, "weights": [1, 2]}, "unknown key"),
])
def test_ensemble_bad_config(cfg, message):
    with pytest.raises(ConfigError, match=message):
        build_annotator({"type": "ensemble", **cfg})


def test_ensemble_judges_share_one_model(judge_http):
    from conftest import http_judge

    a, b = http_judge(judge_http), {**http_judge(judge_http), "template": "tone"}
    ens = build_annotator({"type": "ensemble", "aggregate": "min", "members": [a, b]})
    assert ens.sources[0][1].client is ens.sources[1][1].client
    assert ens.sources[1][1].config.template == "tone"


# ---------------------------------------------------------------- the loop and compare
def test_proxy_score_beside_an_independent_evaluator(tmp_path, tiny_policy_dir, tiny_prompts_file):
    """The evaluator scores held-out answers, the training annotator (ensemble here) too as
    ``proxy_score``; neither is starved by the exhausted training budget."""
    from daralign.train.args import parse_train_args
    from daralign.train.command import run

    heldout = tiny.write_jsonl(tmp_path / "heldout.jsonl", [{"prompt": p} for p in tiny.PROMPTS[:3]])
    ensemble = {"type": "ensemble", "aggregate": "uwo", "members": [fn("length_reward"), fn("constant_reward")]}
    cfg = tiny.run_config(tmp_path, tiny_policy_dir, tiny_prompts_file, annotator=ensemble, eval_dataset=str(heldout),
                          eval_annotator=fn("constant_reward"), eval_steps=1, max_steps=3, annotation_budget=16)
    out = tmp_path / "out"
    run(*parse_train_args(["--config", str(cfg), "--output_dir", str(out)]))
    after = json.loads((out / "heldout_after.json").read_text())
    assert after["score"] == 0.5 and after["evaluator_is_training_annotator"] is False
    assert None not in after["proxy_per_prompt"] and after["proxy_score"] is not None
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["annotation_requests"] == 16  # 2 steps of 2 prompts × K=2 × 2 members; held-out is not charged
    assert "eval/proxy_score" in rows[0] and "rewards/ensemble_std" in rows[0]
    assert not undocumented_metrics(rows)


def test_function_evaluator_is_not_starved_by_the_budget(tmp_path, tiny_policy_dir, tiny_prompts_file):
    from daralign.train.args import parse_train_args
    from daralign.train.command import run

    heldout = tiny.write_jsonl(tmp_path / "heldout.jsonl", [{"prompt": p} for p in tiny.PROMPTS[:3]])
    cfg = tiny.run_config(tmp_path, tiny_policy_dir, tiny_prompts_file, eval_dataset=str(heldout), annotation_budget=4)
    out = tmp_path / "out"
    run(*parse_train_args(["--config", str(cfg), "--output_dir", str(out)]))
    assert None not in json.loads((out / "heldout_after.json").read_text())["per_prompt"]


@pytest.fixture(scope="module")
def gold_compare(tmp_path_factory, tiny_policy_dir, tiny_prompts_file):
    from test_compare import KeywordAnnotator, write_config

    tmp = tmp_path_factory.mktemp("gold_compare")
    heldout = tiny.write_jsonl(tmp / "heldout.jsonl", [{"prompt": p} for p in tiny.PROMPTS[:3]])
    cfg = write_config(tmp, tiny_policy_dir, tiny_prompts_file, eval_dataset=str(heldout),
                       eval_annotator=fn("length_reward"))
    out = tmp / "out"
    KeywordAnnotator.LOG.clear()
    argv = ["compare", "--config", str(cfg), "--algorithms", "dar,online-dpo,dpo", "--annotation_budget", "8",
            "--eval_requests", "4", "--best_of_n", "4", "--seeds", "1,2", "--output_dir", str(out)]
    assert daralign_main(argv) == 0
    return out, argv


def test_compare_writes_gold_curves_and_statistics(gold_compare):
    out, _ = gold_compare
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluator_is_training_annotator"] is False
    for rec in summary["runs"]:
        for key in ("gold_before", "gold_after", "proxy_before", "proxy_after", "kl_final", "annotation_requests"):
            assert rec[key] is not None, (rec["dir"], key)
        assert rec["annotation_requests"] <= 8
        xs = [p["requests"] for p in rec["curve"]]
        assert xs[0] == 0 and xs == sorted(xs)
        if rec["algorithm"] == "dar":  # 4 requests a step, evaluated every 4: at 0, 4 and the end (8)
            assert xs == [0, 4, 8]
    gold = summary["gold"]
    assert set(gold["groups"]) == {"dar", "online-dpo", "dpo"}
    g = gold["groups"]["dar"]
    assert g["curve"][-1]["n"] == 2 and g["gold_at_budget_ci"] is not None
    assert g["gold_at_budget"] == pytest.approx(sum(r["gold_after"] for r in summary["runs"] if r["algorithm"] == "dar") / 2)
    dar_runs = [r for r in summary["runs"] if r["algorithm"] == "dar"]
    assert g["gold_change"] == pytest.approx(sum(r["gold_after"] - r["gold_before"] for r in dar_runs) / 2)
    assert gold["oaif_dpo_final_gold"] == gold["groups"]["online-dpo"]["gold_at_budget"]
    assert "p1" in gold and gold["groups"]["online-dpo"]["requests_to_reach_oaif_dpo"] is not None
    bon = gold["bon_reference"]
    assert [p["n"] for p in bon["curve"]] == [1, 2, 4] and bon["curve"][2]["proxy"] >= bon["curve"][0]["proxy"]
    page = (out / "report.html").read_text()
    assert "P1 = DAR" in page and 'src="gold_vs_requests_and_kl.png"' in page and (out / "proxy_vs_gold.png").exists()
    # paired within seeds against DAR: each seed's (method − DAR), averaged
    by_seed = {(r["algorithm"], r["seed"]): r for r in summary["runs"]}
    diffs = [by_seed["online-dpo", s]["gold_after"] - by_seed["dar", s]["gold_after"] for s in (1, 2)]
    paired = gold["paired"]["online-dpo"]["gold_after"]
    assert gold["paired_reference"] == "dar" and paired["n"] == 2 and paired["mean"] == pytest.approx(sum(diffs) / 2)
    assert paired["se"] == pytest.approx(abs(diffs[0] - diffs[1]) / 2)  # two seeds: SE = |d1 − d2| / 2
    assert g["gold_curve_mean"] is not None and "p1_ci_low" in gold and g["gao_fit"]["form"] == "rl"
    table = (out / "gold.md").read_text()
    assert table.count("\n| ") == 3 + 3 and "| dar |" in table and "P1" in table  # 3 methods, paired: header + 2
    assert "| online-dpo | " in table.split("paired within seeds")[1]


def test_offline_dpo_buys_its_pairs_from_the_budget(gold_compare):
    out, argv = gold_compare
    for seed in (1, 2):
        meta = json.loads((out / "dpo" / "pairs" / f"seed{seed}.meta.json").read_text())
        run = json.loads((out / "dpo" / f"seed{seed}" / "compare_run.json").read_text())
        assert meta["requests"] == run["label_requests"] <= 8 and meta["prompts"] == 8  # 4 steps × 2 prompts, 1 request a pair here
        pairs = (out / "dpo" / "pairs" / f"seed{seed}.jsonl").read_text().splitlines()
        assert len(pairs) == meta["pairs"] == run["pairs"]
        steps = [json.loads(x) for x in (out / "dpo" / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()]
        assert len(steps) == -(-len(pairs) // 2)  # one epoch over the pairs that survived (2 a step): none seen twice
        assert sum(s["num_prompts"] for s in steps) >= len(pairs)
    assert json.loads(pairs[0]).keys() == {"prompt", "chosen", "rejected"}
    best_of_n = (out / "best_of_n.json").read_text()
    assert daralign_main(argv) == 0  # repeated: every run and the reference are reused
    assert (out / "best_of_n.json").read_text() == best_of_n


def test_testbed_config_parses_for_every_method():
    from daralign.compare.run import build_plan

    plan, _ = build_plan(["--config", str(ROOT / "examples" / "testbed" / "testbed.yaml"), "--annotation_budget", "320",
                          "--algorithms", "dar,online-dpo,online-ipo,online-slic,rloo,grpo,ppo,bon-sft,dpo",
                          "--eval_requests", "64", "--output_dir", "/tmp/never-written"])
    per_step = {r.algorithm: r.per_step for r in plan.runs}
    assert per_step == {"dar": 32, "online-dpo": 16, "online-ipo": 16, "online-slic": 16, "rloo": 32, "grpo": 32,
                        "ppo": 32, "bon-sft": 32, "dpo": 16}
    assert {r.algorithm: r.train.eval_steps for r in plan.runs}["online-dpo"] == 4
    # ≥ 256 held-out answers, one evaluation seed shared by every training seed
    heldout = len((ROOT / "examples" / "testbed" / "heldout.jsonl").read_text().splitlines())
    assert {r.train.eval_samples_per_prompt * min(heldout, r.train.eval_max_prompts) for r in plan.runs} == {256}
    assert {r.train.heldout_seed for r in plan.runs} == {7919}
    assert yaml.safe_load((ROOT / "examples" / "testbed" / "testbed.yaml").read_text())["eval_annotator"]["function"].endswith("gold.py:gold")
    ensemble, _ = build_plan(["--config", str(ROOT / "examples" / "testbed" / "testbed.yaml"), "--annotation_budget", "960",
                              "--annotator", str(ROOT / "examples" / "testbed" / "ensemble_uwo.yaml"), "--algorithms", "dar,rloo",
                              "--eval_requests", "192", "--output_dir", "/tmp/never-written"])
    assert {r.per_step for r in ensemble.runs} == {96} and {r.train.eval_steps for r in ensemble.runs} == {2}
    learned, _ = build_plan(["--config", str(ROOT / "examples" / "testbed" / "testbed.yaml"), "--annotation_budget", "320",
                             "--annotator", str(ROOT / "examples" / "testbed" / "learned.yaml"), "--algorithms", "dar,online-dpo",
                             "--eval_requests", "64", "--output_dir", "/tmp/never-written"])
    # the learned proxy: 1 request a score, 2 a comparison (8 prompts × 4 answers; 8 pairs)
    assert {r.algorithm: r.per_step for r in learned.runs} == {"dar": 32, "online-dpo": 16}
    from daralign.annotators import build_annotator

    path = ROOT / learned.runs[0].train.annotator["path"]
    assert build_annotator({"type": "learned", "path": str(path)}).spec["features"] == "prompt_reply"
    for member in ensemble.runs[0].train.annotator["members"]:  # the templates exist and fit score mode
        from daralign.annotators.judge import load_template

        load_template(member["template"] if "/" not in member["template"] else str(ROOT / member["template"]), "score")
    assert not Path("/tmp/never-written").exists()


def test_proxy_gold_agreement():
    from daralign.evaluation.best_of_n import agreement

    res = agreement([[0.1, 0.5, 0.9], [0.2, 0.2, None]], [[1.0, 3.0, 2.0], [5.0, 4.0, 1.0]])
    assert res["pairs"] == 3 and res["pairwise_agreement"] == pytest.approx(2 / 3)  # (0,1) (0,2) agree, (1,2) not; ties skipped
    assert res["answers"] == 5 and -1 <= res["pearson"] <= 1 and -1 <= res["spearman"] <= 1
    from daralign.evaluation.best_of_n import _ranks

    assert _ranks([3.0, 1.0, 3.0, 2.0]) == [2.5, 0.0, 2.5, 1.0]
    perfect = agreement([[1, 2, 3, 4]], [[10, 20, 30, 40]])
    assert perfect["pearson"] == pytest.approx(1.0) and perfect["spearman"] == pytest.approx(1.0) and perfect["pairwise_agreement"] == 1.0


def test_a_field_added_later_at_its_default_is_not_another_config(gold_compare):
    from daralign.compare.run import build_plan, check_existing

    out, argv = gold_compare
    plan, _ = build_plan(argv[1:])
    run = plan.runs[0]
    path = run.out / "compare_run.json"
    record = json.loads(path.read_text())
    original = path.read_text()
    try:
        del record["config"]["max_micro_batch_tokens"]  # as a run made before the field existed
        path.write_text(json.dumps(record))
        check_existing(run)
        del record["config"]["max_completion_length"]  # not at its default: a different run
        path.write_text(json.dumps(record))
        with pytest.raises(ConfigError, match="another config"):
            check_existing(run)
    finally:
        path.write_text(original)


def test_ablation_page_from_real_compare_folders(gold_compare, tmp_path):
    """examples/testbed/ablations.py on a real core study and a real ``--sweep`` folder."""
    out, argv = gold_compare
    sweep = tmp_path / "sweep"
    sweep_argv = [a for a in argv]
    sweep_argv[sweep_argv.index("--algorithms") + 1] = "dar"
    sweep_argv[sweep_argv.index("--output_dir") + 1] = str(sweep)
    cut = sweep_argv.index("--best_of_n")
    del sweep_argv[cut:cut + 2]
    assert daralign_main(sweep_argv + ["--sweep", "dar_ratio=0.5"]) == 0
    ablations = _example("ablations")
    page = tmp_path / "page"
    assert ablations.main(["--core", str(out), "--sweeps", str(sweep), "--ensemble", str(out), "--out", str(page)]) == 0
    table = json.loads((page / "ablations.json").read_text())
    assert [r["curve"] for r in table["dar_ratio"]] == ["0.1 (default)", "0.5"]  # ordered by value, default from the core
    swept = json.loads((sweep / "summary.json").read_text())["gold"]["groups"]["dar[dar_ratio=0.5]"]
    assert table["dar_ratio"][1]["gold_change"] == pytest.approx(swept["gold_change"])
    assert [r["curve"] for r in table["ensemble"]] == ["dar, single proxy", "dar, ensemble"]
    assert (page / "ablations.png").is_file() and (page / "ensembles.png").is_file()
    assert "| 0.5 |" in (page / "ablations.md").read_text()
    # --default: the default point from a folder run under the sweeps' conditions (here, the 0.5 one)
    assert ablations.main(["--core", str(out), "--default", str(sweep), "--sweeps", str(sweep), "--out", str(page)]) == 0
    rows = json.loads((page / "ablations.json").read_text())["dar_ratio"]
    assert rows[0]["gold_change"] == pytest.approx(swept["gold_change"]) and rows[0]["curve"] == "0.1 (default)"


def _example(name: str):
    sys.path.insert(0, str(ROOT / "examples" / "testbed"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def test_study_page_pairs_arms_across_folders(gold_compare, tmp_path):
    """examples/testbed/study.py on a real compare folder given as the core, the dar_ratio-0 and the
    noise folder: the pairs it reports are the per-seed differences, computed here by hand."""
    out, _ = gold_compare
    study = _example("study")
    page = tmp_path / "page"
    assert study.main(["--core", str(out), "--ratio0", str(out), "--noise", str(out), "--control", str(out), "--out", str(page)]) == 0
    res = json.loads((page / "study.json").read_text())
    runs = json.loads((out / "summary.json").read_text())["runs"]
    after = {(r["group"], r["seed"]): r["gold_after"] for r in runs}
    diffs = [after["dar", s] - after["online-dpo", s] for s in (1, 2)]
    got = res["paired_asked"]["dar − online-dpo"]["gold_after"]
    assert got["n"] == 2 and got["mean"] == pytest.approx(sum(diffs) / 2)
    assert got["se"] == pytest.approx(abs(diffs[0] - diffs[1]) / 2)  # SD/√2 of two values = |a − b| / 2
    assert res["paired_vs_dar"]["online-dpo"]["gold_after"]["mean"] == pytest.approx(-got["mean"])
    for name in ("dar_ratio 0 − dar_ratio 0.1", "dar − its shuffled-reward control"):  # the same runs under two names
        same = res["paired_asked"][name]["gold_after"]
        assert same["mean"] == 0 and same["se"] == 0 and same["n"] == 2
    arms = {a["arm"]: a for a in res["arms"]}
    assert set(arms) >= {"dar", "online-dpo", "dar, dar_ratio 0", "online-dpo, 25% noise", "dar, shuffled rewards"}
    dar_runs = [r for r in runs if r["group"] == "dar"]
    assert arms["dar"]["length_after"] == pytest.approx(sum(r["heldout_length_after"] for r in dar_runs) / 2)
    assert res["max_paired_se"] == pytest.approx(max(v["gold_after"]["se"] for v in
                                                     [*res["paired_vs_dar"].values(), *res["paired_asked"].values()]))
    assert res["verdict"] in {"confirmed", "refuted", "undecided"} and (page / "study.png").is_file()
    assert got["mde80"] == pytest.approx(study.mde80(got)) and "| at the budget | MDE | one seed left out |" in (page / "study.md").read_text()
    json.loads((page / "study.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    assert "Verdict on the paper's claim" in (page / "study.md").read_text()
    # every seed's difference kept for the strip plot; the verdict recomputed with each seed left out
    assert got["per_seed"] == {"1": pytest.approx(diffs[0]), "2": pytest.approx(diffs[1])}
    assert set(res["verdict_leave_one_out"]) == {"1", "2"} and res["verdict_all_seeds"] in {"confirmed", "refuted", "undecided"}
    assert res["verdict"] == (res["verdict_all_seeds"] if set(res["verdict_leave_one_out"].values()) == {res["verdict_all_seeds"]}
                              else "undecided")


def test_study_merges_seeds_kept_in_several_summaries(gold_compare, tmp_path):
    """Seeds run in different sessions, each kept as a summary.json: merged, the statistics are
    those of the one folder holding them all; a (method, seed) recorded twice differently is refused."""
    out, _ = gold_compare
    study = _example("study")
    whole = json.loads((out / "summary.json").read_text())
    parts = []
    for seed in (1, 2):
        part = {**whole, "runs": [r for r in whole["runs"] if r["seed"] == seed]}
        parts.append(tmp_path / f"seed{seed}.json")
        parts[-1].write_text(json.dumps(part))
    merged = study.load([parts[1], out / "summary.json", parts[0]])  # seed 2 first; every run once more
    assert merged["seeds"] == [1, 2] and len(merged["runs"]) == len(whole["runs"])
    for name, g in whole["gold"]["groups"].items():
        for key in ("gold_change", "gold_change_se", "gold_at_budget", "gold_curve_mean", "kl_at_budget"):
            assert merged["gold"]["groups"][name][key] == pytest.approx(g[key]), (name, key)
    assert merged["gold"]["paired"]["online-dpo"]["gold_after"]["mean"] == \
        pytest.approx(whole["gold"]["paired"]["online-dpo"]["gold_after"]["mean"])
    other = json.loads(parts[0].read_text())
    other["runs"][0]["gold_after"] += 0.5
    parts[0].write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="seed 1: two different runs"):
        study.load([out, parts[0]])
    seed1 = [r for r in whole["runs"] if r["seed"] == 1]
    moved = {**seed1[0], "gold_before": seed1[0]["gold_before"] + 0.002}  # started from other answers (another CPU's bf16)
    parts[0].write_text(json.dumps({**whole, "runs": [moved]}))
    parts[1].write_text(json.dumps({**whole, "runs": seed1[1:]}))
    with pytest.raises(SystemExit, match="seed 1: the summaries to merge start from different held-out answers"):
        study.load([parts[0], parts[1]])


def test_study_verdict_rule():
    verdict = _example("study").verdict
    p1 = {"p1": 0.5, "p1_ci_low": 0.3, "p1_ci_high": 0.8, "p1_undefined_frac": 0.0}
    level = {"gold_after": {"mean": 0.0, "ci95": 0.02}}
    assert verdict(p1, level) == "confirmed"
    assert verdict({**p1, "p1_undefined_frac": 0.2}, level) == "undecided"  # DAR often never gets there
    assert verdict({**p1, "p1_ci_high": 1.4}, level) == "undecided"
    assert verdict(p1, {"gold_after": {"mean": -0.05, "ci95": 0.02}}) == "refuted"  # ends below at the same budget
    assert verdict({"p1": 1.5, "p1_ci_low": 1.2, "p1_ci_high": 2.0, "p1_undefined_frac": 0}, level) == "refuted"
    assert verdict({"p1": None, "p1_ci_low": None, "p1_ci_high": None}, None) == "undecided"
    # P1's bounds may be "never" (inf: DAR too often never reaches the target); the rule reads them as any number
    assert verdict({**p1, "p1_ci_high": math.inf, "p1_undefined_frac": 0.33}, level) == "undecided"
    assert verdict({"p1": None, "p1_ci_low": math.inf, "p1_ci_high": math.inf, "p1_undefined_frac": 1.0}, level) == "refuted"


def test_study_minimum_detectable_difference():
    """MDE ≈ (t_{0.975, n−1} + t_{0.8, n−1}) · SE, with t quantiles from tables; "never" in study.json."""
    study = _example("study")
    for df, p, t in [(7, 0.975, 2.364624), (7, 0.8, 0.896030), (9, 0.975, 2.262157), (1, 0.8, 1.376382), (2, 0.8, 1.060660)]:
        assert study.t_quantile(p, df) == pytest.approx(t, abs=2e-6)
    # DAR − OAIF-DPO in the study: SE 0.012566 over 8 seeds → 3.2606 SE = 0.041 (the doc's figure)
    assert study.mde80({"se": 0.012566, "n": 8}) == pytest.approx(3.260654 * 0.012566, abs=1e-6)
    assert study.mde80({"se": None, "n": 1}) is None
    assert study.jsonable({"a": [math.inf, 1.0]}) == {"a": ["never", 1.0]} and study.fmt(math.inf, ".2f") == "never"


def test_study_leave_one_out_on_the_rloo_dar_seeds():
    """Issue 32, item 4, on the study's own RLOO − DAR differences (run records of seeds 1–8, seeds 9–10
    as kept in rloo-dar-seeds9-10.json): over seeds 1–8 the lead survives every leave-one-out (which is
    why leave-one-out is necessary, not sufficient); over ten seeds it is not decided."""
    study = _example("study")
    img = ROOT / "docs" / "img" / "study"
    runs = [r for name in ("summary-dar-online-dpo.json", "summary-four-methods-seeds1-5.json",
                           "summary-rloo-grpo-seeds6-8.json") for r in json.loads((img / name).read_text())["runs"]]
    eight = study.pair(runs, "rloo", "dar")["gold_after"]
    assert sorted(eight["per_seed"]) == list(range(1, 9)) and eight["leave_one_out"]["decided"] == "+"
    ten = dict(eight["per_seed"])
    for seed, v in json.loads((img / "rloo-dar-seeds9-10.json").read_text())["seeds"].items():
        ten[int(seed)] = v["rloo_minus_dar"]
    loo = study.leave_one_out(ten)
    assert loo["decided"] is None and loo["ci_low_min"] < 0 < loo["mean_min"] <= loo["mean_max"]
    subsets = [t_interval([d for s, d in ten.items() if s != out]) for out in ten]
    assert loo["mean_max"] == pytest.approx(max(t["mean"] for t in subsets))
    assert loo["ci_high_max"] == pytest.approx(max(t["mean"] + t["ci95"] for t in subsets))
    # significant with all five seeds (CI low +0.003), but not with seed 3 or 4 left out: not decided
    close = {1: 0.002, 2: 0.014, 3: 0.025, 4: 0.024, 5: 0.010}
    full = t_interval(list(close.values()))
    assert full["mean"] - full["ci95"] > 0 and study.leave_one_out(close)["decided"] is None
    assert study.leave_one_out({s: -0.01 - 0.001 * s for s in range(1, 9)})["decided"] == "−"
    assert study.leave_one_out({1: 0.1, 2: 0.2})["decided"] is None  # two seeds: nothing to leave out
