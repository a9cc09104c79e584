"""Shared test helpers: compose the real Hydra config, shrunk to debug sizes, into a temp log dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from salsa.cli import register

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
os.environ.setdefault("SALSA_ROOT", str(ROOT))
register()


def make_cfg(log_dir: Path | str, *overrides: str, debug: bool = True, config_name: str = "train") -> DictConfig:
    """The composed `train` (or `config_name`) config with `paths.log_dir` in a temp dir (debug sizes unless
    debug=False)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name=config_name,
            overrides=[f"paths.log_dir={log_dir}", *(["debug=default"] if debug else []), *overrides],
            return_hydra_config=True,
        )
    out = Path(log_dir) / "out"
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.set_readonly(cfg.hydra, False)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg.hydra  # as under @hydra.main: the job's config has no hydra node
    return cfg


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One log dir (and stage cache) shared by tests that only need debug-size stages built once."""
    return tmp_path_factory.mktemp("shared_logs")


@pytest.fixture(scope="session")
def upstream(shared_cache) -> Path:
    """The shared log dir with base, SFT ingredients 0-2, soup3 and the RM at debug sizes built (once per session)."""
    from salsa.infra.context import Context
    from salsa.pipeline import run

    cfg = make_cfg(shared_cache, "stage=rm")
    run(cfg, Context.from_cfg(cfg))
    return shared_cache


def with_upstream(upstream: Path, log_dir: Path) -> Path:
    """`log_dir` with a copy of the upstream stage cache, so a test builds only the stages it is about."""
    import shutil

    shutil.copytree(upstream / "cache", log_dir / "cache", ignore=shutil.ignore_patterns("*.lock"), dirs_exist_ok=True)
    return log_dir


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: skipped, with the reason, everywhere else."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
