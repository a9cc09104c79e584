"""GPU memory of every stage of a run under the QLoRA plan, estimated from the model's config alone (meta device).

    python -m salsa.models.memory model=gemma2b                       # any Hydra override of src/train.py works
    python -m salsa.models.memory experiment=paper_llama2_7b ppo.batch_size=16 ppo.response_length=256

The model is built on the meta device from the preset's shipped config (`model.arch`), so nothing is downloaded.
Sizes come from the config: rollout batch `ppo.batch_size`, training minibatch `ppo.batch_size / num_minibatches`,
sequence `ppo.max_prompt_length + ppo.response_length`, `len(ref.ingredients)` soup ingredients. SFT and RM
peaks use `sft.*` / `rm.*` batch sizes and lengths; the held-out losses (SFT, soup) score at most `HELDOUT_BUDGET`
bytes of logits at a time; evaluation and export sample `eval.batch_size` / `eval.answers.batch_size` answers at a
time. Each stage loads the base once and frees it when it ends (`salsa.infra.context`), so the run needs the largest
stage's peak.

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


def layer_activation_bytes(tokens: int, hidden: int, q_dim: int, kv_dim: int, intermediate: int) -> int:
    """What autograd keeps for one decoder layer (bf16): norms' inputs/outputs and residuals (6·hidden), q and the
    attention output with their rotary/attention copies (4·q_dim), k and v likewise (4·kv_dim), and the MLP's gate,
    up, activation and product (4·intermediate)."""
    return tokens * BF16 * (6 * hidden + 4 * q_dim + 4 * kv_dim + 4 * intermediate)


def activation_bytes(
    layers: int, tokens: int, hidden: int, q_dim: int, kv_dim: int, intermediate: int, checkpointing: bool
) -> int:
    """One forward's activations: every layer's, or with checkpointing each layer's input plus one layer's
    activations while it is recomputed."""
    one = layer_activation_bytes(tokens, hidden, q_dim, kv_dim, intermediate)
    return layers * tokens * hidden * BF16 + one if checkpointing else layers * one


def layer_gradient_bytes(tokens: int, hidden: int, intermediate: int) -> int:
    """What backward holds on top while it goes through one decoder layer (bf16): the gradient arriving at the layer
    and the one it passes down (2·hidden), and in the MLP the gradients of the product and of the gate's and up's
    outputs, alive together before the product's is freed (3·intermediate). One layer at a time, with or without
    checkpointing."""
    return tokens * BF16 * (2 * hidden + 3 * intermediate)


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
) -> dict[str, float]:
    """Bytes of each part of a PPO run on one GPU under the QLoRA plan (see the module docstring). `merged_start`:
    the soup is folded into a plain-weight base first (`ppo.merge_start`); its negated adapter replaces the soup's,
    and the merge itself holds one projection's weight and delta in float32 for a moment, before the rollout."""
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
    rollout = kv_cache_bytes(shapes.layers, rollout_batch, seq, shapes.kv_dim) + max(
        generation_logits_bytes(rollout_batch, shapes.vocab),
        scoring_logits_bytes(rollout_batch, response_len, shapes.vocab),  # reference log-probs
    )
    merge = 2 * max(i * o for i, o in shapes.targets) * FP32 if merged_start else 0
    parts = {
        "base_weights": base,
        "adapters_frozen": frozen * FP32,
        "adapters_trainable": trainable * FP32,
        "grads_and_optimizer": adam_bytes(trainable),
        "activations_train": train,
        "rollout": rollout,
        "merge": merge,
    }
    transient = ("activations_train", "rollout", "merge")
    parts["peak"] = sum(v for k, v in parts.items() if k not in transient) + max(train, rollout, merge)
    parts.update(
        parameters=shapes.parameters, linear_parameters=shapes.linear, adapter_parameters=one_adapter,
        trainable_parameters=trainable, frozen_adapter_parameters=frozen,
    )  # fmt: skip
    return parts


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


def inference_activation_bytes(shapes: Shapes, tokens: int) -> int:
    """A no-grad forward keeps only the layer being computed, plus the residual stream."""
    return tokens * shapes.hidden * BF16 + layer_activation_bytes(
        tokens, shapes.hidden, shapes.q_dim, shapes.kv_dim, shapes.intermediate
    )


def estimate_heldout(shapes: Shapes, quant: str, adapter_ranks: int, rows: int, prompt: int, target: int) -> float:
    """Peak bytes of a held-out loss (`salsa.stages.lm.heldout_loss`): the base with its adapters, a no-grad forward
    of a batch, and its logits on the target positions, as many rows as the logit budget allows (at least one)."""
    from salsa.stages.lm import HELDOUT_BUDGET, HELDOUT_BYTES_PER_LOGIT

    keep = target + 1
    per_row = keep * shapes.vocab * HELDOUT_BYTES_PER_LOGIT
    rows = max(1, min(rows, HELDOUT_BUDGET // per_row))
    return (
        base_bytes(shapes, quant)
        + lora_parameters(shapes.targets, adapter_ranks) * FP32
        + inference_activation_bytes(shapes, rows * (prompt + target))
        + rows * per_row
    )


def estimate_sampling(shapes: Shapes, quant: str, adapter_ranks: int, batch: int, prompt: int, new: int) -> float:
    """Peak bytes of sampling `batch` answers of `new` tokens (evaluation, export): the base with every adapter the
    stage loads, the KV cache, one step's logits, and the reference's scoring of the answers (for the KL)."""
    return (
        base_bytes(shapes, quant)
        + lora_parameters(shapes.targets, adapter_ranks) * FP32
        + kv_cache_bytes(shapes.layers, batch, prompt + new, shapes.kv_dim)
        + max(generation_logits_bytes(batch, shapes.vocab), scoring_logits_bytes(batch, new, shapes.vocab))
        + inference_activation_bytes(shapes, batch * (prompt + new))
    )


def estimate_from_cfg(cfg) -> tuple[dict[str, float], dict[str, Any]]:
    m, p = cfg.model, cfg.ppo
    if not m.get("arch") or "model_type" not in m.arch:
        raise ValueError(f"model={m.name} ships no hub config (model.arch with model_type): nothing to estimate")
    from omegaconf import OmegaConf

    lora = m.get("lora") or {"r": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    shapes = model_shapes(meta_model(OmegaConf.to_container(m.arch, resolve=True)), list(lora["target_modules"]))
    sizes = {
        "rollout_batch": p.batch_size, "minibatch": p.batch_size // p.num_minibatches,
        "prompt_len": p.max_prompt_length, "response_len": p.response_length,
    }  # fmt: skip
    parts = estimate(
        shapes,
        m.get("quant", "none"),
        lora["r"],
        len(cfg.ref.ingredients),
        checkpointing=bool(m.get("gradient_checkpointing", True)),
        merged_start=m.get("quant", "none") == "none" and bool(m.get("name_or_path")) and p.get("merge_start", True),
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
    parts["stages"] = {
        "sft": max(parts["sft_peak"], parts["sft_heldout"]),
        "soup": parts["soup_heldout"],
        "rm": parts["rm_peak"],
        "ppo": parts["peak"],
        "eval": parts["eval_sampling"],
        **({"export": parts["export_sampling"]} if e.get("export") else {}),
    }
    return parts, {"model": m.name, "name_or_path": m.get("name_or_path"), "quant": m.get("quant", "none"), **sizes}


def report(parts: dict[str, float], info: dict[str, Any]) -> str:
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
