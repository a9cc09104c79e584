"""The bootstrap behind the replication's confidence intervals, on cases with known answers."""

import numpy as np
import pytest

from salsa.analysis.stats import bootstrap_draws, comparison_scores, hierarchical_bootstrap


def test_comparison_scores():
    got = comparison_scores([1.0, 2.0, 3.0, 4.0], [0.0, 2.0, 5.0, 4.05], tie_tolerance=0.1)
    assert got.tolist() == [1.0, 0.5, 0.0, 0.5]


def test_degenerate_cases_have_no_width():
    assert hierarchical_bootstrap(np.ones((3, 10, 2))) == (1.0, 1.0, 1.0)
    assert hierarchical_bootstrap(np.full((3, 10, 2), 0.5)) == (0.5, 0.5, 0.5)


def test_two_prompt_case_matches_its_exact_distribution():
    # one seed, prompts scoring 1 and 0: a draw of two prompts has mean 0, ½ or 1 with probability ¼, ½, ¼
    scores = np.array([[[1.0], [0.0]]])
    point, low, high = hierarchical_bootstrap(scores, n_boot=20000, level=0.95)
    assert point == 0.5 and low == 0.0 and high == 1.0
    draws = bootstrap_draws(scores, n_boot=20000)
    for value, probability in ((0.0, 0.25), (0.5, 0.5), (1.0, 0.25)):
        assert np.mean(draws == value) == pytest.approx(probability, abs=0.015)


def test_seed_level_variation_widens_the_interval():
    rng = np.random.default_rng(1)
    within = rng.uniform(0.4, 0.6, size=(4, 50, 2))
    shifted = within + np.array([-0.2, -0.1, 0.1, 0.2])[:, None, None]  # seeds disagree
    _, lo1, hi1 = hierarchical_bootstrap(within)
    _, lo2, hi2 = hierarchical_bootstrap(shifted)
    assert hi2 - lo2 > 2 * (hi1 - lo1)
