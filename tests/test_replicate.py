"""The replication report's statistics on hand-made runs with known answers."""

import numpy as np
import pandas as pd
import pytest

from salsa.analysis.replicate import (
    Job,
    head_to_head,
    landscape_table,
    markdown,
    overoptimisation,
    smooth,
    task_measures,
    title,
    win_rates,
)


def _job(ref: str, seed: int, policy: list[float], ppo: list[float], sft: list[float], history=None) -> Job:
    rows = [("policy", g) for g in policy] + [("sft", g) for g in sft] + ([("ppo", g) for g in ppo] if ppo else [])
    answers = pd.DataFrame({"model": [m for m, _ in rows], "gold_reward": [g for _, g in rows]})
    results = {"rm_reward": 0.5, "kl_to_ref": 2.0, "sft_gold_reward": float(np.mean(sft))}
    return Job(ref, 0.05, seed, results, answers, history or {})


def test_win_rates_against_the_same_seeds_baseline():
    # 2 seeds × 2 prompts × 1 sample; soup3 wins 2, ties 1, loses 1 against PPO -> (2 + 0.5) / 4
    jobs = [
        _job("soup3", 0, policy=[1.0, 2.0], ppo=[0.0, 2.0], sft=[0.0, 0.0]),
        _job("soup3", 1, policy=[3.0, 0.0], ppo=[1.0, 1.0], sft=[0.0, 0.0]),
        _job("sft", 0, policy=[0.0, 2.0], ppo=[], sft=[0.0, 0.0]),
        _job("sft", 1, policy=[1.0, 1.0], ppo=[], sft=[0.0, 0.0]),
    ]
    table = win_rates(jobs, per_prompt=1, n_boot=500).set_index("ref")
    assert table.loc["soup3", "win_vs_ppo_mean"] == pytest.approx(2.5 / 4)
    assert table.loc["soup3", "win_vs_ppo_low"] <= 2.5 / 4 <= table.loc["soup3", "win_vs_ppo_high"]
    assert table.loc["soup3", "win_vs_sft_mean"] == pytest.approx((3 + 0.5) / 4)  # three wins, one tie
    assert table.loc["soup3", "gold_mean"] == pytest.approx(1.5)
    assert np.isnan(table.loc["sft", "win_vs_ppo_mean"])  # plain PPO has no PPO baseline
    assert list(table.index) == ["sft", "soup3"]  # the paper's order of references


def test_head_to_head_pairs_runs_of_the_same_seed():
    jobs = [
        _job("soup3", 0, policy=[1.0, 1.0], ppo=[0.0, 0.0], sft=[0.0, 0.0]),
        _job("soup2", 0, policy=[0.0, 1.0], ppo=[0.0, 0.0], sft=[0.0, 0.0]),
        _job("soup3", 1, policy=[1.0, 1.0], ppo=[0.0, 0.0], sft=[0.0, 0.0]),  # no soup2 run for seed 1: left out
    ]
    h2h = head_to_head(jobs, "soup3", "soup2", per_prompt=1, n_boot=200)
    assert h2h.loc[0, "seeds"] == 1 and h2h.loc[0, "win_mean"] == pytest.approx(0.75)


def test_smooth():
    assert smooth([1.0, 3.0, 5.0, 7.0], window=2).tolist() == [1.0, 2.0, 4.0, 6.0]


def test_overoptimisation_sees_gold_fall_while_rm_rises():
    iters = range(12)
    gold = [0.0] * 4 + [1.0] * 4 + [0.0] * 4  # peaks, then falls back
    rm = [float(i) for i in iters]  # keeps rising
    hist = {"ppo/gold_reward": list(zip(iters, gold, strict=True)), "ppo/rm_reward": list(zip(iters, rm, strict=True))}
    flat = {"ppo/gold_reward": [(i, 1.0) for i in iters], "ppo/rm_reward": [(i, 1.0) for i in iters]}
    jobs = [_job("sft", 0, [0.0], [], [0.0], hist), _job("sft", 1, [0.0], [], [0.0], flat)]
    row = overoptimisation(jobs).iloc[0]
    g, r = smooth(gold), smooth(rm)
    peak = int(np.argmax(g))
    assert row["gold_drop_from_peak"] == pytest.approx((g[peak] - g[-1] + 0.0) / 2)
    assert row["rm_rise_after_gold_peak"] == pytest.approx((r[-1] - r[peak] + 0.0) / 2)
    assert row["seeds_overoptimised"] == 1


def test_landscape_table():
    land = {
        "points": {
            "sft 0": {"gold_reward": 1.0, "rm_reward": 0.1},
            "sft 1": {"gold_reward": 2.0, "rm_reward": 0.2},
            "sft 2": {"gold_reward": 3.0, "rm_reward": 0.3},
            "soup": {"gold_reward": 3.5, "rm_reward": 0.25},
        },
        "grids": {"gold_reward": [[1.0, 4.0]], "rm_reward": [[0.0, 0.5]]},
    }
    row = landscape_table({0: land}).iloc[0]
    assert row["ingredients_gold_reward_mean"] == pytest.approx(2.0) and row["soup_beats_best_gold_reward"]
    assert not row["soup_beats_best_rm_reward"] and row["grid_max_gold_reward"] == 4.0


def test_task_measures_average_each_reference_over_its_seeds():
    jobs = [_job("soup3", s, [0.0], [0.0], [0.0]) for s in (0, 1)] + [_job("sft", 0, [0.0], [], [0.0])]
    assert task_measures(jobs).empty  # the embedded task's evaluation reports no task measures
    for job, prompt, acc in zip(jobs, (0.25, 0.75, 0.5), (0.6, 0.8, 0.7), strict=True):
        job.results.update(ifeval_prompt_strict_policy=prompt, rm_accuracy=acc, ended_frac=1.0)
        job.task, job.model = "ifeval", "smollm2"
    jobs[1].results["ifeval_instruction_strict_policy"] = 0.5  # reported by one seed only: its own value
    table = task_measures(jobs).set_index("ref")
    assert table.loc["soup3", "seeds"] == 2
    assert table.loc["soup3", "ifeval_prompt_strict_policy"] == pytest.approx(0.5)
    assert table.loc["soup3", "rm_accuracy"] == pytest.approx(0.7)
    assert table.loc["soup3", "ifeval_instruction_strict_policy"] == pytest.approx(0.5)
    assert np.isnan(table.loc["sft", "ifeval_instruction_strict_policy"])
    assert np.isnan(table.loc["sft", "rm_gold_agreement"])  # not in the results: not made up
    heading = title(jobs)
    assert heading == "Does SALSA beat PPO? data=ifeval, model=smollm2"
    text = markdown(win_rates(jobs, per_prompt=1, n_boot=50), pd.DataFrame(), pd.DataFrame(), pd.DataFrame(),
                    task_measures(jobs).reset_index(drop=True), heading)  # fmt: skip
    assert text.startswith("# Does SALSA beat PPO? data=ifeval, model=smollm2")
    assert "| soup3 | 0.05 | 2 | 0.700 | — | 1.000 | 0.500 | 0.500 |" in text
    assert "πother vs PPO" not in text  # no ref=other run: no row for the paper's πother number
    assert "soup3 against soup2" not in text  # no soup2 run: no head-to-head section


def test_title_of_the_embedded_task():
    assert title([_job("sft", 0, [0.0], [], [0.0])]).endswith("Replication on the embedded task")
