"""`rm.normalize`: the reward model's head is scaled after training so its held-out scores have unit s.d."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from salsa.infra.context import Context
from salsa.models.hf import load_reward_model, load_tokenizer, scale_score_head, sequence_scores
from salsa.pipeline import run
from salsa.stages.rm import PairDataset, pair_batch, rm_settings, score_metrics
from tests.conftest import make_cfg, with_upstream


def test_scaling_the_head_scales_every_score(tmp_path):
    from salsa.models.hf import tiny_gemma, train_word_tokenizer

    tok = train_word_tokenizer(["a b c d ."])
    tiny_gemma(tok, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
               num_key_value_heads=1, head_dim=8).save_pretrained(tmp_path)  # fmt: skip
    model = load_reward_model(tmp_path).eval()
    ids = torch.tensor([[3, 4, 5, 6], [4, 4, 3, 0]])
    attention = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    with torch.no_grad():
        before = sequence_scores(model, ids, attention)
        scale_score_head(model, 2.5)
        torch.testing.assert_close(sequence_scores(model, ids, attention), 2.5 * before)


def test_metrics_keep_the_raw_sd_either_way():
    raw = {"accuracy": 0.6, "score_mean": 2.0, "score_mean_square": 8.0}  # s.d. 2
    kept = score_metrics(torch.nn.Module(), dict(raw), False, "rm")
    assert kept == {"accuracy": 0.6, "raw_score_sd": pytest.approx(2.0), "score_mean": 2.0}
    head = torch.nn.Module()
    head.score = torch.nn.Linear(3, 1, bias=False)
    weight = head.score.weight.detach().clone()
    scaled = score_metrics(head, dict(raw), True, "rm")
    assert scaled == {"accuracy": 0.6, "raw_score_sd": pytest.approx(2.0), "reward_scale": pytest.approx(0.5),
                      "score_mean": pytest.approx(1.0)}  # fmt: skip
    torch.testing.assert_close(head.score.weight, weight / 2)
    with pytest.raises(RuntimeError, match="rm.normalize=false"):
        score_metrics(head, {"score_mean": 1.0, "score_mean_square": 1.0}, True, "rm")


def test_a_reward_model_that_barely_separates_answers_is_named(caplog):
    head = torch.nn.Module()
    head.score = torch.nn.Linear(3, 1, bias=False)
    with caplog.at_level("WARNING", logger="salsa"):
        score_metrics(head, {"score_mean": 0.5, "score_mean_square": 0.25 + 0.01**2}, True, "rm")  # s.d. 0.01
    assert "barely separates answers" in caplog.text and "50 s.d. from zero" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="salsa"):
        score_metrics(head, {"score_mean": 0.1, "score_mean_square": 0.01 + 0.4**2}, True, "rm")  # the default's
    assert "barely" not in caplog.text


def test_the_setting_keys_the_reward_model(tmp_path):
    assert rm_settings(make_cfg(tmp_path))["normalize"] is True
    assert rm_settings(make_cfg(tmp_path, "rm.normalize=false"))["normalize"] is False


@pytest.mark.slow
def test_the_normalised_reward_model_is_the_raw_one_scaled_to_unit_sd(upstream, tmp_path):
    """Trained alike (same seed and pairs), the two reward models differ only by the head's factor, and the
    normalised one's scores over the held-out pairs' answers have mean square minus squared mean = 1."""
    cfg = make_cfg(with_upstream(upstream, tmp_path), "stage=rm", "rm.normalize=false")
    ctx = Context.from_cfg(cfg)
    run(cfg, ctx)
    (raw,) = [e for e in ctx.entries if e.stage == "rm"]
    default = Context.from_cfg(make_cfg(tmp_path, "stage=rm"))
    run(default.cfg, default)  # cached: the upstream's reward model
    (normed,) = [e for e in default.entries if e.stage == "rm"]
    assert raw.key != normed.key
    scale = normed.manifest["metrics"]["reward_scale"]
    assert scale == pytest.approx(1 / raw.manifest["metrics"]["raw_score_sd"], rel=1e-4)
    assert normed.manifest["metrics"]["accuracy"] == raw.manifest["metrics"]["accuracy"]  # a scale keeps the order
    a, b = load_file(raw.path / "model.safetensors"), load_file(normed.path / "model.safetensors")
    for k, v in a.items():
        torch.testing.assert_close(b[k], v * scale if k.startswith("score.") else v, rtol=1e-5, atol=0)

    model, tok = load_reward_model(normed.path).eval(), load_tokenizer(normed.path)
    r = cfg.rm
    pairs = PairDataset(tok, ctx.data.pairs_val, r.max_prompt_length, r.max_response_length)
    loader = DataLoader(pairs, batch_size=64, collate_fn=lambda items: pair_batch(items, tok.pad_token_id))
    with torch.no_grad():
        scores = torch.cat([sequence_scores(model, b["input_ids"], b["attention_mask"]) for b in loader])
    assert scores.numel() == 2 * len(ctx.data.pairs_val)
    assert scores.std(unbiased=False).item() == pytest.approx(1.0, rel=1e-4)
    assert scores.mean().item() == pytest.approx(normed.manifest["metrics"]["score_mean"], rel=1e-4, abs=1e-5)
