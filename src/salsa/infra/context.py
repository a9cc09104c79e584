"""What every stage needs: the resolved config, the stage cache, the tracker and the task data."""

from __future__ import annotations

import gc
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from salsa.data.task import TaskData
from salsa.infra.cache import MANIFEST, Entry, StageCache, stage_key
from salsa.infra.distributed import (
    barrier,
    broadcast_from_zero,
    connected,
    deepspeed_strategy,
    is_global_zero,
    rank_name,
)
from salsa.infra.tracking import Tracker
from salsa.infra.training import CKPT_DIR

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


def release_memory() -> None:
    """Collect what the last stage dropped (Lightning's trainer and module refer to each other, so reference
    counting alone does not free them) and return the GPU's cached blocks."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class Context:
    cfg: DictConfig
    cache: StageCache
    tracker: Tracker
    entries: list[Entry] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)  # stage key -> what this run calls it (a policy's ref name)
    _data: TaskData | None = None

    @classmethod
    def from_cfg(cls, cfg: DictConfig, tracker: Tracker | None = None) -> Context:
        return cls(cfg, StageCache(cfg.paths.cache_dir), tracker or Tracker.from_cfg(cfg))

    @property
    def data(self) -> TaskData:
        if self._data is None:
            self._data = hydra.utils.instantiate(self.cfg.data.task, _convert_="all")
        return self._data

    @data.setter
    def data(self, value: TaskData) -> None:
        """The task completed by a stage (`salsa.stages.samples`: SFT data and pairs from the base's answers)."""
        self._data = value

    def build(self, stage: str, spec: dict[str, Any], fn: Callable[[Path, str | None], dict[str, Any]]) -> Entry:
        """The cached output of `stage` for `spec`; on a miss, `fn(workdir, mlflow_run_id)` builds it in a child run."""
        key = stage_key(stage, spec)
        if not is_global_zero():
            return self._follow(stage, key, fn)
        built = False

        def build(work: Path) -> dict[str, Any]:
            nonlocal built
            built = True
            if connected():  # DDP: tell the other ranks to join this build (decided under the cache's lock)
                broadcast_from_zero(True)
            log.info("[%s] building %s in %s", stage, key, work)
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            try:
                with self.tracker.child(stage, key) as run_id:
                    meta = fn(work, run_id) or {}
                    if torch.cuda.is_available():  # what the memory estimator is checked against
                        meta.setdefault("metrics", {})["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
                    self.tracker.log_metrics(run_id, {f"final/{k}": v for k, v in meta.get("metrics", {}).items()})
            finally:
                release_memory()  # the stage's models are gone: the next stage starts with free memory
            shutil.rmtree(work / CKPT_DIR, ignore_errors=True)  # built: the published stage keeps its outputs only
            return {**meta, "run_id": run_id}

        entry = self.cache.get_or_build(stage, spec, build)
        if connected():
            if built:
                barrier()  # published: the other ranks may read it now
            else:
                broadcast_from_zero(False)
        if entry.reused:
            log.info("[%s] reusing %s (made by run %s)", stage, key, entry.run_id)
            self.tracker.set_tags(self.tracker.parent_id, {f"reused.{stage}.{key}": entry.run_id or "untracked"})
        self.entries.append(entry)
        return entry

    def _follow(self, stage: str, key: str, fn: Callable[[Path, str | None], dict[str, Any]]) -> Entry:
        """A DDP rank other than 0: build alongside rank 0 when it builds (in scratch, never published), then use
        what rank 0 published."""
        building = broadcast_from_zero() if connected() else self.cache.lookup(stage, key) is None
        if not building:
            entry = self.cache.lookup(stage, key)
            if entry is None:
                raise RuntimeError(
                    f"[{stage}] rank {rank_name()}: rank 0 reported {key} built, but it is not published"
                )
            self.entries.append(entry)
            return entry
        scratch = self.cache.root / stage / f"{key}.rank{rank_name()}"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        resume = self.cache.root / stage / f"{key}.partial" / CKPT_DIR
        if resume.is_dir():  # rank 0 resumes an interrupted build: every rank must restore the same checkpoint
            shutil.copytree(resume, scratch / CKPT_DIR)
        meta = fn(scratch, None) or {}
        keep = bool(self.cfg.extras.get("keep_rank_outputs"))
        if keep:  # to compare replicas with rank 0's output
            (scratch / MANIFEST).write_text(json.dumps({"stage": stage, "key": key, **meta}, default=str))
        if not connected():  # no process group (a build without training before any fit): use this rank's copy
            entry = Entry(stage, key, scratch, {"stage": stage, "key": key, **meta}, reused=False)
        else:
            barrier()
            entry = self.cache.lookup(stage, key)
            if not keep:
                shutil.rmtree(scratch, ignore_errors=True)
        self.entries.append(entry)
        return entry

    def trainer(self, work: Path, run_id: str | None, **overrides: Any) -> pl.Trainer:
        """A Lightning Trainer from `cfg.trainer`, writing into the stage's work dir and its MLflow child run.

        A stage's own `callbacks` join those of the config (the progress bar) rather than replace them.
        `clip_norm` is the gradient-norm clip of a manually optimised stage: under DeepSpeed the engine applies it
        (see `deepspeed_strategy`); elsewhere the module clips by itself and it is ignored here."""
        clip_norm = overrides.pop("clip_norm", None)
        strategy = self.cfg.trainer.get("strategy")
        if clip_norm is not None and isinstance(strategy, str) and "deepspeed" in strategy:
            overrides["strategy"] = deepspeed_strategy(strategy, clip_norm)
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
