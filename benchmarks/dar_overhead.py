"""What DAR costs on top of what it cannot avoid, measured in one run on the same tokens.

1. DAR update step ÷ plain SFT step (goal ≤ 1.05). Both go through the loop's own
   ``OnlineTrainer.update`` on the same rollout tokens with the same micro-batching, gradient
   clipping and AdamW step. The DAR step also includes ``DAR.prepare`` (advantages and weights
   from the rewards and the already-computed reference log-probs); the SFT step's loss is the mean
   sequence NLL through the same ``sequence_logps`` path, without weights. (The reference forward
   is a separate cost, ``timing/reference`` in metrics.jsonl, and not part of either step.)
2. Rollout tokens/s ÷ raw ``model.generate`` tokens/s (goal ≥ 0.97): ``sample_rollout`` (which
   also records the behaviour log-probs and builds the masks) against ``generate`` alone, same
   prompts, same sampling settings, same seed (so the very same tokens), tokens counted up to and
   including the first EOS.

Runs are interleaved (A, B, B, A, ...) after a warm-up of each; each ratio is the median over
``--repeats`` of the ratio within one adjacent pair, both in wall-clock time and in this process's
CPU time (``time.process_time``, much less sensitive to other jobs on a shared machine). ~2–3 min
on 2 idle CPU cores with the defaults.

On CUDA every tensor is made on the model's device, and every timer synchronises the device when
it starts and when it stops (CUDA kernels run after the call that queued them returns: without it
a step's time would count only its launches). Read the wall ratio there: the CPU time of a GPU run
is the host's (kernel launches, and the wait inside ``synchronize``).

    python benchmarks/dar_overhead.py [--model bundled:smollm2-135m-instruct] [--repeats 3] [--threads 1]

On a machine shared with other jobs use ``--threads 1``: with 2 threads per process on 2 busy cores
every parallel region waits for a descheduled thread, and one step's time varied 2–5× run to run
(measured here at load ≈ 10: paired ratios 0.8–2.8); with one thread the pairs agreed within 10 %.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = [
    "Tell me about the ocean.", "Describe a walk in the park.", "What is a good breakfast?",
    "Give me three tips for learning to cook.", "Explain why the sky is blue.", "Write a short note to a friend.",
    "What should I pack for a weekend trip?", "How do plants grow?",
]


def length_reward(prompts, completions, **kwargs):  # the config needs an annotator; rewards come below
    return [float(len(c)) for c in completions]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="bundled:smollm2-135m-instruct", help="policy (hub id, folder, .gguf, bundled:NAME)")
    p.add_argument("--num_prompts", type=int, default=4, help="prompts per online batch")
    p.add_argument("--num_generations", type=int, default=2, help="K samples per prompt")
    p.add_argument("--max_new_tokens", type=int, default=32, help="completion length limit")
    p.add_argument("--per_device_train_batch_size", type=int, default=2, help="prompts per micro-batch")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each side (median reported)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for both sides")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default); 1 makes CPU "
                   "times robust on a machine shared with other jobs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the numbers to this file")
    p.add_argument("--work_dir", help="folder for the prompts file and the run (default: a new temporary folder); "
                   "removed when the script succeeds, kept (and printed) when it fails")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.num_prompts % args.per_device_train_batch_size:
        sys.exit("--num_prompts must be a multiple of --per_device_train_batch_size")
    tmp = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="dar_overhead_"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        res = measure(args, tmp)
    except BaseException:
        print(f"dar_overhead failed; its work folder is kept: {tmp}", file=sys.stderr, flush=True)
        raise
    shutil.rmtree(tmp, ignore_errors=True)  # the prompts file and the run folder this script wrote
    report(args, res)
    return 0


def sft_objective(cfg):
    """Plain SFT on the same tokens: mean sequence NLL, no weights, no reference."""
    from daralign.objectives.base import Objective

    class SFT(Objective):
        def prepare(self, rollout, feedback, ref_token_logps, model):
            return {}, {}

        def loss(self, policy_logps, batch):
            return -policy_logps.mean(), {}

    return SFT(None, cfg)


def measure(args, tmp: Path) -> dict:
    from daralign.core.config import TrainConfig
    from daralign.objectives.dar import DARConfig
    from daralign.train.loop import OnlineTrainer

    data = tmp / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in (PROMPTS * 4)[: args.num_prompts]))
    ga = args.num_prompts // args.per_device_train_batch_size
    cfg = TrainConfig(
        model_name_or_path=args.model, dataset=str(data), output_dir=str(tmp / "run"), seed=args.seed,
        annotator={"type": "function", "function": f"{Path(__file__).resolve()}:length_reward"},
        num_generations=args.num_generations, max_completion_length=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=ga, bf16=args.bf16, report=False,
    )
    cfg.validate()
    t0 = time.perf_counter()
    trainer = OnlineTrainer(cfg, DARConfig())
    try:
        return measure_with(args, cfg, trainer, t0)
    finally:
        trainer.close()


def measure_with(args, cfg, trainer, t0: float) -> dict:
    import torch

    from daralign.core.types import Feedback
    from daralign.rollout.hf import neutral_generation_config, sample_rollout
    from daralign.rollout.tokens import eos_token_ids, tokenize_prompts

    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f}s; torch threads {torch.get_num_threads()}", flush=True)
    model, tok, acc = trainer.unwrapped, trainer.tokenizer, trainer.accelerator
    device = model.device  # every tensor below is made here: CUDA and CPU tensors do not mix
    cuda = device.type == "cuda"
    rows = trainer.schedule.batch(0)
    K = args.num_generations
    ga = args.num_prompts // args.per_device_train_batch_size

    # ------------------------------------------------------------ 2. rollout vs raw generate
    enc = tokenize_prompts(tok, [r["prompt"] for r in rows], cfg.max_prompt_length, device)
    prompt_ids, prompt_mask = enc["input_ids"].repeat_interleave(K, 0), enc["attention_mask"].repeat_interleave(K, 0)
    eos_ids = eos_token_ids(model, tok)
    eos = torch.tensor(eos_ids, device=device)

    def count(gen: torch.Tensor) -> int:  # completion tokens up to and including the first EOS
        is_eos = torch.isin(gen, eos)
        first = torch.where(is_eos.any(-1), is_eos.float().argmax(-1),
                            torch.full((gen.shape[0],), gen.shape[1] - 1, device=gen.device))
        return int((first + 1).sum())

    def synchronize():  # the queued kernels finish inside the timed span, not in the next one
        if cuda:
            torch.cuda.synchronize(device)

    def clock():
        synchronize()
        return time.perf_counter(), time.process_time()

    def since(t):
        synchronize()
        return time.perf_counter() - t[0], time.process_time() - t[1]

    def run_rollout(seed):
        torch.manual_seed(seed)
        t = clock()
        with acc.autocast():
            r = sample_rollout(model, tok, rows, num_generations=K, max_completion_length=cfg.max_completion_length,
                               temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                               max_prompt_length=cfg.max_prompt_length, generation_batch_size=cfg.generation_batch_size)
        dt = since(t)
        return r, int(r.completion_mask.sum()), dt

    @torch.no_grad()
    def run_generate(seed):
        model.eval()
        torch.manual_seed(seed)
        t = clock()
        outs = []
        with acc.autocast():
            for s in range(0, prompt_ids.shape[0], cfg.generation_batch_size):
                e = s + cfg.generation_batch_size
                with neutral_generation_config(model, eos_ids, tok.pad_token_id):  # the rollout's sampling, exactly
                    out = model.generate(input_ids=prompt_ids[s:e], attention_mask=prompt_mask[s:e], do_sample=True,
                                         temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                         max_new_tokens=cfg.max_completion_length,
                                         pad_token_id=tok.pad_token_id, eos_token_id=eos_ids)
                outs.append(out[:, prompt_ids.shape[1]:])
        dt = since(t)
        n = sum(count(o) for o in outs)
        return outs, n, dt

    run_rollout(args.seed), run_generate(args.seed)  # warm-up
    roll, gen, same_tokens = [], [], True  # (tok/s wall, tok/s cpu) per repeat
    for i in range(args.repeats):
        seed = args.seed + 1 + i
        if i % 2 == 0:
            (_, n_r, dt_r), (_, n_g, dt_g) = run_rollout(seed), run_generate(seed)
        else:
            (_, n_g, dt_g), (_, n_r, dt_r) = run_generate(seed), run_rollout(seed)
        roll.append((n_r / dt_r[0], n_r / dt_r[1]))
        gen.append((n_g / dt_g[0], n_g / dt_g[1]))
        same_tokens &= n_r == n_g
        print(f"  rollout {n_r} tok in {dt_r[0]:.2f}s wall / {dt_r[1]:.2f}s cpu | generate {n_g} tok in "
              f"{dt_g[0]:.2f}s wall / {dt_g[1]:.2f}s cpu", flush=True)

    # ------------------------------------------------------------ 1. DAR update vs SFT update
    torch.manual_seed(args.seed)
    rollout, _, _ = run_rollout(args.seed)
    g = torch.Generator().manual_seed(args.seed)  # drawn on the CPU (the same rewards on every device), then moved
    feedback = Feedback(num_annotations=rollout.input_ids.shape[0], rewards=torch.rand(len(rows), K, generator=g).to(device),
                        valid=torch.ones(len(rows), K, dtype=torch.bool, device=device))
    ref = trainer.reference_token_logps(rollout)
    dar, sft = trainer.objective, sft_objective(cfg)

    def dar_step():
        t = clock()
        trainer.objective = dar
        with torch.no_grad():
            prepared, _ = dar.prepare(rollout, feedback, ref, model)
        trainer.update(rollout, prepared, True)
        return since(t)

    def sft_step():
        t = clock()
        trainer.objective = sft
        trainer.update(rollout, {}, True)
        return since(t)

    dar_step(), sft_step()  # warm-up (optimizer state allocation)
    dar_t, sft_t = [], []
    for i in range(args.repeats):
        a, b = (dar_step(), sft_step()) if i % 2 == 0 else tuple(reversed((sft_step(), dar_step())))
        dar_t.append(a)
        sft_t.append(b)
        print(f"  DAR update {a[0]:.2f}s wall / {a[1]:.2f}s cpu | SFT update {b[0]:.2f}s wall / {b[1]:.2f}s cpu",
              flush=True)

    n_tok = int(rollout.completion_mask.sum())
    med = statistics.median
    res = {
        "model": args.model, "sequences": rollout.input_ids.shape[0], "seq_len": rollout.input_ids.shape[1],
        "completion_tokens": n_tok, "micro_batches": ga, "repeats": args.repeats, "bf16": args.bf16,
        "device": str(device), "torch_threads": torch.get_num_threads(), "same_tokens": same_tokens,
        "dar_update_s": [a for a in dar_t], "sft_update_s": [b for b in sft_t],
        "rollout_tok_per_s": roll, "generate_tok_per_s": gen,
    }
    for j, kind in enumerate(("wall", "cpu")):
        res[f"update_ratio_{kind}"] = med([a[j] / b[j] for a, b in zip(dar_t, sft_t)])
        res[f"rollout_ratio_{kind}"] = med([r[j] / g[j] for r, g in zip(roll, gen)])
    return res


def report(args, res: dict) -> None:
    ga, same_tokens = res["micro_batches"], res["same_tokens"]
    print(f"\n{args.model}: {res['sequences']} sequences × {res['seq_len']} tokens, {ga} micro-batches, "
          f"median of {args.repeats} paired ratios")
    for kind in ("wall", "cpu"):
        u, r = res[f"update_ratio_{kind}"], res[f"rollout_ratio_{kind}"]
        print(f"[{kind:>4}] DAR update step ÷ SFT step         = {u:.3f}  (goal ≤ 1.05) {'OK' if u <= 1.05 else 'MISSED'}")
        print(f"[{kind:>4}] rollout tok/s ÷ raw generate tok/s = {r:.3f}  (goal ≥ 0.97) {'OK' if r >= 0.97 else 'MISSED'}"
              f"{'' if same_tokens else '  [token counts differed between the two sides]'}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    sys.exit(main())
