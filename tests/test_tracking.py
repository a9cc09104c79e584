"""Run names and saved views that make MLflow's UI readable, from their pure parts; paths stored relative to the log
dir."""

import json

import pandas as pd
import pytest
from omegaconf import OmegaConf

from salsa.analysis.sweep import mlflow_results, swept_params
from salsa.infra.tracking import (
    Tracker,
    key_columns,
    logged_path,
    relative_filter,
    relative_to_log_dir,
    run_name,
    view_state,
)


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


def test_paths_under_the_log_dir_are_stored_relative_to_it():
    assert relative_to_log_dir("/x/logs/multiruns/2026-01-01_00-00-00", "/x/logs") == "multiruns/2026-01-01_00-00-00"
    assert relative_to_log_dir("/x/logs", "/x/logs/") == "."
    assert relative_to_log_dir("sqlite:////x/logs/mlflow.db", "/x/logs") == "sqlite:///mlflow.db"
    # a path elsewhere stays absolute: moving the log dir does not move it
    for value in ("/x/logs2/a", "/x/logs/../code", "/x", "soup3", "0.02", "sqlite:///mlflow.db"):
        assert relative_to_log_dir(value, "/x/logs") == value
    where = "tags.sweep = '/x/logs/multiruns/a' and tags.kind = 'pipeline'"
    assert relative_filter(where, "/x/logs") == "tags.sweep = 'multiruns/a' and tags.kind = 'pipeline'"
    # readers: a stored path under the log dir, and an absolute one (an older store's) as it is
    assert logged_path("multiruns/a", "/y/logs").as_posix() == "/y/logs/multiruns/a"
    assert logged_path("/x/logs/multiruns/a", "/y/logs").as_posix() == "/x/logs/multiruns/a"
    runs = pd.DataFrame(
        {
            "run_id": ["new", "old"],
            "start_time": pd.to_datetime([2, 1], unit="s"),
            "tags.sweep": ["multiruns/a", "/x/logs/multiruns/b"],
            "params.ref.name": ["sft", "sft"],
            "params.ppo.kl_coef": ["0.2", "0.2"],
            "metrics.eval/win_rate_vs_sft": [0.5, 0.6],
        }
    )
    assert list(mlflow_results(runs)["sweep"]) == ["/x/logs/multiruns/b", "multiruns/a"]
    assert list(mlflow_results(runs, "/y/logs")["sweep"]) == ["/x/logs/multiruns/b", "/y/logs/multiruns/a"]


def test_tracker_writes_no_path_of_the_log_dir(tmp_path):
    """Tags, params and a saved view of a run in a sweep name the log dir's files relative to it, and the view's
    filter still selects the run."""
    log_dir = tmp_path / "logs"
    sweep = log_dir / "multiruns" / "2026-01-01_00-00-00"
    uri = f"sqlite:///{log_dir}/mlflow.db"
    tracker = Tracker(uri, "salsa", str(log_dir / "mlartifacts"), str(log_dir))
    paths = {"root_dir": str(tmp_path), "log_dir": str(log_dir), "cache_dir": str(log_dir / "cache")}
    cfg = OmegaConf.create({"paths": paths, "logger": {"tracking_uri": uri}, "ppo": {"kl_coef": 0.02}})
    with tracker.run("job", cfg, {"kind": "pipeline", "sweep": str(sweep), "output_dir": str(sweep / "0")}) as run_id:
        tracker.set_tags(run_id, {"checkpoint": log_dir / "cache" / "sft" / "abc"})
    tracker.save_view("sweep-a", "sweep a", view_state(key_columns(), f"tags.sweep = '{sweep}'"))

    run = tracker.client.get_run(run_id)
    assert run.data.tags["sweep"] == "multiruns/2026-01-01_00-00-00" and run.data.tags["checkpoint"] == "cache/sft/abc"
    assert run.data.tags["output_dir"] == "multiruns/2026-01-01_00-00-00/0"
    assert logged_path(run.data.tags["sweep"], log_dir) == sweep
    params = {k: v for k, v in run.data.params.items() if k.startswith(("paths.", "logger."))}
    assert params == {"paths.root_dir": str(tmp_path), "paths.log_dir": ".", "paths.cache_dir": "cache",
                      "logger.tracking_uri": "sqlite:///mlflow.db"}  # fmt: skip
    views = tracker.client.get_experiment(tracker.experiment_id).tags
    stored = [*run.data.tags.values(), *run.data.params.values(), *views.values()]
    assert not [v for v in stored if str(log_dir) in v]
    where = json.loads(json.loads(views["mlflow.sharedViewState.sweep-a"])["state"])["searchFilter"]
    assert [r.info.run_id for r in tracker.client.search_runs([tracker.experiment_id], where)] == [run_id]
