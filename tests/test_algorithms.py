"""DPO, GRPO and RLOO on the tiny model with any reference: where they start, what stays frozen, how they resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

from salsa.algorithms.dpo import DPOConfig, DPOModule, PreferenceDataset, pair_logprobs, preference_batch
from salsa.algorithms.grpo import GRPOConfig, GRPOModule
from salsa.algorithms.rloo import RLOOConfig, RLOOModule
from salsa.infra.context import Context
from salsa.models.hf import load_causal_lm, load_tokenizer
from salsa.pipeline import run
from salsa.stages.group import build_group_actors
from salsa.stages.ppo import build_actors
from tests.conftest import make_cfg, with_upstream

pytestmark = pytest.mark.slow

GROUP = {"grpo": (GRPOModule, GRPOConfig), "rloo": (RLOOModule, RLOOConfig)}


@pytest.fixture(scope="module")
def stages(upstream):
    """Base, SFT ingredients 0-2, soup3 and RM at debug sizes (built once per test session)."""
    cfg = make_cfg(upstream, "stage=rm")
    ctx = Context.from_cfg(cfg)
    run(cfg, ctx)
    by_stage = {}
    for e in ctx.entries:
        by_stage.setdefault(e.stage, []).append(e)
    return cfg, ctx, by_stage


def _group_module(algo, stages, init=None, reference=None, **overrides):
    cfg, ctx, by_stage = stages
    soup, rm = by_stage["soup"][0], by_stage["rm"][0]
    module_cls, config_cls = GROUP[algo]
    config = config_cls(**{**config_cls.from_cfg(cfg[algo]).__dict__, **overrides})
    actors = build_group_actors(init or soup, reference or soup, rm)
    return module_cls(actors, load_tokenizer(soup.path), ctx.data.prompts_train, config, ctx.data.judge)


def _same_logits(model, entry, vocab: int) -> None:
    x = torch.randint(6, vocab, (3, 12))
    mask = torch.ones_like(x)
    start = load_causal_lm(entry.path).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=x, attention_mask=mask).logits,
            start(input_ids=x, attention_mask=mask).logits,
            rtol=0,
            atol=0,
        )


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_group_policy_starts_exactly_at_its_start_and_samples_k_per_prompt(algo, stages):
    module = _group_module(algo, stages)
    soup = stages[2]["soup"][0]
    _same_logits(module.actors.policy, soup, len(module.tokenizer))
    assert module.actors.value is None  # critic-free: no value model is loaded or trained
    out = module.rollout(module.prompts[:3], iteration=0)
    k = module.config.group_size
    queries = out["batch"]["sequences"][:, : out["prompt_len"]]
    assert queries.size(0) == 3 * k
    for g in range(3):  # the k answers of a prompt are consecutive rows with the same query
        assert (queries[g * k : (g + 1) * k] == queries[g * k]).all()
    assert abs(out["stats"][f"{algo}/kl"].item()) < 1e-4  # policy = reference = soup
    assert out["batch"]["advantages"].shape == (3 * k,)


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_ref_other_starts_at_sft0_and_anchors_at_sft1(algo, stages):
    sft = {e.key: e for e in stages[2]["sft"]}
    first, second = list(sft.values())[:2]
    module = _group_module(algo, stages, init=first, reference=second)
    _same_logits(module.actors.policy, first, len(module.tokenizer))
    _same_logits(module.actors.reference, second, len(module.tokenizer))


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_group_reference_is_bit_identical_after_training_and_policy_moves(algo, stages):
    cfg, ctx, _ = stages
    module = _group_module(algo, stages, iterations=2)
    ref_before = {k: v.clone() for k, v in module.actors.reference.state_dict().items()}
    rm_before = {k: v.clone() for k, v in module.actors.reward.state_dict().items()}
    policy_before = {k: v.clone() for k, v in module.actors.policy.state_dict().items()}
    trainer = ctx.trainer(ctx.cache.root / f"{algo}-test", None, max_epochs=2, logger=False)
    trainer.fit(module)
    for k, v in module.actors.reference.state_dict().items():
        assert torch.equal(v, ref_before[k]), k
    for k, v in module.actors.reward.state_dict().items():
        assert torch.equal(v, rm_before[k]), k
    assert any(not torch.equal(v, policy_before[k]) for k, v in module.actors.policy.state_dict().items())
    assert len(module.history) == 2
    for key in ("rm_reward", "gold_reward", "kl", "kl_k3", "loss", "entropy", "clip_frac", "advantage_abs"):
        assert math.isfinite(module.last_stats[f"{algo}/{key}"]), key


def test_group_size_and_minibatches_are_checked(stages):
    with pytest.raises(Exception, match="grpo.group_size"):
        _group_module("grpo", stages, group_size=1)
    with pytest.raises(Exception, match="rloo.num_minibatches"):
        _group_module("rloo", stages, batch_size=3, group_size=3, num_minibatches=2)


def _dpo_module(stages, init, reference, **overrides):
    cfg, ctx, _ = stages
    config = DPOConfig(**{**DPOConfig.from_cfg(cfg.dpo).__dict__, **overrides})
    tok = load_tokenizer(init.path)
    actors = build_actors(init, reference, None, value=False)
    data = PreferenceDataset(tok, ctx.data.pairs_train, config.max_prompt_length, config.max_response_length)
    ref = pair_logprobs(actors.reference_logits, data, tok.pad_token_id, config.reference_batch_size, "cpu")
    return DPOModule(actors, *ref, config, total_steps=4), data, tok


def _fit_dpo(stages, module, data, tok, name: str, steps: int = 2):
    from functools import partial

    from torch.utils.data import DataLoader

    _, ctx, _ = stages
    loader = DataLoader(
        data, batch_size=16, shuffle=False, collate_fn=partial(preference_batch, pad_id=tok.pad_token_id)
    )
    trainer = ctx.trainer(ctx.cache.root / name, None, max_steps=steps, logger=False)
    trainer.fit(module, train_dataloaders=loader)


def test_dpo_loss_is_log_2_for_every_pair_at_step_0_and_the_reference_stays(stages):
    soup = stages[2]["soup"][0]
    module, data, tok = _dpo_module(stages, soup, soup)
    _same_logits(module.model.policy, soup, len(tok))
    ref_before = {k: v.clone() for k, v in module.model.reference.state_dict().items()}
    policy_before = {k: v.clone() for k, v in module.model.policy.state_dict().items()}
    _fit_dpo(stages, module, data, tok, "dpo-test")
    assert module.first_losses.numel() == 16
    torch.testing.assert_close(module.first_losses, torch.full((16,), math.log(2.0)), rtol=0, atol=1e-6)
    for k, v in module.model.reference.state_dict().items():
        assert torch.equal(v, ref_before[k]), k
    assert any(not torch.equal(v, policy_before[k]) for k, v in module.model.policy.state_dict().items())


def test_dpo_with_another_reference_does_not_start_at_log_2(stages):
    first, second = stages[2]["sft"][:2]
    module, data, tok = _dpo_module(stages, first, second)
    _fit_dpo(stages, module, data, tok, "dpo-other-test", steps=1)
    assert not torch.allclose(module.first_losses, torch.full((16,), math.log(2.0)), atol=1e-4)


def test_dpo_sequence_logprobs_cover_answers_only(stages):
    """A pair's log-probability is that of its answer tokens: the same however much padding its batch has."""
    soup = stages[2]["soup"][0]
    module, data, tok = _dpo_module(stages, soup, soup)
    alone = pair_logprobs(module.model.reference_logits, torch.utils.data.Subset(data, [0]), tok.pad_token_id, 1, "cpu")
    together = pair_logprobs(module.model.reference_logits, data, tok.pad_token_id, 64, "cpu")
    torch.testing.assert_close(alone[0][0], together[0][0], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(alone[1][0], together[1][0], rtol=1e-6, atol=1e-5)
    assert (together[0] < 0).all() and (together[1] < 0).all()


# ---------------------------------------------------------------------------------------------------------------
# The pipeline: every algorithm with the cached stages, judged like PPO
# ---------------------------------------------------------------------------------------------------------------
def test_each_algorithm_runs_end_to_end_and_reuses_the_shared_stages(upstream, tmp_path):
    with_upstream(upstream, tmp_path)
    built = {}
    for algo in ("dpo", "grpo", "rloo"):
        cfg = make_cfg(tmp_path, f"algo={algo}", "ref=soup3")
        ctx = Context.from_cfg(cfg)
        results = run(cfg, ctx)
        assert results["algo"] == algo and results["ref"] == "soup3" and results["judge"] == "gold"
        for key in ("win_rate_vs_sft", "win_rate_vs_ppo", "gold_reward", "rm_reward", "kl_to_ref"):
            assert math.isfinite(results[key]), (algo, key)
        # the policy and its baseline (the same algorithm with ref=sft) are this algorithm's stages
        policies = [e for e in ctx.entries if e.stage == algo]
        assert len(policies) == 2 and not any(e.stage == "ppo" for e in ctx.entries)
        built[algo] = {e.stage for e in ctx.entries if not e.reused}
    for algo in ("dpo", "grpo", "rloo"):  # every algorithm reuses the cached SFT ingredients, soup and RM
        assert built[algo] == {algo, "eval"}, algo
    # DPO keeps the reference's log-probabilities of every pair with its stage, and its held-out pair metrics
    (dpo,) = [p for p in (tmp_path / "cache" / "dpo").iterdir() if p.is_dir() and "." not in p.name][:1]
    manifest = json.loads((dpo / "manifest.json").read_text())
    assert (dpo / "reference_logprobs.safetensors").is_file()
    assert 0.0 <= manifest["metrics"]["val_reward_accuracy"] <= 1.0
    # per-iteration history for the online algorithms
    (grpo,) = [p for p in (tmp_path / "cache" / "grpo").iterdir() if p.is_dir() and "." not in p.name][:1]
    assert (grpo / "history.csv").read_text().startswith("iteration,")


class Stopped(Exception):
    pass


@pytest.mark.parametrize(
    ("algo", "moving"),
    [("grpo", ()), ("dpo", ()), ("grpo", ("ref.update=ema", "ref.ema_rate=0.5"))],
    ids=["grpo", "dpo", "grpo-moving-reference"],
)
def test_interrupted_run_resumes_to_the_same_policy(algo, moving, upstream, tmp_path, monkeypatch):
    """A build that dies after its first checkpoint resumes from it (DPO without scoring the reference again; a
    moving reference as it had moved) and publishes the same policy as an uninterrupted one."""
    from safetensors.torch import load_file

    from salsa.algorithms import dpo as dpo_module
    from salsa.infra import training
    from salsa.stages import dpo as dpo_stage

    every = {"grpo": ("grpo.iterations=3", "grpo.ckpt_every=1"), "dpo": ("dpo.ckpt_every=1",)}[algo]
    args = ("stage=ppo", f"algo={algo}", "ref=soup3", *every, *moving)
    cfg = make_cfg(with_upstream(upstream, tmp_path / "straight"), *args)
    run(cfg, Context.from_cfg(cfg))

    original = training.AtomicLastCheckpoint.on_train_epoch_end

    def dies_after_first_checkpoint(self, trainer, module):
        original(self, trainer, module)
        if trainer.current_epoch == 0 and f"/{algo}/" in str(self.dirpath):
            raise Stopped  # as if the process died here

    cfg2 = make_cfg(with_upstream(upstream, tmp_path / "resumed"), *args)
    monkeypatch.setattr(training.AtomicLastCheckpoint, "on_train_epoch_end", dies_after_first_checkpoint)
    with pytest.raises(Stopped):
        run(cfg2, Context.from_cfg(cfg2))
    monkeypatch.setattr(training.AtomicLastCheckpoint, "on_train_epoch_end", original)
    assert list((tmp_path / "resumed" / "cache" / algo).glob("*.partial/checkpoints/last.ckpt"))
    scored = []
    real = dpo_module.pair_logprobs
    monkeypatch.setattr(dpo_stage, "pair_logprobs", lambda *a, **k: scored.append(1) or real(*a, **k))
    run(cfg2, Context.from_cfg(cfg2))
    if algo == "dpo":  # the killed stage read its reference log-probabilities back from its directory; only the
        assert len(scored) == 2  # baseline (ref=sft), never started before the kill, scored its train and val pairs

    def policies(root):  # the run's policy and its baseline's, by stage key
        return {p.parent.name: load_file(p) for p in (root / "cache" / algo).glob("*/model.safetensors")}

    a, b = policies(tmp_path / "straight"), policies(tmp_path / "resumed")
    assert a.keys() == b.keys() and len(a) == 2
    for key, weights in a.items():
        for k in weights:
            torch.testing.assert_close(weights[k], b[key][k], rtol=0, atol=1e-6)
        # the last iteration's statistics too: its KL is measured against the reference as it had moved
        metrics = [json.loads((root / "cache" / algo / key / "manifest.json").read_text())["metrics"]
                   for root in (tmp_path / "straight", tmp_path / "resumed")]  # fmt: skip
        assert metrics[1] == pytest.approx(metrics[0], rel=1e-4, abs=1e-7)
