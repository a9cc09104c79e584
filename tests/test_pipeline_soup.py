"""The first half of the pipeline at debug sizes: base → SFT ingredients → soup, cached and reused."""

import pytest

from salsa.data.tokens import LMDataset
from salsa.infra.context import Context
from salsa.models.hf import load_causal_lm, load_tokenizer
from salsa.pipeline import run
from salsa.stages.lm import heldout_loss
from tests.conftest import make_cfg

pytestmark = pytest.mark.slow


def test_soup_stage_then_full_reuse(tmp_path):
    """Counts builds, so it has a cache of its own: other tests fill the shared one in whatever order they run."""
    cfg = make_cfg(tmp_path, "stage=soup")
    ctx = Context.from_cfg(cfg)
    first = run(cfg, ctx)
    assert set(first["sft_val_loss"]) == {0, 1, 2}
    assert first["ref_val_loss"] is not None
    built = [e.stage for e in ctx.entries if not e.reused]
    assert built.count("sft") == 3 and built.count("soup") == 1 and built.count("base") == 1

    ctx2 = Context.from_cfg(cfg)
    second = run(cfg, ctx2)
    assert all(e.reused for e in ctx2.entries)
    assert second["sft_val_loss"] == first["sft_val_loss"]
    # every stage built exactly once, by the build log
    keys = [b["key"] for b in ctx2.cache.builds()]
    assert len(keys) == len(set(keys)) == 5

    # ingredients differ (seeds), yet share the base
    ingredients = [e for e in ctx.entries if e.stage == "sft"]
    assert len({e.key for e in ingredients}) == 3
    assert {e.manifest["base"] for e in ingredients} == {ctx.entries[0].key}


def test_sft_lowers_heldout_loss(shared_cache):
    cfg = make_cfg(shared_cache, "stage=sft", "ref=sft", "sft.epochs=4", "sft.lr=3e-3")
    ctx = Context.from_cfg(cfg)
    run(cfg, ctx)
    base, sft0 = ctx.entries[0], ctx.entries[1]
    tok = load_tokenizer(base.path)
    val = LMDataset.from_examples(tok, ctx.data.sft_val, cfg.sft.max_prompt_length, cfg.sft.max_response_length)
    before = heldout_loss(load_causal_lm(base.path), val, tok.pad_token_id)
    after = heldout_loss(load_causal_lm(sft0.path), val, tok.pad_token_id)
    assert after == pytest.approx(sft0.manifest["metrics"]["val_loss"], rel=1e-5)
    assert after < before - 0.1


def test_greedy_and_weighted_soups(shared_cache):
    for soup in ("greedy", "weighted"):
        cfg = make_cfg(shared_cache, "stage=soup", f"soup={soup}")
        ctx = Context.from_cfg(cfg)
        run(cfg, ctx)
        entry = ctx.entries[-1]
        assert entry.stage == "soup"
        assert abs(sum(entry.manifest["weights"]) - 1.0) < 1e-9
        if soup == "weighted":
            assert entry.manifest["weights"] == pytest.approx([0.5, 0.3, 0.2])


def test_heldout_loss_in_logit_budgets(shared_cache):
    """Scoring in batches sized by a logit budget (one row at a time, here) gives the loss of one big batch, and
    batches of a 256k vocabulary stay within the budget."""
    from salsa.stages.lm import HELDOUT_BYTES_PER_LOGIT, heldout_batches

    cfg = make_cfg(shared_cache, "stage=sft", "ref=sft")
    ctx = Context.from_cfg(cfg)
    run(cfg, ctx)
    sft0 = ctx.entries[1]
    tok = load_tokenizer(sft0.path)
    val = LMDataset.from_examples(tok, ctx.data.sft_val, cfg.sft.max_prompt_length, cfg.sft.max_response_length)
    model = load_causal_lm(sft0.path)
    one_batch = heldout_loss(model, val, tok.pad_token_id)
    assert len(heldout_batches(val, len(tok))) == 1
    budget = 1  # below one row: every row is its own batch
    assert len(heldout_batches(val, len(tok), logits_budget=budget)) == len(val)
    assert heldout_loss(model, val, tok.pad_token_id, logits_budget=budget) == pytest.approx(one_batch, rel=1e-6)
    gib = 1024**3
    for rows, keep in heldout_batches(val, 256_000, logits_budget=gib):
        assert len(rows) == 1 or len(rows) * keep * 256_000 * HELDOUT_BYTES_PER_LOGIT <= gib
