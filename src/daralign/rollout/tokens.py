"""Prompt tokens every engine shares: the same left-padded, left-truncated prompt ids whichever
engine samples (so HF and vLLM see identical prompts), and the ids that end a completion."""

from __future__ import annotations

from typing import Any

from daralign.core.data import render_prompt


def tokenize_prompts(tokenizer, prompts: list[Any], max_prompt_length: int, device) -> dict:
    """Chat-templated prompts, left-padded; a prompt over ``max_prompt_length`` tokens keeps its end."""
    texts = [render_prompt(tokenizer, p) for p in prompts]
    side, tside = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"  # keep the prompt's end
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                        max_length=max_prompt_length, add_special_tokens=False)
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = side, tside
    return {k: v.to(device) for k, v in enc.items()}


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the model's generation config's and the tokenizer's EOS."""
    eos = model.generation_config.eos_token_id
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    return sorted(set(ids) | {tokenizer.eos_token_id} - {None})


def prompt_token_ids(enc) -> list[list[int]]:
    """Each prompt's tokens without the left padding: what an engine that takes token ids is given."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(enc["input_ids"], enc["attention_mask"])]
