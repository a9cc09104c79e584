"""Uncertainty for win rates: a hierarchical bootstrap over seeds, then prompts within each seed.

Comparisons are grouped by (seed, prompt): answers to one prompt share it, and runs with one seed share their SFT
ingredients and RL trajectory, so resampling individual comparisons would understate the uncertainty.
"""

from __future__ import annotations

import numpy as np


def comparison_scores(a: np.ndarray, b: np.ndarray, tie_tolerance: float = 0.0) -> np.ndarray:
    """1 for a win of a over b, ½ for a tie, 0 for a loss, elementwise."""
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    return np.where(diff > tie_tolerance, 1.0, np.where(np.abs(diff) <= tie_tolerance, 0.5, 0.0))


def bootstrap_draws(scores: np.ndarray, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """Bootstrap means of `scores` (seeds × prompts × samples per prompt): each draw resamples seeds with
    replacement, then prompts with replacement within each drawn seed; samples of one prompt stay together."""
    scores = np.asarray(scores, dtype=float)
    if scores.ndim == 2:
        scores = scores[:, :, None]
    per_prompt = scores.mean(axis=2)  # (S, P)
    n_seeds, n_prompts = per_prompt.shape
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    prompts = rng.integers(0, n_prompts, size=(n_boot, n_seeds, n_prompts))
    return per_prompt[seeds[:, :, None], prompts].mean(axis=(1, 2))


def hierarchical_bootstrap(
    scores: np.ndarray, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """The mean of `scores` and its percentile bootstrap interval at `level` (see `bootstrap_draws`)."""
    draws = bootstrap_draws(scores, n_boot, seed)
    alpha = (1.0 - level) / 2
    low, high = np.quantile(draws, [alpha, 1.0 - alpha])
    return float(np.asarray(scores, dtype=float).mean()), float(low), float(high)
