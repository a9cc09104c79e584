"""The reward-model study trains reward models the way the `rm` stage does."""

import math

import hydra
import pytest

from salsa.analysis.rm_curve import gold_labelled, grid, label_ceiling, train_point
from salsa.data.synthetic import Pair
from salsa.infra.cache import StageCache
from tests.conftest import make_cfg


def test_label_ceiling_is_the_mean_rater_agreement_with_the_gold():
    pairs = [Pair("p", "a", "b", gold_margin=0.0), Pair("p", "a", "b", gold_margin=-math.log(3))]
    # σ(0) = 1/2; σ(log 3) = 3/4 (a rater picks the higher gold reward with that probability, whichever is chosen)
    assert label_ceiling(pairs) == pytest.approx((0.5 + 0.75) / 2)
    assert label_ceiling([Pair("p", "a", "b", gold_margin=2.0)], temperature=2.0) == pytest.approx(1 / (1 + math.e**-1))


def test_gold_labels_put_the_higher_gold_reward_first():
    flipped = gold_labelled(Pair("p", "worse", "better", True, False, gold_margin=-1.5))
    assert (flipped.chosen, flipped.rejected, flipped.chosen_ended, flipped.rejected_ended) == (
        "better", "worse", False, True,
    )  # fmt: skip
    assert flipped.gold_margin == 1.5
    kept = Pair("p", "better", "worse", gold_margin=0.5)
    assert gold_labelled(kept) is kept


def test_grid_varies_one_axis_at_a_time_around_the_default():
    points = grid(3000, [1000, 3000], [3e-4], [2], ["base", "sft"])
    assert points == [
        ("base", 1000, 1, None), ("base", 3000, 1, None), ("base", 3000, 2, None), ("base", 3000, 1, 3e-4),
        ("sft", 3000, 1, None),
    ]  # fmt: skip
    # the points that do not vary the passes use the default's
    assert grid(3000, [1000], [3e-4], [], ["base"], default_epochs=3) == [
        ("base", 1000, 3, None),
        ("base", 3000, 3, 3e-4),
    ]


def test_a_study_point_reproduces_the_rm_stage(upstream):
    """Same base, pairs, settings and seed as the pipeline's reward model: the same held-out accuracy and agreement."""
    cfg = make_cfg(upstream, "stage=rm")
    cache = StageCache(cfg.paths.cache_dir)
    (rm_dir,) = [p for p in (cache.root / "rm").iterdir() if p.is_dir() and "." not in p.name]
    rm = cache.lookup("rm", rm_dir.name)
    base = cache.lookup("base", rm.manifest["spec"]["base"])
    data = hydra.utils.instantiate(cfg.data.task, _convert_="all")
    point = train_point("base", base.path, data.pairs_train, data.pairs_val, cfg.rm, int(cfg.rm.seed))
    assert point.pairs == len(data.pairs_train)
    assert point.accuracy == pytest.approx(rm.manifest["metrics"]["accuracy"], abs=1e-6)
    assert point.gold_agreement == pytest.approx(rm.manifest["metrics"]["gold_agreement"], abs=1e-6)
    assert point.accuracy_shuffled == pytest.approx(rm.manifest["metrics"]["accuracy_shuffled_prompts"], abs=1e-6)


def test_a_linear_judge_of_the_gold_features_recovers_noise_free_labels():
    """The gold reward is a weighted sum of its seven features, so on noise-free labels a linear judge of them
    separates the held-out pairs (up to the few with a near-zero margin); on the answers' words alone it cannot."""
    from salsa.analysis.rm_curve import BASELINES, linear_baseline
    from salsa.data.synthetic import SyntheticTask

    task = SyntheticTask(0)
    train = [gold_labelled(p) for p in task.preference_pairs(2000, "train")]
    val = [gold_labelled(p) for p in task.preference_pairs(200, "val")]
    _, held_out = linear_baseline(train, val, BASELINES["+ all seven gold features"], l2=1e-5)
    assert held_out >= 0.95
    _, words_only = linear_baseline(train, val, [], l2=1e-5)
    assert words_only < held_out - 0.2


def test_a_study_reads_back_what_it_wrote_including_older_csvs(tmp_path):
    from salsa.analysis.rm_curve import Point, read_points, write_report

    points = [
        Point("base", 10, 3000, 1, 1e-3, 0, 94, 0.6, 0.58, 0.59, 80.0, accuracy_shuffled=0.55),
        Point("base", 10, 3000, 1, 3e-4, 0, 94, 0.6, 0.61, 0.63, 90.0, "raters", "mean", 3e-3, "fresh", 0.6),
    ]
    write_report(points, 0.8, 0.8, tmp_path, ["python -m salsa.analysis.rm_curve --lrs ''"])
    again, commands = read_points(tmp_path)
    assert again == points and commands == ["python -m salsa.analysis.rm_curve --lrs ''"]
    table = (tmp_path / "rm_curve.md").read_text()
    row = (
        "| base | 10 | raters | mean | 3000 | 1 | 0.0003 | 0.003 | 0 | 94 | 0.600 | fresh | 0.610 | 0.600 | 0.630 "
        "| 90 |"
    )
    assert row in table
    assert "| base | 10 | raters | last | 3000 | 1 | 0.001 | – | 0 |" in table
    # a csv written before score, head_lr and heldout existed: those columns take their defaults
    csv_path = tmp_path / "rm_curve.csv"
    lines = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join(",".join(row.split(",")[:12]) for row in lines[:2]) + "\n")
    (old,), _ = read_points(tmp_path)
    assert (old.score, old.head_lr, old.heldout) == ("last", None, "val") and math.isnan(old.accuracy_shuffled)
