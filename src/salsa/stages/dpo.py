"""The DPO stage: the policy and the reference from cached stages, the reference's log-probabilities of every
preference pair computed once and kept in the stage's directory, then `salsa.algorithms.dpo.DPOModule` trained
resumably on a seeded batch plan. Publishes the policy with its held-out pair metrics."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytorch_lightning as pl
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from salsa.algorithms.dpo import (
    DPOConfig,
    DPOModule,
    PreferenceDataset,
    heldout_preferences,
    pair_logprobs,
    preference_batch,
)
from salsa.algorithms.reference import MovingReference, update_spec
from salsa.infra.cache import Entry
from salsa.infra.context import Context, log, plain
from salsa.infra.training import PlanSampler, batch_plan, fit_resumable
from salsa.models.hf import load_tokenizer
from salsa.models.qlora import uses_adapters
from salsa.stages.ppo import online_actors

REFERENCE_LOGPROBS = "reference_logprobs.safetensors"


def cached_reference_logprobs(path: Path, actors, datasets: dict[str, PreferenceDataset], pad_id, config, device):
    """{split: (chosen, rejected)} reference log-probabilities, read from `path` if an earlier attempt wrote them,
    otherwise computed and written there (the stage's directory: they are published with the policy)."""
    if path.is_file():
        saved = load_file(str(path))
        if all(saved[f"{s}_chosen"].numel() == len(d) for s, d in datasets.items()):
            return {s: (saved[f"{s}_chosen"], saved[f"{s}_rejected"]) for s in datasets}
    out = {
        s: pair_logprobs(actors.reference_logits, d, pad_id, config.reference_batch_size, device)
        for s, d in datasets.items()
    }
    tensors = {f"{s}_{side}": t for s, (c, r) in out.items() for side, t in (("chosen", c), ("rejected", r))}
    save_file(tensors, str(path.with_suffix(".tmp")))
    path.with_suffix(".tmp").rename(path)
    return out


def run_dpo(
    ctx: Context, policy_init: Entry, reference: Entry, rm: Entry | None, ref_name: str, ref_update=None
) -> Entry:
    """The policy trained by DPO (or IPO) on the preference pairs from `policy_init` against `reference`. DPO has no
    reward model (`rm` is None); `ref_name` labels the run, outside the cache key."""
    cfg = ctx.cfg
    spec = {
        "policy_init": policy_init.key, "reference": reference.key, "dpo": plain(cfg.dpo), "data": plain(cfg.data),
        **update_spec(ref_update),
    }  # fmt: skip

    def build(work: Path, run_id: str | None) -> dict:
        config = DPOConfig.from_cfg(cfg.dpo)
        pl.seed_everything(config.seed, workers=True, verbose=False)
        tok = load_tokenizer(policy_init.path)
        # no dropout: a pair's log-probabilities must be the same function as the reference's
        actors = online_actors(ctx, policy_init, reference, None, merged=False, value=False, ref_update=ref_update)
        actors.to(ctx.device)
        datasets = {
            split: PreferenceDataset(tok, pairs, config.max_prompt_length, config.max_response_length)
            for split, pairs in (("train", ctx.data.pairs_train), ("val", ctx.data.pairs_val))
        }
        ref = cached_reference_logprobs(work / REFERENCE_LOGPROBS, actors, datasets, tok.pad_token_id, config,
                                        ctx.device)  # fmt: skip
        plan = batch_plan(len(datasets["train"]), config.batch_size, config.epochs, config.seed)
        loader = DataLoader(
            datasets["train"],
            batch_sampler=PlanSampler(plan, config.ckpt_every),
            collate_fn=partial(preference_batch, pad_id=tok.pad_token_id),
        )
        module = DPOModule(
            actors, *ref["train"], config, total_steps=len(plan), moving=MovingReference(actors, ref_update)
        )
        ctx.tracker.set_tags(
            run_id, {"ref": ref_name, "algo": "dpo", "reference_key": reference.key, "policy_init": policy_init.key}
        )
        fit_resumable(
            partial(ctx.trainer, work, run_id, gradient_clip_val=config.max_grad_norm),
            module,
            work,
            f"dpo {ref_name}",
            loader.batch_sampler.num_chunks,
            train_dataloaders=loader,
            use_distributed_sampler=False,
        )
        metrics = heldout_preferences(actors, datasets["val"], ref["val"], config, tok.pad_token_id, ctx.device)
        if module.first_losses is not None:  # log 2 for every pair when the policy starts at the reference
            metrics["first_step_loss"] = float(module.first_losses.mean())
        actors.save_policy(work)
        tok.save_pretrained(str(work))
        log.info("[dpo %s] held-out pairs: %s", ref_name, {k: round(v, 4) for k, v in metrics.items()})
        return {
            "metrics": metrics,
            "format": "lora" if uses_adapters(cfg.model) else "full",
            "base": policy_init.manifest.get("base"),
        }

    entry = ctx.build("dpo", spec, build)
    ctx.labels[entry.key] = ref_name
    return entry
