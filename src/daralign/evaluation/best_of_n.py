"""Best-of-n on the starting policy, chosen by the proxy and measured by the gold: the analytic
reference of the over-optimisation papers (Gao et al. 2023), drawn beside trained policies.

For each held-out prompt, m answers are sampled once; for every n ≤ m the expected gold of the
answer the proxy ranks best among n drawn without replacement is computed exactly from the m
(the unbiased order-statistics estimator: with the m sorted by proxy, the i-th lowest, 1-based,
is the best of a random n-subset with probability C(i−1, n−1) / C(m, n)). Its KL to the
starting policy is analytic, KL(π_BoN‖π) = log n − (n−1)/n nats per sequence (Stiennon et al.
2020; an upper bound that is tight for continuous rewards).
"""

from __future__ import annotations

import math
import statistics


def best_of_n_expectation(proxy: list[float], gold: list[float], n: int) -> tuple[float, float]:
    """(E[gold], E[proxy]) of the proxy's best of n out of these m answers (ties by order)."""
    m = len(proxy)
    order = sorted(range(m), key=lambda i: proxy[i])
    total = math.comb(m, n)
    weights = [math.comb(rank, n - 1) / total for rank in range(m)]  # rank: how many answers rank below
    return (sum(w * gold[i] for w, i in zip(weights, order)), sum(w * proxy[i] for w, i in zip(weights, order)))


def best_of_n_curve(proxy: list[list[float | None]], gold: list[list[float | None]], ns: list[int]) -> list[dict]:
    """Mean over prompts of best-of-n gold and proxy for each n (prompts with an invalid label dropped)."""
    keep = [(p, g) for p, g in zip(proxy, gold) if None not in p and None not in g]
    out = []
    for n in ns:
        vals = [best_of_n_expectation(p, g, n) for p, g in keep]
        out.append({"n": n, "kl": math.log(n) - (n - 1) / n, "gold": sum(v[0] for v in vals) / len(vals),
                    "proxy": sum(v[1] for v in vals) / len(vals), "prompts": len(vals)})
    return out


def _ranks(xs: list[float]) -> list[float]:
    """Ranks with ties averaged (Spearman's correlation is Pearson's on these)."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def agreement(proxy: list[list[float | None]], gold: list[list[float | None]]) -> dict:
    """How well the proxy tracks the gold on the same answers: Pearson and Spearman correlation
    over all answers, and pairwise agreement — of two answers to one prompt whose scores differ
    under both, the share the proxy orders as the gold does."""
    flat = [(p, g) for ps, gs in zip(proxy, gold) for p, g in zip(ps, gs) if p is not None and g is not None]
    xs, ys = [p for p, _ in flat], [g for _, g in flat]
    agree = total = 0
    for ps, gs in zip(proxy, gold):
        for i, j in ((i, j) for i in range(len(ps)) for j in range(i + 1, len(ps))):
            if None in (ps[i], ps[j], gs[i], gs[j]) or ps[i] == ps[j] or gs[i] == gs[j]:
                continue
            total += 1
            agree += (ps[i] > ps[j]) == (gs[i] > gs[j])
    return {"pearson": statistics.correlation(xs, ys), "spearman": statistics.correlation(_ranks(xs), _ranks(ys)),
            "pairwise_agreement": agree / total if total else None, "pairs": total, "answers": len(flat)}


def measure_best_of_n(train, n_max: int) -> dict:
    """Sample ``n_max`` held-out answers per prompt from the starting policy of ``train`` (a
    TrainConfig with ``eval_annotator`` = gold and ``annotator`` = proxy) at ``eval_temperature``,
    score them with both, and return the curve for n = 1, 2, 4, … ≤ n_max and the proxy–gold
    agreement on those answers."""
    import torch

    from daralign.annotators import build_annotator
    from daralign.core.data import load_prompts
    from daralign.core.models import load_causal_lm, load_tokenizer
    from daralign.core.rng import fork_rng
    from daralign.rollout.hf import sample_rollout

    rows = load_prompts(train.eval_dataset, column=train.prompt_column)[: train.eval_max_prompts]
    tokenizer = load_tokenizer(train.model_name_or_path, train.trust_remote_code)
    model = load_causal_lm(train.model_name_or_path, train.dtype, train.trust_remote_code).eval()
    with fork_rng():
        torch.manual_seed(train.seed + 15485863)
        rollout = sample_rollout(model, tokenizer, rows, num_generations=n_max, max_completion_length=train.max_completion_length,
                                 temperature=train.eval_temperature, generation_batch_size=train.generation_batch_size,
                                 max_prompt_length=train.max_prompt_length, bf16=train.bf16)
    del model
    prompts = [rollout.prompt_of(i) for i in range(len(rollout.completions))]
    per_row = [rows[i // n_max] for i in range(len(prompts))]
    scores, requests = {}, 0
    for name, cfg in (("proxy", train.annotator), ("gold", train.eval_annotator)):
        annotator = build_annotator(cfg)
        try:
            with annotator.meter.evaluation():
                flat = annotator.score(prompts, rollout.completions, per_row).scores
            requests += annotator.meter.requests["eval"]
        finally:
            annotator.close()
        scores[name] = [flat[p * n_max:(p + 1) * n_max] for p in range(len(rows))]
    ns = [n for n in (1, 2, 4, 8, 16, 32, 64, 128) if n <= n_max]
    return {"n_max": n_max, "prompts": len(rows), "temperature": train.eval_temperature, "eval_annotation_requests": requests,
            "curve": best_of_n_curve(scores["proxy"], scores["gold"], ns),
            "agreement": agreement(scores["proxy"], scores["gold"])}
