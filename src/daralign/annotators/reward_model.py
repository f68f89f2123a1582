"""A sequence-classification reward model with its own tokenizer and chat template.

The conversation (prompt messages + the response as the assistant turn) is rendered with the
*reward model's* chat template — never the policy's — and the score is the first logit.
"""

from __future__ import annotations

import torch

from daralign.annotators.base import Annotator, ScoreResult, register_annotator
from daralign.annotators.functions import _check_keys
from daralign.core.data import as_messages
from daralign.core.errors import AnnotationError, ConfigError
from daralign.core.models import DTYPES, _location


@register_annotator("reward_model")
class RewardModelAnnotator(Annotator):
    """``{type: reward_model, model: PATH, dtype: float32, batch_size: 16, max_length: 1024}``"""

    def __init__(self, model, tokenizer, batch_size: int, max_length: int) -> None:
        super().__init__()
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.max_length = batch_size, max_length

    @classmethod
    def describe(cls, cfg: dict) -> str:
        return f"reward model {cfg.get('model')}"

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

    def _fit(self, prompt, completion: str) -> tuple[str, bool]:
        """The rendered text within ``max_length`` tokens, cut from the *left of the prompt* so the
        model always sees the whole response (a right cut would give every long-prompt sample of a
        prompt the same score). (text, whether the prompt was cut)."""
        text = self._render(prompt, completion)
        over = len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) - self.max_length
        if over <= 0:
            return text, False
        messages = as_messages(prompt)
        while over > 0 and any(m["content"] for m in messages):
            i = next(j for j, m in enumerate(messages) if m["content"])  # the earliest text left
            ids = self.tokenizer(messages[i]["content"], add_special_tokens=False)["input_ids"]
            messages[i] = {**messages[i], "content": self.tokenizer.decode(ids[over:]) if over < len(ids) else ""}
            text = self._render(messages, completion)
            over = len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) - self.max_length
        if over > 0:
            raise AnnotationError(f"reward model: a response alone is longer than max_length={self.max_length} tokens; "
                                  f"raise max_length (the model must see the whole response)")
        return text, True

    @torch.no_grad()
    def _score(self, prompts, completions, rows):
        n = len(completions)
        fitted = [self._fit(p, c) for p, c in zip(prompts, completions)]
        texts, cut = [t for t, _ in fitted], sum(c for _, c in fitted)
        if cut:
            from daralign.core.tracking import console

            console.print(f"[yellow]reward model: {cut} of {n} prompt(s) cut from the left to fit max_length={self.max_length} "
                          f"(the response is always whole)[/yellow]")
        scores: list[float] = []
        for s in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[s:s + self.batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            scores += self.model(**enc).logits[:, 0].float().tolist()
        return ScoreResult(scores, {"annotator/truncated_prompts": float(cut)})
