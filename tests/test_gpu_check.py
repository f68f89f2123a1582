"""benchmarks/gpu_check.py in its tiny CPU mode: the prepared GPU check runs end to end (model of
Qwen2-0.5B's config and shipped tokenizer at 2 layers, DAR and RLOO through the trainer, DAR ÷ SFT
update, DAR ÷ TRL RLOOTrainer) and writes its JSON — so a borrowed GPU machine runs a script known
to work. No timing is asserted."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_gpu_check_tiny_runs_and_reports(tmp_path):
    sys.path.insert(0, str(BENCH))
    import gpu_check

    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--tiny", "--skip_vllm", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["tiny"] and set(res["sections"]) == {"dar", "rloo"}
    for section in res["sections"].values():
        assert section["tokens_per_s"] > 0 and section["steps"] == 2 and section["peak_gpu_memory_gib"] is None
    assert res["dar_update_over_sft_step"] > 0
    if importlib.util.find_spec("trl") is not None:
        assert res["dar_over_trl_rloo_iteration"] > 0
