"""The testbed's ablations and ensembles on one page: reads the ``summary.json`` of finished
``daralign compare`` folders (README.md has the commands) and writes, into ``--out``:

- ``ablations.png``: per DAR knob, held-out gold against √KL(π‖π_ref) for each value, the default
  value taken from the core study's ``dar`` runs, with best-of-n on the starting policy (the paper's
  figures 4–5 as a gold frontier);
- ``ensembles.png``: gold and proxy against training steps for DAR and RLOO trained on the single
  proxy and on the ensemble, so a delayed or absent gold turn-down is visible;
- ``ablations.md`` / ``ablations.json``: per curve, gold and proxy change ± SE over seeds, KL at the
  budget, the gold peak and whether it turned down (``daralign.compare.curves.peak``).

    python examples/testbed/ablations.py --core runs/testbed --ensemble runs/testbed-uwo \\
        --sweeps runs/testbed-ratio0 runs/testbed-ratio runs/testbed-total runs/testbed-clip runs/testbed-k --out docs/img/testbed
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

KNOBS = ("dar_ratio", "dar_total", "weight_clip", "num_generations")


def load(folder: Path) -> dict:
    path = Path(folder) / "summary.json"
    if not path.is_file():
        raise SystemExit(f"{path}: not found (run the folder's `daralign compare` command first)")
    return json.loads(path.read_text())


def steps_per_request(summary: dict, group: str) -> float:
    per_step = {r["requests_per_step"] for r in summary["runs"] if r["group"] == group}
    return 1.0 / per_step.pop()


def row(label: str, g: dict) -> dict:
    keys = ("gold_change", "gold_change_se", "gold_change_z", "proxy_change", "proxy_change_se", "kl_at_budget",
            "peak_requests", "peak_gold", "turn_down")
    return {"curve": label, **{k: g.get(k) for k in keys}}


def ablations(default: dict, sweeps: list[dict], default_config: dict) -> dict[str, dict[str, dict]]:
    """{knob: {value: gold group}}, ``default`` (a gold group) at the default value of every knob."""
    out: dict[str, dict[str, dict]] = {}
    for s in sweeps:
        for name, g in s["gold"]["groups"].items():
            m = re.fullmatch(r"dar\[(\w+)=([^\]]+)\]", name)
            if m and m[1] in KNOBS:
                out.setdefault(m[1], {})[m[2]] = g
    for knob, values in out.items():
        values.setdefault(f"{default_config[knob]:g} (default)", default)
    return out


def fmt(x, digits=3):
    return "—" if x is None else f"{x:+.{digits}f}" if isinstance(x, float) else str(x)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--core", type=Path, required=True, help="the core study's folder (its dar runs are the default point)")
    ap.add_argument("--sweeps", type=Path, nargs="*", default=[], help="folders of `--sweep` runs of dar")
    ap.add_argument("--default", type=Path, help="a folder whose one dar group ran the default config under the sweeps' "
                                                 "conditions (e.g. `--sweep dar_ratio=0.1`); else the core study's dar")
    ap.add_argument("--ensemble", type=Path, help="the folder of dar/rloo trained on the ensemble annotator")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    core = load(args.core)
    first_dar = next(r for r in core["runs"] if r["group"] == "dar")
    default_config = yaml.safe_load((args.core / first_dar["dir"] / "config.yaml").read_text())  # every field, resolved
    table: dict[str, list[dict]] = {}

    default = core["gold"]["groups"]["dar"]
    if args.default:
        (default,) = load(args.default)["gold"]["groups"].values()
    knobs = ablations(default, [load(f) for f in args.sweeps], default_config)
    if knobs:
        bon = core["gold"].get("bon_reference")
        fig, axes = plt.subplots(1, len(knobs), figsize=(4.2 * len(knobs), 3.6), squeeze=False)
        for ax, (knob, values) in zip(axes[0], sorted(knobs.items())):
            others = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"])
            for value, g in sorted(values.items(), key=lambda kv: float(kv[0].split()[0])):
                c = [p for p in g["curve"] if p["gold"] is not None and p["kl"] is not None]
                style = dict(color="k", lw=2) if "default" in value else dict(color=next(others))  # the default: black in every panel
                ax.plot([math.sqrt(max(p["kl"], 0.0)) for p in c], [p["gold"] for p in c], marker="o", ms=3, label=value, **style)
                table.setdefault(knob, []).append(row(value, g))
            if bon:
                ax.plot([math.sqrt(p["kl"]) for p in bon["curve"]], [p["gold"] for p in bon["curve"]], "--", color="grey", lw=1,
                        label="best-of-n")
            ax.set(title=knob, xlabel="√KL(π‖π_ref)", ylabel="held-out gold")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.out / "ablations.png", dpi=110)
        plt.close(fig)

    if args.ensemble:
        ens = load(args.ensemble)
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for algo, color in (("dar", "tab:blue"), ("rloo", "tab:green")):
            for summary, style, tag in ((core, "--", "single proxy"), (ens, "-", "ensemble")):
                name = algo
                if algo == "dar" and summary is core and args.default:  # the rerun: the ensemble's conditions
                    summary = load(args.default)
                    (name,) = summary["gold"]["groups"]
                g = summary["gold"]["groups"].get(name)
                if g is None:
                    continue
                per = steps_per_request(summary, name)
                c = [p for p in g["curve"] if p["gold"] is not None]
                steps = [p["requests"] * per for p in c]
                axes[0].plot(steps, [p["gold"] for p in c], style, color=color, marker="o", ms=3, label=f"{algo}, {tag}")
                axes[1].plot(steps, [p["proxy"] for p in c], style, color=color, marker="o", ms=3, label=f"{algo}, {tag}")
                table.setdefault("ensemble", []).append(row(f"{algo}, {tag}", g))
        axes[0].set(xlabel="training step", ylabel="held-out gold", title="gold")
        axes[1].set(xlabel="training step", ylabel="held-out proxy", title="proxy: each run's own annotator (ensemble: uwo)")
        for ax in axes:
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.out / "ensembles.png", dpi=110)
        plt.close(fig)

    lines = []
    for section, rows in table.items():
        base = next((r for r in rows if "default" in r["curve"]), None)
        for r in rows:  # the gold change against the default's, independent seeds: SE = √(SE₁² + SE₂²)
            ok = base is not None and r is not base and None not in (r["gold_change"], r["gold_change_se"], base["gold_change_se"])
            r["gold_vs_default"] = r["gold_change"] - base["gold_change"] if ok else None
            r["gold_vs_default_se"] = math.hypot(r["gold_change_se"], base["gold_change_se"]) if ok else None
        lines += [f"### {section}", "", "| curve | gold change ± SE (z) | vs default ± SE | proxy change ± SE | KL at budget | "
                  "gold peak (requests) | turn-down |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            z = f" ({r['gold_change_z']:.1f})" if r["gold_change_z"] is not None else ""
            gold = f"{fmt(r['gold_change'])} ± {r['gold_change_se']:.3f}{z}" if r["gold_change_se"] else fmt(r["gold_change"])
            proxy = f"{fmt(r['proxy_change'])} ± {r['proxy_change_se']:.3f}" if r["proxy_change_se"] else fmt(r["proxy_change"])
            kl = f"{r['kl_at_budget']:.1f}" if r["kl_at_budget"] is not None else "—"
            peak = f"{r['peak_gold']:.3f} ({r['peak_requests']:.0f})" if r["peak_gold"] is not None else "—"
            vs = f"{fmt(r['gold_vs_default'])} ± {r['gold_vs_default_se']:.3f}" if r["gold_vs_default_se"] else "—"
            lines.append(f"| {r['curve']} | {gold} | {vs} | {proxy} | {kl} | {peak} | {'yes' if r['turn_down'] else 'no'} |")
        lines.append("")
    (args.out / "ablations.md").write_text("\n".join(lines))
    (args.out / "ablations.json").write_text(json.dumps(table, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
