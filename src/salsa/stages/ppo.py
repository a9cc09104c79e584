"""The online policy-optimisation stages (PPO here; GRPO and RLOO in `salsa.stages.group` through `run_online`):
build the models from cached stages, train the algorithm's module resumably, and publish the policy with its
per-iteration history."""

from __future__ import annotations

import csv
import os
from functools import partial
from pathlib import Path

import pytorch_lightning as pl

from salsa.algorithms.ppo import PPOConfig, PPOModule
from salsa.algorithms.reference import MovingReference, update_spec
from salsa.config import rollout_config
from salsa.infra.cache import Entry
from salsa.infra.context import Context, log, plain
from salsa.infra.training import fit_resumable
from salsa.models.actors import FullActors
from salsa.models.adapter_actors import build_adapter_actors, merges_start
from salsa.models.hf import load_causal_lm, load_reward_model, load_tokenizer
from salsa.models.qlora import BaseSettings, uses_adapters
from salsa.stages.base import base_settings

HISTORY = "history.csv"


def write_history(rows: list[dict[str, float]], path: Path) -> None:
    """Per-iteration PPO statistics as CSV (iteration first), so curves exist without a tracking server."""
    if not rows:
        return
    columns = ["iteration", *sorted({k for r in rows for k in r} - {"iteration"})]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def read_history(path: Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(iteration, value), ...]} from a stage's history.csv ({} if it has none)."""
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: [(int(r["iteration"]), float(r[k])) for r in rows if r[k] != ""] for k in rows[0] if k != "iteration"}


def build_actors(policy_init: Entry, reference: Entry, rm: Entry | None, value: bool = True) -> FullActors:
    """Full-weight models from cache entries: the policy, the reference, the reward model (`rm`; None for DPO) and,
    with `value`, the value model (PPO's: it starts as the reward model)."""
    # no dropout: it would make the update's log-probs differ from the rollout's (SFT checkpoints carry 0.1)
    policy = load_causal_lm(policy_init.path, attention_dropout=0.0)
    ref = load_causal_lm(reference.path, attention_dropout=0.0)
    value_model = load_reward_model(rm.path, attention_dropout=0.0) if value else None
    reward = load_reward_model(rm.path, attention_dropout=0.0) if rm is not None else None
    return FullActors(policy, value_model, ref, reward)


def compile_cache(path: Path) -> None:
    """Keep torch.compile's on-disk caches (Inductor's kernels, AOTAutograd's graphs) beside the stage cache, so the
    jobs of a sweep compile once and the rest load the compiled code. A cache directory the user set
    (TORCHINDUCTOR_CACHE_DIR) wins; torch itself writes its default there on import, which does not count."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        path.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)


def stage_spec(
    cfg, policy_init: Entry, reference: Entry, rm: Entry | None, group: str = "ppo", ref_update=None
) -> tuple[dict, bool]:
    """An algorithm's cache key material (its settings are `cfg[group]`), and whether the policy's start is merged
    into the base.

    `merge_start` enters the key only where it applies (adapters on a plain-weight base), `compile` and
    `compile_sampler` only when on (compiled kernels round differently), and the rollout engine only when it is not
    `hf`: elsewhere they change nothing, and the keys of runs that use none stay what they were before the options
    existed."""
    settings = plain(cfg[group])
    merge_start, compiled = settings.pop("merge_start", False), settings.pop("compile", False)
    compiled_sampler = settings.pop("compile_sampler", False)
    merged = uses_adapters(cfg.model) and merges_start(BaseSettings.from_cfg(cfg.model), merge_start)
    spec = {
        "policy_init": policy_init.key, "reference": reference.key, **({"rm": rm.key} if rm is not None else {}),
        group: settings, "data": plain(cfg.data), **update_spec(ref_update),
        **({"merged_start": True} if merged else {}), **({"compiled": True} if compiled else {}),
        **({"compiled_sampler": True} if compiled_sampler else {}), **rollout_config(cfg).key(),
    }  # fmt: skip
    return spec, merged


def online_actors(
    ctx: Context, policy_init: Entry, reference: Entry, rm: Entry | None, merged: bool, value: bool, ref_update=None
):
    """The algorithm's models: full weights, or adapters on one shared base (QLoRA)."""
    if uses_adapters(ctx.cfg.model):
        settings = base_settings(ctx)
        moving = bool(update_spec(ref_update))
        return build_adapter_actors(
            settings, policy_init, reference, rm, ctx.device, merge_start=merged, value=value, moving_reference=moving
        )
    return build_actors(policy_init, reference, rm, value=value)


def run_online(
    ctx: Context, group: str, make_module, policy_init: Entry, reference: Entry, rm: Entry, ref_name: str,
    value: bool = True, ref_update=None,
) -> Entry:  # fmt: skip
    """The policy trained by an online algorithm — `make_module(actors, tokenizer, moving)`, settings in the config
    group `group`, which also names its stage — from `policy_init` against `reference` and the reward model `rm`.
    `ref_name` labels it in this run's logs and plots; it is not part of the cache key (the same training under
    another name is the same stage). `ref_update` (the `ref` config) moves the reference (`ref.update`)."""
    cfg = ctx.cfg
    spec, merged = stage_spec(cfg, policy_init, reference, rm, group, ref_update)

    def build(work: Path, run_id: str | None) -> dict:
        pl.seed_everything(int(cfg[group].seed), workers=True, verbose=False)
        tok = load_tokenizer(policy_init.path)
        actors = online_actors(ctx, policy_init, reference, rm, merged, value, ref_update)
        module = make_module(actors, tok, MovingReference(actors, ref_update))
        ctx.tracker.set_tags(
            run_id, {"ref": ref_name, "algo": group, "reference_key": reference.key, "policy_init": policy_init.key}
        )
        try:
            fit_resumable(
                partial(ctx.trainer, work, run_id, clip_norm=float(module.config.max_grad_norm)),
                module,
                work,
                f"{group} {ref_name}",
                module.config.iterations,
                module.config.ckpt_every,
                use_distributed_sampler=False,
                log_every_n_steps=1,
            )
        finally:
            module.close_engine()  # a vLLM engine's memory goes back before the next stage, on a crash too
        actors.save_policy(work)
        tok.save_pretrained(str(work))
        final = module.last_stats
        write_history(module.history, work / HISTORY)
        log.info("[%s %s] final: %s", group, ref_name, {k: round(v, 4) for k, v in final.items()})
        return {
            "metrics": {k.removeprefix(f"{group}/"): v for k, v in final.items()},
            "format": "lora" if uses_adapters(cfg.model) else "full",
            "base": policy_init.manifest.get("base"),
        }

    entry = ctx.build(group, spec, build)
    ctx.labels[entry.key] = ref_name
    return entry


def run_ppo(ctx: Context, policy_init: Entry, reference: Entry, rm: Entry, ref_name: str, ref_update=None) -> Entry:
    """The policy trained by PPO from `policy_init` against `reference` and the reward model `rm`."""
    cfg = ctx.cfg

    def make_module(actors, tok, moving) -> PPOModule:
        config = PPOConfig.from_cfg(cfg.ppo)
        if config.compile:
            compile_cache(ctx.cache.root / "compile")
            actors.compile()
        return PPOModule(actors, tok, ctx.data.prompts_train, config, ctx.data.judge, moving, rollout_config(cfg))

    return run_online(ctx, "ppo", make_module, policy_init, reference, rm, ref_name, ref_update=ref_update)
