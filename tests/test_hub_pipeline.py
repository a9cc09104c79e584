"""`experiment=paper_gemma2b` end to end on CPU: the hub preset as a researcher runs it, on a Gemma-shaped local
checkpoint (Gemma's special tokens and chat template, 2 small layers, an 8k vocabulary, 4-bit) and UltraFeedback-format
files whose prompts run past the preset's 256 tokens. Counts are scaled down, and answers are 32 tokens (sampling
through a 4-bit base is slow on CPU); prompt lengths, learning rates and batch sizes are the preset's."""

import math

import pytest
import torch

from tests.hub_pipeline import FEW, run_paper_gemma2b

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    monkeypatch = pytest.MonkeyPatch()
    try:
        yield run_paper_gemma2b(
            tmp_path_factory.mktemp("paper"),
            monkeypatch,
            {"vocab": 8192},
            "trainer=cpu",
            "ppo.response_length=32",
            "ppo.iterations=1",
            *FEW,
        )
    finally:
        monkeypatch.undo()


def test_the_preset_sets_the_scale(observed):
    cfg = observed.cfg
    assert cfg.model.name == "gemma2b" and cfg.data.name == "ultrafeedback" and cfg.ref.name == "soup2"
    assert cfg.sft.max_prompt_length == cfg.ppo.max_prompt_length == cfg.eval.max_prompt_length == 256
    assert (cfg.sft.lr, cfg.rm.lr, cfg.ppo.lr, cfg.ppo.batch_size) == (2e-4, 5e-5, 1e-5, 8)
    assert 0.0 <= observed.results["win_rate_vs_sft"] <= 1.0 and 0.0 <= observed.results["win_rate_vs_ppo"] <= 1.0


def test_every_prompt_keeps_bos_and_the_template(observed):
    tok = observed.tokenizer
    start = tok.convert_tokens_to_ids(["<bos>", "<start_of_turn>"])
    end = tok.convert_tokens_to_ids(["<end_of_turn>", "<start_of_turn>", "model"])
    cut = [q for q in observed.queries if q[1] is not None and q[2] > q[1]]
    assert len(cut) > 10  # the over-long prompts were met, in SFT, RM, PPO and evaluation
    for ids, max_length, _ in observed.queries:
        assert ids[:2] == start and ids[-3:] == end
        assert max_length is None or len(ids) <= max_length


def test_reward_heads_trained_in_float32(observed):
    inits, trained = observed.head_inits, observed.trained_heads()
    assert len(inits) == len(trained) == 2  # the policy's reward model and the held-out judge
    for before, after in zip(inits, trained, strict=True):
        assert after.dtype == torch.float32 and not torch.equal(before, after)


def test_first_ppo_iteration_starts_at_the_reference(observed):
    assert abs(observed.first_ppo_kl()) < 1e-3  # the policy is the soup until its first update


def test_one_base_at_a_time_and_an_independent_judge(observed):
    built = [e for e in observed.entries if not e.reused and e.stage != "base"]
    assert len(observed.loads) == len(built) and max(alive for _, _, alive in observed.loads) == 1
    results = observed.results
    assert results["judge"] == "heldout_rm" and results["judge_model"] != observed.stage("rm")[0].key
    assert math.isfinite(results["judge_reward"])
