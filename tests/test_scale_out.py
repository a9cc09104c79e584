"""Scale-out configs: DDP/FSDP/DeepSpeed trainers, the SLURM launcher, which process is rank 0."""

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from salsa.infra.context import Context
from salsa.infra.distributed import is_global_zero, rank_name
from tests.conftest import CONF, make_cfg


@pytest.mark.parametrize(
    ("trainer", "strategy"), [("ddp", "ddp"), ("fsdp", "fsdp"), ("deepspeed", "deepspeed_stage_2")]
)
def test_trainer_strategies(tmp_path, trainer, strategy):
    cfg = make_cfg(tmp_path, f"trainer={trainer}")
    assert cfg.trainer.strategy == strategy and cfg.trainer.devices == 2
    assert cfg.trainer._target_ == "pytorch_lightning.Trainer"


def test_qlora_refuses_sharded_strategies(tmp_path):
    from salsa.validate import check_strategy

    cfg = make_cfg(tmp_path, "model=gemma2b", "model.name_or_path=/nowhere", "trainer=fsdp", "logger=none")
    with pytest.raises(ValueError, match="cannot shard a 4-bit base"):
        check_strategy(cfg)


def test_slurm_launcher_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=["hydra/launcher=submitit_slurm", "hydra.launcher.gpus_per_node=1", "experiment=paper_gemma2b"],
            return_hydra_config=True,
        )
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher") and cfg.hydra.launcher.gpus_per_node == 1


@pytest.mark.parametrize(
    ("env", "zero", "name"),
    [
        ({}, True, "0-0"),
        ({"LOCAL_RANK": "0", "NODE_RANK": "0", "WORLD_SIZE": "2"}, True, "0-0"),
        ({"LOCAL_RANK": "1", "WORLD_SIZE": "2"}, False, "0-1"),
        ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, False, "1-0"),
        ({"RANK": "3", "LOCAL_RANK": "1"}, False, "3"),
    ],
)
def test_rank_from_launcher_environment(monkeypatch, env, zero, name):
    for var in ("RANK", "NODE_RANK", "LOCAL_RANK", "SLURM_PROCID", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert is_global_zero() is zero and rank_name() == name


def test_other_ranks_build_in_scratch_and_publish_nothing(tmp_path, monkeypatch):
    """Without a process group yet (the first build), a non-zero rank trains in its own scratch directory, restores
    rank 0's checkpoint when rank 0 resumes, and never writes the cache's published entries or build log."""
    cfg = make_cfg(tmp_path, "logger=none", "extras.keep_rank_outputs=true")
    ctx = Context.from_cfg(cfg)
    spec = {"x": 1}
    from salsa.infra.cache import stage_key

    key = stage_key("sft", spec)
    resume = ctx.cache.root / "sft" / f"{key}.partial" / "checkpoints"
    resume.mkdir(parents=True)
    (resume / "last.ckpt").write_text("rank 0's checkpoint")
    monkeypatch.setenv("LOCAL_RANK", "1")
    seen = {}

    def build(work, run_id):
        seen["work"], seen["ckpt"] = work, (work / "checkpoints" / "last.ckpt").read_text()
        return {"metrics": {"val_loss": 1.5}}

    entry = ctx.build("sft", spec, build)
    assert seen["ckpt"] == "rank 0's checkpoint" and seen["work"].name == f"{key}.rank0-1"
    assert entry.path == seen["work"] and entry.manifest["metrics"] == {"val_loss": 1.5}
    assert ctx.cache.lookup("sft", key) is None and ctx.cache.builds() == []


@pytest.mark.parametrize("world", [1, 3, 8])
def test_plan_sampler_gives_every_process_rows(world, monkeypatch):
    """Each rank takes its slice of every planned batch; a last batch smaller than the world is left out, so no rank
    ever gets an empty batch (which crashed padding), and all ranks see the same number of batches."""
    from salsa.infra.training import PlanSampler, batch_plan

    plan = batch_plan(n=42, batch_size=8, epochs=1, seed=0)  # 5 batches of 8 and one of 2
    served = []
    for rank in range(world):
        sampler = PlanSampler(plan, chunk=100)
        monkeypatch.setattr(sampler, "_rank", lambda r=rank: (r, world))
        served.append(list(sampler))
        assert len(sampler) == len(served[-1])
    assert len({len(s) for s in served}) == 1
    assert all(batch for s in served for batch in s)
    covered = sorted(i for s in served for batch in s for i in batch)
    expected = sorted(i for b in plan if len(b) >= world for i in b)
    assert covered == expected


@pytest.fixture
def fake_deepspeed(monkeypatch):
    """Enough of the `deepspeed` package for Lightning to build its strategy object (the engine is never started)."""
    import logging
    import sys
    import types

    import pytorch_lightning.strategies.deepspeed as lds

    module = types.ModuleType("deepspeed")
    module.__version__ = "0.16.0"
    module.utils = types.SimpleNamespace(logging=types.SimpleNamespace(logger=logging.getLogger("fake-deepspeed")))
    monkeypatch.setitem(sys.modules, "deepspeed", module)
    monkeypatch.setattr(lds, "_DEEPSPEED_AVAILABLE", True)
    monkeypatch.setattr(lds, "_DEEPSPEED_GREATER_EQUAL_0_16", True, raising=False)


@pytest.mark.parametrize("name", ["deepspeed", "deepspeed_stage_2"])
def test_deepspeed_engine_clips_to_the_algorithms_max_grad_norm(fake_deepspeed, name):
    from types import SimpleNamespace

    from salsa.infra.distributed import deepspeed_strategy

    strategy = deepspeed_strategy(name, 0.7)
    assert strategy.config["zero_optimization"]["stage"] == 2
    # what Lightning does when it formats the engine's config: without our value it would write trainer's 0.0
    trainer = SimpleNamespace(accumulate_grad_batches=1, gradient_clip_val=None)
    strategy._lightning_module = SimpleNamespace(trainer=trainer)
    strategy.config["train_micro_batch_size_per_gpu"] = 1
    strategy._format_batch_size_and_grad_accum_config()
    assert strategy.config["gradient_clipping"] == 0.7


def test_online_stages_hand_their_clip_to_a_deepspeed_trainer(tmp_path, fake_deepspeed, monkeypatch):
    """`ctx.trainer(clip_norm=...)` builds the DeepSpeed strategy with the clip; other strategies ignore it."""
    from types import SimpleNamespace

    import hydra

    tracker = SimpleNamespace(lightning_logger=lambda run_id: False)
    built = {}
    monkeypatch.setattr(hydra.utils, "instantiate", lambda cfg, **kw: built.update(kw) or [])
    cfg = make_cfg(tmp_path, "trainer=deepspeed", "logger=none")
    ctx = Context(cfg, None, tracker)
    ctx.trainer(tmp_path, None, clip_norm=float(cfg.ppo.max_grad_norm), logger=False)
    assert built["strategy"].config["gradient_clipping"] == cfg.ppo.max_grad_norm
    built.clear()
    ctx = Context(make_cfg(tmp_path, "trainer=ddp", "logger=none"), None, tracker)
    ctx.trainer(tmp_path, None, clip_norm=1.0, logger=False)
    assert "strategy" not in built and "clip_norm" not in built


def test_deepspeed_strategy_refuses_other_names():
    from salsa.infra.distributed import deepspeed_strategy

    with pytest.raises(ValueError, match="not one of Lightning's DeepSpeed"):
        deepspeed_strategy("ddp", 1.0)
