"""The figures: what they draw (lines, order, marks) and that the PNGs are real images."""

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.image import imread

from salsa.analysis.plots import frontier_figure, landscape_figure, ppo_curves_figure, save_png


def informative_png(path: Path, min_side: int = 100) -> bool:
    """At least `min_side` pixels on each side and not one flat colour."""
    pixels = imread(str(path))
    return min(pixels.shape[:2]) >= min_side and float(pixels.std()) > 0.01


def test_frontier_one_curve_per_ref_in_kl_order(tmp_path):
    jobs = pd.DataFrame(
        {
            "ref": ["sft", "sft", "soup3", "soup3"],
            "kl_coef": [0.2, 0.01, 0.2, 0.01],
            "kl_to_ref": [1.0, 5.0, 2.0, 4.0],
            "gold_reward": [0.1, 0.3, 0.2, 0.5],
            "rm_reward": [1.0, 2.0, 1.5, 2.5],
        }
    )
    fig = frontier_figure(jobs)
    gold, rm = fig.axes[:2]
    assert [line.get_label() for line in gold.lines] == ["ref=sft", "ref=soup3"]
    assert list(gold.lines[1].get_xdata()) == [2.0, 4.0] and list(gold.lines[1].get_ydata()) == [0.2, 0.5]
    assert list(rm.lines[0].get_ydata()) == [1.0, 2.0]
    assert informative_png(save_png(fig, tmp_path / "frontier.png"))


def test_frontier_without_gold_has_one_panel():
    jobs = pd.DataFrame({"ref": ["sft"], "kl_coef": [0.1], "kl_to_ref": [1.0], "gold_reward": [None], "rm_reward": [1]})
    assert len([ax for ax in frontier_figure(jobs).axes if ax.lines]) == 1


def test_ppo_curves_skip_missing_metrics(tmp_path):
    histories = {
        "ref=soup3": {"ppo/rm_reward": [(0, 1.0), (1, 2.0)], "ppo/kl": [(0, 0.0), (1, 0.5)], "ppo/gold_reward": []},
        "ref=sft": {"ppo/rm_reward": [(0, 1.5), (1, 2.5)], "ppo/kl": [(0, 0.0), (1, 0.8)], "ppo/gold_reward": []},
    }
    fig = ppo_curves_figure(histories)
    assert [ax.get_title() for ax in fig.axes] == ["RM reward", "KL(π ‖ π_ref) per response"]
    assert list(fig.axes[1].lines[1].get_ydata()) == [0.0, 0.8]
    assert informative_png(save_png(fig, tmp_path / "curves.png"))


def test_landscape_marks_and_orientation(tmp_path):
    a, b = [0.0, 1.0, 2.0], [0.0, 1.0]
    grid = np.array([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])  # grid[j, i] = value at (a[i], b[j])
    fig = landscape_figure(a, b, {"rm_reward": grid}, {"sft 0": (0.0, 0.0), "soup": (1 / 3, 1 / 3)})
    ax = fig.axes[0]
    image = ax.images[0]
    assert np.array_equal(image.get_array(), grid) and image.origin == "lower"
    assert image.get_extent() == [-0.5, 2.5, -0.5, 1.5]  # cells centred on the grid values
    assert [tuple(line.get_xydata()[0]) for line in ax.lines] == [(0.0, 0.0), (1 / 3, 1 / 3)]
    assert informative_png(save_png(fig, tmp_path / "landscape.png"))
