"""Run names and saved views that make MLflow's UI readable, from their pure parts."""

import pytest
from omegaconf import OmegaConf

from salsa.analysis.sweep import swept_params
from salsa.infra.tracking import key_columns, run_name, view_state


def test_run_name_is_the_reference_and_the_overrides_that_matter():
    overrides = ["paths.log_dir=/tmp/x", "debug=default", "logger=mlflow", "extras.torch_threads=1",
                 "ppo.kl_coef=0.012078386012648110", "ref=sft", "soup=greedy", "hydra.launcher.n_jobs=2"]  # fmt: skip
    assert run_name(overrides, "sft") == "ref=sft ppo.kl_coef=0.01208 soup=greedy"
    assert run_name([], "soup3") == "ref=soup3"
    assert run_name(["ppo.lr=1e-4", "+ppo.extra=2"], "soup3") == "ref=soup3 ppo.lr=1e-4 ppo.extra=2"


def test_view_puts_results_first_then_settings():
    columns = key_columns(["ppo.lr"])
    state = view_state(columns, "tags.kind = 'pipeline'", "metrics.`eval/win_rate_vs_sft`")
    assert state["selectedColumns"] == state["columnOrder"] == columns
    assert columns[0] == "metrics.`eval/win_rate_vs_sft`"
    assert columns[-4:] == ["params.`ppo.lr`", "params.`algo.name`", "params.`ref.name`", "params.`ppo.kl_coef`"]
    assert key_columns(["ppo.kl_coef"])[-3:] == ["params.`ppo.kl_coef`", "params.`algo.name`", "params.`ref.name`"]
    assert set(state["columnWidths"]) == {c for c in columns if c.startswith("metrics.")}
    assert state["searchFilter"] == "tags.kind = 'pipeline'" and state["orderByAsc"] is False


@pytest.fixture
def sweep_dir(tmp_path):
    jobs = [(["ppo.kl_coef=0.01", "ref=sft", "debug=default"], {"ref": {"name": "sft"}, "ppo": {"kl_coef": 0.01}}),
            (["ppo.kl_coef=0.2", "ref=soup3", "debug=default"], {"ref": {"name": "soup3"}, "ppo": {"kl_coef": 0.2}}),
            (["ppo.kl_coef=0.2", "soup=greedy", "debug=default"],
             {"ref": {"name": "soup3"}, "ppo": {"kl_coef": 0.2}, "soup": {"method": "greedy"}})]  # fmt: skip
    for n, (overrides, cfg) in enumerate(jobs):
        (tmp_path / str(n) / ".hydra").mkdir(parents=True)
        OmegaConf.save(OmegaConf.create(overrides), tmp_path / str(n) / ".hydra" / "overrides.yaml")
        OmegaConf.save(OmegaConf.create(cfg), tmp_path / str(n) / "resolved_config.yaml")
    return tmp_path


def test_swept_params_are_the_overrides_that_differ(sweep_dir):
    # a value override names itself; a group choice shows as its name field, or the fields it changes
    assert swept_params(sweep_dir) == ["ppo.kl_coef", "ref.name", "soup.method"]
