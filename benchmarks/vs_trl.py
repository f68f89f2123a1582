"""daralign vs TRL, one process, same model / prompts / K / lengths / reward function.

    pip install trl==1.16.0        # benchmark-only dependency (not in pyproject)
    python benchmarks/vs_trl.py [--iterations 3] [--prompts 4] [--k 4] [--max_completion_length 16]

Phases (each builds its trainer, runs ``--iterations`` online iterations, is torn down):
  trl-rloo        TRL ``RLOOTrainer`` (beta 0.05: reference model, KL in the reward)
  dar             daralign DAR, same K
  rloo            daralign RLOO (kl_coef 0.05), same K: same algorithm as trl-rloo, other framework
  trl-online-dpo  TRL ``trl.experimental.online_dpo.OnlineDPOTrainer`` (2 samples per prompt,
                  preference from the reward function), if the installed TRL has it
  dar-k2          daralign DAR with K = 2, the same samples per step as trl-online-dpo

What is measured:
- iteration time: wall time of one online iteration (sample, reward, reference log-probs,
  loss, backward, optimizer step). daralign: ``OnlineTrainer.step``; TRL: between consecutive
  ``on_step_end`` callbacks (the first from ``on_step_begin``). The first iteration is a
  warm-up and is left out; the median of the rest is reported.
- peak memory: resident set size sampled every 5 ms (psutil) during the phase — model,
  reference and optimizer state included — minus the RSS when the phase began (after
  ``gc.collect()`` and ``malloc_trim``, so memory freed by the previous phase does not count
  for or against the next). tracemalloc would miss torch's tensors (C++ allocations).
On a shared CPU, timings are noisy: compare ratios, and repeat with ``--order`` reversed. Both
frameworks run with the same ``--threads`` (default 1).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
REPO = Path(__file__).resolve().parents[1]
POSITIVE = ("great", "love", "wonderful", "amazing", "happy", "fun", "excited", "fantastic")


def upbeat_reward(prompts=None, completions=None, **kwargs) -> list[float]:
    """Cheap, deterministic: exclamation marks and upbeat words. Accepts TRL's conversational
    completions ([{"role": "assistant", "content": ...}]) and daralign's plain strings."""
    out = []
    for c in completions:
        text = c if isinstance(c, str) else c[-1]["content"]
        low = text.lower()
        out.append(0.5 * min(text.count("!"), 4) + sum(low.count(w) for w in POSITIVE))
    return out


class PeakRSS:
    """Peak resident set size above the level at ``start`` (bytes), sampled in a thread."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self.proc, self.interval = psutil.Process(), interval

    def __enter__(self):
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def delta(self) -> int:
        return self.peak - self.base


def prompts(n: int) -> list[str]:
    rows = [json.loads(line) for line in (REPO / "examples/data/quickstart_train.jsonl").read_text().splitlines()]
    return [r["prompt"] for r in rows[:n]]


# ---------------------------------------------------------------- daralign
def run_daralign(algorithm: str, model: str, texts: list[str], K: int, length: int, iterations: int, lr: float) -> list[float]:
    from daralign.core.config import TrainConfig
    from daralign.train.loop import OnlineTrainer
    from daralign.train.step_metrics import nothing_spent
    from daralign.objectives import get_objective

    tmp = Path(tempfile.mkdtemp(prefix="vs_trl_"))
    data = tmp / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    train = TrainConfig(algorithm=algorithm, model_name_or_path=model, dataset=str(data), num_generations=K,
                        max_completion_length=length, temperature=1.0, per_device_train_batch_size=len(texts),
                        learning_rate=lr, max_steps=iterations, output_dir=str(tmp / "run"), report=False,
                        log_completions=False, annotator={"type": "function", "function": f"{__file__}:upbeat_reward"},
                        bf16=__import__("torch").cuda.is_available())
    cls = get_objective(algorithm)
    algo = cls.Config(**({"kl_coef": 0.05} if algorithm == "rloo" else {})) if cls.Config else None
    trainer = OnlineTrainer(train, algo)
    times, parts = [], {}
    spent = nothing_spent()
    try:
        for step in range(iterations):
            t0 = synced_clock()
            m = trainer.step(step, len(texts), spent)
            times.append(synced_clock() - t0)
            spent = {k: m[k] for k in spent}
            if step:
                for k in ("rollout", "annotate", "reference", "update"):
                    parts.setdefault(k, []).append(m[f"timing/{k}"])
    finally:
        trainer.close()
        shutil.rmtree(tmp, ignore_errors=True)  # the prompts file and the run folder this phase wrote
    print(f"    daralign {algorithm} K={K}: " + ", ".join(f"{k} {statistics.median(v):.2f} s" for k, v in parts.items()))
    return times


def synced_clock() -> float:
    """``time.perf_counter()`` once the GPU has finished what was queued (CUDA kernels run
    asynchronously: an unsynchronised clock times the launches, not the work)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


# ---------------------------------------------------------------- TRL
def _trl_common(tmp: str, lr: float, iterations: int) -> dict:
    import torch

    cuda = torch.cuda.is_available()  # on a GPU both sides run there, in bf16 autocast
    return dict(output_dir=tmp, learning_rate=lr, max_steps=iterations, logging_steps=10_000, save_strategy="no",
                report_to="none", use_cpu=not cuda, bf16=cuda, gradient_checkpointing=False, seed=42,
                lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                dataloader_num_workers=0, disable_dropout=True)


def _timer_callback():
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self):
            self.marks: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            if not self.marks:
                self.marks.append(synced_clock())

        def on_step_end(self, args, state, control, **kw):
            self.marks.append(synced_clock())

        @property
        def times(self) -> list[float]:
            return [b - a for a, b in zip(self.marks, self.marks[1:])]

    return Timer()


def run_trl(kind: str, model: str, texts: list[str], K: int, length: int, iterations: int, lr: float) -> list[float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = tempfile.mkdtemp(prefix="vs_trl_trl_")
    tok = AutoTokenizer.from_pretrained(model)
    policy = AutoModelForCausalLM.from_pretrained(model, dtype="float32")
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": t}]} for t in texts] * (iterations + 1))
    timer = _timer_callback()
    if kind == "trl-rloo":
        from trl import RLOOConfig, RLOOTrainer

        args = RLOOConfig(**_trl_common(tmp, lr, iterations), per_device_train_batch_size=len(texts) * K,
                          num_generations=K, max_completion_length=length, temperature=1.0, top_p=1.0, top_k=0,
                          beta=0.05, num_iterations=1, steps_per_generation=1, shuffle_dataset=False)
        trainer = RLOOTrainer(model=policy, reward_funcs=upbeat_reward, args=args, train_dataset=data,
                              processing_class=tok, callbacks=[timer])
    else:
        from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

        args = OnlineDPOConfig(**_trl_common(tmp, lr, iterations), per_device_train_batch_size=len(texts),
                               max_new_tokens=length, temperature=1.0, top_p=1.0, beta=0.1)
        trainer = OnlineDPOTrainer(model=policy, reward_funcs=upbeat_reward, args=args, train_dataset=data,
                                   processing_class=tok, callbacks=[timer])
    try:
        trainer.train()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # TRL's output_dir (save_strategy "no": nothing kept)
    times = timer.times
    del trainer, policy
    return times


PHASES = {
    "trl-rloo": lambda a: run_trl("trl-rloo", a.model, a.texts, a.k, a.max_completion_length, a.iterations, a.lr),
    "dar": lambda a: run_daralign("dar", a.model, a.texts, a.k, a.max_completion_length, a.iterations, a.lr),
    "rloo": lambda a: run_daralign("rloo", a.model, a.texts, a.k, a.max_completion_length, a.iterations, a.lr),
    "trl-online-dpo": lambda a: run_trl("trl-online-dpo", a.model, a.texts, 2, a.max_completion_length, a.iterations, a.lr),
    "dar-k2": lambda a: run_daralign("dar", a.model, a.texts, 2, a.max_completion_length, a.iterations, a.lr),
}
RATIOS = [("dar", "trl-rloo", "goal: time ≤ 0.5, memory ≤ 0.8"), ("rloo", "trl-rloo", "same algorithm"),
          ("dar-k2", "trl-online-dpo", "2 samples per prompt each")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="bundled:smollm2-135m-instruct")
    p.add_argument("--prompts", type=int, default=4, help="prompts per iteration")
    p.add_argument("--k", type=int, default=4, help="samples per prompt (RLOO, DAR)")
    p.add_argument("--max_completion_length", type=int, default=16)
    p.add_argument("--iterations", type=int, default=3, help="online iterations per phase (the first is a warm-up)")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--order", default="trl-rloo,dar,rloo,trl-online-dpo,dar-k2", help="phases to run, in order")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 default: on a shared machine more threads mostly spin-wait)")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    if a.iterations < 2:
        p.error("--iterations must be ≥ 2 (the first is a warm-up)")
    import torch
    import trl

    from daralign.core.bundled import resolve

    torch.set_num_threads(a.threads)
    a.model = resolve(a.model) if a.model.startswith("bundled:") else a.model
    a.texts = prompts(a.prompts)
    order = [x.strip() for x in a.order.split(",") if x.strip()]
    if "trl-online-dpo" in order:  # importing it pulls TRL's vLLM client (~10 s on a CPU): only when asked
        try:
            import trl.experimental.online_dpo  # noqa: F401
        except ImportError:
            order = [x for x in order if x not in ("trl-online-dpo", "dar-k2")]
            print("this TRL has no online DPO: skipped")
    print(f"trl {trl.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads; model {a.model}; "
          f"{a.prompts} prompts × K={a.k}, {a.max_completion_length} new tokens, {a.iterations} iterations")
    results = {}
    for name in order:
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            times = PHASES[name](a)
            total = time.perf_counter() - t0
        timed = times[1:]
        results[name] = {"iteration_s": statistics.median(timed), "iterations_s": times, "peak_rss_delta_mb": mem.delta / 2**20,
                         "phase_s": total}
        print(f"{name:>15}: iteration {results[name]['iteration_s']:.2f} s (all: {', '.join(f'{t:.2f}' for t in times)}), "
              f"peak RSS +{results[name]['peak_rss_delta_mb']:.0f} MiB, phase {total:.0f} s", flush=True)
        gc.collect()
    print()
    for ours, theirs, note in RATIOS:
        if ours in results and theirs in results:
            t = results[ours]["iteration_s"] / results[theirs]["iteration_s"]
            m = results[ours]["peak_rss_delta_mb"] / results[theirs]["peak_rss_delta_mb"]
            results[f"{ours}/{theirs}"] = {"time": t, "memory": m}
            print(f"{ours} / {theirs}: iteration time ×{t:.2f}, peak memory ×{m:.2f}   ({note})")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
