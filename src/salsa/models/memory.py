"""GPU memory of every stage of a run, estimated from the model's config alone (meta device), under the run's plan:
QLoRA adapters on one frozen base (`model.finetune=lora`, the 2B+ presets), or full fine-tuning (`model.finetune=full`,
e.g. `model=smollm2`).

    python -m salsa.models.memory model=gemma2b                       # any Hydra override of src/train.py works
    python -m salsa.models.memory experiment=paper_llama2_7b ppo.batch_size=16 ppo.response_length=256
    python -m salsa.models.memory model=smollm2                       # full fine-tuning: four float32 models in PPO

The model is built on the meta device from the preset's shipped config (`model.arch`), so nothing is downloaded.
Sizes come from the config: rollout batch `ppo.batch_size`, training minibatch `ppo.batch_size / num_minibatches`,
sequence `ppo.max_prompt_length + ppo.response_length`, `len(ref.ingredients)` soup ingredients. SFT and RM
peaks use `sft.*` / `rm.*` batch sizes and lengths; the held-out losses (SFT, soup) score at most `HELDOUT_BUDGET`
bytes of logits at a time; evaluation and export sample `eval.batch_size` / `eval.answers.batch_size` answers at a
time. Each stage loads the base once and frees it when it ends (`salsa.infra.context`), so the run needs the largest
stage's peak.

Under full fine-tuning every model is a float32 checkpoint (`salsa.models.actors.FullActors`): PPO holds the policy
and the value model (trained: weights, gradients and AdamW's two moments, all float32) and the frozen reference and
reward model; SFT and RM train one model. Training runs under `trainer=gpu`'s bf16-mixed autocast, and gradient
checkpointing is never applied to full models (only to adapter models, `salsa.models.qlora`). Full checkpoints are
read for the soup's held-out losses, evaluation and export through `salsa.models.loaders.FullLoader` on the run's
device; an SFT ingredient's own held-out loss runs after Lightning has moved it back to the CPU when `fit` ended, so
that one takes host memory, reported apart from the GPU's.

Each term is a small function below. Activations are an approximation: the tensors autograd keeps for one decoder
layer in bf16, and the gradients backward holds while it goes through one, counted for a Llama/Gemma layer; CUDA's
context and allocator fragmentation (~0.5-1 GiB) come on top.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

GIB = 1024**3
BF16, FP32 = 2, 4


# ---------------------------------------------------------------------------------------------------------------
# Pure arithmetic (bytes), each checked against a hand-computed case in tests/test_memory.py
# ---------------------------------------------------------------------------------------------------------------
def nf4_bytes(n: int, blocksize: int = 64, double_quant: bool = True, block2: int = 256) -> int:
    """4 bits per weight plus absmax scales: one per block of `blocksize`; with double quantisation the scales are
    themselves 8-bit, with one float32 scale per `block2` of them (a few constant bytes per tensor are ignored)."""
    blocks = math.ceil(n / blocksize)
    scales = blocks + math.ceil(blocks / block2) * FP32 if double_quant else blocks * FP32
    return math.ceil(n / 2) + scales


def lora_parameters(shapes: Sequence[tuple[int, int]], r: int) -> int:
    """A (r × in) and B (out × r) for each adapted linear layer of shape (in, out)."""
    return sum(r * (i + o) for i, o in shapes)


def adam_bytes(n_trainable: int) -> int:
    """Float32 gradients and AdamW's two moments per trainable parameter (the weights are counted as adapters)."""
    return n_trainable * 3 * FP32


def kv_cache_bytes(layers: int, batch: int, seq: int, kv_dim: int, dtype_bytes: int = BF16) -> int:
    """Keys and values of every layer for every position of the batch."""
    return 2 * layers * batch * seq * kv_dim * dtype_bytes


def layer_activation_bytes(
    tokens: int, hidden: int, q_dim: int, kv_dim: int, intermediate: int, dtype_bytes: int = BF16
) -> int:
    """What autograd keeps for one decoder layer (bf16): norms' inputs/outputs and residuals (6·hidden), q and the
    attention output with their rotary/attention copies (4·q_dim), k and v likewise (4·kv_dim), and the MLP's gate,
    up, activation and product (4·intermediate). `dtype_bytes`: float32 (4) for a model computing in float32."""
    return tokens * dtype_bytes * (6 * hidden + 4 * q_dim + 4 * kv_dim + 4 * intermediate)


def mixed_layer_activation_bytes(tokens: int, hidden: int, q_dim: int, kv_dim: int, intermediate: int) -> int:
    """What autograd keeps for one decoder layer of a float32 model under bf16 autocast (full fine-tuning). The
    residual stream stays float32 (the embedding and the norms are not autocast), so both RMSNorms keep their float32
    input and normalised output (4·hidden float32); every linear layer casts its input to bf16 and keeps that copy:
    q, k, v, gate and up each their own (5·hidden) and o_proj the attention output (q_dim); attention keeps the
    rotated q, k and v (q_dim + 2·kv_dim); the MLP its gate, activation, up and product (4·intermediate), bf16.
    Counted from the tensors autograd saves in a Llama layer (tests/test_memory.py measures them)."""
    bf16 = 5 * hidden + 2 * q_dim + 2 * kv_dim + 4 * intermediate
    return tokens * (BF16 * bf16 + FP32 * 4 * hidden)


def activation_bytes(
    layers: int, tokens: int, hidden: int, q_dim: int, kv_dim: int, intermediate: int, checkpointing: bool
) -> int:
    """One forward's activations: every layer's, or with checkpointing each layer's input plus one layer's
    activations while it is recomputed."""
    one = layer_activation_bytes(tokens, hidden, q_dim, kv_dim, intermediate)
    return layers * tokens * hidden * BF16 + one if checkpointing else layers * one


def layer_gradient_bytes(tokens: int, hidden: int, intermediate: int, residual_bytes: int = BF16) -> int:
    """What backward holds on top while it goes through one decoder layer (bf16): the gradient arriving at the layer
    and the one it passes down (2·hidden), and in the MLP the gradients of the product and of the gate's and up's
    outputs, alive together before the product's is freed (3·intermediate). One layer at a time, with or without
    checkpointing. `residual_bytes`: float32 (4) where the residual stream is float32 (a float32 model under
    autocast), and so is its gradient."""
    return tokens * (residual_bytes * 2 * hidden + BF16 * 3 * intermediate)


def full_trainable_bytes(n_trainable: int) -> int:
    """A fully fine-tuned model's parameters: float32 weights, float32 gradients and AdamW's two float32 moments."""
    return n_trainable * FP32 + adam_bytes(n_trainable)


def autocast_copy_bytes(n_cast: int) -> int:
    """The bf16 copies bf16-mixed autocast makes of a trained float32 model's linear weights: autograd keeps each
    for the backward of its matmul (Lightning's autocast does not cache casts, so frozen models' copies are
    transient, one layer at a time)."""
    return n_cast * BF16


def adamw_step_bytes(n_trainable: int) -> int:
    """The optimizer step's temporary: foreach AdamW (the default on GPUs) takes the square root of every second
    moment into a new float32 tensor list before it updates the weights. After backward, when activations are gone."""
    return n_trainable * FP32


def scalar_parameters(parameters: int, untied_head: int, hidden: int) -> int:
    """A *ForSequenceClassification model of the same config (reward and value models): the causal LM without its
    untied LM head (a tied one is the embedding, which stays), with a hidden → 1 score head and no bias."""
    return parameters - untied_head + hidden


def eval_parameters(causal: int, scalar: int, judge: bool) -> int:
    """Parameters evaluation holds at once (`salsa.stages.evaluate.run_eval`): the reference and the reward model for
    the whole stage, the held-out judge reward model when there is one, and one answering model at a time (each is
    loaded for its `answer` call and freed after it)."""
    return 2 * causal + (2 if judge else 1) * scalar


def logits_bytes(tokens: int, vocab: int, training: bool) -> int:
    """The LM head's output on the response positions: bf16 logits and their float32 log-softmax; training adds the
    float32 gradient."""
    return tokens * vocab * (BF16 + FP32 + (FP32 if training else 0))


def generation_logits_bytes(batch: int, vocab: int) -> int:
    """Sampling holds one step at a time (`salsa.models.generation.SampledLogprobs`): the step's float32 logits,
    their log-softmax (to read the sampled token's log-probability) and the sampling softmax."""
    return batch * vocab * 3 * FP32


def scoring_logits_bytes(batch: int, positions: int, vocab: int) -> int:
    """Scoring sampled answers against a reference, a few rows at a time (`salsa.models.actors.row_chunks`): each
    row's logits and their log-softmax, as many rows as the scoring budget allows (at least one)."""
    from salsa.models.actors import SCORING_BUDGET

    per_row = positions * vocab * 2 * FP32
    return min(batch, max(1, SCORING_BUDGET // per_row)) * per_row


# ---------------------------------------------------------------------------------------------------------------
# Shapes from a config on the meta device
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Shapes:
    parameters: int  # all parameters of the causal LM
    linear: int  # parameters of the decoder's nn.Linear layers (what 4-bit quantisation stores in nf4)
    targets: list[tuple[int, int]]  # (in, out) of each linear layer LoRA adapts
    layers: int
    hidden: int
    q_dim: int
    kv_dim: int
    intermediate: int
    vocab: int
    # an untied LM head's parameters; 0 when it is tied to the embedding (one tensor, counted once in `parameters`)
    untied_head: int = 0


def meta_model(arch: dict[str, Any]) -> nn.Module:
    """The causal LM of a config dict (a hub config.json's fields, with `model_type`), with no weights allocated."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(arch)
    model_type = fields.pop("model_type")
    config = AutoConfig.for_model(model_type, **fields)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def model_shapes(model: nn.Module, target_modules: Sequence[str]) -> Shapes:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    output = model.get_output_embeddings()
    tied = output.weight is model.get_input_embeddings().weight
    linear, targets = 0, []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not output:
            linear += module.weight.numel()
            if name.rsplit(".", 1)[-1] in target_modules:
                targets.append((module.in_features, module.out_features))
    return Shapes(
        parameters=sum(p.numel() for p in model.parameters()),
        linear=linear,
        targets=targets,
        layers=cfg.num_hidden_layers,
        hidden=cfg.hidden_size,
        q_dim=cfg.num_attention_heads * head_dim,
        kv_dim=cfg.num_key_value_heads * head_dim,
        intermediate=cfg.intermediate_size,
        vocab=cfg.vocab_size,
        untied_head=0 if tied else output.weight.numel(),
    )


# ---------------------------------------------------------------------------------------------------------------
# The PPO estimate
# ---------------------------------------------------------------------------------------------------------------
def estimate(
    shapes: Shapes,
    quant: str,
    r: int,
    ingredients: int,
    rollout_batch: int,
    minibatch: int,
    prompt_len: int,
    response_len: int,
    checkpointing: bool = True,
    merged_start: bool = False,
    sampling_copy: bool = False,
) -> dict[str, float]:
    """Bytes of each part of a PPO run on one GPU under the QLoRA plan (see the module docstring). `merged_start`:
    the soup is folded into a plain-weight base first (`ppo.merge_start`); its negated adapter replaces the soup's,
    and the merge itself holds one projection's weight and delta in float32 for a moment, before the rollout.
    `sampling_copy` (`rollout=hf_merged`): a bfloat16 copy of the policy with its adapters merged samples the
    rollouts; it stays allocated for the run, and building it holds one projection's float32 sum for a moment."""
    seq = prompt_len + response_len
    base = base_bytes(shapes, quant)
    one_adapter = lora_parameters(shapes.targets, r)
    frozen = lora_parameters(shapes.targets, r * ingredients) + one_adapter  # the soup (rank Σr) and the reward's
    trainable = 2 * one_adapter + shapes.hidden  # the policy's new adapter, the value adapter and its head
    forward = activation_bytes(
        shapes.layers, minibatch * seq, shapes.hidden, shapes.q_dim, shapes.kv_dim, shapes.intermediate, checkpointing
    )
    backward = layer_gradient_bytes(minibatch * seq, shapes.hidden, shapes.intermediate)  # policy, then value
    train = 2 * forward + backward + logits_bytes(minibatch * response_len, shapes.vocab, training=True)
    rollout = rollout_bytes(shapes, rollout_batch, seq, response_len)
    merge = 2 * max(i * o for i, o in shapes.targets) * FP32 if merged_start else 0
    parts = {
        "base_weights": base,
        "adapters_frozen": frozen * FP32,
        "adapters_trainable": trainable * FP32,
        "grads_and_optimizer": adam_bytes(trainable),
        "activations_train": train,
        "rollout": rollout,
        "merge": merge,
        "sampling_copy": shapes.parameters * BF16 if sampling_copy else 0,
    }
    transient = ("activations_train", "rollout", "merge")
    parts["peak"] = sum(v for k, v in parts.items() if k not in transient) + max(train, rollout, merge)
    parts.update(
        parameters=shapes.parameters, linear_parameters=shapes.linear, adapter_parameters=one_adapter,
        trainable_parameters=trainable, frozen_adapter_parameters=frozen,
    )  # fmt: skip
    return parts


def rollout_bytes(shapes: Shapes, batch: int, seq: int, response: int) -> int:
    """Sampling the rollout and scoring it: the bf16 KV cache, and the larger of one sampling step's logits and the
    reference's scoring of the answers (its log-probs, a few rows at a time)."""
    return kv_cache_bytes(shapes.layers, batch, seq, shapes.kv_dim) + max(
        generation_logits_bytes(batch, shapes.vocab), scoring_logits_bytes(batch, response, shapes.vocab)
    )


def estimate_supervised(
    shapes: Shapes, quant: str, r: int, batch: int, seq: int, lm_head: bool, checkpointing: bool = True
) -> float:
    """Peak bytes of SFT (`lm_head`: logits on every position) or reward-model training: the base, one trainable
    adapter with its optimizer, one forward's activations and one layer's gradients in backward."""
    base = base_bytes(shapes, quant)
    adapter = lora_parameters(shapes.targets, r) + shapes.hidden
    tokens = batch * seq
    acts = activation_bytes(
        shapes.layers, tokens, shapes.hidden, shapes.q_dim, shapes.kv_dim, shapes.intermediate, checkpointing
    )
    return (
        base
        + adapter * FP32
        + adam_bytes(adapter)
        + acts
        + layer_gradient_bytes(tokens, shapes.hidden, shapes.intermediate)
        + (logits_bytes(tokens, shapes.vocab, True) if lm_head else 0)
    )


def base_bytes(shapes: Shapes, quant: str) -> int:
    """The frozen base: linear layers in nf4 (or bf16), everything else (embeddings, norms) in bf16."""
    other = shapes.parameters - shapes.linear
    return (nf4_bytes(shapes.linear) if quant == "nf4" else shapes.linear * BF16) + other * BF16


def inference_activation_bytes(shapes: Shapes, tokens: int, dtype_bytes: int = BF16) -> int:
    """A no-grad forward keeps only the layer being computed, plus the residual stream."""
    return tokens * shapes.hidden * dtype_bytes + layer_activation_bytes(
        tokens, shapes.hidden, shapes.q_dim, shapes.kv_dim, shapes.intermediate, dtype_bytes
    )


def heldout_rows(vocab: int, rows: int, target: int) -> tuple[int, int]:
    """(rows scored at once, bytes of one row's logits) of a held-out loss (`salsa.stages.lm.heldout_batches`): the
    target positions' logits, as many rows as the logit budget allows (at least one)."""
    from salsa.stages.lm import HELDOUT_BUDGET, HELDOUT_BYTES_PER_LOGIT

    per_row = (target + 1) * vocab * HELDOUT_BYTES_PER_LOGIT
    return max(1, min(rows, HELDOUT_BUDGET // per_row)), per_row


def estimate_heldout(shapes: Shapes, quant: str, adapter_ranks: int, rows: int, prompt: int, target: int) -> float:
    """Peak bytes of a held-out loss (`salsa.stages.lm.heldout_loss`): the base with its adapters, a no-grad forward
    of a batch, and its logits on the target positions, as many rows as the logit budget allows (at least one)."""
    rows, per_row = heldout_rows(shapes.vocab, rows, target)
    return (
        base_bytes(shapes, quant)
        + lora_parameters(shapes.targets, adapter_ranks) * FP32
        + inference_activation_bytes(shapes, rows * (prompt + target))
        + rows * per_row
    )


def sampling_work_bytes(shapes: Shapes, batch: int, prompt: int, new: int, dtype_bytes: int = BF16) -> int:
    """What sampling `batch` answers of `new` tokens holds besides the weights: the KV cache, the larger of one step's
    logits and the reference's scoring of the answers (for the KL), and a no-grad forward, in the models' dtype."""
    return (
        kv_cache_bytes(shapes.layers, batch, prompt + new, shapes.kv_dim, dtype_bytes)
        + max(generation_logits_bytes(batch, shapes.vocab), scoring_logits_bytes(batch, new, shapes.vocab))
        + inference_activation_bytes(shapes, batch * (prompt + new), dtype_bytes)
    )


def estimate_sampling(shapes: Shapes, quant: str, adapter_ranks: int, batch: int, prompt: int, new: int) -> float:
    """Peak bytes of sampling `batch` answers of `new` tokens (evaluation, export): the base with every adapter the
    stage loads, and the sampling's own memory (`sampling_work_bytes`)."""
    return (
        base_bytes(shapes, quant)
        + lora_parameters(shapes.targets, adapter_ranks) * FP32
        + sampling_work_bytes(shapes, batch, prompt, new)
    )


# ---------------------------------------------------------------------------------------------------------------
# Full fine-tuning (`model.finetune=full`): separate float32 models, trained under bf16-mixed autocast
# ---------------------------------------------------------------------------------------------------------------
def causal_cast(shapes: Shapes) -> int:
    """Weights a causal LM's training forward casts to bf16: its linear layers and the LM head (tied or not; an
    embedding lookup is not cast)."""
    return shapes.linear + shapes.vocab * shapes.hidden


def scalar_cast(shapes: Shapes) -> int:
    """Weights a reward or value model's training forward casts to bf16: its linear layers and the score head."""
    return shapes.linear + shapes.hidden


def full_training_bytes(shapes: Shapes, tokens: int, forwards: int, logit_tokens: int, cast: int) -> int:
    """What a training step of float32 models holds on top of their weights and optimizer: `forwards` forwards of
    `tokens` tokens each, every layer's activations kept (gradient checkpointing is not applied to full models), one
    layer's gradients in backward, the LM head's logits on `logit_tokens` positions, and the bf16 copies of the
    `cast` weights the forwards kept for backward."""
    one = mixed_layer_activation_bytes(tokens, shapes.hidden, shapes.q_dim, shapes.kv_dim, shapes.intermediate)
    return (
        forwards * shapes.layers * one
        + layer_gradient_bytes(tokens, shapes.hidden, shapes.intermediate, residual_bytes=FP32)
        + (logits_bytes(logit_tokens, shapes.vocab, training=True) if logit_tokens else 0)
        + autocast_copy_bytes(cast)
    )


def estimate_full(
    shapes: Shapes, rollout_batch: int, minibatch: int, prompt_len: int, response_len: int
) -> dict[str, float]:
    """Bytes of each part of a PPO run on one GPU under full fine-tuning (`salsa.models.actors.FullActors`): the
    policy and the value model (a scalar-head model, started from the reward model) trained, the reference and the
    reward model frozen, all float32. The update's policy and value forwards go through one backward (one loss);
    the optimizer's step comes after backward, when the activations are freed."""
    seq = prompt_len + response_len
    causal = shapes.parameters
    scalar = scalar_parameters(shapes.parameters, shapes.untied_head, shapes.hidden)
    trainable = causal + scalar
    train = full_training_bytes(
        shapes, minibatch * seq, 2, minibatch * response_len, causal_cast(shapes) + scalar_cast(shapes)
    )
    parts = {
        "weights_trainable": trainable * FP32,
        "weights_frozen": (causal + scalar) * FP32,  # the reference and the reward model
        "grads_and_optimizer": adam_bytes(trainable),
        "activations_train": train,
        "rollout": rollout_bytes(shapes, rollout_batch, seq, response_len),
        "optimizer_step": adamw_step_bytes(trainable),
    }
    transient = ("activations_train", "rollout", "optimizer_step")
    parts["peak"] = sum(v for k, v in parts.items() if k not in transient) + max(parts[k] for k in transient)
    parts.update(
        parameters=causal, scalar_parameters=scalar, linear_parameters=shapes.linear, trainable_parameters=trainable
    )
    return parts


def estimate_full_supervised(shapes: Shapes, batch: int, seq: int, lm_head: bool) -> int:
    """Peak bytes of SFT (`lm_head`: a causal LM, logits on every position) or reward-model training (a scalar-head
    model) of one full model: its float32 weights, gradients and AdamW moments, and the larger of the training
    step's activations and the optimizer step's temporary."""
    n = shapes.parameters if lm_head else scalar_parameters(shapes.parameters, shapes.untied_head, shapes.hidden)
    tokens = batch * seq
    cast = causal_cast(shapes) if lm_head else scalar_cast(shapes)
    train = full_training_bytes(shapes, tokens, 1, tokens if lm_head else 0, cast)
    return full_trainable_bytes(n) + max(train, adamw_step_bytes(n))


def estimate_full_heldout(shapes: Shapes, rows: int, prompt: int, target: int) -> int:
    """Bytes of a held-out loss of one float32 causal LM (SFT, each soup candidate): its weights, a float32 no-grad
    forward (no autocast outside training) and its target logits, a budget of rows at a time."""
    rows, per_row = heldout_rows(shapes.vocab, rows, target)
    return (
        shapes.parameters * FP32 + inference_activation_bytes(shapes, rows * (prompt + target), FP32) + rows * per_row
    )


def estimate_full_sampling(shapes: Shapes, parameters: int, batch: int, prompt: int, new: int) -> int:
    """Bytes of sampling `batch` answers of `new` tokens with float32 models holding `parameters` in all (evaluation,
    export): their weights, the float32 KV cache, one step's logits or the reference's scoring, and a float32
    no-grad forward."""
    return parameters * FP32 + sampling_work_bytes(shapes, batch, prompt, new, FP32)


def merged_sampler(cfg: Any) -> bool:
    """Whether a bf16 copy of the policy samples (`rollout=hf_merged`): held beside the models for the run, and by
    evaluation and export too."""
    return (cfg.get("rollout") or {}).get("engine") == "hf_merged"


def sampling_copy_line(parts: dict[str, Any]) -> list[str]:
    """The report's line for the merged sampler's copy, where there is one."""
    copy = parts.get("sampling_copy", 0)
    return [f"  sampling copy         {copy / GIB:6.2f} GiB  (rollout=hf_merged: the policy merged, bf16)"] * bool(copy)


def loads_judge_model(judge: str, data: str) -> bool:
    """Whether evaluation loads a held-out judge reward model (`salsa.stages.rm.judge_kind`): `heldout_rm`, or
    `auto` on data without a gold reward (every task but the embedded synthetic one)."""
    return judge == "heldout_rm" or (judge == "auto" and data != "synthetic")


def estimate_full_from_cfg(cfg: Any, shapes: Shapes, sizes: dict[str, int]) -> dict[str, Any]:
    """Every stage under full fine-tuning. GPU: SFT, RM and PPO training, the soup (averaged on the CPU tensor by
    tensor, then scored one model at a time), evaluation and export (`FullLoader` on the run's device). Host memory:
    an SFT ingredient's held-out loss, computed after Lightning moved the trained model back to the CPU."""
    s, e = cfg.sft, cfg.eval
    parts = estimate_full(shapes, **sizes)
    copy = shapes.parameters * BF16 if merged_sampler(cfg) else 0
    parts["sampling_copy"] = copy
    parts["peak"] += copy
    parts["sft_peak"] = estimate_full_supervised(
        shapes, s.batch_size, s.max_prompt_length + s.max_response_length, lm_head=True
    )
    parts["rm_peak"] = estimate_full_supervised(
        shapes, 2 * cfg.rm.batch_size, cfg.rm.max_prompt_length + cfg.rm.max_response_length, lm_head=False
    )  # chosen and rejected in one forward
    parts["sft_heldout"] = estimate_full_heldout(shapes, 128, s.max_prompt_length, s.max_response_length)
    parts["soup_heldout"] = parts["sft_heldout"]
    judge = loads_judge_model(str(e.judge), str(cfg.data.name))
    alive = eval_parameters(parts["parameters"], parts["scalar_parameters"], judge)
    parts["eval_sampling"] = estimate_full_sampling(shapes, alive, e.batch_size, e.max_prompt_length, e.response_length)
    a = e.answers
    parts["export_sampling"] = estimate_full_sampling(
        shapes, parts["parameters"], a.batch_size, e.max_prompt_length, a.max_new_tokens
    )
    parts["eval_sampling"] += copy
    parts["export_sampling"] += copy
    parts["eval_judge"] = judge
    parts["stages"] = {
        "sft": parts["sft_peak"],
        "soup": parts["soup_heldout"],
        "rm": parts["rm_peak"],
        "ppo": parts["peak"],
        "eval": parts["eval_sampling"],
        **({"export": parts["export_sampling"]} if e.get("export") else {}),
    }
    parts["host_stages"] = {"sft": parts["sft_heldout"]}
    return parts


def estimate_from_cfg(cfg: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(parts in bytes, what was estimated) for a composed run config, under its plan: full fine-tuning or QLoRA."""
    m, p = cfg.model, cfg.ppo
    if not m.get("arch") or "model_type" not in m.arch:
        raise ValueError(f"model={m.name} ships no hub config (model.arch with model_type): nothing to estimate")
    from omegaconf import OmegaConf

    from salsa.config import full_finetune

    lora = m.get("lora") or {"r": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    shapes = model_shapes(meta_model(OmegaConf.to_container(m.arch, resolve=True)), list(lora["target_modules"]))
    sizes = {
        "rollout_batch": p.batch_size, "minibatch": p.batch_size // p.num_minibatches,
        "prompt_len": p.max_prompt_length, "response_len": p.response_length,
    }  # fmt: skip
    info = {"model": m.name, "name_or_path": m.get("name_or_path"), "quant": m.get("quant", "none"), **sizes}
    if full_finetune(m):
        return estimate_full_from_cfg(cfg, shapes, sizes), {**info, "plan": "full"}
    parts = estimate(
        shapes,
        m.get("quant", "none"),
        lora["r"],
        len(cfg.ref.ingredients),
        checkpointing=bool(m.get("gradient_checkpointing", True)),
        merged_start=m.get("quant", "none") == "none" and bool(m.get("name_or_path")) and p.get("merge_start", True),
        sampling_copy=merged_sampler(cfg),
        **sizes,
    )
    quant, ckpt = m.get("quant", "none"), bool(m.get("gradient_checkpointing", True))
    parts["sft_peak"] = estimate_supervised(
        shapes,
        quant,
        lora["r"],
        cfg.sft.batch_size,
        cfg.sft.max_prompt_length + cfg.sft.max_response_length,
        True,
        ckpt,
    )
    parts["rm_peak"] = estimate_supervised(
        shapes,
        quant,
        lora["r"],
        2 * cfg.rm.batch_size,
        cfg.rm.max_prompt_length + cfg.rm.max_response_length,
        False,
        ckpt,
    )  # chosen and rejected in one forward
    r, n = lora["r"], len(cfg.ref.ingredients)
    s, e = cfg.sft, cfg.eval
    parts["sft_heldout"] = estimate_heldout(shapes, quant, r, 128, s.max_prompt_length, s.max_response_length)
    parts["soup_heldout"] = estimate_heldout(shapes, quant, r * n, 128, s.max_prompt_length, s.max_response_length)
    # evaluation loads the policy (soup + delta), SFT ingredient 0, the baseline (ingredient 0 + delta), the soup,
    # the reward model and a judge: about 3n + 6 adapters of rank r on one base
    parts["eval_sampling"] = estimate_sampling(
        shapes, quant, r * (3 * n + 6), e.batch_size, e.max_prompt_length, e.response_length
    )
    a = e.answers
    parts["export_sampling"] = estimate_sampling(
        shapes, quant, r * (n + 1), a.batch_size, e.max_prompt_length, a.max_new_tokens
    )
    if parts["sampling_copy"]:  # evaluation and export sample with the same kind of copy
        parts["eval_sampling"] += parts["sampling_copy"]
        parts["export_sampling"] += parts["sampling_copy"]
    parts["stages"] = {
        "sft": max(parts["sft_peak"], parts["sft_heldout"]),
        "soup": parts["soup_heldout"],
        "rm": parts["rm_peak"],
        "ppo": parts["peak"],
        "eval": parts["eval_sampling"],
        **({"export": parts["export_sampling"]} if e.get("export") else {}),
    }
    return parts, {**info, "plan": "qlora"}


def report(parts: dict[str, Any], info: dict[str, Any]) -> str:
    """The estimate as text, for the plan it was made under."""
    return full_report(parts, info) if info.get("plan") == "full" else qlora_report(parts, info)


def full_report(parts: dict[str, Any], info: dict[str, Any]) -> str:
    gib = {k: v / GIB for k, v in parts.items() if isinstance(v, int | float)}
    judge = ", the held-out judge" if parts["eval_judge"] else ""
    lines = [
        f"{info['model']} ({info['name_or_path']}), full fine-tuning: PPO with rollout batch {info['rollout_batch']}, "
        f"minibatch {info['minibatch']}, sequence {info['prompt_len']}+{info['response_len']}",
        "  plan                  model.finetune=full: every weight trained, float32 with AdamW, bf16-mixed autocast; "
        "no adapters",
        f"  parameters            {parts['parameters'] / 1e6:.1f} M ({parts['linear_parameters'] / 1e6:.1f} M in "
        f"linear layers); {parts['scalar_parameters'] / 1e6:.1f} M with a scalar head (reward, value)",
        f"  weights (4 models)    {gib['weights_trainable'] + gib['weights_frozen']:6.2f} GiB  (policy and value "
        "trained, reference and reward frozen; float32)",
        f"  grads + optimizer     {gib['grads_and_optimizer']:6.2f} GiB  (policy and value: float32 gradients, "
        "AdamW's two moments)",
        f"  activations (train)   {gib['activations_train']:6.2f} GiB  (policy and value forwards, no checkpointing; "
        "their bf16 weight copies)",
        f"  rollout (KV + logits) {gib['rollout']:6.2f} GiB",
        *sampling_copy_line(parts),
        f"  optimizer step        {gib['optimizer_step']:6.2f} GiB  (foreach AdamW's temporary, after backward)",
        f"  PPO peak              {gib['peak']:6.2f} GiB",
        f"  SFT peak              {gib['sft_peak']:6.2f} GiB  (sft.batch_size sequences of the SFT lengths)",
        f"  RM peak               {gib['rm_peak']:6.2f} GiB  (2 x rm.batch_size sequences; the judge's too)",
        f"  SFT held-out loss     {gib['sft_heldout']:6.2f} GiB  (host memory: Lightning moved the trained model "
        "back to the CPU; logits of the target positions, in budgets)",
        f"  soup held-out loss    {gib['soup_heldout']:6.2f} GiB  (one model at a time; the soup is averaged tensor "
        "by tensor)",
        f"  eval sampling         {gib['eval_sampling']:6.2f} GiB  (eval.batch_size answers: the reference, the "
        f"reward model{judge} and one answering model)",
        f"  export sampling       {gib['export_sampling']:6.2f} GiB  (eval.answers.batch_size x max_new_tokens)",
        "  per stage (GPU)       " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in parts["stages"].items()) + " GiB",
        "  per stage (host)      " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in parts["host_stages"].items()) + " GiB",
        f"  the run needs         {max(parts['stages'].values()) / GIB:6.2f} GiB of GPU  "
        "(+ CUDA context and fragmentation, ~0.5-1 GiB)",
    ]
    return "\n".join(lines)


def qlora_report(parts: dict[str, Any], info: dict[str, Any]) -> str:
    gib = {k: v / GIB for k, v in parts.items() if isinstance(v, int | float)}
    lines = [
        f"{info['model']} ({info['name_or_path']}), quant={info['quant']}: PPO with rollout batch "
        f"{info['rollout_batch']}, minibatch {info['minibatch']}, sequence {info['prompt_len']}+{info['response_len']}",
        f"  parameters            {parts['parameters'] / 1e9:.2f} B ({parts['linear_parameters'] / 1e9:.2f} B in "
        f"linear layers)",
        f"  adapters              {parts['adapter_parameters'] / 1e6:.1f} M per adapter; "
        f"{parts['trainable_parameters'] / 1e6:.1f} M trainable, "
        f"{parts['frozen_adapter_parameters'] / 1e6:.1f} M frozen",
        f"  base weights          {gib['base_weights']:6.2f} GiB",
        f"  adapters              {gib['adapters_frozen'] + gib['adapters_trainable']:6.2f} GiB",
        f"  grads + optimizer     {gib['grads_and_optimizer']:6.2f} GiB",
        f"  activations (train)   {gib['activations_train']:6.2f} GiB",
        f"  rollout (KV + logits) {gib['rollout']:6.2f} GiB",
        *sampling_copy_line(parts),
        f"  PPO peak              {gib['peak']:6.2f} GiB",
        f"  SFT peak              {gib['sft_peak']:6.2f} GiB  (sft.batch_size sequences of the SFT lengths)",
        f"  SFT held-out loss     {gib['sft_heldout']:6.2f} GiB  (logits of the target positions, in budgets)",
        f"  soup held-out loss    {gib['soup_heldout']:6.2f} GiB",
        f"  RM peak               {gib['rm_peak']:6.2f} GiB  (2 x rm.batch_size sequences; the judge's too)",
        f"  eval sampling         {gib['eval_sampling']:6.2f} GiB  (eval.batch_size answers, every adapter loaded)",
        f"  export sampling       {gib['export_sampling']:6.2f} GiB  (eval.answers.batch_size x max_new_tokens)",
        "  per stage             "
        + ", ".join(f"{stage} {v / GIB:.2f}" for stage, v in parts["stages"].items())
        + " GiB",
        f"  the run needs         {max(parts['stages'].values()) / GIB:6.2f} GiB  "
        "(+ CUDA context and fragmentation, ~0.5-1 GiB)",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    import os

    from hydra import compose, initialize_config_dir

    from salsa.cli import register
    from salsa.config import CONF_DIR, REPO_ROOT

    register()  # the typed config and resolvers train.yaml names
    os.environ.setdefault("SALSA_ROOT", str(REPO_ROOT))
    overrides = list(sys.argv[1:] if argv is None else argv)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    text = report(*estimate_from_cfg(cfg))
    print(text)
    return text


if __name__ == "__main__":
    main()
