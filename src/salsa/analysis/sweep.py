"""Tables of a sweep's runs: one row per pipeline run, read from a sweep directory or from MLflow.

Both sources give the same columns — `ref`, `kl_coef` and the results (`win_rate_vs_sft`, `kl_to_ref`, ...) — so
the frontier plot and the win-rate table work on either.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from salsa.infra.tracking import flatten, logged_path

SETTING = ["ref", "kl_coef"]  # what a `kl_coef × ref` sweep varies


def finished_jobs(sweep_dir: str | Path) -> Iterator[tuple[Path, DictConfig, dict[str, Any]]]:
    """(job dir, resolved config, results) of each job of a Hydra sweep dir that finished (wrote both files)."""
    for results_file in sorted(Path(sweep_dir).glob("*/results.json")):
        config_file = results_file.with_name("resolved_config.yaml")
        if config_file.is_file():
            yield results_file.parent, OmegaConf.load(config_file), json.loads(results_file.read_text())


def job_results(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per finished job of a Hydra sweep dir (`<n>/results.json` next to `<n>/resolved_config.yaml`)."""
    rows = []
    for job, cfg, results in finished_jobs(sweep_dir):
        row = {"job": job.name, "ref": cfg.ref.name, "kl_coef": float(cfg.ppo.kl_coef)}
        row.update({k: v for k, v in results.items() if k not in row and not isinstance(v, dict | list)})
        rows.append(row)
    return pd.DataFrame(rows, columns=None if rows else ["job", *SETTING])


def swept_params(sweep_dir: str | Path) -> list[str]:
    """The config keys (MLflow param names) a sweep's jobs differ in, from their command-line overrides.

    `ppo.kl_coef=0.02` names itself; a config group choice (`ref=sft`) is shown by its `name` field (`ref.name`),
    or by the fields it changes when it has none.
    """
    jobs = sorted(p for p in Path(sweep_dir).iterdir() if (p / ".hydra" / "overrides.yaml").is_file())
    overrides: dict[str, list[str]] = {}
    configs = []
    for job in jobs:
        for override in OmegaConf.load(job / ".hydra" / "overrides.yaml"):
            key, _, value = str(override).lstrip("+~").partition("=")
            overrides.setdefault(key, []).append(value)
        if (job / "resolved_config.yaml").is_file():
            configs.append(flatten(OmegaConf.to_container(OmegaConf.load(job / "resolved_config.yaml"))))
    keys: list[str] = []
    for key, values in overrides.items():
        if len(set(values)) < 2 and len(values) == len(jobs):  # the same in every job
            continue
        if "." in key:
            keys.append(key)
        elif configs and f"{key}.name" in configs[0]:
            keys.append(f"{key}.name")
        else:
            fields = sorted({k for c in configs for k in c if k.startswith(f"{key}.")})
            keys.extend(k for k in fields if len({str(c.get(k)) for c in configs}) > 1)
    return keys


def mlflow_results(runs: pd.DataFrame, log_dir: str | Path | None = None) -> pd.DataFrame:
    """One row per pipeline run from `mlflow.search_runs` output: parent runs that logged `eval/` metrics.

    Stage child runs, sweep summaries and landscape runs are left out; metric columns lose their `metrics.eval/`
    prefix. Rows are in start order (oldest first). `sweep` is the tag as stored (relative to the log dir), or, given
    the runs' `log_dir`, the sweep's directory.
    """
    columns = ["run_id", "start_time", "sweep", *SETTING]
    if runs.empty or "metrics.eval/win_rate_vs_sft" not in runs:
        return pd.DataFrame(columns=columns)
    parent = runs["tags.mlflow.parentRunId"].isna() if "tags.mlflow.parentRunId" in runs else True
    jobs = runs[parent & runs["metrics.eval/win_rate_vs_sft"].notna()].sort_values("start_time")
    sweeps = jobs.get("tags.sweep")
    if log_dir is not None and sweeps is not None:
        sweeps = sweeps.map(lambda tag: str(logged_path(tag, log_dir)) if isinstance(tag, str) else tag)
    out = pd.DataFrame(
        {
            "run_id": jobs["run_id"],
            "start_time": jobs["start_time"],
            "sweep": sweeps,
            "ref": jobs["params.ref.name"],
            "kl_coef": jobs["params.ppo.kl_coef"].astype(float),
        }
    )
    for col in jobs.columns:
        if col.startswith("metrics.eval/"):
            out[col.removeprefix("metrics.eval/")] = jobs[col]
    return out.reset_index(drop=True)


def latest_per_setting(jobs: pd.DataFrame) -> pd.DataFrame:
    """The last row of each (ref, kl_coef): a rerun of a setting replaces the earlier one."""
    return jobs.drop_duplicates(subset=SETTING, keep="last").reset_index(drop=True)


def win_rate_table(jobs: pd.DataFrame, metric: str = "win_rate_vs_sft") -> pd.DataFrame:
    """`metric` with one row per `ref` and one column per `kl_coef` (the last run of each setting)."""
    latest = latest_per_setting(jobs)
    return latest.pivot(index="ref", columns="kl_coef", values=metric).sort_index().sort_index(axis=1)
