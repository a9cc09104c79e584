"""Start and anchor apart (`init=` beside `ref=`), and references that move (`ref.update=ema|sync`)."""

from __future__ import annotations

import pytest
import torch

from salsa.functional import ema_update, reference_rate
from salsa.infra.context import Context
from salsa.pipeline import run
from tests.conftest import make_cfg, with_upstream


def test_ema_update_and_when_a_reference_moves_by_hand():
    ref, policy = torch.tensor([1.0, 3.0]), torch.tensor([3.0, -1.0])
    # 0.75 · [1, 3] + 0.25 · [3, −1] = [1.5, 2.0]
    torch.testing.assert_close(ema_update(ref, policy, 0.25), torch.tensor([1.5, 2.0]))
    assert torch.equal(ema_update(ref, policy, 1.0), policy)  # a sync with mixing 1 is an exact copy
    assert [reference_rate("ema", s, 0.1, 3, 0.5) for s in (1, 2, 3)] == [0.1, 0.1, 0.1]
    assert [reference_rate("sync", s, 0.1, 3, 0.5) for s in (1, 2, 3, 6)] == [None, None, 0.5, 0.5]
    assert reference_rate("frozen", 3, 0.1, 3, 0.5) is None


@pytest.mark.slow
def test_init_and_ref_compose_into_four_distinct_policies(upstream, tmp_path):
    with_upstream(upstream, tmp_path)
    keys = {}
    for init in ("sft", "soup3"):
        for ref in ("sft", "soup3"):
            cfg = make_cfg(tmp_path, f"init={init}", f"ref={ref}", "stage=ppo")
            ctx = Context.from_cfg(cfg)
            results = run(cfg, ctx)
            assert results["init"] == init and results["ref"] == ref
            ppo = [e for e in ctx.entries if e.stage == "ppo"]
            policy = ppo[0]
            keys[(init, ref)] = policy.key
            soups = {e.key for e in ctx.entries if e.stage == "soup"}
            start = policy.manifest["spec"]["policy_init"]
            anchor = policy.manifest["spec"]["reference"]
            assert (start in soups) == (init == "soup3") and (anchor in soups) == (ref == "soup3")
    assert len(set(keys.values())) == 4
    # the diagonal is what ref= alone gives: init=soup3 ref=soup3 is SALSA, init=sft ref=sft plain PPO
    for same in ("sft", "soup3"):
        cfg = make_cfg(tmp_path, f"ref={same}", "stage=ppo")
        ctx = Context.from_cfg(cfg)
        run(cfg, ctx)
        assert [e for e in ctx.entries if e.stage == "ppo"][0].key == keys[(same, same)]


def _group_run(upstream, tmp_path, *overrides):
    """GRPO from the soup against the soup at debug sizes, returning the module after training."""
    from salsa.algorithms.grpo import GRPOConfig, GRPOModule
    from salsa.algorithms.reference import MovingReference
    from salsa.models.hf import load_tokenizer
    from salsa.stages.group import build_group_actors

    cfg = make_cfg(with_upstream(upstream, tmp_path), "stage=rm", *overrides)
    ctx = Context.from_cfg(cfg)
    run(cfg, ctx)
    soup = [e for e in ctx.entries if e.stage == "soup"][0]
    rm = [e for e in ctx.entries if e.stage == "rm"][0]
    config = GRPOConfig(**{**GRPOConfig.from_cfg(cfg.grpo).__dict__, "iterations": 1, "num_minibatches": 2})
    actors = build_group_actors(soup, soup, rm)
    module = GRPOModule(
        actors,
        load_tokenizer(soup.path),
        ctx.data.prompts_train,
        config,
        ctx.data.judge,
        MovingReference(actors, cfg.ref),
    )
    return ctx, module


@pytest.mark.slow
def test_sync_at_step_tau_makes_the_reference_the_policy(upstream, tmp_path):
    ctx, module = _group_run(upstream, tmp_path, "ref.update=sync", "ref.sync_every=2")
    before = {k: v.clone() for k, v in module.actors.reference.state_dict().items()}
    moved = []
    real = module.moving.after_step
    module.moving.after_step = lambda step: moved.append((step, real(step)))
    ctx.trainer(tmp_path / "w", None, max_epochs=1, logger=False).fit(module)
    assert moved == [(1, False), (2, True)]  # two optimizer steps: the reference moved after the second (τ = 2)
    policy = module.actors.policy.state_dict()
    for k, v in module.actors.reference.state_dict().items():
        torch.testing.assert_close(v, policy[k], rtol=0, atol=0)
    assert any(not torch.equal(v, before[k]) for k, v in module.actors.reference.state_dict().items())


@pytest.mark.slow
def test_ema_moves_the_reference_by_its_rate_after_each_step(upstream, tmp_path):
    ctx, module = _group_run(upstream, tmp_path, "ref.update=ema", "ref.ema_rate=0.25")
    module.config.num_minibatches = 1  # one optimizer step: reference = 0.75 · start + 0.25 · trained policy
    start = {k: v.clone() for k, v in module.actors.reference.state_dict().items()}
    ctx.trainer(tmp_path / "w", None, max_epochs=1, logger=False).fit(module)
    policy = module.actors.policy.state_dict()
    for k, v in module.actors.reference.state_dict().items():
        torch.testing.assert_close(v, 0.75 * start[k] + 0.25 * policy[k], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_a_moving_reference_on_adapters_copies_the_policy(tmp_path):
    from salsa.infra.cache import Entry
    from salsa.models.adapter_actors import build_adapter_actors
    from salsa.models.qlora import AdapterError, BaseSettings, LoraSettings
    from tests.hub_fixtures import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path / "gemma", "gemma")
    lora = LoraSettings(r=2, target_modules=["q_proj", "v_proj"])
    settings = BaseSettings(str(ckpt), quant="none", gradient_checkpointing=False, lora=lora)
    from salsa.models.shared_base import SharedBase

    shared = SharedBase.load(settings, "cpu")
    shared.new_adapter("start", settings.lora)
    for layer in shared._layers:  # a start that differs from the base
        torch.nn.init.normal_(layer.lora_B["start"].weight, std=0.5)
    shared.save_adapter("start", tmp_path / "start")
    start = Entry("sft", "s0", tmp_path / "start", {}, False)
    actors = build_adapter_actors(settings, start, start, None, "cpu", value=False, moving_reference=True)
    for layer in actors.shared._layers:  # a trained policy delta
        if "policy" in layer.lora_B:
            torch.nn.init.normal_(layer.lora_B["policy"].weight, std=0.5)
    x = torch.randint(6, 40, (2, 7))
    with torch.no_grad():
        policy = actors.policy(input_ids=x).logits
        assert not torch.allclose(actors.reference(input_ids=x).logits, policy)
        actors.move_reference(1.0)
        torch.testing.assert_close(actors.reference(input_ids=x).logits, policy, rtol=0, atol=1e-6)
    with pytest.raises(AdapterError, match="only copy"):
        actors.move_reference(0.5)


def test_mixing_references_on_adapters_is_refused(tmp_path):
    from salsa.errors import ConfigError
    from salsa.validate import validate

    cfg = make_cfg(tmp_path, "model=gemma2b", "model.name_or_path=/nowhere", "ref.update=ema", "logger=none")
    with pytest.raises(ConfigError, match="ref.update"):
        validate(cfg)
