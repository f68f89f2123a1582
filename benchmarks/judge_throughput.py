"""Judge throughput: responses scored per second with the shared template prefix's KV cache reused
(``reuse_prefix: true``, the default) ÷ without it, in one run, same requests, same threads.

The requests are the quickstart's: the ``tone`` template, yes/no scale read from log-probs, the
held-out prompts with a policy-like answer each (K = 4 answers per prompt, so each batch shares
the template and often the prompt too). Runs alternate (off, on, on, off, ...) after a warm-up;
the ratio is the median over ``--repeats`` adjacent pairs. Scores must agree (the test suite
checks 1e-4 in fp32).

    OMP_NUM_THREADS=1 python benchmarks/judge_throughput.py [--dtype auto] [--threads 1] [--repeats 3]

``--vllm_url`` adds a third side: the same requests to the same judge served by vLLM with prefix
caching (an OpenAI-compatible server, read through daralign's ``openai`` backend from its top-20
log-probs), timed the same way and compared with the in-process reuse:

    python -m vllm.entrypoints.openai.api_server --model ~/.cache/daralign/models/qwen2.5-coder-0.5b-instruct \
        --served-model-name judge --enable-prefix-caching --enforce-eager --dtype bfloat16 --port 8011 &
    python benchmarks/judge_throughput.py --threads 2 --vllm_url http://127.0.0.1:8011/v1 --vllm_model judge
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ANSWERS = ["Sure! Here is a quick overview: start small, stay consistent, and enjoy the process.",
           "I can help with that. The main steps are listed below, with a short note on each.",
           "Great question! Many people wonder about this, and the answer is simpler than it seems.",
           "Unfortunately I cannot say for certain, but here are a few things you could try first."]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="bundled:qwen2.5-coder-0.5b-instruct")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--num_prompts", type=int, default=8)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--vllm_url", help="also time the judge served here by vLLM (OpenAI API, prefix caching on)")
    p.add_argument("--vllm_model", default="judge", help="the served model name at --vllm_url")
    p.add_argument("--json")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from daralign.annotators.transformers_client import TransformersClient
    from daralign.annotators.judge import JudgeAnnotator, JudgeConfig
    from daralign.core.data import read_rows

    rows = read_rows(Path(__file__).resolve().parents[1] / "examples" / "data" / "quickstart_heldout.jsonl")[: args.num_prompts]
    prompts = [r["prompt"] for r in rows for _ in ANSWERS]
    answers = ANSWERS * len(rows)
    client = TransformersClient(args.model, dtype=args.dtype, batch_size=args.batch_size)
    judge = JudgeAnnotator(JudgeConfig(template="tone", dtype=args.dtype, batch_size=args.batch_size), client=client)

    def run(reuse: bool) -> tuple[float, list]:
        client.reuse_prefix, client._prefix = reuse, None
        t = time.perf_counter()
        scores = judge.score(prompts, answers).scores
        return len(answers) / (time.perf_counter() - t), scores

    run(False), run(True)  # warm-up
    pairs = []
    for i in range(args.repeats):
        off, on = (run(False), run(True)) if i % 2 == 0 else tuple(reversed((run(True), run(False))))
        pairs.append((off, on))
    ratio = statistics.median(on[0] / off[0] for off, on in pairs)
    diff = max(abs(a - b) for off, on in pairs for a, b in zip(off[1], on[1]))
    out = {"responses_per_s_full": statistics.median(off[0] for off, _ in pairs),
           "responses_per_s_prefix_reuse": statistics.median(on[0] for _, on in pairs), "speedup": ratio,
           "max_score_difference": diff, "dtype": client.dtype, "threads": args.threads, "responses": len(answers)}
    if args.vllm_url:
        served = JudgeAnnotator(JudgeConfig(template="tone", backend="openai", base_url=args.vllm_url,
                                            model=args.vllm_model, batch_size=args.batch_size))

        def run_served() -> tuple[float, list]:
            t = time.perf_counter()
            scores = served.score(prompts, answers).scores
            return len(answers) / (time.perf_counter() - t), scores

        run_served()  # warm-up (the server's prefix cache starts filled, as it is in a run)
        timed = [run_served() for _ in range(args.repeats)]
        ours = pairs[-1][1][1]
        out |= {"responses_per_s_vllm_server": statistics.median(r for r, _ in timed),
                "vllm_server_max_score_difference": max(abs(a - b) for a, b in zip(ours, timed[-1][1]))}
        out["vllm_server_over_prefix_reuse"] = out["responses_per_s_vllm_server"] / out["responses_per_s_prefix_reuse"]
        served.close()
    print(json.dumps(out, indent=1))
    print(f"judge responses/s with prefix reuse ÷ without: {ratio:.2f} (max score difference {diff:.1e}, {client.dtype})")
    if args.vllm_url:
        print(f"judge responses/s served by vLLM (prefix caching) ÷ in-process prefix reuse: "
              f"{out['vllm_server_over_prefix_reuse']:.2f} (max score difference {out['vllm_server_max_score_difference']:.1e})")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
