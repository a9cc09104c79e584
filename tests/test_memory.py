"""The memory estimator: hand-computed terms, agreement with real (tiny) models, and the three presets offline."""

import bitsandbytes.functional as bnbf
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from salsa.models.memory import (
    activation_bytes,
    adam_bytes,
    base_bytes,
    estimate,
    estimate_heldout,
    estimate_sampling,
    estimate_supervised,
    generation_logits_bytes,
    inference_activation_bytes,
    kv_cache_bytes,
    layer_activation_bytes,
    layer_gradient_bytes,
    logits_bytes,
    lora_parameters,
    main,
    meta_model,
    model_shapes,
    nf4_bytes,
    scoring_logits_bytes,
)


def test_terms_hand_cases():
    # 16384 weights: 8192 bytes of 4-bit codes, 256 one-byte block scales, 1 float32 second-level scale
    assert nf4_bytes(16384) == 8192 + 256 + 4
    assert nf4_bytes(16384, double_quant=False) == 8192 + 256 * 4
    assert lora_parameters([(4, 8), (8, 4)], r=2) == 2 * 12 + 2 * 12
    assert adam_bytes(10) == 120
    assert kv_cache_bytes(layers=2, batch=3, seq=5, kv_dim=8) == 2 * 2 * 3 * 5 * 8 * 2
    assert layer_activation_bytes(tokens=1, hidden=1, q_dim=1, kv_dim=1, intermediate=1) == 2 * 18
    one = layer_activation_bytes(10, 4, 4, 2, 8)
    assert activation_bytes(3, 10, 4, 4, 2, 8, checkpointing=False) == 3 * one
    assert activation_bytes(3, 10, 4, 4, 2, 8, checkpointing=True) == 3 * 10 * 4 * 2 + one
    # backward through one layer: the gradient in and out (2·hidden) and the MLP's three (3·intermediate), bf16
    assert layer_gradient_bytes(tokens=1, hidden=1, intermediate=1) == 2 * 5
    assert layer_gradient_bytes(tokens=10, hidden=4, intermediate=8) == 10 * 2 * (8 + 24)
    assert logits_bytes(2, 10, training=True) == 2 * 10 * 10 and logits_bytes(2, 10, training=False) == 2 * 10 * 6
    assert generation_logits_bytes(2, 10) == 2 * 10 * 12  # one step: logits, log-softmax, softmax
    assert scoring_logits_bytes(3, 5, 10) == 3 * 5 * 10 * 8  # well under the budget: every row at once


def test_nf4_bytes_match_bitsandbytes():
    w = torch.randn(64, 4096)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    stored = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
    stored += state.state2.absmax.numel() * state.state2.absmax.element_size()
    assert nf4_bytes(w.numel()) == stored


ARCH = {
    "model_type": "llama", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
}  # fmt: skip


def test_meta_shapes_agree_with_a_real_model_and_peft():
    targets = ["q_proj", "v_proj", "down_proj"]
    shapes = model_shapes(meta_model(ARCH), targets)
    real = AutoModelForCausalLM.from_config(meta_model(ARCH).config)
    assert shapes.parameters == sum(p.numel() for p in real.parameters())
    assert shapes.kv_dim == 32 and shapes.q_dim == 64 and shapes.layers == 2
    peft_model = get_peft_model(real, LoraConfig(r=4, target_modules=targets))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert lora_parameters(shapes.targets, 4) == trainable


def test_estimate_parts_add_up():
    shapes = model_shapes(meta_model(ARCH), ["q_proj"])
    parts = estimate(shapes, "nf4", r=2, ingredients=3, rollout_batch=4, minibatch=2, prompt_len=3, response_len=5)
    fixed = parts["base_weights"] + parts["adapters_frozen"] + parts["adapters_trainable"]
    assert parts["peak"] == fixed + parts["grads_and_optimizer"] + max(parts["activations_train"], parts["rollout"])
    # frozen = the soup (rank 3·2) + the reward adapter (rank 2); trainable = two rank-2 adapters + the value head
    assert parts["frozen_adapter_parameters"] == 4 * parts["adapter_parameters"]
    assert parts["trainable_parameters"] == 2 * parts["adapter_parameters"] + 64
    # policy and value forwards of a minibatch (2 × 8 tokens), one layer's backward, logits on the 2 × 5 responses
    forward = activation_bytes(2, 16, 64, 64, 32, 128, checkpointing=True)
    expected = 2 * forward + layer_gradient_bytes(16, 64, 128) + logits_bytes(10, 96, True)
    assert parts["activations_train"] == expected
    # SFT differs from RM training on the same tokens by the LM head's logits (and their gradient)
    sft = estimate_supervised(shapes, "nf4", 2, batch=3, seq=7, lm_head=True)
    rm = estimate_supervised(shapes, "nf4", 2, batch=3, seq=7, lm_head=False)
    assert sft - rm == logits_bytes(21, 96, True)
    # RM training: the base, one adapter + head with AdamW, the checkpointed forward, one layer's backward
    adapter = parts["adapter_parameters"] + 64
    forward = activation_bytes(2, 21, 64, 64, 32, 128, checkpointing=True)
    assert rm == parts["base_weights"] + 4 * adapter + adam_bytes(adapter) + forward + layer_gradient_bytes(21, 64, 128)
    plain = estimate(shapes, "none", r=2, ingredients=3, rollout_batch=4, minibatch=2, prompt_len=3, response_len=5)
    assert plain["base_weights"] > parts["base_weights"] and plain["merge"] == 0
    # the soup merged into a plain base: one projection's weight and delta in float32, before the rollout
    merged = estimate(
        shapes, "none", r=2, ingredients=3, rollout_batch=4, minibatch=2, prompt_len=3, response_len=5,
        merged_start=True,
    )  # fmt: skip
    assert merged["merge"] == 2 * max(i * o for i, o in shapes.targets) * 4
    assert merged["peak"] == plain["peak"] - max(plain["activations_train"], plain["rollout"]) + max(
        plain["activations_train"], plain["rollout"], merged["merge"]
    )


# published parameter counts of the three models
@pytest.mark.parametrize(("preset", "billions"), [("gemma2b", 2.51), ("llama2_7b", 6.74), ("mistral7b", 7.24)])
def test_presets_estimate_offline(monkeypatch, capsys, preset, billions):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = main([f"model={preset}", "ppo.batch_size=8", "ppo.num_minibatches=2", "ppo.response_length=128"])
    assert text in capsys.readouterr().out
    assert f"parameters            {billions:.2f} B" in text
    for part in (
        "base weights",
        "adapters",
        "grads + optimizer",
        "activations (train)",
        "rollout",
        "SFT peak",
        "SFT held-out loss",
        "soup held-out loss",
        "RM peak",
        "eval sampling",
        "export sampling",
        "per stage",
        "needs",
    ):
        assert part in text


def test_heldout_and_sampling_estimates(monkeypatch):
    """The held-out loss holds as many rows of logits as its budget allows (at least one); sampling holds the KV
    cache and every step's float32 logits. Both on top of the base and the stage's adapters."""
    from salsa.stages import lm

    shapes = model_shapes(meta_model(ARCH), ["q_proj"])
    fixed = base_bytes(shapes, "nf4") + lora_parameters(shapes.targets, 6) * 4
    per_row = (5 + 1) * 96 * lm.HELDOUT_BYTES_PER_LOGIT
    monkeypatch.setattr(lm, "HELDOUT_BUDGET", 3 * per_row)  # room for three rows of 128
    assert (
        estimate_heldout(shapes, "nf4", 6, 128, 4, 5) == fixed + inference_activation_bytes(shapes, 3 * 9) + 3 * per_row
    )
    monkeypatch.setattr(lm, "HELDOUT_BUDGET", 1)  # one row even when one row is over budget
    assert estimate_heldout(shapes, "nf4", 6, 128, 4, 5) == fixed + inference_activation_bytes(shapes, 9) + per_row
    sampling = estimate_sampling(shapes, "nf4", 6, batch=2, prompt=4, new=5)
    logits = max(generation_logits_bytes(2, 96), scoring_logits_bytes(2, 5, 96))
    assert sampling == fixed + kv_cache_bytes(2, 2, 9, 32) + logits + inference_activation_bytes(shapes, 18)
