"""Sampling with transformers ``generate``: K responses per prompt and their behaviour log-probs.

π_t(y|x) is recorded at sampling time from the raw logits ``generate`` already computed
(``output_logits=True``), so recording costs no extra forward pass. Log-probs are of the
temperature-scaled distribution, the one the loop also uses for π_ref and π_θ; top-p/top-k
truncation, when the user asks for it, is not part of π_t (as in TRL).

The recorded π_t must be the distribution actually sampled from, so sampling runs with a
*neutral* generation config: the model's own ``generation_config.json`` (repetition penalty,
top-k 50, suppressed tokens, ...) is set aside while sampling, and nothing masks EOS at the first
step (no ``min_new_tokens``): an empty answer is a legitimate sample.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F

from daralign.core.types import Rollout
from daralign.rollout.base import RolloutEngine, SamplingSettings, register_engine
from daralign.rollout.tokens import eos_token_ids, tokenize_prompts
from daralign.core.sharding import in_lockstep


def _autocast(bf16: bool):
    return torch.autocast("cpu" if not torch.cuda.is_available() else "cuda", dtype=torch.bfloat16) if bf16 else nullcontext()


@contextmanager
def neutral_generation_config(model, eos_ids: list[int], pad_token_id: int):
    """Sample with transformers' global defaults only, not the checkpoint's processors."""
    from transformers import GenerationConfig

    target = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps the model
    saved = target.generation_config
    target.generation_config = GenerationConfig(eos_token_id=eos_ids, pad_token_id=pad_token_id,
                                                bos_token_id=getattr(saved, "bos_token_id", None))
    try:
        yield
    finally:
        target.generation_config = saved


@torch.no_grad()
def sample_rollout(
    model, tokenizer, rows: list[dict], *, num_generations: int, max_completion_length: int,
    temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, max_prompt_length: int = 256,
    generation_batch_size: int = 32, bf16: bool = False,
) -> Rollout:
    """Sample ``num_generations`` completions for each row's ``prompt`` (prompt-major order)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    K = num_generations
    enc = tokenize_prompts(tokenizer, [r["prompt"] for r in rows], max_prompt_length, device)
    prompt_ids = enc["input_ids"].repeat_interleave(K, 0)
    prompt_mask = enc["attention_mask"].repeat_interleave(K, 0)
    N, Lp = prompt_ids.shape
    eos_ids = eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id
    gen_tokens = torch.full((N, max_completion_length), pad, dtype=torch.long, device=device)
    gen_logps = torch.zeros((N, max_completion_length), dtype=torch.float32, device=device)
    lockstep = in_lockstep(model)  # FSDP2: every forward gathers layers from all processes, so all keep stepping
    for s in range(0, N, generation_batch_size):
        e = min(s + generation_batch_size, N)
        with _autocast(bf16), neutral_generation_config(model, eos_ids, pad):
            out = model.generate(
                input_ids=prompt_ids[s:e], attention_mask=prompt_mask[s:e], do_sample=True,
                temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_completion_length,
                pad_token_id=pad, eos_token_id=eos_ids, return_dict_in_generate=True, output_logits=True,
                synced_gpus=lockstep,
            )
        new = out.sequences[:, Lp:]
        gen_tokens[s:e, : new.shape[1]] = new
        for t, step_logits in enumerate(out.logits):  # raw, pre-warper; one (b, V) at a time, never (b, T, V)
            logps = F.log_softmax(step_logits.float() / temperature, -1)
            gen_logps[s:e, t] = torch.gather(logps, 1, new[:, t:t + 1]).squeeze(-1)
    # completion = tokens up to and including the first EOS (pad may equal EOS, so never use pad)
    is_eos_tok = torch.isin(gen_tokens, torch.tensor(eos_ids, device=device))
    is_eos = is_eos_tok.any(-1)
    first_eos = torch.where(is_eos, is_eos_tok.float().argmax(-1), torch.full_like(is_eos, max_completion_length - 1, dtype=torch.long))
    gen_mask = (torch.arange(max_completion_length, device=device)[None] <= first_eos[:, None]).long()
    gen_tokens = torch.where(gen_mask.bool(), gen_tokens, torch.full_like(gen_tokens, pad))
    input_ids = torch.cat([prompt_ids, gen_tokens], 1)
    attention_mask = torch.cat([prompt_mask, gen_mask], 1)
    completion_mask = torch.cat([torch.zeros_like(prompt_mask), gen_mask], 1)
    # token_logps[:, t] is the log-prob of token t+1, so completion token j sits at Lp-1+j
    behaviour = torch.zeros((N, Lp + max_completion_length - 1), dtype=torch.float32, device=device)
    behaviour[:, Lp - 1:] = gen_logps * gen_mask
    completions = [
        tokenizer.decode(gen_tokens[i, : int(gen_mask[i].sum())], skip_special_tokens=True) for i in range(N)
    ]
    model.train(was_training)
    return Rollout(
        rows=rows, prompts=[r["prompt"] for r in rows], completions=completions, input_ids=input_ids,
        attention_mask=attention_mask, completion_mask=completion_mask, behaviour_token_logps=behaviour,
        is_eos=is_eos, num_generations=K,
    )


@register_engine("hf")
class HFEngine(RolloutEngine):
    """transformers ``generate`` on the policy itself: π_t recorded while sampling, nothing to sync."""

    gives_behaviour_logps = True
    auto_priority = 0  # the fallback: ``auto`` samples with it when no other engine takes the run

    def __init__(self, settings: SamplingSettings, tokenizer) -> None:
        self.s, self.tokenizer = settings, tokenizer

    @classmethod
    def auto_selects(cls, train, config, feedback_kind: str) -> bool:
        """any run no other engine takes"""
        return True

    @classmethod
    def from_config(cls, config: None, settings: SamplingSettings, tokenizer, device) -> "HFEngine":
        return cls(settings, tokenizer)

    def sample(self, model, rows: list[dict], step: int) -> Rollout:
        s = self.s
        with s.autocast():
            return sample_rollout(model, self.tokenizer, rows, num_generations=s.num_generations,
                                  max_completion_length=s.max_completion_length, temperature=s.temperature,
                                  top_p=s.top_p, top_k=s.top_k, max_prompt_length=s.max_prompt_length,
                                  generation_batch_size=s.generation_batch_size)
