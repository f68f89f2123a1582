"""One prepared GPU check (issue: GPU users), for a borrowed machine with no internet and no vLLM
needed: ≤ 10 minutes on one CUDA GPU with the machine's own torch/transformers.

1. A randomly initialised model of Qwen2.5-0.5B's shape (config + tokenizer in
   ``benchmarks/assets/qwen2-0.5b``, no weights), bf16 on CUDA.
2. DAR and RLOO through daralign's own trainer with a function reward: tokens/s (sampled tokens
   per second of a whole step, first step excluded) and peak GPU memory.
3. DAR update ÷ SFT step on the same tokens (``benchmarks/dar_overhead.py``).
4. DAR ÷ TRL ``RLOOTrainer`` time per iteration, when ``trl`` is importable (``benchmarks/vs_trl.py``;
   its memory column is host RSS, not GPU memory).
5. DAR with a colocated vLLM engine, when ``vllm`` is importable (``--skip_vllm`` to leave it out).

``--tiny`` shrinks the model to 2 layers and the run to a few tokens, for a CPU (CI runs it):

    python benchmarks/gpu_check.py --json gpu_check.json          # on the GPU machine
    python benchmarks/gpu_check.py --tiny --skip_vllm             # anywhere, a minute
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ASSETS = HERE / "assets" / "qwen2-0.5b"
PROMPTS = ["Tell me about the ocean.", "Describe a walk in the park.", "What is a good breakfast?",
           "Give me three tips for learning to cook.", "Explain why the sky is blue.", "Write a short note to a friend.",
           "What should I pack for a weekend trip?", "How do plants grow?"]
TINY = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "layer_types": ["full_attention"] * 2}


def length_reward(prompts, completions, **kwargs):
    """A function reward that varies with the sample (random weights write random text)."""
    return [0.01 * len(c) + c.count(" ") for c in completions]


def build_model(folder: Path, tiny: bool, cuda: bool):
    """The model folder, and its shipped tokenizer loaded (the train sections share it)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(ASSETS / name, folder / name)
    with gzip.open(ASSETS / "tokenizer.json.gz") as src, open(folder / "tokenizer.json", "wb") as dst:
        shutil.copyfileobj(src, dst)
    config = AutoConfig.from_pretrained(ASSETS, **(TINY if tiny else {}))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if cuda else torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    return folder, AutoTokenizer.from_pretrained(folder)


def train_section(folder: Path, tokenizer, algorithm: str, a, cuda: bool, out: Path, **extra) -> dict:
    import torch

    import daralign

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    args = daralign.TrainConfig(
        algorithm=algorithm, num_generations=a.k, per_device_train_batch_size=a.prompts, max_completion_length=a.max_new_tokens,
        max_steps=a.steps, learning_rate=1e-6, bf16=cuda, dtype="bfloat16" if cuda else "float32", report=False,
        log_completions=False, output_dir=str(out / algorithm), generation_batch_size=a.prompts * a.k, **extra)
    trainer = daralign.Trainer(model=str(folder), processing_class=tokenizer, reward_funcs=length_reward, args=args,
                               train_dataset=[{"prompt": p} for p in (PROMPTS * 8)[: a.prompts * 2]])
    trainer.train()
    steps = trainer.state.log_history[1:] or trainer.state.log_history  # the first step warms up
    tokens, seconds = sum(m["num_tokens"] for m in steps), sum(m["step_time"] for m in steps)
    return {"algorithm": algorithm, "steps": len(trainer.state.log_history), "tokens_per_s": tokens / seconds,
            "step_time_s": seconds / len(steps), **{k: sum(m[k] for m in steps) / len(steps) for k in
                                                    ("timing/rollout", "timing/reference", "timing/update")},
            "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="2-layer model, few tokens: a CPU smoke run")
    p.add_argument("--steps", type=int, default=None, help="online iterations per method (default 4; tiny 2)")
    p.add_argument("--prompts", type=int, default=None, help="prompts per step (default 8; tiny 2)")
    p.add_argument("--k", type=int, default=None, help="samples per prompt (default 4; tiny 2)")
    p.add_argument("--max_new_tokens", type=int, default=None, help="completion length (default 256; tiny 8)")
    p.add_argument("--skip_vllm", action="store_true", help="leave out the vLLM section even when vllm is importable")
    p.add_argument("--skip_trl", action="store_true", help="leave out the TRL comparison even when trl is importable")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    defaults = {"steps": 2, "prompts": 2, "k": 2, "max_new_tokens": 8} if a.tiny else \
        {"steps": 4, "prompts": 8, "k": 4, "max_new_tokens": 256}
    for k, v in defaults.items():
        setattr(a, k, getattr(a, k) or v)
    import torch
    import transformers

    from daralign.core.provenance import cpu

    cuda = torch.cuda.is_available()
    res = {"device": torch.cuda.get_device_name(0) if cuda else cpu(),
           "torch": torch.__version__, "transformers": transformers.__version__, "tiny": a.tiny,
           "shape": {k: getattr(a, k) for k in defaults}}
    print(f"gpu_check on {res['device']} (torch {torch.__version__}, transformers {transformers.__version__})", flush=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    t0 = time.perf_counter()
    try:
        folder, tokenizer = build_model(work / "model", a.tiny, cuda)
        res["sections"] = {}
        for algorithm in ("dar", "rloo"):
            res["sections"][algorithm] = train_section(folder, tokenizer, algorithm, a, cuda, work / "runs")
            print(json.dumps(res["sections"][algorithm]), flush=True)
        sys.path.insert(0, str(HERE))
        import dar_overhead

        overhead = work / "overhead.json"
        dar_overhead.main(["--model", str(folder), "--num_prompts", str(a.prompts), "--num_generations", str(a.k),
                           "--max_new_tokens", str(a.max_new_tokens), "--repeats", "2", "--json", str(overhead)]
                          + (["--bf16"] if cuda else []))
        o = json.loads(overhead.read_text())
        res["dar_update_over_sft_step"] = o["update_ratio_wall"]
        if not a.skip_trl and importlib.util.find_spec("trl") is not None:
            import vs_trl

            versus = work / "vs_trl.json"
            vs_trl.main(["--model", str(folder), "--prompts", str(a.prompts), "--k", str(a.k), "--max_completion_length",
                         str(a.max_new_tokens), "--iterations", str(max(2, a.steps)), "--order", "trl-rloo,dar",
                         "--threads", str(torch.get_num_threads()), "--json", str(versus)])
            res["vs_trl"] = json.loads(versus.read_text())
        if not a.skip_vllm and importlib.util.find_spec("vllm") is not None:
            res["sections"]["dar-vllm"] = train_section(folder, tokenizer, "dar", a, cuda, work / "runs-vllm", use_vllm=True,
                                                        vllm_gpu_memory_utilization=0.3)
            print(json.dumps(res["sections"]["dar-vllm"]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["wall_s"] = time.perf_counter() - t0
    print("\n" + "\n".join(f"{name:>9}: {s['tokens_per_s']:.0f} tokens/s, {s['step_time_s']:.2f} s a step"
                           + (f", peak GPU memory {s['peak_gpu_memory_gib']:.2f} GiB" if s["peak_gpu_memory_gib"] else "")
                           for name, s in res["sections"].items()))
    print(f"DAR update ÷ SFT step: {res['dar_update_over_sft_step']:.3f}")
    if "vs_trl" in res:
        res["dar_over_trl_rloo_iteration"] = res["vs_trl"]["dar/trl-rloo"]["time"]
        print(f"DAR ÷ TRL RLOOTrainer iteration: {res['dar_over_trl_rloo_iteration']:.3f} (goal on a GPU: ≤ 0.67, 1.5× faster)")
    print(f"whole check: {res['wall_s']:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
