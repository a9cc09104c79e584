"""How a reward model's sequence score is read (`rm.score=last|mean`) and the scalar head's own rate (`rm.head_lr`)."""

from __future__ import annotations

import json

import pytest
import torch

from salsa.config import check_groups
from salsa.errors import ConfigError
from salsa.infra.context import Context
from salsa.models.hf import (
    load_reward_model,
    load_tokenizer,
    pool_scores,
    response_positions,
    scalar_head_outputs,
    sequence_scores,
)
from salsa.pipeline import run
from salsa.stages.rm import RewardModule, pair_batch, rm_settings
from salsa.validate import check_rm_score, validate
from tests.conftest import make_cfg, with_upstream


def test_last_and_mean_pooling_by_hand():
    out = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 1.0, 1.0, 1.0]])
    attention = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    answer = torch.tensor([[0, 0, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0]])
    # last attended token: 4, 6 (right padding after it), 9
    torch.testing.assert_close(pool_scores(out, attention, None, "last"), torch.tensor([4.0, 6.0, 9.0]))
    # mean over the answer: (3 + 4) / 2, 6, and 0 for a row without answer tokens
    torch.testing.assert_close(pool_scores(out, attention, answer, "mean"), torch.tensor([3.5, 6.0, 0.0]))
    with pytest.raises(ValueError, match="needs the response"):
        pool_scores(out, attention, None, "mean")
    with pytest.raises(ValueError, match="must be one of"):
        pool_scores(out, attention, answer, "max")


def test_a_rollouts_answer_mask_widens_to_the_whole_sequence():
    answer = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    wide = response_positions(answer, 5)  # two query positions, then the answer
    assert wide.tolist() == [[0, 0, 1, 1, 0], [0, 0, 1, 0, 0]]


def test_pair_batches_mark_each_answer_after_its_prompt():
    # (chosen ids, rejected ids, gold margin, prompt length): prompts of 2 and 1 tokens
    items = [([5, 6, 7, 8], [5, 6, 9], 1.0, 2), ([5, 7], [5, 8, 8, 8, 8], -0.5, 1)]
    b = pair_batch(items, pad_id=0)
    assert b["input_ids"].shape == (4, 5)
    assert b["response_mask"].tolist() == [[0, 0, 1, 1, 0], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 1, 1, 1, 1]]
    assert (b["response_mask"] <= b["attention_mask"]).all()


def test_the_scalar_head_gets_its_own_learning_rate(tmp_path):
    from salsa.models.hf import tiny_gemma, train_word_tokenizer

    tok = train_word_tokenizer(["a b c d ."])
    tiny_gemma(tok, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
               num_key_value_heads=1, head_dim=8).save_pretrained(tmp_path)  # fmt: skip
    model = load_reward_model(tmp_path)
    same = RewardModule(model, lr=1e-3, total_steps=10).configure_optimizers()
    (group,) = same["optimizer"].param_groups  # without head_lr: one group, one rate
    assert group["initial_lr"] == 1e-3
    split = RewardModule(model, lr=1e-3, head_lr=3e-2, total_steps=10).configure_optimizers()["optimizer"]
    body, head = split.param_groups
    assert [p is q for p, q in zip(head["params"], model.score.parameters(), strict=True)] == [True]
    assert head["initial_lr"] == 3e-2 and body["initial_lr"] == 1e-3  # the schedule scales both alike
    every = {id(p) for p in model.parameters()}
    assert sorted(map(id, body["params"] + head["params"])) == sorted(every)


def test_default_score_settings_keep_the_reward_models_keys(tmp_path):
    default = make_cfg(tmp_path)
    assert "score" not in rm_settings(default) and "head_lr" not in rm_settings(default)
    tuned = make_cfg(tmp_path, "rm.score=mean", "rm.head_lr=0.003")
    assert rm_settings(tuned)["score"] == "mean" and rm_settings(tuned)["head_lr"] == 0.003
    assert check_rm_score(tuned) == "mean"
    with pytest.raises(ConfigError, match="rm.score"):
        check_groups(make_cfg(tmp_path, "rm.score=max"))


def test_mean_scores_are_refused_for_reward_adapters(tmp_path):
    cfg = make_cfg(tmp_path, "model=gemma2b", "rm.score=mean")
    with pytest.raises(ConfigError, match="full-weight"):
        check_rm_score(cfg)
    with pytest.raises(ConfigError, match="full-weight"):  # before anything runs
        validate(cfg)


@pytest.mark.slow
def test_a_mean_scored_reward_model_is_read_the_same_way_everywhere(upstream, tmp_path):
    """The rm stage writes `score_pooling` into the model's config; its held-out metrics, PPO's rollout scores and
    the evaluation read the answer's mean; the engine export refuses it."""
    from salsa.export_engine import ExportError, check_kind, find_stage
    from salsa.models.actors import FullActors

    cfg = make_cfg(with_upstream(upstream, tmp_path), "rm.score=mean", "rm.head_lr=0.003", "stage=eval")
    ctx = Context.from_cfg(cfg)
    results = run(cfg, ctx)
    (rm,) = {e.key: e for e in ctx.entries if e.stage == "rm"}.values()  # stages list each entry they use
    assert rm.key not in {p.name for p in (upstream / "cache" / "rm").iterdir()}  # not the default reward model
    assert rm.manifest["score"] == "mean" and rm.manifest["spec"]["rm"]["score"] == "mean"
    assert json.loads((rm.path / "config.json").read_text())["score_pooling"] == "mean"
    assert results["rm_accuracy"] == rm.manifest["metrics"]["accuracy"]
    # PPO and the evaluation ran against it: their mean RM scores are the answers' mean-pooled scores
    ppo = {e.key: e for e in ctx.entries if e.stage == "ppo"}.values()
    assert {e.manifest["spec"]["rm"] for e in ppo} == {rm.key}  # SALSA's policy and its plain-PPO baseline

    model, tok = load_reward_model(rm.path).eval(), load_tokenizer(rm.path)
    ids = torch.tensor([[tok.pad_token_id, 5, 6, 7, 8, 9], [4, 5, 6, 7, 8, 8]])
    attention = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    answer = torch.tensor([[1, 1, 1], [1, 1, 0]])  # the rollout's last three positions (query of three)
    with torch.no_grad():
        per_token = scalar_head_outputs(model, ids, attention)
        expected = torch.stack([per_token[0, 3:].mean(), per_token[1, 3:5].mean()])
        actors = FullActors(torch.nn.Linear(1, 1), None, torch.nn.Linear(1, 1), model)
        torch.testing.assert_close(actors.scores(ids, attention, answer), expected)
        last = per_token.gather(1, torch.tensor([[5], [4]])).squeeze(1)
        assert not torch.allclose(sequence_scores(model, ids, attention, response_positions(answer, 6)), last)

    with pytest.raises(ExportError, match="rm.score=mean"):
        check_kind(find_stage(tmp_path / "cache", rm.key, "--rm"), "reward", "--rm")
