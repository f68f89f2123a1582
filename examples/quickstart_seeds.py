"""The quickstart over several training seeds: its numbers at the level of replication.

One quickstart run gives a ± over its 32 held-out prompts; seeds move the result more than that
(issue "Numbers that survive a sceptical reviewer"). This runs ``make quickstart``'s command —
DAR plus its shuffled-reward control — once per seed, the design otherwise unchanged, and writes
the seed-level mean, standard error and 95% t-interval of DAR's gold gain over its own start and
over its control, each seed's numbers and wall time, and the CPU, as JSON:

    python examples/quickstart_seeds.py --seeds 1,2,3,4,5 --json docs/img/quickstart/seeds.json

Run folders go to ``--runs`` (one per seed); a seed whose folder already holds ``results.json`` is
read, not run again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def seed_level(values: list[float]) -> dict:
    """Mean, SE over seeds and the 95% t-interval (n − 1 degrees of freedom): compare's statistics."""
    from daralign.compare.paired import t_interval

    t = t_interval(values)
    return {"n_seeds": t["n"], "mean": t["mean"], "se": t["se"], "ci95": [t["mean"] - t["ci95"], t["mean"] + t["ci95"]],
            "mean_over_se": t["mean"] / t["se"] if t["se"] else None}


def run_seed(seed: int, runs: Path) -> dict:
    out = runs / f"seed{seed}"
    took = None
    if not (out / "results.json").is_file():
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "daralign.cli", "train", "--config", str(HERE / "quickstart.yaml"),
                        "--with_control", "true", "--seed", str(seed), "--output_dir", str(out)], check=True)
        took = time.perf_counter() - start
    res = json.loads((out / "results.json").read_text())
    return {"seed": seed, "wall_s": took, "gold_gain_over_start": res["trained"]["gold_delta"],
            "gold_gain_over_start_se_prompts": res["trained"]["gold_delta_se"],
            "gold_gain_over_control": res["gold_delta_vs_control"],
            "gold_gain_over_control_se_prompts": res["gold_delta_vs_control_se"],
            "control_gold_change": res["control"]["gold_delta"], "proxy_gain_over_start": res["trained"]["proxy_delta"],
            "kl_after": res["trained"]["kl_after"], "control_kl_after": res["control"]["kl_after"],
            "length_after": res["trained"]["length_after"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="1,2,3,4,5", help="comma-separated training seeds")
    ap.add_argument("--runs", type=Path, default=Path("runs/quickstart-seeds"), help="one run folder per seed")
    ap.add_argument("--json", type=Path, default=None, help="where to write the seed-level JSON")
    a = ap.parse_args(argv)
    from daralign.core.provenance import cpu

    seeds = [int(s) for s in a.seeds.split(",") if s]
    rows = [run_seed(s, a.runs) for s in seeds]
    result = {
        "what": "examples/quickstart.yaml (DAR + shuffled-reward control) over training seeds; the ± is over seeds",
        "cpu": cpu(), "seeds": seeds, "per_seed": rows,
        "gold_gain_over_start": seed_level([r["gold_gain_over_start"] for r in rows]),
        "gold_gain_over_control": seed_level([r["gold_gain_over_control"] for r in rows]),
        "control_gold_change": seed_level([r["control_gold_change"] for r in rows]),
        "wall_s_run_and_control": [r["wall_s"] for r in rows],
    }
    for key in ("gold_gain_over_start", "gold_gain_over_control"):
        s = result[key]
        print(f"{key}: {s['mean']:+.3f} ± {s['se']:.3f} over {s['n_seeds']} seeds "
              f"(95% CI {s['ci95'][0]:+.3f} to {s['ci95'][1]:+.3f}; {s['mean_over_se']:.1f} SE)")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
