"""What the lag did inside the lag study's runs (docs/testbed.md, "The lag study"): per arm, how stale
its batches were and how each method's correction for it behaved — RLOO's truncated importance
weight (how often the cap cut it, how far π_θ had moved from π_sampler) and DAR's regression
weight (its mean and how often ``weight_clip`` cut it; DAR's weight already holds π_t, the sampler).
Descriptive only: the study's answer is ``async_study.py``'s, by its rule.

It reads every run's ``metrics.jsonl`` in the study's compare folders and writes, per arm, the mean
over seeds of each run's mean over its steps (the ``async/is_*`` keys over lagged steps only: a
step with no lag has no ratio)::

    python examples/testbed/lag_metrics.py runs/study-async0 runs/study-async1 runs/study-async2 \\
        --out docs/img/study-async/lag_metrics.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

KEYS = ("async/staleness", "async/is_weight_mean", "async/is_truncated_frac", "async/is_log_ratio_max",
        "dar/weight_mean", "dar/clip_frac", "dar/log_ratio_ref_behaviour", "kl")


def run_means(metrics: Path) -> dict[str, float]:
    """One run's mean of each key over the steps that log it; the importance ratio's over the steps
    that trained on stale samples (on a fresh batch it is 1 and never cut)."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    out = {}
    for k in KEYS:
        values = [r[k] for r in rows if k in r and (not k.startswith("async/is_") or r.get("async/staleness", 0) > 0)]
        if values:
            out[k] = statistics.fmean(values)
    return out


def arm_name(folder: Path, method: str) -> str:
    """The arm's name from study.sh's folder names: study-async0, study-async1, study-async2."""
    lag = folder.name.removeprefix("study-async")
    if not lag.isdigit():
        raise SystemExit(f"{folder}: not a lag study folder (study.sh names them study-async0, -async1, -async2)")
    return method if lag == "0" else f"{method} @ async {lag}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", type=Path, nargs="+", help="the study's compare folders: runs/study-async{0,1,2}")
    p.add_argument("--out", type=Path, required=True, help="the JSON to write")
    a = p.parse_args(argv)
    arms = {}
    for folder in a.folders:
        for method_dir in sorted(d for d in folder.iterdir() if d.is_dir() and d.name != "configs"):
            runs = {int(s.name.removeprefix("seed")): run_means(s / "metrics.jsonl")
                    for s in method_dir.glob("seed*") if (s / "metrics.jsonl").is_file()}
            if not runs:
                continue
            keys = sorted({k for r in runs.values() for k in r})
            arms[arm_name(folder, method_dir.name)] = {
                "seeds": sorted(runs), **{k: statistics.fmean(r[k] for r in runs.values() if k in r) for k in keys}}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"what": __doc__.split("\n\n")[0], "arms": arms}, indent=1) + "\n")
    for name, values in arms.items():
        print(name, {k: round(v, 4) for k, v in values.items() if k != "seeds"}, f"({len(values['seeds'])} seeds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
