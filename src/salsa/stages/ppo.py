"""The PPO stage: builds the four models from cached stages, trains `salsa.algorithms.ppo.PPOModule` resumably,
and publishes the policy with its per-iteration history."""

from __future__ import annotations

import csv
import os
from functools import partial
from pathlib import Path

import pytorch_lightning as pl

from salsa.algorithms.ppo import PPOConfig, PPOModule
from salsa.infra.cache import Entry
from salsa.infra.context import Context, log, plain
from salsa.infra.training import fit_resumable
from salsa.models.actors import FullActors
from salsa.models.adapter_actors import build_adapter_actors, merges_start
from salsa.models.hf import load_causal_lm, load_reward_model, load_tokenizer
from salsa.models.qlora import BaseSettings, uses_adapters

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


def build_actors(policy_init: Entry, reference: Entry, rm: Entry) -> FullActors:
    # no dropout: it would make the update's log-probs differ from the rollout's (SFT checkpoints carry 0.1)
    policy = load_causal_lm(policy_init.path, attention_dropout=0.0)
    ref = load_causal_lm(reference.path, attention_dropout=0.0)
    value = load_reward_model(rm.path, attention_dropout=0.0)  # the value function starts as the reward model
    reward = load_reward_model(rm.path, attention_dropout=0.0)
    return FullActors(policy, value, ref, reward)


def compile_cache(path: Path) -> None:
    """Keep torch.compile's on-disk caches (Inductor's kernels, AOTAutograd's graphs) beside the stage cache, so the
    jobs of a sweep compile once and the rest load the compiled code. A cache directory the user set
    (TORCHINDUCTOR_CACHE_DIR) wins; torch itself writes its default there on import, which does not count."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        path.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)


def stage_spec(cfg, policy_init: Entry, reference: Entry, rm: Entry) -> tuple[dict, bool]:
    """The PPO stage's cache key material, and whether the policy's start is merged into the base.

    `ppo.merge_start` enters the key only where it applies (adapters on a plain-weight base), and `ppo.compile` only
    when on (compiled kernels round differently): elsewhere they change nothing, and the keys of runs that use
    neither stay what they were before the options existed."""
    ppo = plain(cfg.ppo)
    merge_start, compiled = ppo.pop("merge_start"), ppo.pop("compile")
    merged = uses_adapters(cfg.model) and merges_start(BaseSettings.from_cfg(cfg.model), merge_start)
    spec = {
        "policy_init": policy_init.key, "reference": reference.key, "rm": rm.key, "ppo": ppo, "data": plain(cfg.data),
        **({"merged_start": True} if merged else {}), **({"compiled": True} if compiled else {}),
    }  # fmt: skip
    return spec, merged


def run_ppo(ctx: Context, policy_init: Entry, reference: Entry, rm: Entry, ref_name: str) -> Entry:
    """The policy trained by PPO from `policy_init` against `reference` and the reward model `rm`. `ref_name` labels
    it in this run's logs and plots; it is not part of the cache key (the same training under another name is the
    same stage)."""
    cfg = ctx.cfg
    adapters = uses_adapters(cfg.model)
    spec, merged = stage_spec(cfg, policy_init, reference, rm)

    def build(work: Path, run_id: str | None) -> dict:
        config = PPOConfig.from_cfg(cfg.ppo)
        pl.seed_everything(config.seed, workers=True, verbose=False)
        tok = load_tokenizer(policy_init.path)
        if adapters:  # QLoRA: all four models are adapters on one shared base
            settings = BaseSettings.from_cfg(cfg.model)
            actors = build_adapter_actors(settings, policy_init, reference, rm, ctx.device, merge_start=merged)
        else:
            actors = build_actors(policy_init, reference, rm)
        if config.compile:
            compile_cache(ctx.cache.root / "compile")
            actors.compile()
        module = PPOModule(actors, tok, ctx.data.prompts_train, config, ctx.data.judge)
        ctx.tracker.set_tags(run_id, {"ref": ref_name, "reference_key": reference.key, "policy_init": policy_init.key})
        fit_resumable(
            partial(ctx.trainer, work, run_id),
            module,
            work,
            f"ppo {ref_name}",
            config.iterations,
            config.ckpt_every,
            use_distributed_sampler=False,
            log_every_n_steps=1,
        )
        actors.save_policy(work)
        tok.save_pretrained(str(work))
        final = module.last_stats
        write_history(module.history, work / HISTORY)
        log.info("[ppo %s] final: %s", ref_name, {k: round(v, 4) for k, v in final.items()})
        return {
            "metrics": {k.removeprefix("ppo/"): v for k, v in final.items()},
            "format": "lora" if adapters else "full",
            "base": policy_init.manifest.get("base"),
        }

    entry = ctx.build("ppo", spec, build)
    ctx.labels[entry.key] = ref_name
    return entry
