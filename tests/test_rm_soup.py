"""Reward-model soups (`rm=soup`): members trained with their own seeds and cached, averaged weight by weight."""

import pytest
import torch
from safetensors.torch import load_file

from salsa.infra.context import Context
from salsa.pipeline import run
from salsa.stages.rm import run_rm_soup
from tests.conftest import make_cfg, with_upstream

pytestmark = pytest.mark.slow


def test_rm_soup_trains_members_and_reports_each(upstream, tmp_path):
    cfg = make_cfg(with_upstream(upstream, tmp_path), "rm=soup", "stage=rm")
    ctx = Context.from_cfg(cfg)
    results = run(cfg, ctx)
    members = [e for e in ctx.entries if e.stage == "rm"]
    (soup,) = [e for e in ctx.entries if e.stage == "rm_soup"]
    assert [e.manifest["member"] for e in members] == [0, 1, 2]
    assert len({e.key for e in members}) == 3
    # member 0 is the default reward model: the same cache key as a run without rm=soup
    single = Context.from_cfg(make_cfg(tmp_path, "stage=rm"))
    run(single.cfg, single)
    assert [e.key for e in single.entries if e.stage == "rm"] == [members[0].key]
    metrics = soup.manifest["metrics"]
    assert results["rm_accuracy"] == metrics["accuracy"]
    for i, member in enumerate(members):
        assert metrics[f"member{i}_accuracy"] == member.manifest["metrics"]["accuracy"]
    # the soup is the members' average, tensor by tensor, its head then scaled to unit s.d. (rm.normalize)
    weights = [load_file(e.path / "model.safetensors") for e in members]
    averaged = load_file(soup.path / "model.safetensors")
    scale = metrics["reward_scale"]
    for k, v in averaged.items():
        mean = sum(w[k] for w in weights) / 3
        torch.testing.assert_close(v, mean * scale if k.startswith("score.") else mean, rtol=1e-6, atol=1e-7)


def test_a_soup_of_identical_reward_models_is_that_model(upstream, tmp_path):
    cfg = make_cfg(with_upstream(upstream, tmp_path), "stage=rm")
    ctx = Context.from_cfg(cfg)
    run(cfg, ctx)
    (rm,) = [e for e in ctx.entries if e.stage == "rm"]
    soup = run_rm_soup(ctx, [rm, rm, rm])
    member, souped = load_file(rm.path / "model.safetensors"), load_file(soup.path / "model.safetensors")
    for k, v in member.items():  # the head's second normalisation is by 1 (up to rounding)
        torch.testing.assert_close(souped[k], v, rtol=1e-5 if k.startswith("score.") else 0, atol=1e-7)
    assert soup.manifest["metrics"]["raw_score_sd"] == pytest.approx(1.0, rel=1e-5)
    assert soup.manifest["metrics"]["accuracy"] == pytest.approx(rm.manifest["metrics"]["accuracy"])
