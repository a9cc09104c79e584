"""Every option of every config group composes, and the composed config has the contracts' keys."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

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
