"""Soup: the weight average of SFT ingredients that becomes SALSA's reference model (and the policy's start)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from salsa.config import SOUP_METHODS
from salsa.infra.cache import Entry
from salsa.infra.context import Context, log, plain
from salsa.merge.soup import SoupError, greedy_soup, soup_checkpoints, soup_lora_adapters
from salsa.models.hf import load_tokenizer
from salsa.stages.base import stage_loader
from salsa.stages.lm import heldout_dataset, heldout_loss


def write_soup(ingredients: list[Entry], out: Path, weights: list[float] | None) -> list[float]:
    formats = {e.manifest.get("format") for e in ingredients}
    bases = {e.manifest.get("base") for e in ingredients}
    if len(formats) != 1:
        raise SoupError(f"ingredients mix formats {sorted(map(str, formats))}")
    if len(bases) != 1:
        raise SoupError(f"ingredients come from different bases {sorted(map(str, bases))}")
    paths = [e.path for e in ingredients]
    if formats == {"lora"}:
        return soup_lora_adapters(paths, out, weights)
    return soup_checkpoints(paths, out, weights)


def run_soup(ctx: Context, ingredients: list[Entry]) -> Entry:
    cfg = ctx.cfg
    s = cfg.soup
    if s.method not in SOUP_METHODS:
        raise SoupError(f"soup.method must be one of {SOUP_METHODS}, got {s.method!r}")
    spec = {"ingredients": [e.key for e in ingredients], "soup": plain(s), "data": plain(cfg.data)}

    def build(work: Path, run_id: str | None) -> dict:
        tok = load_tokenizer(ingredients[0].path)
        val = heldout_dataset(ctx, tok)
        loader = stage_loader(ctx)

        def loss_of(path: Path) -> float:
            return heldout_loss(loader.causal(path), val, tok.pad_token_id)

        members, weights = list(ingredients), (list(s.weights) if s.method == "weighted" else None)
        if s.method == "greedy":
            by_key = {e.key: e for e in ingredients}
            own = {e.key: e.manifest.get("metrics", {}).get("val_loss") for e in ingredients}

            def score(keys: list[str]) -> float:
                if len(keys) == 1:
                    return own[keys[0]] if own[keys[0]] is not None else loss_of(by_key[keys[0]].path)
                with tempfile.TemporaryDirectory(dir=work) as tmp:
                    write_soup([by_key[k] for k in keys], Path(tmp), None)
                    return loss_of(Path(tmp))

            chosen, history = greedy_soup(list(by_key), score)
            log.info(
                "[soup] greedy soup keeps %d of %d ingredients (held-out loss %s)", len(chosen), len(by_key), history
            )
            members = [by_key[k] for k in chosen]
        if len(members) == 1:  # greedy kept one ingredient: the soup is that model
            shutil.copytree(members[0].path, work, dirs_exist_ok=True, ignore=shutil.ignore_patterns("manifest.json"))
            weights = [1.0]
        else:
            weights = write_soup(members, work, weights)
        val_loss = loss_of(work)
        metrics = {"val_loss": val_loss}
        for e in ingredients:
            metrics[f"ingredient{e.manifest.get('index')}_val_loss"] = e.manifest.get("metrics", {}).get("val_loss")
        log.info("[soup] held-out loss %.4f (ingredients: %s)", val_loss, metrics)
        return {
            "metrics": metrics,
            "format": ingredients[0].manifest.get("format"),
            "base": ingredients[0].manifest.get("base"),
            "members": [e.key for e in members],
            "member_indices": [e.manifest.get("index") for e in members],
            "weights": weights,
        }

    return ctx.build("soup", spec, build)
