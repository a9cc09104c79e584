"""Base: the tokenizer and the pretrained causal LM every other stage starts from.

`model=tiny` trains a word-level tokenizer on the task's text and pretrains a tiny Gemma on its documents, so the
whole pipeline runs offline. A hub preset (`model.name_or_path`) is used as it is: the stage only records it.
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl

from salsa.data.tokens import LMDataset
from salsa.infra.cache import Entry
from salsa.infra.context import Context, log, plain
from salsa.models.hf import num_parameters, tiny_gemma, train_word_tokenizer
from salsa.models.sharding import save_pretrained
from salsa.stages.lm import fit_lm, heldout_loss


def task_texts(data) -> list[str]:
    """All text of the task, for training the tokenizer."""
    texts = list(data.pretrain) + list(data.prompts_train) + list(data.prompts_eval)
    texts += [f"{e.prompt} {e.response}" for e in data.sft_train + data.sft_val]
    texts += [f"{p.prompt} {p.chosen} {p.rejected}" for p in data.pairs_train + data.pairs_val]
    return texts


def run_base(ctx: Context) -> Entry:
    cfg = ctx.cfg
    m = cfg.model
    if m.get("name_or_path"):
        # how the frozen base is loaded and adapted determines every later stage, so it is part of the key
        spec = {
            "name_or_path": m.name_or_path, "revision": m.get("revision"), "quant": m.get("quant"),
            "lora": plain(m.get("lora")),
        }  # fmt: skip
        return ctx.build("base", spec, lambda work, run_id: {"format": "hub", **spec})

    spec = {"model": plain(m), "data": plain(cfg.data)}

    def build(work: Path, run_id: str | None) -> dict:
        data = ctx.data
        if not data.pretrain:
            raise ValueError(
                f"model={m.name} pretrains on the task's documents and data={cfg.data.name} has none: use a hub "
                "preset (model=gemma2b, ...) or model.name_or_path=/a/local/checkpoint"
            )
        tok = train_word_tokenizer(task_texts(data))
        p = m.pretrain
        pl.seed_everything(p.seed, workers=True, verbose=False)  # the initial weights depend on the seed alone
        model = tiny_gemma(tok, **plain(m.arch))
        docs = list(data.pretrain)
        n_val = max(1, int(len(docs) * p.val_fraction))
        train = LMDataset.from_documents(tok, docs[n_val:], p.max_length)
        val = LMDataset.from_documents(tok, docs[:n_val], p.max_length)
        log.info("[base] tiny Gemma with %.2fM parameters, vocabulary %d", num_parameters(model) / 1e6, len(tok))
        fit_lm(ctx, model, train, p, tok.pad_token_id, work, run_id, p.seed, "base")
        save_pretrained(model, work)  # a sharded model (trainer=fsdp2) gathered, and written by rank 0
        tok.save_pretrained(str(work))
        val_loss = heldout_loss(model, val, tok.pad_token_id)
        log.info("[base] held-out loss %.4f", val_loss)
        return {
            "metrics": {"val_loss": val_loss, "parameters": num_parameters(model), "vocab_size": len(tok)},
            "format": "full",
        }

    return ctx.build("base", spec, build)
