"""The in-process llama.cpp judge backend (``backend: llama_cpp``, optional: ``pip install
'daralign[llama-cpp]'``). Same ``Client`` interface as the others in ``clients.py``."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from daralign.annotators.backends import is_int, need, register_backend
from daralign.annotators.clients import Client, OnReply, Reply, Request, Reserve, _always, _variants
from daralign.core.errors import ConfigError


@register_backend("llama_cpp")
class LlamaCppClient(Client):
    """In-process GGUF through ``llama-cpp-python`` (optional: ``pip install llama-cpp-python``).
    Next-token probabilities come from the logits of the last prompt position."""

    @dataclass
    class Config:
        n_ctx: int = field(default=4096, metadata={"help": "context length in tokens"})
        n_threads: int | None = field(default=None, metadata={"help": "CPU threads (default: llama.cpp's choice)"})

        def __post_init__(self):
            need(self, "n_ctx", is_int(self.n_ctx, 1), "must be an integer >= 1")
            need(self, "n_threads", self.n_threads is None or is_int(self.n_threads, 1), "must be an integer >= 1")

    def __init__(self, model: str, n_ctx: int = 4096, n_threads: int | None = None):
        try:
            from llama_cpp import Llama
        except ImportError:
            raise ConfigError(
                "backend 'llama_cpp' needs llama-cpp-python: pip install 'daralign[llama-cpp]' "
                "(compiles llama.cpp, ~8 min on 2 cores), or use backend 'transformers'"
            ) from None
        from daralign.core import bundled

        path = str(bundled.gguf_path(model)) if bundled.is_bundled(model) else model
        if not path.endswith(".gguf") or not os.path.isfile(path):
            raise ConfigError(f"model: backend 'llama_cpp' needs a .gguf file or bundled:NAME, got {model!r}")
        self.name = model
        self.llm = Llama(model_path=path, n_ctx=n_ctx, n_threads=n_threads, verbose=False)
        self._ids: dict[str, list[int]] = {}

    @classmethod
    def from_config(cls, c) -> "LlamaCppClient":
        return cls(c.model, c.n_ctx, c.n_threads)

    def __repr__(self) -> str:
        return f"LlamaCppClient(model={self.name!r})"

    def render(self, req: Request) -> str:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        if not hasattr(self, "_fmt"):
            meta = self.llm.metadata
            tmpl = meta.get("tokenizer.chat_template")
            bos = self.llm.detokenize([self.llm.token_bos()]).decode("utf-8", "ignore")
            eos = self.llm.detokenize([self.llm.token_eos()]).decode("utf-8", "ignore")
            self._fmt = Jinja2ChatFormatter(tmpl, eos_token=eos, bos_token=bos) if tmpl else None
        if self._fmt is None:
            return "".join(f"{r.capitalize()}: {c}\n\n" for r, c in req.messages) + "Assistant:" + req.prefix
        return self._fmt(messages=req.message_dicts()).prompt + req.prefix

    def _token_ids(self, label: str) -> list[int]:
        if label not in self._ids:
            ids = set()
            for form in _variants(label):
                enc = self.llm.tokenize(form.encode(), add_bos=False, special=False)
                if len(enc) == 1:
                    ids.add(enc[0])
            self._ids[label] = sorted(ids)
        return self._ids[label]

    def complete(self, requests: list[Request], on_reply: OnReply | None = None,
                 reserve: Reserve = _always) -> list[Reply | None]:
        import llama_cpp
        import numpy as np

        replies: list[Reply | None] = []
        for i, req in enumerate(requests):
            if not reserve():  # the budget is spent: not sent
                replies.append(None)
                continue
            t0 = time.perf_counter()
            text_prompt = self.render(req)
            toks = self.llm.tokenize(text_prompt.encode(), add_bos=False, special=True)
            probs = text = None
            n_new = 0
            if req.candidates:
                self.llm.reset()
                self.llm.eval(toks)
                # With logits_all=False llama-cpp-python keeps no score rows; read the context's
                # last-position logits directly (no full-prompt logits: 151k vocab x prompt).
                ptr = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
                logits = np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),)).astype(np.float64)
                p = np.exp(logits - logits.max())
                p /= p.sum()
                probs = {c: float(sum(p[t] for t in self._token_ids(c))) for c in req.candidates}
                text = self.llm.detokenize([int(p.argmax())]).decode("utf-8", "ignore")
                n_new = 1
            if req.max_tokens > 1 or not req.candidates:
                out = self.llm.create_completion(
                    prompt=toks, max_tokens=req.max_tokens, temperature=req.temperature, seed=req.seed
                )
                text = out["choices"][0]["text"]
                n_new = out["usage"]["completion_tokens"]
            replies.append(Reply(text=text, probs=probs, tokens=len(toks) + n_new, latency_s=time.perf_counter() - t0))
            if on_reply:
                on_reply(i, replies[-1])
        return replies

    def close(self) -> None:
        if getattr(self, "llm", None) is not None:
            self.llm.close()
            self.llm = None
