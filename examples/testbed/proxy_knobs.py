"""How the learned proxy's knobs set its agreement with the gold: refits on one samples.jsonl (the
same SmolLM2 answers and gold scores), 3 seeds each (the seed picks the pairs, the held-out
prompts, the flipped labels and the head's initialisation).

    daralign fit-proxy --config examples/testbed/proxy.yaml --output_dir runs/proxy      # ~6 min
    python examples/testbed/proxy_knobs.py --samples runs/proxy/samples.jsonl --json docs/img/testbed/proxy_knobs.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from daralign.annotators.fit_proxy import FitProxyConfig, fit_proxy

GRID = [  # (features, num_pairs, label_noise, hidden_size)
    ("prompt_reply", 50, 0.0, 0), ("prompt_reply", 200, 0.0, 0), ("prompt_reply", 0, 0.0, 0),
    ("prompt_reply", 200, 0.25, 0), ("prompt_reply", 0, 0.25, 0),
    ("reply", 0, 0.0, 0), ("prompt_reply", 0, 0.0, 64),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", required=True, help="a samples.jsonl written by daralign fit-proxy")
    p.add_argument("--samples_per_prompt", type=int, default=6)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for features, pairs, noise, hidden in GRID:
            runs = [fit_proxy(FitProxyConfig(samples=a.samples, samples_per_prompt=a.samples_per_prompt, features=features,
                                             num_pairs=pairs, label_noise=noise, hidden_size=hidden, seed=s), Path(tmp) / "p")
                    for s in a.seeds]
            agree = [r["pairwise_agreement"] for r in runs]
            rows.append({"features": features, "num_pairs": pairs or "all", "label_noise": noise, "hidden_size": hidden,
                         "training_pairs": [r["num_pairs"] for r in runs], "heldout_pairs": [r["num_heldout_pairs"] for r in runs],
                         "agreement": agree, "agreement_mean": statistics.mean(agree),
                         "agreement_sd": statistics.stdev(agree) if len(agree) > 1 else None})
    print("| features | pairs (train + held-out) | label noise | head | held-out agreement, mean ± SD over seeds |")
    print("|---|---|---|---|---|")
    for r in rows:
        head = "linear" if r["hidden_size"] == 0 else f"MLP {r['hidden_size']}"
        sd = f" ± {r['agreement_sd']:.3f}" if r["agreement_sd"] is not None else ""
        print(f"| {r['features']} | {r['num_pairs']} | {r['label_noise']:.0%} | {head} | {r['agreement_mean']:.3f}{sd} |")
    if a.json:
        a.json.write_text(json.dumps({"samples": a.samples, "seeds": a.seeds, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
