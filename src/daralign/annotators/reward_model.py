"""A sequence-classification reward model with its own tokenizer and chat template.

The conversation (prompt messages + the response as the assistant turn) is rendered with the
*reward model's* chat template — never the policy's — and the score is the first logit.
"""

from __future__ import annotations

import torch

from daralign.annotators.base import Annotator, ScoreResult, register_annotator
from daralign.annotators.functions import _check_keys, validate_scores
from daralign.data import as_messages
from daralign.errors import ConfigError
from daralign.models import DTYPES, _location


@register_annotator("reward_model")
class RewardModelAnnotator(Annotator):
    """``{type: reward_model, model: PATH, dtype: float32, batch_size: 16, max_length: 1024}``"""

    def __init__(self, model, tokenizer, batch_size: int, max_length: int) -> None:
        super().__init__()
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.max_length = batch_size, max_length

    @classmethod
    def from_config(cls, cfg: dict) -> "RewardModelAnnotator":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        _check_keys(cfg, {"model", "dtype", "batch_size", "max_length", "trust_remote_code"}, "reward_model")
        if "model" not in cfg:
            raise ConfigError("annotator (reward_model): missing key 'model'")
        dtype = cfg.get("dtype", "float32")
        if dtype not in DTYPES:
            raise ConfigError(f"annotator (reward_model): dtype {dtype!r} is not one of {sorted(DTYPES)}")
        trust = bool(cfg.get("trust_remote_code", False))
        where, extra = _location(cfg["model"])
        tok = AutoTokenizer.from_pretrained(where, trust_remote_code=trust, **extra)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model = AutoModelForSequenceClassification.from_pretrained(where, dtype=DTYPES[dtype], trust_remote_code=trust, **extra)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id
        return cls(model, tok, int(cfg.get("batch_size", 16)), int(cfg.get("max_length", 1024)))

    def _render(self, prompt, completion: str) -> str:
        messages = as_messages(prompt) + [{"role": "assistant", "content": completion}]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return "\n\n".join(m["content"] for m in messages)

    @torch.no_grad()
    def score(self, prompts, completions, rows):
        n = self.affordable(len(completions))  # responses past the request limit are not scored (invalid)
        texts = [self._render(p, c) for p, c in zip(prompts[:n], completions[:n])]
        scores: list[float] = []
        for s in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[s:s + self.batch_size], return_tensors="pt", padding=True,
                                 truncation=True, max_length=self.max_length, add_special_tokens=False)
            scores += self.model(**enc).logits[:, 0].float().tolist()
        self.num_requests += n  # one per scored response
        scores = validate_scores(scores, n, "reward model") + [None] * (len(completions) - n)
        self.num_annotations += n
        return ScoreResult(scores)
