"""MLflow tracking: one parent run per pipeline invocation, one child run per stage that trains.

Only `MlflowClient` calls with explicit run ids are used (no global active run), so parallel jobs and the stages'
Lightning loggers never step on each other. Paths under `paths.log_dir` are stored relative to it (the `sweep` tag is
`multiruns/<date>_<time>`), so a moved or copied log dir still matches its store; `logged_path` reads them back.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

PARENT_TAG = "mlflow.parentRunId"
# MLflow 3's UI opens an experiment as GenAI (traces) or as model training (runs) by this experiment tag
KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
# the UI keeps its saved views of the runs table (columns, filter, sort) as experiment tags under this prefix
VIEW_TAG = "mlflow.sharedViewState."
RESULTS_VIEW = "salsa-results"
# what a person comparing runs looks at first: the judged results, then what distinguishes the runs
KEY_METRICS = ("win_rate_vs_sft", "win_rate_vs_ppo", "gold_reward", "rm_reward", "kl_to_ref")
KEY_PARAMS = ("algo.name", "ref.name", "ppo.kl_coef")
# overrides that say where or how a run ran, not what it is: left out of run names
NAME_EXCLUDES = ("paths.", "extras.", "logger", "hydra", "trainer", "debug", "stage", "task_name")
SQLITE = "sqlite:///"  # the store's URI (`logger.tracking_uri`, a param): its file is a path like any other
FILTER_LITERAL = re.compile(r"'([^']*)'")  # a quoted value of a search filter: `tags.sweep = '<dir>'`


def relative_to_log_dir(value: str, log_dir: str | os.PathLike) -> str:
    """`value` with an absolute path under `log_dir` (the whole value, or the file of a `sqlite:///` URI) written
    relative to it (`multiruns/<date>_<time>`; `.` for the log dir itself), so the store names no machine's layout;
    anything else (a path outside the log dir, a name, a number) as it is."""
    scheme = SQLITE if value.startswith(SQLITE) else ""
    path = value[len(scheme) :]
    if not os.path.isabs(path):
        return value
    # as written, then with symlinks resolved (a sweep dir is tagged resolved; /tmp may be a link)
    for resolve in (os.path.abspath, os.path.realpath):
        try:
            return scheme + Path(resolve(path)).relative_to(resolve(log_dir)).as_posix()
        except ValueError:
            continue
    return value


def relative_filter(search_filter: str, log_dir: str | os.PathLike) -> str:
    """A search filter whose quoted values are written as the tags they compare with (`relative_to_log_dir`)."""
    return FILTER_LITERAL.sub(lambda m: f"'{relative_to_log_dir(m[1], log_dir)}'", search_filter)


def logged_path(value: str, log_dir: str | os.PathLike) -> Path:
    """The path a tag or param names: a relative one (as stored) under `log_dir`; an absolute one (a path outside the
    log dir, or a store written before paths were stored relative) as it is."""
    return Path(log_dir) / value


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


def run_name(overrides: Sequence[str], ref: str) -> str:
    """A run's name in the UI: its reference, then the command-line overrides that make it differ from others
    (`ref=soup3 ppo.kl_coef=0.02`); long floats (Optuna's) are shortened to 4 significant digits."""
    parts = [f"ref={ref}"]
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key == "ref" or key.startswith(NAME_EXCLUDES):
            continue
        try:
            number = float(value)
            if "." in value and len(value) > 8:
                value = f"{number:.4g}"
        except ValueError:
            pass
        parts.append(f"{key}={value}")
    return " ".join(parts)


def view_state(
    columns: Sequence[str], search_filter: str = "", order_by: str = "attributes.start_time", ascending: bool = False
) -> dict[str, Any]:
    """A saved view of MLflow's runs table: the selected columns (`metrics.`name``, `params.`name``) in this order,
    a search filter and a sort. Fields the UI does not find in a view keep their defaults."""
    metric_width = 140  # wide enough for `eval/win_rate_vs_sft`, narrow enough that the params stay in sight
    return {
        "searchFilter": search_filter,
        "orderByKey": order_by,
        "orderByAsc": ascending,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "datasetsFilter": [],
        "modelVersionFilter": "All Runs",
        "selectedColumns": list(columns),
        "columnOrder": list(columns),
        "columnWidths": {c: metric_width for c in columns if c.startswith("metrics.")},
        "runsHiddenMode": "FIRST_10_RUNS",
        "viewMaximized": False,
        "runListHidden": False,
        "isAccordionReordered": False,
        "useGroupedValuesInCharts": True,
        "hideEmptyCharts": True,
        "groupBy": None,
        "groupsExpanded": {},
        "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""},
    }


def key_columns(params: Sequence[str] = ()) -> list[str]:
    """The results first, then `params` (e.g. what a sweep varies), then the reference and KL coefficient."""
    params = [*params, *(p for p in KEY_PARAMS if p not in params)]
    return [f"metrics.`eval/{m}`" for m in KEY_METRICS] + [f"params.`{p}`" for p in params]


class Tracker:
    """MLflow when `enabled`, otherwise a no-op with the same interface."""

    def __init__(
        self,
        tracking_uri: str | None,
        experiment: str = "salsa",
        artifact_dir: str | None = None,
        log_dir: str | os.PathLike | None = None,
    ):
        self.enabled = bool(tracking_uri)
        self.tracking_uri = tracking_uri
        self.log_dir = os.path.abspath(log_dir) if log_dir else None  # paths under it are stored relative to it
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
            if exp is None or KIND_TAG not in exp.tags:
                self.client.set_experiment_tag(self.experiment_id, KIND_TAG, TRAINING_KIND)
                self.save_view(RESULTS_VIEW, "salsa results", view_state(key_columns(), "tags.kind = 'pipeline'"))

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> Tracker:
        lg = cfg.get("logger")
        if not lg or lg.get("name") != "mlflow":
            return cls(None)
        Path(cfg.paths.log_dir).mkdir(parents=True, exist_ok=True)
        return cls(lg.tracking_uri, lg.experiment_name, lg.get("artifact_location"), cfg.paths.log_dir)

    def portable(self, value: Any) -> str:
        """A tag's or param's value as stored: `relative_to_log_dir` when the log dir is known."""
        return relative_to_log_dir(str(value), self.log_dir) if self.log_dir else str(value)

    # -- runs ----------------------------------------------------------------------------------------------------
    @contextmanager
    def run(self, name: str, cfg: DictConfig | None = None, tags: dict[str, str] | None = None) -> Iterator[str | None]:
        """A top-level run for the block (its id, None when tracking is off): the config's params are logged at the
        start; it ends FINISHED, or FAILED when the block raises (a crash, an interrupt), and the error propagates."""
        if not self.enabled:
            yield None
            return
        tags = {k: self.portable(v) for k, v in (tags or {}).items()}
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        self.parent_id = run.info.run_id
        if cfg is not None:
            self.log_params(self.parent_id, OmegaConf.to_container(cfg, resolve=True))
        try:
            yield self.parent_id
        except BaseException:
            self.client.set_terminated(self.parent_id, "FAILED")
            raise
        self.client.set_terminated(self.parent_id, "FINISHED")

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

    # -- the UI ---------------------------------------------------------------------------------------------------
    def save_view(self, view_id: str, name: str, state: Mapping[str, Any]) -> None:
        """A saved view of the experiment's runs table (the UI's "Views" menu; also opened by `ui_url(view_id)`)."""
        if not self.enabled:
            return
        if self.log_dir and state.get("searchFilter"):  # it compares tags, which hold relative paths
            state = {**state, "searchFilter": relative_filter(state["searchFilter"], self.log_dir)}
        now = int(time.time() * 1000)
        envelope = {"name": name, "createdAt": now, "updatedAt": now, "state": json.dumps(state)}
        self.client.set_experiment_tag(self.experiment_id, VIEW_TAG + view_id, json.dumps(envelope))

    def ui_url(self, view_id: str | None = RESULTS_VIEW, host: str = "http://127.0.0.1:5000") -> str | None:
        """Where `mlflow ui` shows this experiment's runs (as model training, not GenAI traces), in a saved view."""
        if not self.enabled:
            return None
        query = "workflowType=machine_learning" + (f"&viewStateShareKey={view_id}" if view_id else "")
        return f"{host}/#/experiments/{self.experiment_id}/runs?{query}"

    # -- logging -------------------------------------------------------------------------------------------------
    def log_params(self, run_id: str | None, params: Mapping[str, Any]) -> None:
        if not (self.enabled and run_id):
            return
        from mlflow.entities import Param

        flat = [Param(k, self.portable(v)[:6000]) for k, v in flatten(params).items()]
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
                self.client.set_tag(run_id, k, self.portable(v))

    def log_artifact(self, run_id: str | None, path: str | os.PathLike, subdir: str | None = None) -> None:
        if self.enabled and run_id and Path(path).exists():
            self.client.log_artifact(run_id, str(path), subdir)

    def lightning_logger(self, run_id: str | None):
        """A Lightning MLFlowLogger writing into an existing child run (or False when tracking is off)."""
        if not (self.enabled and run_id):
            return False
        from pytorch_lightning.loggers import MLFlowLogger

        return MLFlowLogger(tracking_uri=self.tracking_uri, run_id=run_id, log_model=False)
