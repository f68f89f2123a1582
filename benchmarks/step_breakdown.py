"""Where an online iteration's time goes (rollout / annotate / reference / update), from a short
real run of a config, and a stacked bar plot comparing such measurements.

    # measure (the first step is a warm-up and left out): appends one labelled row to --results
    OMP_NUM_THREADS=1 python benchmarks/step_breakdown.py --config examples/quickstart_tone.yaml --steps 3 \\
        --label after --results docs/img/performance/steps.json
    # plot every labelled row of --results as one stacked bar
    python benchmarks/step_breakdown.py --plot docs/img/performance/step_breakdown.png --results docs/img/performance/steps.json

To measure an older checkout the same way, run this script with that checkout's ``src`` first on
``PYTHONPATH`` (it only reads ``timing/*`` from the run's metrics.jsonl, which every version writes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PHASES = ("rollout", "annotate", "reference", "update")


def measure(config: str, steps: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "daralign.cli", "train", "--config", config, "--max_steps", str(steps),
               "--output_dir", str(Path(tmp) / "run"), "--report", "false", "--eval_dataset", "", *extra]
        subprocess.run(cmd, check=True)
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()][1:]
    return {p: statistics.mean(r[f"timing/{p}"] for r in rows) for p in PHASES} | \
        {"step_time": statistics.mean(r["step_time"] for r in rows), "steps_measured": len(rows)}


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    bottom = [0.0] * len(labels)
    for phase in PHASES:
        vals = [results[k][phase] for k in labels]
        ax.bar(labels, vals, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set(ylabel="seconds per step", title="where an online iteration's time goes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="examples/quickstart_tone.yaml")
    p.add_argument("--steps", type=int, default=3, help="steps run; the first is a warm-up and not counted")
    p.add_argument("--label", help="name of this measurement (a bar of the plot)")
    p.add_argument("--results", default="docs/img/performance/steps.json")
    p.add_argument("--plot", help="write the stacked bar plot of --results here instead of measuring")
    args, extra = p.parse_known_args(argv)
    results = json.loads(Path(args.results).read_text()) if Path(args.results).exists() else {}
    if args.plot:
        plot(results, args.plot)
        return 0
    results[args.label or "run"] = measure(args.config, args.steps, extra)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(results, indent=1))
    print(json.dumps(results[args.label or "run"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
