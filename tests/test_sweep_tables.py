"""Sweep tables from a sweep dir and from MLflow's search_runs frame; the win-rate pivot."""

import json
import math

import pandas as pd
import pytest
from omegaconf import OmegaConf

from salsa.analysis.sweep import job_results, latest_per_setting, mlflow_results, win_rate_table


def write_job(sweep_dir, n, ref, kl_coef, win_rate, kl_to_ref):
    job = sweep_dir / str(n)
    job.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"ref": {"name": ref}, "ppo": {"kl_coef": kl_coef}}), job / "resolved_config.yaml")
    results = {"win_rate_vs_sft": win_rate, "kl_to_ref": kl_to_ref, "judge": "gold", "sft_val_loss": {"0": 1.0}}
    (job / "results.json").write_text(json.dumps(results))


def test_job_results_and_win_rate_table(tmp_path):
    write_job(tmp_path, 0, "sft", 0.01, 0.60, 3.0)
    write_job(tmp_path, 1, "soup3", 0.01, 0.70, 4.0)
    write_job(tmp_path, 2, "sft", 0.2, 0.55, 1.0)
    (tmp_path / "3").mkdir()  # a job that failed before writing results
    jobs = job_results(tmp_path)
    assert list(jobs["job"]) == ["0", "1", "2"]
    assert list(jobs["kl_coef"]) == [0.01, 0.01, 0.2] and "sft_val_loss" not in jobs  # nested results left out
    table = win_rate_table(jobs)
    assert list(table.index) == ["sft", "soup3"] and list(table.columns) == [0.01, 0.2]
    assert table.loc["sft", 0.01] == 0.60 and table.loc["soup3", 0.01] == 0.70 and table.loc["sft", 0.2] == 0.55
    assert math.isnan(table.loc["soup3", 0.2])  # not run


def test_mlflow_results_keeps_pipeline_runs_only():
    runs = pd.DataFrame(
        {
            "run_id": ["job-new", "stage", "sweep", "job-old"],
            "start_time": pd.to_datetime([3, 2, 4, 1], unit="s"),
            "tags.mlflow.parentRunId": [None, "job-new", None, None],
            "tags.sweep": ["/s", None, "/s", "/s"],
            "params.ref.name": ["soup3", None, None, "soup3"],
            "params.ppo.kl_coef": ["0.05", None, None, "0.05"],
            "metrics.eval/win_rate_vs_sft": [0.8, None, None, 0.6],
            "metrics.final/val_loss": [None, 1.0, None, None],
        }
    )
    jobs = mlflow_results(runs)
    assert list(jobs["run_id"]) == ["job-old", "job-new"]  # oldest first; stage and sweep runs left out
    assert list(jobs["kl_coef"]) == [0.05, 0.05] and list(jobs["win_rate_vs_sft"]) == [0.6, 0.8]
    assert list(latest_per_setting(jobs)["run_id"]) == ["job-new"]
    assert win_rate_table(jobs).loc["soup3", 0.05] == pytest.approx(0.8)  # the rerun replaces the earlier run


def test_mlflow_results_of_an_empty_experiment():
    assert mlflow_results(pd.DataFrame()).empty
