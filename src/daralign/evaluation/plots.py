"""Bar plots with bootstrap error bars (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

AGREEMENT_BARS = [
    ("reward", "AI reward\n(score both)"),
    ("preference_chosen_first", "AI preference\nchosen 1st"),
    ("preference_chosen_second", "AI preference\nchosen 2nd"),
    ("preference_both_orders", "AI preference\nboth orders"),
]


def bar_plot(labels: list[str], values: list[float], lows: list[float], highs: list[float], path: str | Path,
             title: str, ylabel: str, chance: float | None = 0.5, notes: list[str] | None = None) -> Path:
    """Bars with asymmetric [low, high] error bars, value printed on each bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.9 * len(labels) + 1.5, 4.2))
    err = [[v - lo for v, lo in zip(values, lows)], [hi - v for v, hi in zip(values, highs)]]
    bars = ax.bar(range(len(values)), values, yerr=err, capsize=6, color=["#4C72B0", "#DD8452", "#C44E52", "#8172B2"][: len(values)])
    for bar, v, hi, note in zip(bars, values, highs, notes or [""] * len(values)):
        y = hi + 0.02 if hi < 0.88 else 0.5 * v  # above the error bar, or inside a tall bar
        ax.text(bar.get_x() + bar.get_width() / 2, y, f"{100 * v:.1f}%\n{note}", ha="center", va="bottom", fontsize=9,
                color="black" if hi < 0.88 else "white")
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle="--", linewidth=1)
        ax.text(len(values) - 0.5, chance + 0.01, "chance", color="grey", ha="right", va="bottom", fontsize=8)
    ax.set_xticks(range(len(labels)), labels, fontsize=9)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_agreement(summary: dict, path: str | Path, title: str = "Agreement with human preference labels") -> Path:
    """The agreement study's bar plot: reward vs preference (each order, both orders), 95% CIs."""
    keys = [(k, label) for k, label in AGREEMENT_BARS if k in summary]
    sec = [summary[k] for k, _ in keys]
    return bar_plot(
        [label for _, label in keys],
        [s["agreement"] for s in sec],
        [s["ci_low"] for s in sec],
        [s["ci_high"] for s in sec],
        path,
        title=f"{title} (n={summary['num_pairs']}, 95% bootstrap CI)",
        ylabel="agreement (ties = ½)",
        notes=[f"n={s['n']}" for s in sec],
    )
