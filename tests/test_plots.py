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


def is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_forest_one_row_per_arm_with_a_line_at_fifty_percent(tmp_path):
    from salsa.analysis.plots import forest_figure

    table = pd.DataFrame(
        {
            "arm": ["ema", "ppo", "soup", "no interval"],
            "win_vs_ppo_mean": [0.571, np.nan, 0.494, 0.52],  # plain PPO is its own baseline: no row
            "win_vs_ppo_low": [0.534, np.nan, 0.462, np.nan],
            "win_vs_ppo_high": [0.605, np.nan, 0.522, np.nan],
        }
    )
    fig = forest_figure(table)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["ema", "soup", "no interval"]
    assert list(ax.lines[0].get_xdata()) == [50.0, 50.0]  # the tie line
    (bars,) = ax.containers
    assert np.allclose(bars.lines[0].get_xdata(), [57.1, 49.4])  # the two arms with an interval, in percent
    assert [t.get_text() for t in ax.texts] == ["57.1 [53.4, 60.5]", "49.4 [46.2, 52.2]", "52.0"]
    path = save_png(fig, tmp_path / "forest.png")
    assert is_png(path) and informative_png(path)


def test_forest_draws_nan_intervals_and_empty_tables(tmp_path):
    from salsa.analysis.plots import forest_figure

    nan = pd.DataFrame({"label": ["a"], "win_vs_x_mean": [0.5], "win_vs_x_low": [np.nan], "win_vs_x_high": [np.nan]})
    assert is_png(save_png(forest_figure(nan, label="label", value="win_vs_x"), tmp_path / "nan.png"))
    empty = pd.DataFrame({"arm": ["ppo"], "win_vs_ppo_mean": [np.nan]})
    assert is_png(save_png(forest_figure(empty), tmp_path / "empty.png"))


def test_rm_curve_one_curve_over_pairs_and_labelled_single_points(tmp_path):
    from salsa.analysis.plots import rm_curve_figure

    def point(pairs, epochs=1, lr=1e-3, score="last", accuracy=0.6):
        settings = {"start": "base", "labels": "raters", "score": score, "heldout": "val", "head_lr": np.nan, "seed": 0}
        return {**settings, "epochs": epochs, "lr": lr, "pairs": pairs, "accuracy": accuracy,
                "gold_agreement": accuracy + 0.05}  # fmt: skip

    points = pd.DataFrame(
        [point(3000, accuracy=0.60), point(750, accuracy=0.59), point(12000, accuracy=0.65),
         point(3000, epochs=2, accuracy=0.61), point(3000, score="mean", accuracy=np.nan)]
    )  # fmt: skip
    fig = rm_curve_figure(points)
    accuracy, gold = fig.axes[:2]
    curve = accuracy.lines[0]
    assert list(curve.get_xdata()) == [750, 3000, 12000] and list(curve.get_ydata()) == [0.59, 0.60, 0.65]
    assert [line.get_label() for line in accuracy.lines] == [
        "start base, epochs 1, lr 0.001, score last", "epochs 2", "score mean",
    ]  # fmt: skip
    assert list(gold.lines[1].get_ydata()) == [0.66]
    path = save_png(fig, tmp_path / "rm_curve.png")
    assert is_png(path) and informative_png(path)
    assert is_png(save_png(rm_curve_figure(pd.DataFrame()), tmp_path / "none.png"))


def test_reports_draw_their_figures_again_from_their_csvs(tmp_path):
    """`--replot` needs only the CSV a report wrote: the committed reports' figures are regenerated from them."""
    from salsa.analysis import ablations, replicate, rm_curve

    arms = pd.DataFrame({"arm": ["start sft, anchor soup3"], "win_vs_ppo_mean": [0.5], "win_vs_ppo_low": [0.45],
                         "win_vs_ppo_high": [0.55]})  # fmt: skip
    arms.to_csv(tmp_path / "ablations.csv", index=False)
    ablations.main(["--replot", "--out", str(tmp_path)])
    assert informative_png(tmp_path / "forest.png")

    (tmp_path / "forest.png").unlink()
    grid = pd.DataFrame({"ref": ["sft", "soup3"], "kl_coef": [0.05, 0.05], "kl_to_ref": [2.4, 2.6],
                         "rm_reward": [0.7, 0.7], "gold_mean": [0.50, 0.52], "win_vs_ppo_mean": [np.nan, 0.495],
                         "win_vs_ppo_low": [np.nan, 0.45], "win_vs_ppo_high": [np.nan, 0.54]})  # fmt: skip
    grid.to_csv(tmp_path / "replication.csv", index=False)
    replicate.main(["--replot", "--out", str(tmp_path)])
    assert informative_png(tmp_path / "forest.png") and informative_png(tmp_path / "frontier.png")

    points = [
        rm_curve.Point("base", 10, n, 1, 1e-3, 0, 94, 0.6, acc, acc, 80.0) for n, acc in ((750, 0.59), (3000, 0.6))
    ]
    rm_curve.write_report(points, 0.8, 0.8, tmp_path, ["python -m salsa.analysis.rm_curve"])
    assert informative_png(tmp_path / "rm_curve.png")
    (tmp_path / "rm_curve.png").unlink()
    rm_curve.main(["--replot", "--out", str(tmp_path)])
    assert informative_png(tmp_path / "rm_curve.png")
