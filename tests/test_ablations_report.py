"""The ablations report's statistics on hand-made runs with known answers."""

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from salsa.analysis.ablations import (
    PPO,
    Arm,
    arm_table,
    comparisons,
    decomposition,
    head_to_head,
    markdown,
    overoptimisation,
)
from salsa.analysis.replicate import Job, run_design


def _job(
    seed, policy, baseline, start="sft", ref="sft", update="frozen", rm="default", history=None, kl_coef=0.05
) -> Job:
    rows = [("policy", g) for g in policy] + [("sft", 0.0) for _ in policy] + [("ppo", g) for g in baseline]
    answers = pd.DataFrame({"model": [m for m, _ in rows], "gold_reward": [g for _, g in rows]})
    results = {"rm_reward": 0.5, "kl_to_ref": 2.0, "rm_accuracy": 0.6, "rm_gold_agreement": 0.62}
    return Job(ref, kl_coef, seed, results, answers, history or {}, start=start, update=update, rm=rm)


def _grid():
    """Two seeds, two prompts; PPO's answers score 1 and 1 (seed 0), 0 and 2 (seed 1)."""
    ppo = {0: [1.0, 1.0], 1: [0.0, 2.0]}
    gain = {("soup3", "sft"): 0.2, ("sft", "soup3"): 0.4, ("soup3", "soup3"): 1.0}
    jobs = [_job(s, ppo[s], ppo[s]) for s in ppo]
    for (start, ref), g in gain.items():
        jobs += [_job(s, [x + g for x in ppo[s]], ppo[s], start, ref) for s in ppo]
    return jobs


def test_start_and_anchor_decompose_salsas_gain():
    parts = decomposition(_grid(), per_prompt=1, n_boot=200).set_index("effect")
    assert parts.loc["start", "gold_gain_mean"] == pytest.approx(0.2)
    assert parts.loc["anchor", "gold_gain_mean"] == pytest.approx(0.4)
    assert parts.loc["both", "gold_gain_mean"] == pytest.approx(1.0)
    assert parts.loc["interaction", "gold_gain_mean"] == pytest.approx(0.4)  # 1.0 − 0.2 − 0.4
    assert parts.loc["start", "share_of_salsa"] == pytest.approx(0.2)
    assert parts.loc["anchor", "share_of_salsa"] == pytest.approx(0.4)
    # constant gains: every bootstrap draw gives the same value
    assert parts.loc["anchor", "gold_gain_low"] == pytest.approx(0.4)
    assert parts.loc["anchor", "share_high"] == pytest.approx(0.4)
    assert set(parts["seeds"]) == {2}


def test_each_arm_is_judged_against_its_own_runs_ppo_baseline():
    jobs = _grid()
    jobs.append(_job(0, [1.0, 0.0], [1.0, 1.0], update="ema"))  # ties one prompt, loses one; one seed only
    table = arm_table(jobs, per_prompt=1, n_boot=200).set_index("arm")
    salsa = table.loc[Arm("soup3", "soup3").label]
    assert salsa["win_vs_ppo_mean"] == 1.0 and salsa["win_vs_ppo_per_seed"] == [1.0, 1.0]
    assert salsa["gold_gain_mean"] == pytest.approx(1.0)
    ema = table.loc[Arm("sft", "sft", "ema").label]
    assert ema["win_vs_ppo_mean"] == pytest.approx(0.25) and ema["seeds"] == 1
    assert np.isnan(table.loc[PPO.label, "win_vs_ppo_mean"])  # PPO is its own baseline
    assert table.loc[PPO.label, "win_vs_sft_mean"] == pytest.approx(3.5 / 4)  # seed 1's first answer ties SFT's 0


def test_plain_ppo_with_a_reward_model_soup_is_its_own_baseline():
    jobs = _grid()
    for seed in (0, 1):  # a ref=sft run answers no baseline of its own: no "ppo" rows
        job = _job(seed, [0.5, 0.5], [])
        jobs.append(Job("sft", 0.05, seed, job.results, job.answers, {}, start="sft", update="frozen", rm="soup3"))
    table = arm_table(jobs, per_prompt=1, n_boot=200).set_index("arm")
    soup_ppo = table.loc[Arm("sft", "sft", rm="soup3").label]
    assert np.isnan(soup_ppo["win_vs_ppo_mean"]) and soup_ppo["gold_mean"] == pytest.approx(0.5)


def test_runs_of_different_arms_are_paired_by_seed():
    jobs = [
        _job(0, [1.0, 2.0], [0.0, 0.0], rm="soup3"),
        _job(1, [0.0, 0.0], [0.0, 0.0], rm="soup3"),
        _job(0, [0.0, 3.0], [0.0, 0.0]),
        _job(1, [1.0, 1.0], [0.0, 0.0]),
        _job(2, [5.0, 5.0], [0.0, 0.0]),  # no rm=soup run of seed 2: left out
    ]
    vs = head_to_head(jobs, [(Arm("sft", "sft", rm="soup3"), PPO)], per_prompt=1, n_boot=200)
    row = vs.iloc[0]
    assert row["seeds"] == 2
    assert row["win_mean"] == pytest.approx(1 / 4)  # seed 0: 1 > 0 wins, 2 < 3 loses; seed 1 loses both
    assert row["gold_gain_mean"] == pytest.approx(((1 - 0) + (2 - 3) + (0 - 1) + (0 - 1)) / 4)


def test_moving_anchors_meet_plain_ppo_at_a_smaller_kl_coefficient():
    jobs = _grid()
    for seed, ppo in {0: [1.0, 1.0], 1: [0.0, 2.0]}.items():
        jobs.append(_job(seed, [2.0, 0.0], [2.0, 0.0], kl_coef=0.01))  # plain PPO at β = 0.01: its own answers
        jobs.append(_job(seed, [2.0, 1.0], ppo, update="ema"))
    table = arm_table(jobs, per_prompt=1, n_boot=100).set_index("arm")
    weak = Arm("sft", "sft", kl_coef=0.01)
    assert weak.label == "start sft, anchor sft, β 0.01" and weak.label in table.index and PPO.label in table.index
    assert np.isnan(table.loc[weak.label, "win_vs_ppo_mean"])  # its own baseline, like PPO at the grid's β
    pairs = comparisons(list({Arm("sft", "sft", "ema"), weak, PPO, Arm("soup3", "soup3")}))
    assert pairs["penalty"] == [(Arm("sft", "sft", "ema"), weak), (Arm("sft", "sft", "sync"), weak)]
    assert comparisons()["penalty"] == []
    row = head_to_head(jobs, pairs["penalty"], per_prompt=1, n_boot=100).iloc[0]
    assert row["seeds"] == 2
    assert row["win_mean"] == pytest.approx(0.75)  # per seed: 2 = 2 ties, 1 > 0 wins
    assert row["gold_gain_mean"] == pytest.approx(0.5)


def test_over_optimisation_finds_gold_falling_while_the_rm_rises():
    rising = [(i, 0.1 * i) for i in range(20)]
    peaked = [(i, 0.1 * i if i < 10 else 1.0 - 0.1 * (i - 9)) for i in range(20)]
    jobs = [
        _job(0, [0.0], [0.0], history={"ppo/gold_reward": peaked, "ppo/rm_reward": rising}),
        _job(1, [0.0], [0.0], history={"ppo/gold_reward": rising, "ppo/rm_reward": rising}),
    ]
    row = overoptimisation(jobs).iloc[0]
    assert row["seeds"] == 2 and row["seeds_overoptimised"] == 1


def test_markdown_names_every_section():
    jobs = _grid()
    text = markdown(
        arm_table(jobs, 1, 100), decomposition(jobs, 1, 100), {"moving": pd.DataFrame()}, overoptimisation(jobs)
    )
    assert "decomposed" in text and "| start | 2 | 0.200 [0.200, 0.200] | 20% [20%, 20%] |" in text


@pytest.mark.parametrize(
    ("overrides", "design"),
    [
        ({"ref": {"name": "soup3", "policy_init": "ref"}}, {"start": "soup3", "update": "frozen", "rm": "default"}),
        ({"ref": {"name": "other", "policy_init": 0}}, {"start": "sft", "update": "frozen", "rm": "default"}),
        (
            {
                "ref": {"name": "sft", "policy_init": "ref", "update": "ema"},
                "init": {"name": "soup3"},
                "rm": {"members": 3},
            },
            {"start": "soup3", "update": "ema", "rm": "soup3"},
        ),  # fmt: skip
    ],
)
def test_run_design_reads_start_update_and_reward_model(overrides, design):
    assert run_design(OmegaConf.create(overrides)) == design
