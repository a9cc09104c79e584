"""What `src/train.py` does with a composed config: track, run the pipeline, print and save the results."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from salsa.analysis.report import report_job, sweep_tags
from salsa.infra import progress
from salsa.infra.context import Context
from salsa.infra.distributed import is_global_zero
from salsa.infra.tracking import Tracker, run_name
from salsa.pipeline import run, write_results

log = logging.getLogger("salsa")


def quiet_libraries() -> None:
    """Silence warnings that say nothing about the user's run."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for pattern in (
        ".*does not have many workers.*",
        ".*GPU available but not used.*",
        ".*is an invalid version and will not be supported.*",
        ".*`isinstance.*treespec.*",
        ".*module\\(s\\) in eval mode at the start of training.*",  # the frozen reference and reward model
        ".*`validation_step` but have no `val_dataloader`.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("pytorch_lightning.utilities.rank_zero", "pytorch_lightning.accelerators.cuda", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # per-file "Loading weights" bars
    transformers.utils.logging.set_verbosity_error()  # e.g. "score.weight newly initialised" for the reward head


def task_overrides() -> list[str]:
    """The command line's overrides of the job's config (a sweep's job: its own values), [] outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except Exception:  # composed outside @hydra.main (notebooks)
        return []


def output_dir(cfg: DictConfig) -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # composed outside @hydra.main (tests, notebooks)
        path = Path(cfg.paths.log_dir) / "runs" / "adhoc"
        path.mkdir(parents=True, exist_ok=True)
        return path


def results_table(results: dict[str, Any]) -> Table:
    algo = results.get("algo") or "ppo"
    table = Table(title=f"salsa results (algo={algo}, ref={results.get('ref')}, stage={results.get('stage')})")
    if algo != "ppo":  # the results' keys are the same for every algorithm
        table.caption = f"*_ppo, *_vs_ppo: the baseline, {algo} with ref=sft"
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in results.items():
        if k == "stages":
            continue
        if isinstance(v, dict):
            v = ", ".join(f"{kk}: {vv:.4f}" if isinstance(vv, float) else f"{kk}: {vv}" for kk, vv in v.items())
        elif isinstance(v, float):
            v = f"{v:.4f}"
        table.add_row(k, "—" if v is None else str(v))
    return table


def prepare(cfg: DictConfig) -> None:
    """Process-wide settings from `cfg.extras`, shared by the entry points."""
    quiet_libraries()
    progress.set_enabled(cfg.extras.get("progress_bar", True))
    if cfg.extras.get("torch_threads"):
        torch.set_num_threads(int(cfg.extras.torch_threads))
    if cfg.extras.get("print_config"):
        print(OmegaConf.to_yaml(cfg, resolve=True))


def pipeline_job(cfg: DictConfig) -> float | None:
    """What `python src/train.py` does with its config: run the pipeline in a tracked run, write and print the
    results, and return `optimized_metric` for a sweeper."""
    prepare(cfg)
    out = output_dir(cfg)
    if not is_global_zero():  # another DDP rank: it trains alongside rank 0, which alone tracks and reports
        run(cfg, Context.from_cfg(cfg, Tracker(None)))
        return None
    tracker = Tracker.from_cfg(cfg)
    tags = {"kind": "pipeline", "ref": cfg.ref.name, "output_dir": str(out), **sweep_tags()}
    with tracker.run(run_name(task_overrides(), cfg.ref.name), cfg, tags) as run_id:
        ctx = Context.from_cfg(cfg, tracker)
        results = run(cfg, ctx)
        path = write_results(results, out)
        OmegaConf.save(cfg, out / "resolved_config.yaml", resolve=True)
        tracker.log_metrics(run_id, {f"eval/{k}": v for k, v in results.items() if isinstance(v, int | float)})
        tracker.log_artifact(run_id, path)
        tracker.log_artifact(run_id, out / "resolved_config.yaml")
        report_job(tracker, ctx.entries, ctx.labels, out)
    Console().print(results_table(results))
    log.info("results written to %s", path)
    if tracker.enabled and not sweep_tags():  # a sweep's summary names its own view
        log.info("compare runs: mlflow ui --backend-store-uri %s, then open %s", tracker.tracking_uri, tracker.ui_url())
    metric = cfg.get("optimized_metric")
    return results.get(metric) if metric else None
