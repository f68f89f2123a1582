"""Plain-text answers from a causal LM, one per prompt (no log-probs, no training tensors): what
evaluation (win rates, MT-bench, the held-out check) and `daralign fit-proxy` sample from a policy.

Evaluation runs inside training too, so this function leaves the caller's state alone: the model's
train/eval mode, the tokenizer's padding side and the global torch RNG are restored on exit — a
resumed run must not diverge because an evaluation drew random numbers. Unlike a training
rollout (``hf.sample_rollout``) it never truncates prompts (MT-bench second turns carry the first
answer), records no log-probs, and takes one temperature per prompt (MT-bench's per category).
The prompt is rendered exactly as in training (``data.render_prompt``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from daralign.core.data import render_prompt
from daralign.core.rng import fork_rng
from daralign.core.sharding import in_lockstep
from daralign.rollout.hf import neutral_generation_config
from daralign.rollout.tokens import eos_token_ids


@torch.no_grad()
def generate_responses(
    model,
    tokenizer,
    prompts: Sequence[Any],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    batch_size: int = 8,
    seed: int = 0,
    temperatures: Sequence[float] | None = None,
) -> list[str]:
    """One answer per prompt (a string or chat messages), in prompt order.

    ``temperature`` 0 means greedy. ``temperatures`` (one per prompt) overrides it, e.g. MT-bench's
    per-category settings; prompts are grouped by temperature and, within a group, by length so
    that left padding wastes little compute.
    """
    temps = [float(temperature)] * len(prompts) if temperatures is None else [float(t) for t in temperatures]
    texts = [render_prompt(tokenizer, p) for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: (temps[i], len(texts[i])))
    device = next(model.parameters()).device
    was_training, old_side = model.training, tokenizer.padding_side
    out: list[str] = [""] * len(texts)
    model.eval()
    tokenizer.padding_side = "left"
    try:
        with fork_rng():
            torch.manual_seed(seed)
            start = 0
            while start < len(order):
                t = temps[order[start]]
                batch = [i for i in order[start : start + batch_size] if temps[i] == t]
                start += len(batch)
                enc = tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False)
                enc = {k: v.to(device) for k, v in enc.items()}
                sampling = {"do_sample": True, "temperature": t, "top_p": 1.0, "top_k": 0} if t > 0 else {"do_sample": False}
                eos_ids = eos_token_ids(model, tokenizer)
                with neutral_generation_config(model, eos_ids, tokenizer.pad_token_id):
                    gen = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                         eos_token_id=eos_ids, synced_gpus=in_lockstep(model), **sampling)
                new = gen[:, enc["input_ids"].shape[1] :]
                for i, text in zip(batch, tokenizer.batch_decode(new, skip_special_tokens=True)):
                    out[i] = text.strip()
    finally:
        model.train(was_training)
        tokenizer.padding_side = old_side
    return out
