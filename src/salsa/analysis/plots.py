"""Figures: PPO training curves, the reward–KL frontier of a sweep and the reward landscape (logged to MLflow), and
the figures of the committed reports: win rates with their intervals (a forest plot) and the reward model's learning
curve.

Figures are built with matplotlib's object API (`Figure`, no pyplot), so they need no display, leave no global state
behind in long sweeps, and render the same in a notebook.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

# one series of a metric: (step, value) pairs
Series = Sequence[tuple[int, float]]
# the PPO stage's per-iteration metrics that the training-curve figure shows
PPO_PANELS = (
    ("ppo/rm_reward", "RM reward"),
    ("ppo/gold_reward", "gold reward"),
    ("ppo/kl", "KL(π ‖ π_ref) per response"),
)
REWARD_LABELS = {"rm_reward": "RM reward", "gold_reward": "gold reward"}


def save_png(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def ppo_curves_figure(histories: Mapping[str, Mapping[str, Series]]) -> Figure:
    """RM reward, gold reward and sequence KL to the reference per PPO iteration, one colour per PPO run.

    `histories[label][metric]` holds (iteration, value) pairs for the metrics in `PPO_PANELS`, as the PPO stage
    logs them; a panel is drawn only for metrics that some run has.
    """
    panels = [(k, t) for k, t in PPO_PANELS if any(m.get(k) for m in histories.values())]
    fig = Figure(figsize=(4.6 * max(len(panels), 1), 3.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, max(len(panels), 1)))
    for ax, (key, title) in zip(axes, panels, strict=False):
        for i, (label, metrics) in enumerate(histories.items()):
            if metrics.get(key):
                steps, values = zip(*metrics[key], strict=True)
                ax.plot(steps, values, "o-", color=f"C{i}", markersize=3, label=label)
        ax.set(xlabel="PPO iteration", title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def frontier_figure(jobs: pd.DataFrame) -> Figure:
    """Reward against KL to the reference, one curve per `ref` through its `kl_coef` values (annotated β).

    `jobs` has one row per run with columns ref, kl_coef, kl_to_ref, rm_reward and (on the embedded task)
    gold_reward. A curve is drawn in order of KL, so it traces the reward each reference reaches per KL budget.
    """
    panels = [("rm_reward", "RM reward")]
    if "gold_reward" in jobs and jobs["gold_reward"].notna().any():
        panels.insert(0, ("gold_reward", "gold reward"))
    fig = Figure(figsize=(5.2 * len(panels), 4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (metric, title) in zip(axes, panels, strict=True):
        for i, (ref, group) in enumerate(sorted(jobs.groupby("ref"), key=lambda g: str(g[0]))):
            group = group.dropna(subset=["kl_to_ref", metric]).sort_values("kl_to_ref")
            ax.plot(group["kl_to_ref"], group[metric], "o-", color=f"C{i}", label=f"ref={ref}")
            for _, row in group.iterrows():
                ax.annotate(
                    f"β={row['kl_coef']:g}", (row["kl_to_ref"], row[metric]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points",
                )  # fmt: skip
        ax.set(xlabel="KL to the reference (per response)", ylabel=title, title=f"{title} vs KL")
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def landscape_figure(
    a: Sequence[float],
    b: Sequence[float],
    grids: Mapping[str, np.ndarray],
    marks: Mapping[str, tuple[float, float]],
) -> Figure:
    """Heatmaps of mean reward over the plane θ0 + a(θ1 − θ0) + b(θ2 − θ0), one panel per reward.

    `grids[name][j, i]` is the reward at (a[i], b[j]); `marks` are labelled points (a, b) such as the ingredients
    at (0, 0), (1, 0), (0, 1) and the soup.
    """
    fig = Figure(figsize=(5.4 * len(grids), 4.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(grids)))
    da = (a[1] - a[0]) / 2 if len(a) > 1 else 0.5
    db = (b[1] - b[0]) / 2 if len(b) > 1 else 0.5
    extent = (a[0] - da, a[-1] + da, b[0] - db, b[-1] + db)
    for ax, (name, grid) in zip(axes, grids.items(), strict=True):
        image = ax.imshow(np.asarray(grid), origin="lower", extent=extent, aspect="auto", cmap="viridis")
        title = REWARD_LABELS.get(name, name)
        fig.colorbar(image, ax=ax, label=f"mean {title}")
        for label, (x, y) in marks.items():
            soup = label.startswith("soup")
            ax.plot(x, y, "*" if soup else "o", color="white" if soup else "red", markersize=14 if soup else 8,
                    markeredgecolor="black")  # fmt: skip
            ax.annotate(label, (x, y), xytext=(5, 5), textcoords="offset points", color="white", fontsize=8)
        ax.set(xlabel="a  (toward θ1)", ylabel="b  (toward θ2)", title=f"{title} over the ingredients' plane")
    return fig


def forest_figure(
    table: pd.DataFrame,
    label: str = "arm",
    value: str = "win_vs_ppo",
    reference: float = 0.5,
    xlabel: str = "gold-judged win rate against PPO (%)",
) -> Figure:
    """Win rates with their 95% intervals, one row per arm, and a dashed vertical line at `reference` (a tie).

    `table` has a `label` column and `{value}_mean`, `{value}_low`, `{value}_high` as fractions, the columns of the
    report CSVs. Rows without a mean (an arm that is its own baseline) are left out; a row whose interval is missing
    is drawn as its point alone. Rows run top to bottom in the table's order, each annotated with its numbers.
    """
    columns = [f"{value}_{k}" for k in ("mean", "low", "high")]
    numbers = 100 * table.reindex(columns=columns).apply(pd.to_numeric, errors="coerce")
    keep = numbers[columns[0]].notna()
    rows = table[keep]
    mean, low, high = (numbers.loc[keep, c].to_numpy(float) for c in columns)
    n = len(rows)
    y = np.arange(n)[::-1].astype(float)
    fig = Figure(figsize=(7.2, 1.2 + 0.42 * max(n, 1)), layout="constrained")
    ax = fig.subplots()
    ax.axvline(100 * reference, color="grey", linestyle="--", linewidth=1)
    whole = np.isfinite(low) & np.isfinite(high)
    if whole.any():
        errors = np.clip(np.vstack([mean[whole] - low[whole], high[whole] - mean[whole]]), 0, None)
        ax.errorbar(mean[whole], y[whole], xerr=errors, fmt="o", color="C0", capsize=3)
    if (~whole).any():
        ax.plot(mean[~whole], y[~whole], "o", color="C0", markerfacecolor="white")
    for i in range(n):
        text = f"{mean[i]:.1f}" + (f" [{low[i]:.1f}, {high[i]:.1f}]" if whole[i] else "")
        ax.annotate(text, (1.02, y[i]), xycoords=("axes fraction", "data"), va="center", fontsize=8)
    ax.set_yticks(y, [str(v) for v in rows[label]] if n else [])
    ax.set(xlabel=xlabel, ylim=(-0.7, max(n, 1) - 0.3))
    ax.grid(axis="x", alpha=0.3)
    return fig


RM_CURVE_SETTINGS = ("start", "labels", "score", "heldout", "epochs", "lr", "head_lr", "seed")


def rm_curve_figure(points: pd.DataFrame) -> Figure:
    """The reward model's held-out accuracy (against the raters' labels) and its agreement with the gold reward,
    against the number of training pairs.

    `points` has one row per trained reward model, with the columns of `rm_curve.csv`. Points that differ only in
    their number of pairs make one curve; the curve with the most points is the reference, and every other curve or
    single point is labelled by the settings where it differs from it (e.g. `epochs 2`, `lr 0.003`, `score mean`).
    """
    keys = [k for k in RM_CURVE_SETTINGS if k in points]
    fig = Figure(figsize=(10.4, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    panels = (("accuracy", "held-out accuracy (raters' labels)"), ("gold_agreement", "agreement with the gold reward"))
    if points.empty:
        for ax, (_, title) in zip(axes, panels, strict=True):
            ax.set(xlabel="training pairs", title=title)
        return fig
    groups = [g for _, g in points.groupby(keys, dropna=False, sort=False)] if keys else [points]
    base = max(groups, key=len).iloc[0]

    def shown(value) -> str:
        return "–" if pd.isna(value) else f"{value:g}" if isinstance(value, float) else str(value)

    def name(group: pd.DataFrame) -> str:
        row = group.iloc[0]
        changed = [k for k in keys if shown(row[k]) != shown(base[k])]
        shown_keys = changed or [k for k in ("start", "epochs", "lr", "score") if k in keys]
        return ", ".join(f"{k} {shown(row[k])}" for k in shown_keys)

    for ax, (metric, title) in zip(axes, panels, strict=True):
        for i, group in enumerate(groups):
            group = group.sort_values("pairs")
            style = "o-" if len(group) > 1 else "D"
            ax.plot(group["pairs"], group[metric], style, color=f"C{i}", markersize=5, label=name(group))
        ax.set_xscale("log")
        ax.set(xlabel="training pairs", ylabel=metric.replace("_", " "), title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig
