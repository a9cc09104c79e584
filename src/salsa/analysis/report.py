"""What a pipeline run logs to its MLflow parent run besides metrics: sample generations and PPO training curves."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from salsa.analysis.plots import PPO_PANELS, Series, ppo_curves_figure, save_png
from salsa.infra.cache import Entry
from salsa.infra.tracking import Tracker

log = logging.getLogger("salsa")


def sweep_tags() -> dict[str, str]:
    """`{"sweep": <sweep dir>}` for a job of a multirun (so MLflow can filter one sweep's runs), else `{}`."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            return {"sweep": str(Path(hydra_cfg.sweep.dir).resolve())}
    except Exception:  # composed outside @hydra.main (tests, notebooks)
        pass
    return {}


def stage_entries(entries: Sequence[Entry], stage: str) -> list[Entry]:
    """The entries of `stage`, each cache key once, in pipeline order."""
    seen: dict[str, Entry] = {}
    for e in entries:
        if e.stage == stage:
            seen.setdefault(e.key, e)
    return list(seen.values())


def ppo_histories(entries: Sequence[Entry], labels: Mapping[str, str]) -> dict[str, dict[str, Series]]:
    """Per-iteration PPO metrics of each PPO stage, from the history.csv the stage wrote (cached or not), under the
    name this run gave it (`labels`: stage key -> ref name)."""
    from salsa.stages.ppo import HISTORY, read_history

    histories = {}
    for e in stage_entries(entries, "ppo"):
        history = read_history(e.path / HISTORY)
        if history:
            histories[f"ref={labels.get(e.key, '?')}"] = {k: history.get(k, []) for k, _ in PPO_PANELS}
    return histories


def report_job(tracker: Tracker, entries: Sequence[Entry], labels: Mapping[str, str], out: Path) -> list[Path]:
    """Write the job's plots into `out` and log them, with the evaluation's generations table, to the parent run."""
    if not (tracker.enabled and tracker.parent_id):
        return []
    written = []
    histories = ppo_histories(entries, labels)
    if histories:
        written.append(save_png(ppo_curves_figure(histories), out / "ppo_curves.png"))
        tracker.log_artifact(tracker.parent_id, written[-1], "plots")
    for e in stage_entries(entries, "eval"):
        tracker.log_artifact(tracker.parent_id, e.path / "generations.csv")
    return written
