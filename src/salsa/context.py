"""What every stage needs: the resolved config, the stage cache, the tracker and the task data."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from salsa.cache import Entry, StageCache, stage_key
from salsa.data import TaskData
from salsa.tracking import Tracker

log = logging.getLogger("salsa")


# config fields that change how a stage runs but not what it produces: left out of cache keys
NOT_IN_KEY = ("ckpt_every",)


def plain(cfg: Any) -> Any:
    """A config node as plain JSON-able Python for a cache spec, without the fields in NOT_IN_KEY."""
    if not OmegaConf.is_config(cfg):
        return cfg
    out = OmegaConf.to_container(cfg, resolve=True)

    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k not in NOT_IN_KEY}
        return node

    return strip(out)


@dataclass
class Context:
    cfg: DictConfig
    cache: StageCache
    tracker: Tracker
    entries: list[Entry] = field(default_factory=list)
    _data: TaskData | None = None

    @classmethod
    def from_cfg(cls, cfg: DictConfig, tracker: Tracker | None = None) -> Context:
        return cls(cfg, StageCache(cfg.paths.cache_dir), tracker or Tracker.from_cfg(cfg))

    @property
    def data(self) -> TaskData:
        if self._data is None:
            self._data = hydra.utils.instantiate(self.cfg.data.task, _convert_="all")
        return self._data

    def build(self, stage: str, spec: dict[str, Any], fn: Callable[[Path, str | None], dict[str, Any]]) -> Entry:
        """The cached output of `stage` for `spec`; on a miss, `fn(workdir, mlflow_run_id)` builds it in a child run."""
        key = stage_key(stage, spec)

        def build(work: Path) -> dict[str, Any]:
            log.info("[%s] building %s in %s", stage, key, work)
            with self.tracker.child(stage, key) as run_id:
                meta = fn(work, run_id) or {}
                self.tracker.log_metrics(run_id, {f"final/{k}": v for k, v in meta.get("metrics", {}).items()})
            return {**meta, "run_id": run_id}

        entry = self.cache.get_or_build(stage, spec, build)
        if entry.reused:
            log.info("[%s] reusing %s (made by run %s)", stage, key, entry.run_id)
            self.tracker.set_tags(self.tracker.parent_id, {f"reused.{stage}.{key}": entry.run_id or "untracked"})
        self.entries.append(entry)
        return entry

    def trainer(self, work: Path, run_id: str | None, **overrides: Any) -> pl.Trainer:
        """A Lightning Trainer from `cfg.trainer`, writing into the stage's work dir and its MLflow child run.

        A stage's own `callbacks` join those of the config (the progress bar) rather than replace them."""
        overrides.setdefault("logger", self.tracker.lightning_logger(run_id))
        configured = list(hydra.utils.instantiate(self.cfg.trainer.get("callbacks") or []))
        overrides["callbacks"] = [*configured, *overrides.get("callbacks", [])]
        return hydra.utils.instantiate(self.cfg.trainer, default_root_dir=str(work), **overrides)

    @property
    def device(self) -> torch.device:
        accel = self.cfg.trainer.get("accelerator", "auto")
        if accel in ("gpu", "cuda") or (accel == "auto" and torch.cuda.is_available()):
            return torch.device("cuda")
        return torch.device("cpu")
