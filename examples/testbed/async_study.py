"""The lag study's page (docs/testbed.md, "The lag study"; issue 33, item 5): is DAR more robust to
training on samples from an older policy than RLOO? DAR regularises toward the policy that sampled
(π_t), which is an off-policy correction by construction; RLOO needs a truncated importance ratio.

It reads the synchronous arms (dar and rloo at ``async_steps`` 0, ``--sync``) and the same methods at
``async_steps`` 1 and 2 (``--lag1``, ``--lag2``), all on ``study.yaml``'s protocol with the same seeds,
each seed's runs on one machine (it refuses a seed whose runs name different CPUs, or none: in fp32
the same run differs between an Intel Xeon and an AMD EPYC), and writes into ``--out``:

- ``async_study.json``: per method and lag, the paired gold difference lag − sync (at the budget and
  over the curve) with its 95% CI, MDE, every seed's difference and the leave-one-out; per lag the
  difference-in-differences (DAR's change from lag − RLOO's) the same way; the verdict by ``RULE``;
- ``async_study.md``: those tables; ``async_study.png``: gold against requests and against seconds of
  training per arm, and every seed's difference-in-differences.

    python examples/testbed/async_study.py --sync runs/study-async0 --lag1 runs/study-async1 \\
        --lag2 runs/study-async2 --out runs/async-study-page

Each argument takes compare folders or ``summary.json`` files, merged as ``study.py`` merges them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from study import cell, fmt, jsonable, load, pair, paired_summary, strip_plot  # noqa: E402

from daralign.compare.paired import seed_differences, t_interval  # noqa: E402
from daralign.compare.report import seeds_per_cpu  # noqa: E402

METHODS, LAGS = ("dar", "rloo"), (1, 2)
RULE = ("Written 2026-12-07, before any lagged run. At each lag k (async_steps 1 and 2), DAR is more robust to lag "
        "than RLOO when the difference-in-differences of the gold at the budget, (DAR at k − DAR synchronous) − "
        "(RLOO at k − RLOO synchronous), paired over seeds, has a 95% CI above 0 with all seeds and with each seed "
        "left out in turn; less robust when it lies below 0 the same way; undecided otherwise. The answer: 'more "
        "robust' when it is so at some lag and less robust at none; 'less robust' the other way round; 'mixed' when "
        "both; 'undecided' when neither.")


def arm(method: str, lag: int) -> str:
    return method if lag == 0 else f"{method} @ async {lag}"


def lag_verdict(did: dict) -> str:
    """One lag's verdict from its difference-in-differences at the budget (the rule above)."""
    return {"+": "more robust", "−": "less robust"}.get(did["gold_after"]["leave_one_out"]["decided"], "undecided")


def answer(verdicts: dict) -> str:
    found = set(verdicts.values())
    more, less = "more robust" in found, "less robust" in found
    return "mixed" if more and less else "more robust" if more else "less robust" if less else "undecided"


def diff_in_diff(runs: list[dict], lag: int) -> dict:
    """Per seed, (DAR at lag − DAR sync) − (RLOO at lag − RLOO sync), at the budget and over the curve."""
    out = {}
    for key in ("gold_after", "gold_curve_mean"):
        dar = seed_differences(runs, arm("dar", lag), "dar", key)
        rloo = seed_differences(runs, arm("rloo", lag), "rloo", key)
        out[key] = paired_summary({s: dar[s] - rloo[s] for s in sorted(dar.keys() & rloo.keys())})
    return out


def one_machine_per_seed(runs: list[dict]) -> dict[int, str]:
    """Each seed's CPU, the one all its runs name; a seed whose runs name two, or none, ends the
    analysis in one line (its pairs would hold a machine's difference as well as the lag's)."""
    cpus: dict[int, set] = {}
    for r in runs:
        cpus.setdefault(r["seed"], set()).add(r.get("cpu"))
    for seed, found in sorted(cpus.items()):
        if None in found or len(found) > 1:
            named = ", ".join(sorted(c or "not recorded" for c in found))
            raise SystemExit(f"seed {seed}: its runs ran on more than one CPU or do not say which ({named}); "
                             "a seed's synchronous and lagged runs must run on one machine (study.sh async)")
    return {seed: found.pop() for seed, found in sorted(cpus.items())}


def analyse(sync: dict, lagged: dict[int, dict]) -> dict:
    runs = [r for r in sync["runs"] if r["group"] in METHODS] + [r for s in lagged.values() for r in s["runs"]]
    machines = one_machine_per_seed(runs)
    groups = {g: v for s in (sync, *lagged.values()) for g, v in s["gold"]["groups"].items()
              if g in {arm(m, k) for m in METHODS for k in (0, *LAGS)}}
    staleness = {arm(m, k): pair(runs, arm(m, k), m) for m in METHODS for k in lagged}
    did = {k: diff_in_diff(runs, k) for k in lagged}
    verdicts = {k: lag_verdict(d) for k, d in did.items()}
    return {"budget": sync["annotation_budget"], "seeds": sorted({r["seed"] for r in runs}), "cpu_per_seed": machines,
            "eval_dataset": sync.get("eval_dataset"), "training_annotator": sync["training_annotator"],
            "evaluator": sync["evaluator"],
            "arms": {g: {"seeds": len([r for r in runs if r["group"] == g]), "gold_change": v["gold_change"],
                         "gold_change_se": v["gold_change_se"], "gold_at_budget": v["gold_at_budget"],
                         "kl_at_budget": v["kl_at_budget"],
                         "train_s": t_interval([r["curve"][-1].get("train_s") for r in runs
                                                if r["group"] == g and r.get("curve")])["mean"]}
                     for g, v in groups.items()},
            "lag_minus_sync": staleness, "diff_in_diff": {str(k): v for k, v in did.items()},
            "verdict_per_lag": {str(k): v for k, v in verdicts.items()}, "answer": answer(verdicts), "rule": RULE}


def markdown(res: dict) -> str:
    out = [f"Budget {res['budget']} training requests per run, seeds run {res['seeds']} (each difference pairs the "
           f"seeds both arms ran: its n); trained on {res['training_annotator']}, graded by {res['evaluator']} on "
           f"{res['eval_dataset']}. Every ± and CI is over seeds. Seconds of training are the sum of step_time on the "
           "machine the arm ran on, beside other runs: a record, not a speed measurement.", "",
           "Each seed's runs ran on one machine: "
           + seeds_per_cpu([{"seed": s, "cpu": c} for s, c in res["cpu_per_seed"].items()]) + ".", "",
           "| arm | seeds | gold Δ ± SE | gold at budget | KL at budget | seconds of training |",
           "|---|---|---|---|---|---|"]
    for name, a in res["arms"].items():
        out.append(f"| {name} | {a['seeds']} | {fmt(a['gold_change'])} ± {fmt(a['gold_change_se'], '.3f')} | "
                   f"{fmt(a['gold_at_budget'], '.3f')} | {fmt(a['kl_at_budget'], '.2f')} | {fmt(a['train_s'], '.1f')} |")
    out += ["", "Paired within-seed differences of the gold (mean ± SE [95% CI], n seeds; MDE at 80% power; decided: "
            "the sign when the CI excludes 0 with every seed in and with any one left out):", "",
            "| difference | at the budget | MDE | decided | over the curve | MDE | decided |", "|---|---|---|---|---|---|---|"]
    rows = {f"{k} − {k.split(' @')[0]}": v for k, v in res["lag_minus_sync"].items() if v}
    rows |= {f"(dar @ async {k} − dar) − (rloo @ async {k} − rloo)": v for k, v in res["diff_in_diff"].items()}
    for name, v in rows.items():
        at, curve = v["gold_after"], v["gold_curve_mean"]
        out.append(f"| {name} | {cell(at)} | {fmt(at['mde80'], '.3f')} | {at['leave_one_out']['decided'] or 'no'} | "
                   f"{cell(curve)} | {fmt(curve['mde80'], '.3f')} | {curve['leave_one_out']['decided'] or 'no'} |")
    per_lag = ", ".join(f"async {k}: {v}" for k, v in res["verdict_per_lag"].items())
    out += ["", f"**Is DAR more robust to lag than RLOO? {res['answer']}** ({per_lag}). Rule: {res['rule']}"]
    return "\n".join(out) + "\n"


def plot(res: dict, groups: dict, path: Path) -> None:
    fig, (by_requests, by_time, strip) = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, g in groups.items():
        style = {"ls": "-" if "@" not in name else "--" if name.endswith("1") else ":", "marker": "o"}
        by_requests.plot([p["requests"] for p in g["curve"]], [p["gold"] for p in g["curve"]], label=name, **style)
        by_time.plot([p["train_s"] for p in g["curve"]], [p["gold"] for p in g["curve"]], label=name, **style)
    by_requests.set(xlabel="training annotator requests", ylabel="test-set gold (mean over seeds)", title="gold per request")
    by_time.set(xlabel="seconds of training (mean over seeds; shared machine, not a speed measurement)",
                title="gold per second of training")
    by_requests.legend(fontsize=7)
    strip_plot(strip, {f"async {k}": v["gold_after"] for k, v in res["diff_in_diff"].items() if v["gold_after"]["mean"] is not None})
    strip.set(xlabel="(DAR's gold change from lag) − (RLOO's), at the budget\n(grey: each seed; blue: mean, 95% CI)",
              title="is DAR more robust to lag?")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sync", type=Path, nargs="+", required=True,
                   help="dar and rloo at async_steps 0, each seed run on the machine of its lagged runs")
    p.add_argument("--lag1", type=Path, nargs="+", help="dar and rloo with --async_steps 1, same seeds and config")
    p.add_argument("--lag2", type=Path, nargs="+", help="dar and rloo with --async_steps 2, same seeds and config")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    sync = load(a.sync)
    lagged = {k: load(paths, f" @ async {k}") for k, paths in ((1, a.lag1), (2, a.lag2)) if paths}
    if not lagged:
        raise SystemExit("give --lag1 or --lag2 (or both): the lagged arms to compare with --sync")
    res = analyse(sync, lagged)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "async_study.json").write_text(json.dumps(jsonable(res), indent=1, allow_nan=False))
    (a.out / "async_study.md").write_text(markdown(res))
    groups = {n: g for s in (sync, *lagged.values()) for n, g in s["gold"]["groups"].items() if n in res["arms"]}
    plot(res, groups, a.out / "async_study.png")
    print((a.out / "async_study.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
