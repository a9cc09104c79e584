"""SFT: the soup's ingredients, fine-tuned from one base and differing only by seed (data order, dropout)."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl

from salsa.data.tokens import LMDataset
from salsa.infra.cache import Entry
from salsa.infra.context import Context, log, plain
from salsa.models.hf import load_causal_lm, load_tokenizer
from salsa.models.qlora import new_adapter_model, uses_adapters
from salsa.models.sharding import save_pretrained
from salsa.stages.base import base_settings
from salsa.stages.lm import fit_lm, heldout_dataset, heldout_loss
from salsa.stages.samples import complete_data


def ingredient_seed(seed: int, replicate: int, index: int) -> int:
    """Seed of SFT ingredient `index` in replicate `replicate`: replicates never share an ingredient."""
    return seed + 1000 * replicate + index


def run_sft(ctx: Context, base: Entry, index: int) -> Entry:
    """SFT ingredient `index`: the base fine-tuned on the demonstrations with seed `sft.seed + index`."""
    cfg = ctx.cfg
    complete_data(ctx, base)  # SFT data from the base model's answers (data=ifeval); a no-op once done, and elsewhere
    spec = {"base": base.key, "data": plain(cfg.data), "sft": plain(cfg.sft), "index": index}

    def build(work: Path, run_id: str | None) -> dict:
        s = cfg.sft
        seed = ingredient_seed(s.seed, s.get("replicate", 0), index)
        adapters = uses_adapters(cfg.model)
        if adapters:  # a LoRA adapter on the frozen base; the seed also sets its initial A
            pl.seed_everything(seed, workers=True, verbose=False)
            tok, model = new_adapter_model(base_settings(ctx), ctx.device)
        else:
            tok = load_tokenizer(base.path)
            # dropout is one of the seeds' sources of diversity
            model = load_causal_lm(base.path, attention_dropout=s.attention_dropout)
        train = LMDataset.from_examples(tok, ctx.data.sft_train, s.max_prompt_length, s.max_response_length)
        fit_lm(ctx, model, train, s, tok.pad_token_id, work, run_id, seed, f"sft {index}")
        save_pretrained(model, work)  # a sharded model (trainer=fsdp2) gathered, and written by rank 0
        tok.save_pretrained(str(work))
        val_loss = heldout_loss(model, heldout_dataset(ctx, tok), tok.pad_token_id)
        log.info("[sft %d] held-out loss %.4f", index, val_loss)
        fmt = "lora" if adapters else "full"
        return {"metrics": {"val_loss": val_loss}, "format": fmt, "base": base.key, "index": index, "seed": seed}

    return ctx.build("sft", spec, build)
