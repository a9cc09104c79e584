"""`hparams_search=ppo_optuna`: Hydra's Optuna sweeper runs its trials through the real entry point, each one a
tracked pipeline run, and reports the best parameters."""

import os
import subprocess
import sys

import pytest
import yaml
from mlflow.tracking import MlflowClient

from salsa.cli import missing_sweeper
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_optuna_search_runs_trials_and_tracks_each(tmp_path):
    pytest.importorskip(
        "hydra_plugins.hydra_optuna_sweeper", reason='needs the optuna extra: pip install -e ".[optuna]"'
    )
    cmd = [
        sys.executable, str(ROOT / "src" / "train.py"), "hparams_search=ppo_optuna", "debug=default",
        "hydra.sweeper.n_trials=2", f"paths.log_dir={tmp_path}", "ref=sft",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Best parameters" in proc.stdout + proc.stderr
    (sweep,) = (tmp_path / "multiruns").iterdir()
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert 0.005 <= best["best_params"]["ppo.kl_coef"] <= 0.5 and 1e-5 <= best["best_params"]["ppo.lr"] <= 1e-3

    # tracking stays on under debug=default: one MLflow run per trial, with the trial's parameters and its metric
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("salsa").experiment_id])
    trials = [r for r in runs if "mlflow.parentRunId" not in r.data.tags and r.data.tags.get("kind") != "sweep"]
    assert len(trials) == 2
    kl = sorted(float(r.data.params["ppo.kl_coef"]) for r in trials)
    assert kl[0] != kl[1]  # the sampler chose different values
    values = [r.data.metrics["eval/win_rate_vs_sft"] for r in trials]
    assert best["best_value"] == max(values)


def test_missing_optuna_extra_is_one_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if "optuna" in name else real(name, *a))
    assert 'pip install -e ".[optuna]"' in missing_sweeper(["hparams_search=ppo_optuna"])
    assert missing_sweeper(["hparams_search=null"]) is None and missing_sweeper(["ppo.kl_coef=0.1"]) is None
