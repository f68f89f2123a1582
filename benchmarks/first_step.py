"""The first optimizer step after loading a model on a CPU, with the weights left in the
checkpoint's memory map (transformers' default) and with them copied into the process's own memory
first (``daralign.core.models.own_weights``, what the trainer does for full-weight CPU training).

A step writes every weight in place; in a memory map each 4 KiB page is copied on its first write.
Prints the time ratio of "copy + first step" to "first step on the memory map"; ``--json`` writes
the numbers. One process, the two ways alternated ``--repeats`` times, a fresh model each time:

    python benchmarks/first_step.py --repeats 5 --json first_step.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path


def first_steps(model_name: str, copy: bool) -> dict:
    """Seconds for the copy (0 when not made), the first AdamW step and the second, on a fresh load."""
    import torch

    from daralign.core.models import load_causal_lm, own_weights

    model = load_causal_lm(model_name)
    copied = 0.0
    if copy:
        t = time.perf_counter()
        own_weights(model)
        copied = time.perf_counter() - t
    params = list(model.parameters())
    for p in params:  # gradients of the right shape; their values do not matter to the timing
        p.grad = torch.full_like(p, 1e-3)
    optimizer = torch.optim.AdamW(params, lr=1e-6, fused=True)  # as the trainer builds it
    steps = []
    for _ in range(2):
        t = time.perf_counter()
        optimizer.step()
        steps.append(time.perf_counter() - t)
    del model, params, optimizer
    gc.collect()
    return {"copy_s": copied, "first_step_s": steps[0], "second_step_s": steps[1]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="bundled:smollm2-135m-instruct", help="a model daralign loads (fp32)")
    p.add_argument("--repeats", type=int, default=5, help="fresh loads per way, alternated")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--json", help="write the numbers here")
    a = p.parse_args(argv)
    import torch

    from daralign.core.provenance import cpu

    if a.threads:
        torch.set_num_threads(a.threads)
    first_steps(a.model, copy=True)  # warm-up: imports, the page cache, the fused kernel's first call
    runs = {"memory_map": [], "own_copy": []}
    for _ in range(a.repeats):
        runs["memory_map"].append(first_steps(a.model, copy=False))
        runs["own_copy"].append(first_steps(a.model, copy=True))
    median = {way: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for way, rs in runs.items()}
    mapped = median["memory_map"]["first_step_s"]
    owned = median["own_copy"]["copy_s"] + median["own_copy"]["first_step_s"]
    res = {"model": a.model, "cpu": cpu(), "threads": torch.get_num_threads(),
           "repeats": a.repeats, "median": median, "runs": runs, "copy_and_first_step_over_mapped_first_step": owned / mapped}
    print(f"{res['cpu']}, {res['threads']} threads")
    for way, m in median.items():
        print(f"{way:>10}: copy {m['copy_s']:.2f} s, first step {m['first_step_s']:.2f} s, second {m['second_step_s']:.2f} s")
    print(f"copy + first step ÷ first step on the memory map: {res['copy_and_first_step_over_mapped_first_step']:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
