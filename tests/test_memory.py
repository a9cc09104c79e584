"""The memory estimator: hand-computed terms, agreement with real (tiny) models, the three QLoRA presets and
SmolLM2's full fine-tuning offline."""

import re

import bitsandbytes.functional as bnbf
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from salsa.models.memory import (
    activation_bytes,
    adam_bytes,
    adamw_step_bytes,
    autocast_copy_bytes,
    base_bytes,
    causal_cast,
    estimate,
    estimate_full,
    estimate_full_heldout,
    estimate_full_sampling,
    estimate_full_supervised,
    estimate_heldout,
    estimate_sampling,
    estimate_supervised,
    eval_parameters,
    full_trainable_bytes,
    generation_logits_bytes,
    inference_activation_bytes,
    kv_cache_bytes,
    layer_activation_bytes,
    layer_gradient_bytes,
    loads_judge_model,
    logits_bytes,
    lora_parameters,
    main,
    meta_model,
    mixed_layer_activation_bytes,
    model_shapes,
    nf4_bytes,
    rollout_bytes,
    scalar_cast,
    scalar_parameters,
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
    # rollout=hf_merged: a bf16 copy of the whole policy, held for the run
    copy = estimate(
        shapes, "nf4", r=2, ingredients=3, rollout_batch=4, minibatch=2, prompt_len=3, response_len=5,
        sampling_copy=True,
    )  # fmt: skip
    assert copy["sampling_copy"] == 2 * shapes.parameters and copy["peak"] == parts["peak"] + 2 * shapes.parameters


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


# ---------------------------------------------------------------------------------------------------------------
# Full fine-tuning (model.finetune=full)
# ---------------------------------------------------------------------------------------------------------------
def test_full_terms_hand_cases():
    # a trained float32 parameter: 4 (weight) + 4 (gradient) + 8 (AdamW's two moments) bytes
    assert full_trainable_bytes(10) == 10 * (4 + 4 + 8)
    assert autocast_copy_bytes(10) == 10 * 2  # bf16 copies of cast weights
    assert adamw_step_bytes(10) == 10 * 4  # foreach AdamW's float32 square roots
    # a scalar-head model: the LM head goes unless it is tied (then it is the embedding), a hidden → 1 head comes
    assert scalar_parameters(100, untied_head=0, hidden=8) == 108
    assert scalar_parameters(100, untied_head=30, hidden=8) == 78
    # evaluation: reference + answering model (causal), reward model (+ judge) (scalar)
    assert eval_parameters(10, 11, judge=False) == 2 * 10 + 11
    assert eval_parameters(10, 11, judge=True) == 2 * 10 + 2 * 11
    # one layer under autocast on float32 weights: bf16 (5·hidden + 2·q + 2·kv + 4·intermediate), float32 4·hidden
    assert mixed_layer_activation_bytes(tokens=1, hidden=1, q_dim=1, kv_dim=1, intermediate=1) == 2 * 13 + 4 * 4
    assert mixed_layer_activation_bytes(10, 4, 4, 2, 8) == 10 * (2 * (20 + 8 + 4 + 32) + 4 * 16)
    assert layer_gradient_bytes(tokens=1, hidden=1, intermediate=1, residual_bytes=4) == 4 * 2 + 2 * 3
    assert layer_activation_bytes(1, 1, 1, 1, 1, dtype_bytes=4) == 4 * 18
    assert kv_cache_bytes(layers=2, batch=3, seq=5, kv_dim=8, dtype_bytes=4) == 2 * 2 * 3 * 5 * 8 * 4
    # the held-out judge reward model: asked for, or `auto` on data without a gold reward
    assert loads_judge_model("heldout_rm", "synthetic") and loads_judge_model("auto", "ultrafeedback")
    assert not loads_judge_model("auto", "synthetic") and not loads_judge_model("gold", "hh_rlhf")
    assert not loads_judge_model("rm", "hh_rlhf")


@pytest.mark.parametrize("tied", [False, True])
def test_tied_embeddings_counted_once_and_scalar_models(tied):
    """A tied LM head is the embedding: one tensor in the causal LM's count, and it stays in the scalar-head model
    (reward, value) built from the same config, which `scalar_parameters` predicts."""
    arch = {**ARCH, "tie_word_embeddings": tied}
    shapes = model_shapes(meta_model(arch), [])
    real = AutoModelForCausalLM.from_config(meta_model(arch).config)
    assert shapes.parameters == sum(p.numel() for p in real.parameters())
    assert shapes.untied_head == (0 if tied else 96 * 64)
    untied = 0 if tied else 96 * 64
    assert shapes.parameters == 96 * 64 + untied + 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64) + 64
    config = meta_model(arch).config
    config.num_labels = 1
    scalar = AutoModelForSequenceClassification.from_config(config)
    assert sum(p.numel() for p in scalar.parameters()) == scalar_parameters(shapes.parameters, shapes.untied_head, 64)


def saved_bytes(layers: int, tokens: tuple[int, int]) -> tuple[int, int]:
    """(bytes autograd saves for backward besides the float32 parameters themselves, parameters of the linear
    layers) for a training forward of a float32 Llama of `layers` layers under bf16 autocast (CPU's autocast: the
    linear layers and attention run in bf16 as on GPUs)."""
    arch = {**ARCH, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": layers}
    model = AutoModelForCausalLM.from_config(meta_model(arch).config, attn_implementation="sdpa")
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=torch.randint(0, 96, tokens))
    return sum(saved.values()), model_shapes(model, []).linear


def test_mixed_layer_activations_match_what_autograd_saves():
    """Per decoder layer (the difference of a 4- and a 2-layer model), a float32 model under bf16 autocast saves
    `mixed_layer_activation_bytes` and the bf16 copies of the layer's linear weights."""
    tokens = (2, 32)
    (small, small_linear), (large, large_linear) = saved_bytes(2, tokens), saved_bytes(4, tokens)
    per_layer = (large - small) / 2
    expected = mixed_layer_activation_bytes(64, 128, 128, 64, 256) + autocast_copy_bytes(
        (large_linear - small_linear) // 2
    )
    assert per_layer == pytest.approx(expected, rel=0.03)


def test_estimate_full_parts_add_up():
    shapes = model_shapes(meta_model(ARCH), [])
    causal = shapes.parameters
    scalar = scalar_parameters(causal, shapes.untied_head, 64)
    parts = estimate_full(shapes, rollout_batch=4, minibatch=2, prompt_len=3, response_len=5)
    # policy and value trained (float32 weights, gradients, AdamW), reference and reward model frozen (float32)
    assert parts["weights_trainable"] + parts["grads_and_optimizer"] == full_trainable_bytes(causal + scalar)
    assert parts["weights_frozen"] == 4 * (causal + scalar)
    # the update: policy and value forwards of 2 × 8 tokens, every layer kept (2 layers), one layer's backward with a
    # float32 residual, logits on the 2 × 5 response positions, bf16 copies of both models' cast weights
    train = (
        2 * 2 * mixed_layer_activation_bytes(16, 64, 64, 32, 128)
        + layer_gradient_bytes(16, 64, 128, residual_bytes=4)
        + logits_bytes(10, 96, True)
        + 2 * (shapes.linear + 96 * 64 + shapes.linear + 64)
    )
    assert parts["activations_train"] == train
    assert parts["rollout"] == rollout_bytes(shapes, 4, 8, 5) and parts["optimizer_step"] == 4 * (causal + scalar)
    fixed = parts["weights_trainable"] + parts["weights_frozen"] + parts["grads_and_optimizer"]
    assert parts["peak"] == fixed + max(train, parts["rollout"], parts["optimizer_step"])
    # SFT: one causal LM trained on 3 × 7 tokens through its 2 layers, logits on every position
    sft = estimate_full_supervised(shapes, batch=3, seq=7, lm_head=True)
    sft_train = (
        2 * mixed_layer_activation_bytes(21, 64, 64, 32, 128)
        + layer_gradient_bytes(21, 64, 128, residual_bytes=4)
        + logits_bytes(21, 96, True)
        + autocast_copy_bytes(causal_cast(shapes))
    )
    assert sft == full_trainable_bytes(causal) + max(sft_train, adamw_step_bytes(causal))
    # RM: one scalar-head model, no LM-head logits
    rm = estimate_full_supervised(shapes, batch=3, seq=7, lm_head=False)
    rm_train = sft_train - logits_bytes(21, 96, True) - autocast_copy_bytes(causal_cast(shapes) - scalar_cast(shapes))
    assert rm == full_trainable_bytes(scalar) + max(rm_train, adamw_step_bytes(scalar))


def test_full_heldout_and_sampling_estimates(monkeypatch):
    """Full checkpoints are read in float32 without autocast: weights, KV cache and activations at 4 bytes."""
    from salsa.stages import lm

    shapes = model_shapes(meta_model(ARCH), [])
    per_row = (5 + 1) * 96 * lm.HELDOUT_BYTES_PER_LOGIT
    monkeypatch.setattr(lm, "HELDOUT_BUDGET", 3 * per_row)  # room for three rows of 128
    assert estimate_full_heldout(shapes, 128, 4, 5) == (
        4 * shapes.parameters + inference_activation_bytes(shapes, 3 * 9, 4) + 3 * per_row
    )
    sampling = estimate_full_sampling(shapes, 1000, batch=2, prompt=4, new=5)
    logits = max(generation_logits_bytes(2, 96), scoring_logits_bytes(2, 5, 96))
    assert sampling == 4 * 1000 + kv_cache_bytes(2, 2, 9, 32, 4) + logits + inference_activation_bytes(shapes, 18, 4)


def test_full_checkpoints_are_read_on_the_runs_device(tmp_path):
    """The full plan counts the soup, evaluation and export on the GPU because FullLoader loads full checkpoints
    onto the device it is given (here the meta device, which holds no memory)."""
    from salsa.models.loaders import model_loader

    AutoModelForCausalLM.from_config(meta_model(ARCH).config).save_pretrained(tmp_path)
    loader = model_loader({"name_or_path": "some/checkpoint", "finetune": "full"}, device="meta")
    assert next(loader.causal(tmp_path).parameters()).device.type == "meta"
    assert next(loader.reward(tmp_path).parameters()).device.type == "meta"


def gib_of(text: str, label: str) -> float:
    return float(re.search(rf"^  {re.escape(label)}\s+([0-9.]+) GiB", text, re.M).group(1))


def test_smollm2_estimates_full_finetuning(monkeypatch, capsys):
    """`model=smollm2` fine-tunes every weight. By hand, at its preset's sizes (PPO rollout batch 32, minibatch 16,
    128 + 64 tokens; 30 layers, hidden 576, q 576, kv 192, intermediate 1536, vocabulary 49152):

    - parameters: 134.5 M (the tied LM head is the embedding, counted once); a scalar-head model has 576 more.
    - fixed: policy + value trained, 2 × 134.5 M × (4 weight + 4 gradient + 8 AdamW) = 4.30 GB; reference +
      reward model frozen, 2 × 134.5 M × 4 = 1.08 GB; together 5.38 GB = 5.01 GiB.
    - the update's transient (larger than the rollout's ~0.9 GiB and AdamW's 1 GiB temporary): two forwards of
      16 × 192 = 3072 tokens through 30 uncheckpointed layers at ~30 KB per token and layer (10.5 k bf16 values +
      4 × 576 float32) = 5.6 GB, logits of 16 × 64 positions × 49152 × 10 B = 0.5 GB, bf16 copies of both models'
      weights 2 × 134.5 M × 2 B = 0.54 GB: ~6.6 GB = ~6.2 GiB.
    - PPO peak ~11.2 GiB: between 10 and 12.5 GiB. The QLoRA plan of the same model (`model.finetune=lora`) is
      ~5.3 GiB: its one bf16 base is shared and gradient checkpointing keeps one layer's activations.
    """
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = main(["model=smollm2"])
    assert text in capsys.readouterr().out
    assert "full fine-tuning" in text and "134.5 M" in text
    # no adapter lines: they mean nothing when every weight is trained
    assert "per adapter" not in text and not re.search(r"^  (adapters|base weights) ", text, re.M)
    assert gib_of(text, "weights (4 models)") + gib_of(text, "grads + optimizer") == pytest.approx(5.01, abs=0.02)
    assert 10 < gib_of(text, "PPO peak") < 12.5
    assert "per stage (GPU)       sft" in text and "per stage (host)" in text
    lora = main(["model=smollm2", "model.finetune=lora"])
    assert "full fine-tuning" not in lora and "adapters" in lora
    assert gib_of(lora, "PPO peak") < gib_of(text, "PPO peak") / 1.5
