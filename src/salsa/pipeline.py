"""The SALSA pipeline: base → SFT ingredients → soup → reward model → policy optimisation against the reference
(`algo=`, PPO by default) → evaluation.

Each stage comes from the stage cache when an identical one was built before (see `salsa.infra.cache`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from salsa.algorithms import ALGORITHMS
from salsa.config import STAGES
from salsa.infra.cache import Entry
from salsa.infra.context import Context
from salsa.stages.base import run_base
from salsa.stages.evaluate import run_eval
from salsa.stages.export import run_export
from salsa.stages.rm import judge_kind, run_rm
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


def reference(ctx: Context, sft: dict[int, Entry]) -> Entry:
    """The KL reference of `cfg.ref`: the soup of its ingredients (`ref.soup`), or its one SFT ingredient.

    Everything that holds a policy near a reference gets it here (a moving reference would start from this one).
    """
    ref = ctx.cfg.ref
    if ref.soup:
        return run_soup(ctx, [sft[i] for i in ref.ingredients])
    (only,) = ref.ingredients
    return sft[only]


def policy_start(ref_cfg: DictConfig, sft: dict[int, Entry], reference: Entry) -> Entry:
    """Where the policy starts: the reference itself (`policy_init: ref`) or one SFT ingredient."""
    return reference if ref_cfg.policy_init == "ref" else sft[int(ref_cfg.policy_init)]


def run(cfg: DictConfig, ctx: Context | None = None) -> dict[str, Any]:
    """Run the pipeline up to `cfg.stage`; return the results dict (also written to `results.json`)."""
    ctx = ctx or Context.from_cfg(cfg)
    last = STAGES.index(cfg.stage)
    started = time.time()
    results: dict[str, Any] = dict.fromkeys(RESULT_KEYS)
    results.update(algo=cfg.algo.name, ref=cfg.ref.name, stage=cfg.stage)

    base = run_base(ctx)
    if last >= STAGES.index("sft"):
        sft = {i: run_sft(ctx, base, i) for i in needed_ingredients(cfg.ref)}
        results["sft_val_loss"] = {i: e.manifest["metrics"]["val_loss"] for i, e in sft.items()}
    if last >= STAGES.index("soup"):
        ref = reference(ctx, sft)
        results["ref_val_loss"] = ref.manifest.get("metrics", {}).get("val_loss")
    if last >= STAGES.index("rm"):
        rm = run_rm(ctx, base)
        results["rm_accuracy"] = rm.manifest["metrics"].get("accuracy")
        results["rm_gold_agreement"] = rm.manifest["metrics"].get("gold_agreement")
    if last >= STAGES.index("ppo"):
        algo = ALGORITHMS[cfg.algo.name]
        reward = rm if algo.needs_reward_model else None
        init = policy_start(cfg.ref, sft, ref)
        policy = algo.run(ctx, init, ref, reward, cfg.ref.name)
        # the baseline: the same algorithm and settings with reference and start = SFT ingredient 0 (trained once)
        plain = init.key == ref.key == sft[0].key
        baseline = None if plain else algo.run(ctx, sft[0], sft[0], reward, "sft")
    if last >= STAGES.index("eval"):
        # an independent judge: on hub data a second reward model that never saw the policy's reward model's pairs
        judge = run_rm(ctx, base, role="judge") if judge_kind(cfg, ctx.data) == "heldout_rm" else None
        evaluation = run_eval(ctx, policy, sft[0], baseline, rm, ref, judge)
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
