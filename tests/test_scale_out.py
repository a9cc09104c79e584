"""Scale-out configs: DDP/FSDP/FSDP2/DeepSpeed trainers, the SLURM launcher, which process is rank 0."""

from __future__ import annotations

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


@pytest.mark.parametrize("trainer", ["fsdp", "fsdp2", "deepspeed"])
def test_qlora_refuses_sharded_strategies(tmp_path, trainer):
    from salsa.validate import check_strategy

    cfg = make_cfg(tmp_path, "model=gemma2b", "model.name_or_path=/nowhere", f"trainer={trainer}", "logger=none")
    with pytest.raises(ValueError, match="cannot shard a 4-bit base"):
        check_strategy(cfg)


def test_fsdp2_is_lightnings_model_parallel_strategy(tmp_path):
    """trainer=fsdp2: every process one data-parallel replica (no tensor parallelism), resume checkpoints in one file
    (what `AtomicLastCheckpoint` renames into place and `checkpoint_position` reads)."""
    import hydra
    from pytorch_lightning.strategies import ModelParallelStrategy

    from salsa.config import strategy_name, world_size

    cfg = make_cfg(tmp_path, "trainer=fsdp2", "trainer.devices=4")
    strategy = hydra.utils.instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, ModelParallelStrategy)
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (4, 1)
    assert strategy._save_distributed_checkpoint is False
    assert strategy_name(cfg.trainer) == "fsdp2" and world_size(cfg.trainer) == 4
    assert [strategy_name(make_cfg(tmp_path, f"trainer={t}").trainer) for t in ("default", "ddp", "fsdp")] == [
        "", "ddp", "fsdp",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "overrides",
    [("stage=sft",), ("stage=rm",), ("algo=ppo",), ("algo=grpo",), ("algo=rloo",), ("algo=dpo",), ("ref.update=ema",),
     ("trainer.num_nodes=2", "trainer.strategy.data_parallel_size=4")],
)  # fmt: skip
def test_fsdp2_runs_every_stage_of_the_embedded_model(tmp_path, overrides):
    from salsa.validate import check_strategy

    check_strategy(make_cfg(tmp_path, "trainer=fsdp2", *overrides))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("model=gemma2b", "model.quant=none", "model.name_or_path=/nowhere"), "trainer.strategy: fsdp2 shards "
         "full-weight models (the embedded model, model.finetune=full); a checkpoint under model.finetune=lora trains "
         "adapters on one frozen base: use trainer=ddp"),
        (("ppo.compile=true",), "ppo.compile: compiles unsharded models only"),
        (("trainer.strategy.tensor_parallel_size=2",), "trainer.strategy.tensor_parallel_size: is 2"),
        (("trainer.num_nodes=2",), "trainer.strategy.data_parallel_size: is 2, and every one of the 4 processes"),
    ],
)  # fmt: skip
def test_fsdp2_refusals(tmp_path, overrides, message):
    from salsa.validate import check_strategy

    with pytest.raises(ValueError) as refused:
        check_strategy(make_cfg(tmp_path, "trainer=fsdp2", *overrides))
    assert str(refused.value).startswith(message)


@pytest.mark.parametrize("algo", ["ppo", "grpo", "rloo"])
def test_fsdp1_refuses_manual_optimisation_naming_the_strategies_that_run_it(tmp_path, algo):
    from salsa.validate import check_strategy

    with pytest.raises(ValueError) as refused:
        check_strategy(make_cfg(tmp_path, "trainer=fsdp", f"algo={algo}"))
    assert str(refused.value).startswith(f"trainer.strategy: fsdp cannot run {algo.upper()}")
    assert "use trainer=fsdp2 or trainer=ddp" in str(refused.value)


SLICED_BATCHES = ("model.pretrain.batch_size", "sft.batch_size", "rm.batch_size", "dpo.batch_size")


@pytest.mark.parametrize("trainer", ["ddp", "fsdp2"])
@pytest.mark.parametrize("key", SLICED_BATCHES)
def test_batches_split_over_three_processes_or_are_refused(tmp_path, trainer, key):
    """Three processes: a batch that every process takes a slice of must be a multiple of 3, refused up front
    naming the key; PPO, GRPO and RLOO batches are per process and any size runs."""
    from salsa.config import check_groups
    from salsa.errors import ConfigError

    three = (f"trainer={trainer}", "trainer.devices=3", "trainer.accelerator=cpu", "algo=dpo")
    sizes = dict.fromkeys(SLICED_BATCHES, 24)
    per_process = ("ppo.batch_size=5", "grpo.batch_size=5", "rloo.batch_size=5", "ppo.num_minibatches=1")
    check_groups(make_cfg(tmp_path, *three, *(f"{k}={v}" for k, v in sizes.items()), *per_process))

    sizes[key] = 16  # 5 rows for two processes and 6 for the third would weigh rows unequally
    with pytest.raises(ConfigError) as refused:
        check_groups(make_cfg(tmp_path, *three, *(f"{k}={v}" for k, v in sizes.items())))
    assert str(refused.value) == (
        f"{key}: 16 does not split evenly over the 3 processes of trainer={trainer} (devices × num_nodes): use a "
        "multiple of 3"
    )
    if key == "dpo.batch_size":  # only DPO's runs take DPO batches
        check_groups(make_cfg(tmp_path, *three[:-1], "algo=ppo", *(f"{k}={v}" for k, v in sizes.items())))


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
