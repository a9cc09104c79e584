"""Every option of every config group composes, and the composed config has the contracts' keys."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from salsa.cli import unique_dir
from tests.conftest import CONF, make_cfg

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in {"hydra", "paths", "extras"})
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF / g).glob("*.yaml"))]


def test_groups_exist():
    for group in ("model", "data", "sft", "soup", "ref", "trainer", "logger", "debug", "experiment"):
        assert (CONF / group).is_dir(), group
    assert {f.stem for f in (CONF / "ref").glob("*.yaml")} >= {"sft", "other", "soup2", "soup3"}


@pytest.mark.parametrize(("group", "option"), OPTIONS)
def test_option_composes(tmp_path, group, option):
    cfg = make_cfg(tmp_path, f"{group}={option}", debug=(group != "debug"))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["paths"]["log_dir"] == str(tmp_path)
    assert resolved["paths"]["cache_dir"] == str(Path(tmp_path) / "cache")


def test_defaults(tmp_path):
    cfg = make_cfg(tmp_path, debug=False)
    assert cfg.model.name == "tiny" and cfg.data.name == "synthetic" and cfg.ref.name == "soup3"
    assert cfg.logger.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert cfg.stage == "eval"


def _claim(path: str) -> str:
    return unique_dir(path)


def test_run_dirs_are_unique_across_processes(tmp_path):
    """Eight processes asking for one run directory at once get eight different ones, named stem, stem_2, ..."""
    from concurrent.futures import ProcessPoolExecutor

    stem = str(tmp_path / "runs" / "2026-01-01_00-00-00")
    with ProcessPoolExecutor(4) as pool:
        got = list(pool.map(_claim, [stem] * 8))
    assert sorted(got) == sorted([stem] + [f"{stem}_{n}" for n in range(2, 9)])


def test_run_dir_is_resolved_once_per_config(tmp_path):
    """Hydra reads `hydra.run.dir` more than once; the resolver is cached, so a run never claims a second dir."""
    cfg = OmegaConf.create({"dir": f"${{salsa.unique_dir:{tmp_path}/run}}"})
    assert cfg.dir == cfg.dir == str(tmp_path / "run")
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
