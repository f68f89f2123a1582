"""The lag study's scripts (docs/testbed.md, "The lag study"; issue 33) on real compare folders:
async_study.py's page and rule, machine_check.py and lag_metrics.py."""

from __future__ import annotations

import json

import pytest

import tiny
from daralign.cli import main as daralign_main
from test_testbed import _example, fn


def test_lag_study_page_on_real_sync_and_async_runs(tmp_path, tiny_policy_dir, tiny_prompts_file):
    """examples/testbed/async_study.py on real compare folders (dar and rloo, three seeds, synchronous and
    async_steps 1): every seed's difference-in-differences is recomputed here from the run records,
    the verdict follows the rule from the leave-one-out, and the curves carry seconds of training;
    machine_check.py and lag_metrics.py on the same folders."""
    from test_compare import write_config

    heldout = tiny.write_jsonl(tmp_path / "heldout.jsonl", [{"prompt": p} for p in tiny.PROMPTS[:3]])
    cfg = write_config(tmp_path, tiny_policy_dir, tiny_prompts_file, eval_dataset=str(heldout),
                       eval_annotator=fn("length_reward"), learning_rate=0.3)  # large enough that lag changes the runs
    folders = {}
    for lag in (0, 1):
        folders[lag] = tmp_path / f"lag{lag}"
        assert daralign_main(["compare", "--config", str(cfg), "--algorithms", "dar,rloo", "--annotation_budget", "16",
                              "--eval_requests", "8", "--seeds", "1,2,3", "--async_steps", str(lag),
                              "--output_dir", str(folders[lag])]) == 0
    page = tmp_path / "page"
    lag_study = _example("async_study")
    assert lag_study.main(["--sync", str(folders[0]), "--lag1", str(folders[1]), "--out", str(page)]) == 0
    res = json.loads((page / "async_study.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-standard {c}"))
    after = {(lag, r["group"], r["seed"]): r["gold_after"] for lag in (0, 1)
             for r in json.loads((folders[lag] / "summary.json").read_text())["runs"]}
    did = res["diff_in_diff"]["1"]["gold_after"]
    for seed in (1, 2, 3):
        by_hand = (after[1, "dar", seed] - after[0, "dar", seed]) - (after[1, "rloo", seed] - after[0, "rloo", seed])
        assert did["per_seed"][str(seed)] == pytest.approx(by_hand, abs=1e-12)
    assert did["n"] == 3 and did["mean"] == pytest.approx(sum(did["per_seed"].values()) / 3)
    assert any(abs(d) > 1e-6 for d in did["per_seed"].values())  # the lag moved the runs: the check is not 0 == 0
    staleness = res["lag_minus_sync"]["dar @ async 1"]["gold_after"]
    assert staleness["per_seed"]["2"] == pytest.approx(after[1, "dar", 2] - after[0, "dar", 2], abs=1e-12)
    expected = {"+": "more robust", "−": "less robust", None: "undecided"}[did["leave_one_out"]["decided"]]
    assert res["verdict_per_lag"] == {"1": expected} and res["answer"] == lag_study.answer({1: expected})
    assert set(res["arms"]) == {"dar", "rloo", "dar @ async 1", "rloo @ async 1"}
    for r in json.loads((folders[1] / "summary.json").read_text())["runs"]:
        clock = [p["train_s"] for p in r["curve"]]
        assert clock[0] == 0 and all(b > a for a, b in zip(clock, clock[1:]))
    assert res["arms"]["dar @ async 1"]["train_s"] > 0 and (page / "async_study.png").is_file()
    assert "Is DAR more robust to lag than RLOO?" in (page / "async_study.md").read_text()
    # every seed's runs on one machine, named; a seed whose runs name two CPUs is refused in one line
    cpu = json.loads((folders[0] / "dar" / "seed1" / "provenance.json").read_text())["cpu"]
    assert cpu and res["cpu_per_seed"] == {"1": cpu, "2": cpu, "3": cpu}
    assert f"{cpu}: seeds 1, 2, 3" in (page / "async_study.md").read_text()
    moved = json.loads((folders[1] / "summary.json").read_text())
    next(r for r in moved["runs"] if r["seed"] == 2)["cpu"] = "another CPU"
    (tmp_path / "moved.json").write_text(json.dumps(moved))
    with pytest.raises(SystemExit, match="seed 2: its runs ran on more than one CPU"):
        lag_study.main(["--sync", str(folders[0]), "--lag1", str(tmp_path / "moved.json"), "--out", str(tmp_path / "p2")])
    # machine_check.py: reruns beside their records (here the records themselves: every difference 0;
    # a run folder, a compare folder and its summary.json all name runs)
    check = _example("machine_check")
    assert check.main(["--record", str(folders[0] / "summary.json"), "--reruns", str(folders[0] / "rloo" / "seed2"),
                       str(folders[0]), "--out", str(tmp_path / "check.json")]) == 0
    same = json.loads((tmp_path / "check.json").read_text())
    assert len(same["runs"]) == 6 and {(r["group"], r["seed"]) for r in same["runs"]} == {
        (m, s) for m in ("dar", "rloo") for s in (1, 2, 3)}
    assert [(r["group"], r["seed"], set(r["minus_first"].values())) for r in same["repeats"]] == [("rloo", 2, {0.0})]
    first = next(r for r in same["runs"] if (r["group"], r["seed"]) == ("rloo", 2))
    assert first["record"]["cpu"] == first["rerun"]["cpu"] == cpu and first["rerun"]["gold_after"] == after[0, "rloo", 2]
    assert all(set(r["minus_record"].values()) == {0.0} for r in same["runs"])
    assert same["minus_record_over_runs"]["gold_after"] == {"n": 6, "mean": 0.0, "sd": 0.0, "max_abs": 0.0}
    # against the lagged runs the differences are the lag's: recomputed by hand
    moved = check.check(json.loads((folders[0] / "summary.json").read_text())["runs"],
                        json.loads((folders[1] / "summary.json").read_text())["runs"])
    assert {(r["group"], r["seed"]): r["minus_record"]["gold_after"] for r in moved["runs"]} == pytest.approx(
        {(m, s): after[1, m, s] - after[0, m, s] for m in ("dar", "rloo") for s in (1, 2, 3)}, abs=1e-12)
    # lag_metrics.py: per arm, the mean over seeds of each run's step mean; the importance ratio's over lagged steps
    inside = _example("lag_metrics")
    (tmp_path / "study-async0").symlink_to(folders[0])  # its arm names come from study.sh's folder names
    (tmp_path / "study-async1").symlink_to(folders[1])
    assert inside.main([str(tmp_path / "study-async0"), str(tmp_path / "study-async1"), "--out", str(tmp_path / "lag.json")]) == 0
    arms = json.loads((tmp_path / "lag.json").read_text())["arms"]
    assert set(arms) == {"dar", "rloo", "dar @ async 1", "rloo @ async 1"} and arms["rloo"]["seeds"] == [1, 2, 3]
    assert "async/staleness" not in arms["dar"] and "async/is_weight_mean" not in arms["rloo"]
    rows = {s: [json.loads(x) for x in (folders[1] / "rloo" / f"seed{s}" / "metrics.jsonl").read_text().splitlines()]
            for s in (1, 2, 3)}
    lagged = {s: [r["async/is_weight_mean"] for r in rs if r["async/staleness"] > 0] for s, rs in rows.items()}
    assert all(lagged.values())  # every run trained on stale batches
    assert arms["rloo @ async 1"]["async/is_weight_mean"] == pytest.approx(
        sum(sum(v) / len(v) for v in lagged.values()) / 3, abs=1e-12)
    assert arms["dar @ async 1"]["async/staleness"] > 0 and 0 < arms["dar @ async 1"]["dar/weight_mean"]
    with pytest.raises(SystemExit, match="lag1: not a lag study folder"):
        inside.main([str(folders[1]), "--out", str(tmp_path / "no.json")])
    # the rule's answer over lags
    assert lag_study.answer({1: "more robust", 2: "undecided"}) == "more robust"
    assert lag_study.answer({1: "more robust", 2: "less robust"}) == "mixed"
    assert lag_study.answer({1: "undecided", 2: "undecided"}) == "undecided"
    assert lag_study.answer({1: "less robust"}) == "less robust"
