"""The SALSA pipeline: base → SFT ingredients → soup → reward model → PPO against the reference → evaluation.

Each stage comes from the stage cache when an identical one was built before (see `salsa.infra.cache`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from salsa.config import STAGES
from salsa.infra.cache import Entry
from salsa.infra.context import Context
from salsa.stages.base import run_base
from salsa.stages.evaluate import run_eval
from salsa.stages.export import run_export
from salsa.stages.ppo import run_ppo
from salsa.stages.rm import run_rm
from salsa.stages.sft import run_sft
from salsa.stages.soup import run_soup

log = logging.getLogger("salsa")

RESULT_KEYS = ("win_rate_vs_sft", "win_rate_vs_ppo", "gold_reward", "rm_reward", "kl_to_ref", "judge")


def needed_ingredients(ref: DictConfig) -> list[int]:
    """SFT ingredients a run needs: the reference's, ingredient 0 (the SFT baseline) and the policy's start."""
    need = {0, *ref.ingredients}
    if ref.policy_init != "ref":
        need.add(int(ref.policy_init))
    return sorted(need)


def reference(ctx: Context, sft: dict[int, Entry], ingredients: list[int]) -> Entry:
    """The reference model: one SFT ingredient, or the soup of several."""
    if len(ingredients) == 1:
        return sft[ingredients[0]]
    return run_soup(ctx, [sft[i] for i in ingredients])


def run(cfg: DictConfig, ctx: Context | None = None) -> dict[str, Any]:
    """Run the pipeline up to `cfg.stage`; return the results dict (also written to `results.json`)."""
    if cfg.stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {cfg.stage!r}")
    ctx = ctx or Context.from_cfg(cfg)
    last = STAGES.index(cfg.stage)
    started = time.time()
    results: dict[str, Any] = dict.fromkeys(RESULT_KEYS)
    results.update(ref=cfg.ref.name, stage=cfg.stage)

    base = run_base(ctx)
    if last >= STAGES.index("sft"):
        sft = {i: run_sft(ctx, base, i) for i in needed_ingredients(cfg.ref)}
        results["sft_val_loss"] = {i: e.manifest["metrics"]["val_loss"] for i, e in sft.items()}
    if last >= STAGES.index("soup"):
        ref = reference(ctx, sft, list(cfg.ref.ingredients))
        results["ref_val_loss"] = ref.manifest.get("metrics", {}).get("val_loss")
    if last >= STAGES.index("rm"):
        rm = run_rm(ctx, base)
        results["rm_accuracy"] = rm.manifest["metrics"].get("accuracy")
        results["rm_gold_agreement"] = rm.manifest["metrics"].get("gold_agreement")
    if last >= STAGES.index("ppo"):
        init = ref if cfg.ref.policy_init == "ref" else sft[int(cfg.ref.policy_init)]
        policy = run_ppo(ctx, init, ref, rm, cfg.ref.name)
        # the PPO baseline: reference and start = SFT ingredient 0, same PPO settings (trained once, then cached)
        plain_ppo = init.key == ref.key == sft[0].key
        baseline = None if plain_ppo else run_ppo(ctx, sft[0], sft[0], rm, "sft")
    if last >= STAGES.index("eval"):
        evaluation = run_eval(ctx, policy, sft[0], baseline, rm, ref)
        results.update(evaluation.manifest["results"])
        if cfg.eval.get("export"):  # the policy's answers for an official judge (MT-Bench, Arena-Hard)
            exported = run_export(ctx, policy)
            results["export_file"] = str(exported.path / exported.manifest["file"])

    results["stages"] = {
        e.stage + ("" if e.stage == "base" else f":{e.key}"): ("reused" if e.reused else "built") for e in ctx.entries
    }
    results["seconds"] = round(time.time() - started, 2)
    return results


def write_results(results: dict[str, Any], out_dir: str | Path) -> Path:
    path = Path(out_dir) / "results.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    return path
