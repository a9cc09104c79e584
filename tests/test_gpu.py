"""The hub path on a GPU, in one command: `pytest -m gpu` (skipped without CUDA; under 8 minutes on one H100).

`experiment=paper_gemma2b` end to end at Gemma-2B's real vocabulary (256k) and width (2048, MLP 16384, 8 heads of
256, one KV head) with 2 layers and random weights, a tokenizer with Gemma's special tokens and chat template, on
UltraFeedback-format local files whose prompts and answers run past 256 tokens, at the paper's lengths (256 + 256)
with few examples. Nothing is downloaded. Checks: the run completes; each stage's peak memory is within 1.3x of the
memory estimator's figure for it; the reward model's head trained; the first PPO iteration's KL is ~0; every query
starts with BOS (and keeps the chat template). The figures it prints go in the docs' "Memory estimates".
"""

import json

import pytest
import torch

from tests.hub_pipeline import FEW, run_paper_gemma2b

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

GEMMA_2B_WIDTH = {"hidden": 2048, "intermediate": 16384, "heads": 8, "head_dim": 256, "layers": 2}


def test_paper_gemma2b_on_a_gpu(tmp_path, monkeypatch):
    from salsa.models.memory import GIB, estimate_from_cfg

    observed = run_paper_gemma2b(
        tmp_path, monkeypatch, {**GEMMA_2B_WIDTH, "vocab": 256_000, "dtype": torch.bfloat16},
        "model.arch.num_hidden_layers=2",  # so the estimator sizes the checkpoint actually run
        "ppo.iterations=2",
        *FEW,
        answer_words=300,  # the estimator sizes full-length sequences: the data must reach them
    )  # fmt: skip
    estimated = estimate_from_cfg(observed.cfg)[0]["stages"]
    rows = []
    for stage, estimate in estimated.items():
        peaks = [e.manifest["metrics"]["peak_memory_gib"] for e in observed.stage(stage) if not e.reused]
        for peak in peaks:
            rows.append({"stage": stage, "measured_gib": round(peak, 2), "estimated_gib": round(estimate / GIB, 2)})
    print(json.dumps({"device": torch.cuda.get_device_name(), "peaks": rows}, indent=1))
    assert {r["stage"] for r in rows} >= {"sft", "soup", "rm", "ppo", "eval"}
    for r in rows:
        assert r["estimated_gib"] / 1.3 <= r["measured_gib"] <= 1.3 * r["estimated_gib"], r

    inits, trained = observed.head_inits, observed.trained_heads()
    assert len(inits) == len(trained) == 2
    assert all(
        after.dtype == torch.float32 and not torch.equal(b, after) for b, after in zip(inits, trained, strict=True)
    )
    # bf16 sampling (KV cache) and bf16 scoring differ by rounding: ~0, not exactly 0, over 256 tokens
    assert abs(observed.first_ppo_kl()) < 0.01 * observed.cfg.ppo.response_length
    bos = observed.tokenizer.bos_token_id
    assert observed.queries and all(ids[0] == bos for ids, _, _ in observed.queries)
    assert any(full > max_length for _, max_length, full in observed.queries if max_length)
