"""PPO on the tiny model: starts exactly at the soup, keeps the reference frozen, runs end to end."""

import math
import os

import pytest
import torch

from salsa.algorithms.ppo import PPOConfig, PPOModule, iteration_prompts
from salsa.infra.context import Context
from salsa.models.hf import load_causal_lm, load_tokenizer
from salsa.pipeline import run
from salsa.stages.ppo import build_actors
from tests.conftest import make_cfg

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stages(shared_cache):
    """Base, SFT ingredients, soup3 and RM at debug sizes (built once per test session)."""
    cfg = make_cfg(shared_cache, "stage=rm")
    ctx = Context.from_cfg(cfg)
    run(cfg, ctx)
    by_stage = {}
    for e in ctx.entries:
        by_stage.setdefault(e.stage, []).append(e)
    return cfg, ctx, by_stage


def _module(cfg, ctx, by_stage, **overrides):
    soup, rm = by_stage["soup"][0], by_stage["rm"][0]
    config = PPOConfig(**{**PPOConfig.from_cfg(cfg.ppo).__dict__, **overrides})
    actors = build_actors(soup, soup, rm)
    return PPOModule(actors, load_tokenizer(soup.path), ctx.data.prompts_train, config, ctx.data.judge), soup


def test_iteration_prompts_are_deterministic_and_disjoint_across_ranks():
    a = iteration_prompts(100, 8, seed=0, iteration=3, rank=0, world=2)
    b = iteration_prompts(100, 8, seed=0, iteration=3, rank=1, world=2)
    assert a == iteration_prompts(100, 8, seed=0, iteration=3, rank=0, world=2)
    assert not set(a) & set(b) and len(set(a)) == 8
    assert a != iteration_prompts(100, 8, seed=0, iteration=4, rank=0, world=2)


def test_batch_must_divide_into_minibatches(stages):
    with pytest.raises(ValueError, match="divisible"):
        _module(*stages, batch_size=10, num_minibatches=3)


def test_policy_starts_exactly_at_the_soup(stages):
    module, soup = _module(*stages)
    soup_model = load_causal_lm(soup.path).eval()
    x = torch.randint(6, len(module.tokenizer), (3, 12))
    mask = torch.ones_like(x)
    with torch.no_grad():
        torch.testing.assert_close(
            module.actors.policy(input_ids=x, attention_mask=mask).logits,
            soup_model(input_ids=x, attention_mask=mask).logits,
            rtol=0,
            atol=0,
        )
    # the first rollout has zero KL to the reference (policy = reference = soup)
    out = module.rollout(module.prompts[:8], iteration=0)
    assert abs(out["stats"]["ppo/kl"].item()) < 1e-4
    assert out["stats"]["ppo/kl_k3"].item() < 1e-6


def test_reference_is_bit_identical_after_ppo_and_policy_moves(stages):
    cfg, ctx, by_stage = stages
    module, _ = _module(cfg, ctx, by_stage, iterations=2)
    ref_before = {k: v.clone() for k, v in module.actors.reference.state_dict().items()}
    rm_before = {k: v.clone() for k, v in module.actors.reward.state_dict().items()}
    policy_before = {k: v.clone() for k, v in module.actors.policy.state_dict().items()}
    trainer = ctx.trainer(ctx.cache.root / "ppo-test", None, max_epochs=2, logger=False)
    trainer.fit(module)
    for k, v in module.actors.reference.state_dict().items():
        assert torch.equal(v, ref_before[k]), k
    for k, v in module.actors.reward.state_dict().items():
        assert torch.equal(v, rm_before[k]), k
    assert any(not torch.equal(v, policy_before[k]) for k, v in module.actors.policy.state_dict().items())
    assert all(not p.requires_grad for p in module.actors.reference.parameters())
    stats = module.last_stats
    for key in (
        "ppo/rm_reward",
        "ppo/gold_reward",
        "ppo/kl",
        "ppo/entropy",
        "ppo/clip_frac",
        "ppo/value_loss",
        "ppo/approx_kl",
        "ppo/response_length",
    ):
        assert math.isfinite(stats[key]), key


def test_adaptive_kl_changes_the_coefficient(stages):
    cfg, ctx, by_stage = stages
    module, _ = _module(cfg, ctx, by_stage, iterations=2, target_kl=1e6, kl_horizon=10.0)
    trainer = ctx.trainer(ctx.cache.root / "ppo-test-adaptive", None, max_epochs=2, logger=False)
    trainer.fit(module)
    # KL far below a huge target: the error clips at -0.2 and each iteration scales β by 1 - 0.2 · batch / horizon
    shrink = 1 - 0.2 * module.config.batch_size / 10.0
    assert module.kl_ctl.value == pytest.approx(cfg.ppo.kl_coef * shrink**2)


def test_ppo_models_run_without_dropout(stages):
    """SFT checkpoints carry attention dropout; in PPO an update's forward pass must match the rollout's."""
    module, soup = _module(*stages)
    assert load_causal_lm(soup.path).model.layers[0].self_attn.attention_dropout > 0  # the checkpoint has dropout
    module.actors.train()
    x = torch.randint(6, len(module.tokenizer), (4, 12))
    mask = torch.ones_like(x)
    with torch.no_grad():
        first = module.actors.policy(input_ids=x, attention_mask=mask).logits
        second = module.actors.policy(input_ids=x, attention_mask=mask).logits
    assert torch.equal(first, second)


def test_rollout_scored_a_few_rows_at_a_time_is_the_same(stages, monkeypatch):
    """Scoring the reference and values in row chunks (to bound full-vocabulary logits) changes no number."""
    from salsa.models import actors

    module, _ = _module(*stages)
    prompts = module.prompts[:8]
    whole = module.rollout(prompts, iteration=0)
    assert len(actors.row_chunks(8, 12, 100)) == 1
    monkeypatch.setattr(actors, "SCORING_BUDGET", 1)  # one row at a time
    monkeypatch.setattr(actors.row_chunks, "__defaults__", (1,))
    assert len(actors.row_chunks(8, 12, 100)) == 8
    chunked = module.rollout(prompts, iteration=0)
    for key in ("sequences", "logprobs", "values", "advantages", "returns"):
        torch.testing.assert_close(chunked["batch"][key], whole["batch"][key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "overrides, merged",
    [
        ((), False),  # the embedded tiny model: full weights, nothing to merge
        (("model=gemma2b",), False),  # nf4: a 4-bit base cannot take a merge
        (("model=gemma2b", "model.quant=none"), True),
        (("model=gemma2b", "model.quant=none", "ppo.merge_start=false"), False),
    ],
)
def test_merge_start_enters_the_ppo_key_only_where_it_applies(tmp_path, overrides, merged):
    from salsa.infra.cache import Entry
    from salsa.stages.ppo import stage_spec

    cfg = make_cfg(tmp_path, *overrides)
    entries = [Entry(stage, key, tmp_path, {}, reused=False) for stage, key in (("soup", "a"), ("rm", "b"))]
    spec, got = stage_spec(cfg, entries[0], entries[0], entries[1])
    assert got is merged
    assert "merge_start" not in spec["ppo"]  # runs that cannot merge keep the keys they had before the option
    assert spec.get("merged_start", False) is merged


@pytest.mark.parametrize("group", ["ppo", "grpo"])
def test_the_compiled_sampler_enters_keys_only_when_on(tmp_path, group):
    """Keys of runs that sample eagerly stay what they were before the option existed; a compiled sampler's
    rollouts may round differently, so they are another stage (and so is the evaluation that samples with it)."""
    from salsa.infra.cache import Entry
    from salsa.stages.ppo import stage_spec

    entries = [Entry(stage, key, tmp_path, {}, reused=False) for stage, key in (("soup", "a"), ("rm", "b"))]
    for on in (False, True):
        cfg = make_cfg(tmp_path, f"{group}.compile_sampler={str(on).lower()}", f"ppo.compile_sampler={str(on).lower()}")
        spec, _ = stage_spec(cfg, entries[0], entries[0], entries[1], group=group)
        assert "compile_sampler" not in spec[group] and spec.get("compiled_sampler", False) is on
        assert cfg.eval.compile_sampler is on  # evaluation samples the way PPO does


def test_compiled_ppo_runs_the_same_iterations(stages, tmp_path, monkeypatch):
    """`ppo.compile`: the same two iterations as eager PPO (same samples, statistics to float tolerance), with the
    compiled kernels written to the on-disk cache a second run would load."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from salsa.stages.ppo import compile_cache

    cfg, ctx, by_stage = stages
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what importing torch's compiler sets
    histories = {}
    for compiled in (False, True):
        module, _ = _module(cfg, ctx, by_stage, iterations=2)
        if compiled:
            compile_cache(tmp_path / "compile")
            module.actors.compile()
        trainer = ctx.trainer(tmp_path / f"ppo-{compiled}", None, max_epochs=2, logger=False)
        trainer.fit(module)
        histories[compiled] = module.history
    for eager, compiled in zip(histories[False], histories[True], strict=True):
        assert eager["ppo/response_length"] == compiled["ppo/response_length"]  # sampling is eager: same answers
        for key, value in eager.items():
            assert math.isclose(compiled[key], value, rel_tol=1e-3, abs_tol=1e-4), key
    assert any((tmp_path / "compile").rglob("*.py"))  # Inductor's generated kernels, kept for the next run


def test_compile_cache_lives_beside_the_stage_cache_unless_the_user_chose_one(tmp_path, monkeypatch):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from salsa.stages.ppo import compile_cache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # torch's own, set on import
    compile_cache(tmp_path / "a")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "a") and (tmp_path / "a").is_dir()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    compile_cache(tmp_path / "b")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
