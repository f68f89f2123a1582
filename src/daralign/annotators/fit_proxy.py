"""`daralign fit-proxy`: a learned proxy reward whose agreement with the gold is a knob.

1. Sample ``samples_per_prompt`` answers per training prompt from the starting policy.
2. Score every answer with the gold annotator; every within-prompt pair with a strict gold order is
   a labelled comparison (ties are dropped); at most ``num_pairs`` of them, chosen by ``seed``.
3. Hold out the pairs of ``heldout_fraction`` of the prompts; flip ``label_noise`` of the training
   labels (Coste et al.'s 25% is ``0.25``).
4. Fit a Bradley–Terry head on frozen sentence-embedding features (``annotators/learned.py``):
   minimise −log σ(y·(r(a) − r(b))) + ``weight_decay``·‖w‖², full batch, Adam.
5. Write ``proxy.safetensors`` + ``proxy.json`` (``{type: learned, path: DIR}`` loads them),
   ``agreement.json`` (``pairwise_agreement`` on the held-out pairs against the gold, ``num_pairs``)
   and ``samples.jsonl`` (every answer with its gold score).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from daralign.core.errors import ConfigError


@dataclass
class FitProxyConfig:
    model_name_or_path: str = field(default="bundled:smollm2-135m-instruct", metadata={"help": "the starting policy whose answers the proxy learns to rank"})
    dataset: str = field(default="examples/testbed/train.jsonl", metadata={"help": "prompts (jsonl with a `prompt` column, or a dataset name)"})
    gold: dict = field(default_factory=lambda: {"type": "function", "function": "examples/testbed/gold.py:gold"}, metadata={"help": "the gold annotator that labels the pairs (any annotator config)"})
    num_prompts: int = field(default=64, metadata={"help": "prompts sampled (the first ones of the dataset)"})
    samples_per_prompt: int = field(default=4, metadata={"help": "answers per prompt: K(K−1)/2 within-prompt pairs each"})
    max_completion_length: int = field(default=32, metadata={"help": "new tokens per answer"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the answers"})
    num_pairs: int = field(default=0, metadata={"help": "labelled training+held-out pairs used (0 = all)"})
    heldout_fraction: float = field(default=0.25, metadata={"help": "share of prompts whose pairs measure the agreement"})
    label_noise: float = field(default=0.0, metadata={"help": "share of training labels flipped (Coste et al.: 0.25)"})
    features: str = field(default="prompt_reply", metadata={"help": "reply | prompt_reply (annotators/learned.py)"})
    encoder: str = field(default="minilm", metadata={"help": "sentence-embedding model: minilm (PyPI-shipped) or a folder"})
    hidden_size: int = field(default=0, metadata={"help": "0: a linear head; >0: an MLP with this hidden width"})
    epochs: int = field(default=300, metadata={"help": "full-batch Adam steps"})
    learning_rate: float = field(default=0.05, metadata={"help": "Adam's step size"})
    weight_decay: float = field(default=1e-3, metadata={"help": "L2 penalty on the head's weights"})
    seed: int = field(default=0, metadata={"help": "sampling, pair choice, split, label noise and head initialisation"})
    samples: str | None = field(default=None, metadata={"help": "a samples.jsonl an earlier fit-proxy wrote: its answers and gold scores are reused (no sampling, no gold requests), to try other knobs"})

    def __post_init__(self):
        from daralign.annotators.learned import FEATURES

        if self.features not in FEATURES:
            raise ConfigError(f"fit-proxy: features {self.features!r} is not one of {', '.join(FEATURES)}")
        if not 0 <= self.label_noise <= 0.5:
            raise ConfigError(f"fit-proxy: label_noise must be in [0, 0.5] (got {self.label_noise})")
        if not 0 < self.heldout_fraction < 1:
            raise ConfigError(f"fit-proxy: heldout_fraction must be in (0, 1) (got {self.heldout_fraction})")
        if self.samples_per_prompt < 2:
            raise ConfigError("fit-proxy: samples_per_prompt must be at least 2 (pairs are within a prompt)")


def labelled_pairs(golds: list[list[float]], rng: random.Random, limit: int = 0) -> list[tuple[int, int, int, int]]:
    """(prompt, i, j, y) for every within-prompt pair with a strict gold order, y = 1 when answer i
    is better; shuffled by ``rng`` and cut to ``limit`` (0: all)."""
    pairs = [(p, i, j, int(g[i] > g[j])) for p, g in enumerate(golds)
             for i, j in itertools.combinations(range(len(g)), 2) if g[i] is not None and g[j] is not None and g[i] != g[j]]
    rng.shuffle(pairs)
    return pairs[:limit] if limit else pairs


def fit_head(f: torch.Tensor, a: torch.Tensor, b: torch.Tensor, y: torch.Tensor, cfg: FitProxyConfig):
    """A Bradley–Terry head on features ``f``: pair k says answer a[k] beats b[k] when y[k] = 1."""
    from daralign.annotators.learned import ProxyHead

    torch.manual_seed(cfg.seed)
    head = ProxyHead(f.shape[1], cfg.hidden_size)
    opt = torch.optim.Adam(head.parameters(), lr=cfg.learning_rate)
    sign = 2 * y.float() - 1
    for _ in range(cfg.epochs):
        r = head(f)
        loss = torch.nn.functional.softplus(-sign * (r[a] - r[b])).mean()  # −log σ(y·(r_a − r_b))
        loss = loss + cfg.weight_decay * sum((w ** 2).sum() for n, w in head.named_parameters() if n.endswith("weight"))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head.eval()


def agreement(r: torch.Tensor, a: torch.Tensor, b: torch.Tensor, y: torch.Tensor) -> float | None:
    """Share of pairs the head orders as the labels do (a tie in r counts a half)."""
    if len(y) == 0:
        return None
    d = r[a] - r[b]
    right = torch.where(d == 0, torch.full_like(d, 0.5), ((d > 0) == y.bool()).float())
    return float(right.mean())


def read_samples(path: str, K: int) -> tuple[list, list[str], list[float | None]]:
    """(prompts, answers, gold scores) of a samples.jsonl, checked to hold K answers a prompt."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    for i, r in enumerate(rows):
        for key in ("prompt", "completion", "gold"):
            if key not in r:
                raise ConfigError(f"{path}: row {i} has no {key!r} (a samples.jsonl written by fit-proxy)")
        if r["prompt"] != rows[i - i % K]["prompt"]:
            raise ConfigError(f"{path}: row {i}: samples_per_prompt {K} does not match the file's groups of answers")
    if len(rows) % K:
        raise ConfigError(f"{path}: {len(rows)} rows are not groups of samples_per_prompt {K}")
    return [r["prompt"] for r in rows], [r["completion"] for r in rows], [r["gold"] for r in rows]


def fit_proxy(cfg: FitProxyConfig, out: Path) -> dict:
    from daralign.annotators.build import build_annotator
    from daralign.annotators.learned import features, save_proxy
    from daralign.core.data import load_prompts
    from daralign.core.models import load_causal_lm, load_tokenizer
    from daralign.core.tracking import console
    from daralign.rollout.generate import generate_responses

    K, gold_requests = cfg.samples_per_prompt, 0
    if cfg.samples:
        flat_prompts, flat_answers, scores = read_samples(cfg.samples, K)
        console.print(f"fit-proxy: {len(flat_answers)} answers and their gold scores from {cfg.samples}")
    else:
        prompts = [r["prompt"] for r in load_prompts(cfg.dataset, name="dataset")[: cfg.num_prompts]]
        console.print(f"fit-proxy: sampling {K} answers for each of {len(prompts)} prompts from {cfg.model_name_or_path}")
        model, tokenizer = load_causal_lm(cfg.model_name_or_path), load_tokenizer(cfg.model_name_or_path)
        answers = [generate_responses(model, tokenizer, prompts, cfg.max_completion_length, cfg.temperature, seed=cfg.seed + k)
                   for k in range(K)]
        del model
        flat_prompts = [p for p in prompts for _ in range(K)]
        flat_answers = [answers[k][i] for i in range(len(prompts)) for k in range(K)]
        gold = build_annotator(cfg.gold)
        scores = gold.score(flat_prompts, flat_answers).scores
        gold_requests = gold.num_requests
    prompts = flat_prompts[::K]
    golds = [scores[i * K:(i + 1) * K] for i in range(len(prompts))]

    rng = random.Random(cfg.seed)
    pairs = labelled_pairs(golds, rng, cfg.num_pairs)
    held_prompts = set(rng.sample(range(len(prompts)), max(1, round(cfg.heldout_fraction * len(prompts)))))
    train = [p for p in pairs if p[0] not in held_prompts]
    held = [p for p in pairs if p[0] in held_prompts]
    if not train or not held:
        raise ConfigError(f"fit-proxy: {len(train)} training and {len(held)} held-out pairs; give more prompts or samples_per_prompt")
    noisy = [(p, i, j, 1 - y if rng.random() < cfg.label_noise else y) for p, i, j, y in train]

    console.print(f"fit-proxy: {len(train)} training pairs ({cfg.label_noise:.0%} labels flipped), {len(held)} held out; "
                  f"features {cfg.features} from {cfg.encoder}")
    f = features(flat_prompts, flat_answers, cfg.features, cfg.encoder)

    def index(ps):
        return (torch.tensor([p * K + i for p, i, _, _ in ps]), torch.tensor([p * K + j for p, _, j, _ in ps]),
                torch.tensor([y for *_, y in ps]))

    head = fit_head(f, *index(noisy), cfg)
    with torch.no_grad():
        r = head(f)
    result = {"pairwise_agreement": agreement(r, *index(held)), "num_pairs": len(train), "num_heldout_pairs": len(held),
              "train_agreement_with_noisy_labels": agreement(r, *index(noisy)),
              "train_agreement_with_gold": agreement(r, *index(train)),
              "label_noise": cfg.label_noise, "features": cfg.features, "hidden_size": cfg.hidden_size,
              "gold_requests": gold_requests, "config": dataclasses.asdict(cfg)}
    save_proxy(out, head, {"features": cfg.features, "encoder": cfg.encoder, "in_features": f.shape[1],
                           "hidden_size": cfg.hidden_size, "fitted_by": "daralign fit-proxy", "agreement": result["pairwise_agreement"]})
    (out / "agreement.json").write_text(json.dumps(result, indent=1) + "\n")
    with open(out / "samples.jsonl", "w") as fh:
        for i, (p, a) in enumerate(zip(flat_prompts, flat_answers)):
            fh.write(json.dumps({"prompt": p, "completion": a, "gold": scores[i], "heldout": i // K in held_prompts}) + "\n")
    return result


def main(argv: list[str]) -> int:
    from daralign.core.parsing import ArgumentParser, coerce, dataclass_fields, field_help, read_yaml
    from daralign.core.tracking import console

    p = ArgumentParser(prog="daralign fit-proxy", description=__doc__.split("\n\n")[0], argument_default=None)
    p.add_argument("--config", help="a YAML file of the fields below")
    p.add_argument("--output_dir", required=True, help="where the proxy, agreement.json and samples.jsonl go")
    fields = dataclass_fields(FitProxyConfig)  # name -> (class, type, field)
    for name, (_, _, f) in fields.items():
        if name != "gold":  # a mapping: in the YAML only
            p.add_argument(f"--{name}", help=field_help(f))
    a = p.parse_args(argv)
    values = read_yaml(a.config) if a.config else {}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{a.config}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    values = {k: v if k == "gold" else coerce(k, v, fields[k][1], a.config) for k, v in values.items()}
    values |= {k: coerce(k, v, fields[k][1], "command line") for k, v in vars(a).items() if k in fields and v is not None}
    cfg = FitProxyConfig(**values)
    out = Path(a.output_dir)
    result = fit_proxy(cfg, out)
    console.print(f"fit-proxy: held-out pairwise agreement with the gold {result['pairwise_agreement']:.3f} "
                  f"on {result['num_heldout_pairs']} pairs ({result['num_pairs']} trained on); proxy in {out}")
    console.print(f"use it as an annotator: {{type: learned, path: {out}}}")
    return 0
