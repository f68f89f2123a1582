"""Does this machine reproduce a committed run? The same run (group and seed of a committed
``summary.json``) rerun here, set beside the record: gold before and after, KL and proxy at the
budget, each run's CPU. In fp32 two AMD EPYCs agreed to 1e-8 (docs/img/study/reproduction.json);
an Intel Xeon did not (docs/testbed.md, "The lag study", amendment), so the lag study runs each
seed's arms on one machine.

    python examples/testbed/machine_check.py --record docs/img/study-test/summary-core-seeds1-5.json \\
        --group dar --seed 1 --record_cpu "AMD EPYC (avx512_bf16)" \\
        --reruns runs/study-test-repro/dar/seed1 runs/study-async0/dar/seed1 --out docs/img/study-async/machine-check.json

Each of ``--reruns`` is a compare folder (or its ``summary.json``) holding that group and seed, or the
run's own folder (``runs/study-async0/dar/seed1``) once it has finished.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study import summary_path  # noqa: E402

from daralign.compare.report import run_record  # noqa: E402

KEYS = ("gold_before", "gold_after", "kl_final", "proxy_after", "heldout_length_after")


def find(summary: Path, group: str, seed: int) -> dict:
    runs = [r for r in json.loads(summary.read_text())["runs"] if r["group"] == group and r["seed"] == seed]
    if not runs:
        raise SystemExit(f"{summary}: no run of {group} seed {seed}")
    return runs[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--record", type=Path, required=True, help="the committed summary.json holding the run")
    p.add_argument("--group", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--reruns", type=Path, nargs="+", required=True, help="compare folders (or summary.json) rerunning it")
    p.add_argument("--record_cpu", help="the record's CPU, where its summary does not name it (summaries before 2026-12-07)")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    record = find(a.record, a.group, a.seed)
    out = {"what": f"{a.group} seed {a.seed}, committed in {a.record}, rerun; each rerun's difference from the record",
           "record": {k: record.get(k) for k in KEYS} | {"cpu": record.get("cpu") or a.record_cpu}, "reruns": {}}
    for folder in a.reruns:
        one_run = (folder / "compare_run.json").is_file()
        rerun = run_record(folder, folder.parent, 0) if one_run else find(summary_path(folder), a.group, a.seed)
        out["reruns"][str(folder)] = {k: rerun.get(k) for k in (*KEYS, "cpu")} | {
            "minus_record": {k: rerun[k] - record[k] for k in KEYS if rerun.get(k) is not None and record.get(k) is not None}}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
