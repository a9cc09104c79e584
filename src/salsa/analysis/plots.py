"""Figures logged as MLflow artifacts: PPO training curves, the reward–KL frontier of a sweep, the reward landscape.

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
