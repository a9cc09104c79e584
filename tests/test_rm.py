"""The reward model learns a preference it can see."""

from functools import partial

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from salsa.data.synthetic import Pair, SyntheticTask
from salsa.models.hf import load_reward_model, tiny_gemma, train_word_tokenizer
from salsa.stages.rm import PairDataset, RewardModule, pair_batch


def test_reward_model_learns_a_visible_preference(tmp_path):
    task = SyntheticTask(0)
    prompts = task.prompts(160, "train")
    # the preferred answer is always the positive one
    pairs = [Pair(p, "the fox is good .", "the fox is bad .", gold_margin=1.0) for p in prompts]
    tok = train_word_tokenizer(prompts + ["the fox is good . the fox is bad ."])
    torch.manual_seed(0)
    tiny_gemma(
        tok,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    ).save_pretrained(tmp_path)
    model = load_reward_model(tmp_path)
    model.config.pad_token_id = tok.pad_token_id
    data = PairDataset(tok, pairs, 32, 16)
    loader = DataLoader(data, batch_size=16, shuffle=True, collate_fn=partial(pair_batch, pad_id=tok.pad_token_id))
    module = RewardModule(model, lr=3e-3, total_steps=len(loader) * 3)
    trainer = pl.Trainer(
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, loader)
    metrics = trainer.validate(module, DataLoader(data, batch_size=64, collate_fn=loader.collate_fn), verbose=False)
    assert metrics[0]["val/accuracy"] > 0.95
    assert metrics[0]["val/gold_agreement"] > 0.95
