"""The SALSA pipeline: base → SFT ingredients → soup → reward model → policy optimisation against the reference
(`algo=`, PPO by default) → evaluation. A task whose SFT data and preference pairs come from the base model's own
answers (`data=ifeval`) has them drawn between base and SFT (`salsa.stages.samples`).

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
from salsa.stages.rm import judge_kind, reward_model, run_rm
from salsa.stages.samples import complete_data
from salsa.stages.sft import run_sft
from salsa.stages.soup import run_soup

log = logging.getLogger("salsa")

RESULT_KEYS = ("win_rate_vs_sft", "win_rate_vs_ppo", "gold_reward", "rm_reward", "kl_to_ref", "judge")


def needed_ingredients(cfg: DictConfig) -> list[int]:
    """SFT ingredients a run needs: the reference's, ingredient 0 (the SFT baseline) and the policy's start's."""
    ref, init = cfg.ref, cfg.init
    need = {0, *ref.ingredients}
    if init.name != "ref":
        need.update(init.ingredients)
    elif ref.policy_init != "ref":
        need.add(int(ref.policy_init))
    return sorted(need)


def model_of(ctx: Context, sft: dict[int, Entry], soup: bool, ingredients) -> Entry:
    """The soup of `ingredients` (`soup=` says how it is made), or the one SFT ingredient listed."""
    if soup:
        return run_soup(ctx, [sft[i] for i in ingredients])
    (only,) = ingredients
    return sft[only]


def reference(ctx: Context, sft: dict[int, Entry]) -> Entry:
    """The KL reference of `cfg.ref`: the soup of its ingredients (`ref.soup`), or its one SFT ingredient.

    Everything that holds a policy near a reference gets it here (a moving reference starts from this one).
    """
    ref = ctx.cfg.ref
    return model_of(ctx, sft, ref.soup, ref.ingredients)


def policy_start(ctx: Context, sft: dict[int, Entry], reference: Entry) -> Entry:
    """Where the policy starts: `init=` when it names a model, otherwise as the `ref=` choice says (the reference
    itself, `policy_init: ref`, or one SFT ingredient)."""
    init, ref = ctx.cfg.init, ctx.cfg.ref
    if init.name != "ref":
        return model_of(ctx, sft, init.soup, init.ingredients)
    return reference if ref.policy_init == "ref" else sft[int(ref.policy_init)]


def run_label(cfg: DictConfig) -> str:
    """What logs and plots call the run's policy: its reference, and its start when `init=` sets it apart."""
    return cfg.ref.name if cfg.init.name == "ref" else f"init={cfg.init.name} ref={cfg.ref.name}"


def run(cfg: DictConfig, ctx: Context | None = None) -> dict[str, Any]:
    """Run the pipeline up to `cfg.stage`; return the results dict (also written to `results.json`)."""
    ctx = ctx or Context.from_cfg(cfg)
    last = STAGES.index(cfg.stage)
    started = time.time()
    results: dict[str, Any] = dict.fromkeys(RESULT_KEYS)
    results.update(algo=cfg.algo.name, ref=cfg.ref.name, init=cfg.init.name, stage=cfg.stage)

    base = run_base(ctx)
    if last >= STAGES.index("sft"):
        complete_data(ctx, base)  # a task made from the base model's own answers (data=ifeval): answered here
        sft = {i: run_sft(ctx, base, i) for i in needed_ingredients(cfg)}
        results["sft_val_loss"] = {i: e.manifest["metrics"]["val_loss"] for i, e in sft.items()}
    if last >= STAGES.index("soup"):
        ref = reference(ctx, sft)
        results["ref_val_loss"] = ref.manifest.get("metrics", {}).get("val_loss")
    if last >= STAGES.index("rm"):
        rm = reward_model(ctx, base)
        results["rm_accuracy"] = rm.manifest["metrics"].get("accuracy")
        results["rm_gold_agreement"] = rm.manifest["metrics"].get("gold_agreement")
    if last >= STAGES.index("ppo"):
        algo = ALGORITHMS[cfg.algo.name]
        reward = rm if algo.needs_reward_model else None
        start = policy_start(ctx, sft, ref)
        policy = algo.run(ctx, start, ref, reward, run_label(cfg), cfg.ref)
        # the baseline: the same algorithm and settings with reference and start = SFT ingredient 0, the reference
        # frozen (trained once)
        plain = start.key == ref.key == sft[0].key and cfg.ref["update"] == "frozen"
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
