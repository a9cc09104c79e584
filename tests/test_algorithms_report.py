"""The algorithms report's statistics on hand-made runs with known answers."""

import numpy as np
import pandas as pd
import pytest

from salsa.analysis.algorithms import algorithm_table, markdown, versus_ppo
from salsa.analysis.replicate import Job


def _job(algo: str, ref: str, seed: int, policy: list[float], baseline: list[float], sft: list[float]) -> Job:
    rows = [("policy", g) for g in policy] + [("sft", g) for g in sft] + [("ppo", g) for g in baseline]
    answers = pd.DataFrame({"model": [m for m, _ in rows], "gold_reward": [g for _, g in rows]})
    results = {"rm_reward": 0.5, "kl_to_ref": 2.0, "sft_gold_reward": float(np.mean(sft))}
    return Job(ref, 0.1 if algo == "dpo" else 0.05, seed, results, answers, {}, algo=algo)


def test_soup_runs_are_judged_against_the_same_algorithms_sft_reference_run():
    jobs = [
        # DPO soup3: seed 0 wins both prompts against its ref=sft baseline, seed 1 ties one and loses one
        _job("dpo", "soup3", 0, policy=[1.0, 2.0], baseline=[0.0, 1.0], sft=[0.0, 0.0]),
        _job("dpo", "soup3", 1, policy=[1.0, 0.0], baseline=[1.0, 1.0], sft=[0.0, 0.0]),
        _job("dpo", "sft", 0, policy=[0.0, 1.0], baseline=[], sft=[0.0, 0.0]),
        _job("dpo", "sft", 1, policy=[1.0, 1.0], baseline=[], sft=[0.0, 0.0]),
        _job("ppo", "sft", 0, policy=[0.5, 0.5], baseline=[], sft=[0.0, 0.0]),
        _job("ppo", "sft", 1, policy=[2.0, 2.0], baseline=[], sft=[0.0, 0.0]),
    ]
    table = algorithm_table(jobs, per_prompt=1, n_boot=300).set_index(["algo", "ref"])
    soup = table.loc[("dpo", "soup3")]
    assert soup["win_vs_baseline_mean"] == pytest.approx((2 + 0.5) / 4)
    assert soup["win_vs_baseline_per_seed"] == [1.0, 0.25]
    assert soup["win_vs_sft_mean"] == pytest.approx((3 + 0.5) / 4)  # three wins, one tie against SFT
    assert soup["kl_coef"] == 0.1 and soup["seeds"] == 2
    assert np.isnan(table.loc[("dpo", "sft"), "win_vs_baseline_mean"])  # ref=sft is the baseline itself
    assert list(table.index) == [("ppo", "sft"), ("dpo", "sft"), ("dpo", "soup3")]  # PPO first, sft before soup3
    # DPO's ref=sft policy against PPO's of the same seed: seed 0 loses one, wins one; seed 1 loses both
    vs = versus_ppo(jobs, per_prompt=1, n_boot=300).set_index(["algo", "ref"])
    assert vs.loc[("dpo", "sft"), "win_mean"] == pytest.approx(1 / 4)
    text = markdown(table.reset_index(), vs.reset_index())
    assert "| dpo | soup3 | 0.1 | 2 | 62.5 [" in text and "100.0, 25.0" in text
