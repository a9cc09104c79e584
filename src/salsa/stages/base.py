"""Base: the tokenizer and the pretrained causal LM every other stage starts from.

`model=tiny` trains a word-level tokenizer on the task's text and pretrains a tiny Gemma on its documents, so the
whole pipeline runs offline. A checkpoint (`model.name_or_path`: a hub id or a local directory) is used as it is:
under LoRA the stage only records where it comes from; under full fine-tuning (`model.finetune=full`) it writes a
float32 copy, which every later stage fine-tunes and reads. Where the hub is out of reach and the preset names a
GGUF file shipped in a package (`model.gguf`, e.g. SmolLM2's), the stage dequantises it once into a safetensors
checkpoint (either way): the manifest's `source` says which weights were used.
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl

from salsa.data.tokens import LMDataset
from salsa.infra.cache import Entry
from salsa.infra.context import Context, log, plain
from salsa.models.hf import load_causal_lm, load_tokenizer, num_parameters, tiny_gemma, train_word_tokenizer
from salsa.models.loaders import AdapterLoader, FullLoader, model_loader
from salsa.models.qlora import BaseSettings, full_finetune, uses_adapters
from salsa.models.sharding import save_pretrained
from salsa.models.sources import PackagedGGUF, resolve_source, write_gguf_checkpoint
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
        return checkpoint_base(ctx)

    # fields of checkpoints only stay out of the embedded model's key (it was keyed before they existed)
    model = {k: v for k, v in plain(m).items() if k not in ("finetune", "gguf")}
    spec = {"model": model, "data": plain(cfg.data)}

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
        metrics = {"val_loss": val_loss, "parameters": num_parameters(model), "vocab_size": len(tok)}
        if cfg.data.name == "synthetic":  # does the base read its prompt? (the asked nouns are known here)
            from salsa.data.synthetic import requested_nouns
            from salsa.models.prompt_use import prompt_dependence

            use = prompt_dependence(model.eval(), tok, data.sft_val, requested_nouns, cfg.sft.max_prompt_length)
            log.info("[base] answer loss %.4f own prompt / %.4f mismatched; asked nouns %.3f / %.3f",
                     use["answer_loss_own"], use["answer_loss_mismatched"], use["asked_noun_loss_own"],
                     use["asked_noun_loss_mismatched"])  # fmt: skip
            metrics.update(use)
        return {"metrics": metrics, "format": "full"}

    return ctx.build("base", spec, build)


def checkpoint_base(ctx: Context) -> Entry:
    """The base of a hub id or local checkpoint: recorded (LoRA on a hub or local base), or written into the stage
    cache (full fine-tuning, or weights that exist offline only as a packaged GGUF file)."""
    m = ctx.cfg.model
    source = resolve_source(str(m.name_or_path), m.get("revision"), PackagedGGUF.from_cfg(m.get("gguf")))
    full = full_finetune(m)
    # how the frozen base is loaded and adapted determines every later stage, so it is part of the key
    spec = {
        "name_or_path": m.name_or_path, "revision": m.get("revision"), "quant": m.get("quant"),
        "lora": None if full else plain(m.get("lora")),
    }  # fmt: skip
    copy = full or source["kind"] == "gguf"
    if copy:  # the weights the copy holds: a GGUF's differ from the hub's, and a package version may change them
        spec.update(finetune="full" if full else "lora", source=source)
    if not copy:
        return ctx.build("base", spec, lambda work, run_id: {"format": "hub", **spec})

    def build(work: Path, run_id: str | None) -> dict:
        trust = m.get("trust_remote_code", False)
        if source["kind"] == "gguf":
            model, meta = write_gguf_checkpoint(PackagedGGUF.from_cfg(m.gguf), work, trust)
        else:
            name = source.get("path") or source["repo"]
            model = load_causal_lm(name, revision=m.get("revision"), trust_remote_code=trust)
            save_pretrained(model, work)
            load_tokenizer(name, trust_remote_code=trust, revision=m.get("revision")).save_pretrained(str(work))
            meta = {"dtype": "float32"}
        metrics = {"parameters": num_parameters(model), "vocab_size": model.config.vocab_size}
        log.info("[base] %s from %s: %.1fM parameters, vocabulary %d", m.name_or_path, source["kind"],
                 metrics["parameters"] / 1e6, metrics["vocab_size"])  # fmt: skip
        return {"format": "full" if full else "hub", "copied": True, "metrics": metrics, **meta, **spec}

    return ctx.build("base", spec, build)


def base_settings(ctx: Context) -> BaseSettings:
    """How LoRA stages load the frozen base: as `model.*` says, from the stage cache's copy where the base stage
    wrote one (a packaged GGUF dequantised)."""
    settings = BaseSettings.from_cfg(ctx.cfg.model)
    base = next((e for e in ctx.entries if e.stage == "base"), None)
    if base is not None and base.manifest.get("copied"):
        settings.name_or_path, settings.revision = str(base.path), None
    return settings


def stage_loader(ctx: Context) -> FullLoader | AdapterLoader:
    """Loads stage outputs for reading: full checkpoints, or adapters on the run's one shared base."""
    settings = base_settings(ctx) if uses_adapters(ctx.cfg.model) else None
    return model_loader(ctx.cfg.model, ctx.device, settings)
