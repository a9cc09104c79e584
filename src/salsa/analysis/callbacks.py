"""Hydra callbacks (configured under `hydra.callbacks` in conf/hydra/default.yaml).

`SweepReport` runs once in the launching process after every job of a multirun has finished, whichever launcher
ran them (basic, joblib) and whichever sweeper chose them (basic, optuna).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("salsa")


class SweepReport(Callback):
    """Summarises a sweep from its jobs' `results.json` files, into the sweep dir and an MLflow run of its own.

    Writes `sweep_results.csv` (one row per job), `win_rates.csv` (ref × kl_coef) and `frontier.png` (gold and RM
    reward against KL to the reference, one curve per ref). With the MLflow logger they are also logged to a run
    tagged `kind=sweep`, next to the jobs' runs (which carry the same `sweep` tag). Switch it off with
    `~hydra.callbacks.sweep_report`.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        # heavy imports here: Hydra also instantiates callbacks in every job process
        from salsa.analysis.plots import frontier_figure, save_png
        from salsa.analysis.sweep import job_results, swept_params, win_rate_table
        from salsa.infra.tracking import Tracker, key_columns, view_state

        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = job_results(sweep_dir)
        if jobs.empty:
            log.warning("sweep %s: no job wrote results.json, nothing to summarise", sweep_dir)
            return
        files = [sweep_dir / "sweep_results.csv", sweep_dir / "win_rates.csv"]
        jobs.to_csv(files[0], index=False)
        win_rate_table(jobs).to_csv(files[1])
        if jobs["kl_to_ref"].notna().any():
            files.append(save_png(frontier_figure(jobs), sweep_dir / "frontier.png"))
        log.info("sweep summary written to %s", sweep_dir)

        tracker = Tracker.from_cfg(config)
        tags = {"kind": "sweep", "sweep": str(sweep_dir.resolve())}  # the jobs' runs carry the same `sweep` tag
        with tracker.run(f"{config.task_name}-sweep-{sweep_dir.name}", tags=tags) as run_id:
            tracker.log_metrics(run_id, {"jobs": len(jobs)})
            for f in files:
                tracker.log_artifact(run_id, f, "plots" if f.suffix == ".png" else None)
        # a saved view of the runs table with this sweep's jobs, their results and what they vary
        columns = key_columns(swept_params(sweep_dir))
        where = f"tags.sweep = '{sweep_dir.resolve()}' and tags.kind = 'pipeline'"
        view = f"sweep-{sweep_dir.name}"
        tracker.save_view(view, f"sweep {sweep_dir.name}", view_state(columns, where, "metrics.`eval/win_rate_vs_sft`"))
        if tracker.enabled:
            log.info("compare the sweep's runs: mlflow ui --backend-store-uri %s, then open %s",
                     tracker.tracking_uri, tracker.ui_url(view))  # fmt: skip
