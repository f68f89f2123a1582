"""Does this machine reproduce committed runs? Every run of the committed ``summary.json`` files
(``--record``) that was run again (``--reruns``: the same group and seed, same config) set beside its
record: gold before and after, KL and proxy at the budget, length, each run's CPU, the difference,
and over the runs its mean, SD and largest size. In fp32 two AMD EPYCs agreed to 1e-8
(docs/img/study/reproduction.json); an Intel Xeon did not (docs/testbed.md, "The lag study",
amendment), so the lag study runs each seed's arms on one machine.

    python examples/testbed/machine_check.py --record docs/img/study-test/summary-core-*.json \\
        docs/img/study-test/summary-dar-online-dpo-seed6.json docs/img/study-test/summary-rloo-grpo-seed6.json \\
        --record_cpu "AMD EPYC (avx512_bf16)" --reruns runs/study-async0 --out docs/img/study-async/machine-check.json

``--reruns`` takes compare folders, their ``summary.json`` files, or single run folders
(``runs/study-async0/dar/seed1``) once finished; a run given twice is compared with itself
(``repeats``: does this machine repeat a run to the last digit?).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study import summary_path  # noqa: E402

from daralign.compare.report import run_record  # noqa: E402

KEYS = ("gold_before", "gold_after", "kl_final", "proxy_after", "heldout_length_after")


def runs_of(path: Path) -> list[dict]:
    """The run records a path holds: one run folder's, or a summary's (a compare folder's)."""
    path = Path(path)
    if (path / "compare_run.json").is_file():
        return [run_record(path, path.parent, 0)]
    return json.loads(summary_path(path).read_text())["runs"]


def spread(values: list[float]) -> dict:
    return {"n": len(values), "mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else None, "max_abs": max(abs(v) for v in values)}


def check(records: list[dict], reruns: list[dict], record_cpu: str | None = None) -> dict:
    """Each rerun against its record; a run rerun twice (say, on one machine) is compared with its first
    rerun in ``repeats`` instead."""
    recorded = {(r["group"], r["seed"]): r for r in records}
    pairs, repeats, seen = [], [], {}
    for rerun in reruns:
        key = (rerun["group"], rerun["seed"])
        if key in seen:
            repeats.append({"group": key[0], "seed": key[1], "cpus": [seen[key].get("cpu"), rerun.get("cpu")],
                            "minus_first": {k: rerun[k] - seen[key][k] for k in KEYS
                                            if rerun.get(k) is not None and seen[key].get(k) is not None}})
            continue
        seen[key] = rerun
    for key, rerun in sorted(seen.items()):
        record = recorded.get(key)
        if record is None:
            continue
        pairs.append({"group": rerun["group"], "seed": rerun["seed"],
                      "record": {k: record.get(k) for k in KEYS} | {"cpu": record.get("cpu") or record_cpu},
                      "rerun": {k: rerun.get(k) for k in (*KEYS, "cpu")},
                      "minus_record": {k: rerun[k] - record[k] for k in KEYS
                                       if rerun.get(k) is not None and record.get(k) is not None}})
    if not pairs:
        raise SystemExit("no rerun matches a recorded run (same group and seed)")
    over = {k: spread([p["minus_record"][k] for p in pairs if k in p["minus_record"]]) for k in KEYS}
    return {"what": "committed runs run again: each rerun's difference from its record, and over the reruns",
            "runs": pairs, "minus_record_over_runs": over, "repeats": repeats}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--record", type=Path, nargs="+", required=True, help="committed summary.json files holding the runs")
    p.add_argument("--record_cpu", help="the records' CPU, where their summaries do not name it (before 2026-12-07)")
    p.add_argument("--reruns", type=Path, nargs="+", required=True, help="compare folders, summary.json or run folders")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    records = [r for path in a.record for r in runs_of(path)]
    res = check(records, [r for path in a.reruns for r in runs_of(path)], a.record_cpu)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
