"""MLflow tracking: one parent run per pipeline invocation, one child run per stage that trains.

Only `MlflowClient` calls with explicit run ids are used (no global active run), so parallel jobs and the stages'
Lightning loggers never step on each other.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

PARENT_TAG = "mlflow.parentRunId"


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def _store_lock(tracking_uri: str):
    """A file lock next to a sqlite store (a no-op for other stores)."""
    if not tracking_uri.startswith("sqlite:///"):
        return nullcontext()
    db = Path(tracking_uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(db) + ".lock")


class Tracker:
    """MLflow when `enabled`, otherwise a no-op with the same interface."""

    def __init__(self, tracking_uri: str | None, experiment: str = "salsa", artifact_dir: str | None = None):
        self.enabled = bool(tracking_uri)
        self.tracking_uri = tracking_uri
        self.parent_id: str | None = None
        self.experiment_id: str | None = None
        if not self.enabled:
            return
        from mlflow.tracking import MlflowClient

        # parallel jobs starting on a new sqlite store would race to create its tables and the experiment
        with _store_lock(tracking_uri):
            self.client = MlflowClient(tracking_uri=tracking_uri)
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                location = Path(artifact_dir).resolve().as_uri() if artifact_dir else None
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
            else:
                self.experiment_id = exp.experiment_id

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> Tracker:
        lg = cfg.get("logger")
        if not lg or lg.get("name") != "mlflow":
            return cls(None)
        Path(cfg.paths.log_dir).mkdir(parents=True, exist_ok=True)
        return cls(lg.tracking_uri, lg.experiment_name, lg.get("artifact_location"))

    # -- runs ----------------------------------------------------------------------------------------------------
    def start_parent(self, name: str, cfg: DictConfig | None = None, tags: dict[str, str] | None = None) -> str | None:
        if not self.enabled:
            return None
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags or {})
        self.parent_id = run.info.run_id
        if cfg is not None:
            self.log_params(self.parent_id, OmegaConf.to_container(cfg, resolve=True))
        return self.parent_id

    def end_parent(self, status: str = "FINISHED") -> None:
        if self.enabled and self.parent_id:
            self.client.set_terminated(self.parent_id, status)

    @contextmanager
    def child(self, stage: str, key: str) -> Iterator[str | None]:
        """A child run of the parent for one stage build; FAILED if the build raises."""
        if not self.enabled:
            yield None
            return
        tags = {"stage": stage, "cache_key": key}
        if self.parent_id:
            tags[PARENT_TAG] = self.parent_id
        run = self.client.create_run(self.experiment_id, run_name=f"{stage}-{key[:8]}", tags=tags)
        try:
            yield run.info.run_id
        except BaseException:
            self.client.set_terminated(run.info.run_id, "FAILED")
            raise
        self.client.set_terminated(run.info.run_id, "FINISHED")

    # -- logging -------------------------------------------------------------------------------------------------
    def log_params(self, run_id: str | None, params: Mapping[str, Any]) -> None:
        if not (self.enabled and run_id):
            return
        from mlflow.entities import Param

        flat = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(flat), 100):
            self.client.log_batch(run_id, params=flat[i : i + 100])

    def log_metrics(self, run_id: str | None, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not (self.enabled and run_id):
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        if items:
            self.client.log_batch(run_id, metrics=items)

    def set_tags(self, run_id: str | None, tags: Mapping[str, Any]) -> None:
        if self.enabled and run_id:
            for k, v in tags.items():
                self.client.set_tag(run_id, k, str(v))

    def log_artifact(self, run_id: str | None, path: str | os.PathLike, subdir: str | None = None) -> None:
        if self.enabled and run_id and Path(path).exists():
            self.client.log_artifact(run_id, str(path), subdir)

    def lightning_logger(self, run_id: str | None):
        """A Lightning MLFlowLogger writing into an existing child run (or False when tracking is off)."""
        if not (self.enabled and run_id):
            return False
        from pytorch_lightning.loggers import MLFlowLogger

        return MLFlowLogger(tracking_uri=self.tracking_uri, run_id=run_id, log_model=False)
