"""QLoRA settings and loading: the frozen base (4-bit nf4 under `quant: nf4`), and fresh LoRA adapters on it.

The memory plan (docs: "Hub models and QLoRA"): one frozen base in memory; everything else is a LoRA adapter on it,
switched on per call (`salsa.models.shared_base`):
  reference = base + the soup's exact adapter (or one SFT ingredient's), frozen;
  policy    = reference's start + a new trainable adapter whose B is zero, so it starts exactly at that model;
  value     = a trainable copy of the reward model's adapter + its scalar head;
  reward    = the reward model's adapter + scalar head, frozen.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig

from salsa.config import QUANT, LoraSettings, full_finetune, uses_adapters  # noqa: F401 (re-exported)
from salsa.errors import SalsaError
from salsa.models.hf import load_tokenizer

log = logging.getLogger("salsa")
HEAD = "score"  # the scalar head of a *ForSequenceClassification model (saved by peft as a module to save)


def peft():
    """The peft module, imported on first use: it loads bitsandbytes, which runs on the full-weight path need not."""
    import peft as module
    import peft.tuners.tuners_utils  # noqa: F401  (BaseTunerLayer)

    return module


class AdapterError(SalsaError, ValueError):
    """An adapter or model setting that cannot be used."""


# ---------------------------------------------------------------------------------------------------------------
# Settings and loading
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class BaseSettings:
    """How the frozen base is loaded: `model.*` of a hub/local preset (conf/model/gemma2b.yaml)."""

    name_or_path: str
    revision: str | None = None
    quant: str = "nf4"  # nf4 = bitsandbytes 4-bit NormalFloat with double quantisation; none = plain weights
    trust_remote_code: bool = False
    gradient_checkpointing: bool = True
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self):
        if self.quant not in QUANT:
            raise AdapterError(f"model.quant must be one of {QUANT}, got {self.quant!r}")
        if isinstance(self.lora, Mapping):
            self.lora = LoraSettings(**self.lora)

    @classmethod
    def from_cfg(cls, model_cfg: Mapping[str, Any]) -> BaseSettings:
        from omegaconf import OmegaConf

        m = OmegaConf.to_container(model_cfg, resolve=True) if OmegaConf.is_config(model_cfg) else dict(model_cfg)
        if not m.get("name_or_path"):
            raise AdapterError("model.name_or_path is not set: adapters need a hub id or a local checkpoint")
        known = {k: m[k] for k in cls.__dataclass_fields__ if k in m and m[k] is not None}
        return cls(**known)


def compute_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on GPUs (QLoRA's compute dtype); float32 on CPU, where bf16 matmuls are slow and inexact."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def quantization_config(quant: str, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    if quant not in QUANT:
        raise AdapterError(f"model.quant must be one of {QUANT}, got {quant!r}")
    if quant == "none":
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )


def local_device(device: torch.device | str) -> torch.device:
    """Each DDP process loads its base onto its own GPU."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


# every base this process loaded: (name, a weak reference). Stages drop their models when they end and the context
# collects them (`salsa.infra.context.release_memory`), so at most one base is alive at a time; the log counts loads.
LOADED: list[tuple[str, weakref.ref, int]] = []  # (name, the model, bases alive when it loaded, itself included)


def load_base(settings: BaseSettings, device: torch.device | str, scalar_head: bool = False) -> nn.Module:
    """The frozen base (causal LM, or with a fresh one-output head for the reward model), quantised if asked."""
    device = local_device(device)
    started = time.time()
    dtype = compute_dtype(device)
    quant = quantization_config(settings.quant, dtype)
    cls = AutoModelForSequenceClassification if scalar_head else AutoModelForCausalLM
    kwargs: dict[str, Any] = {"num_labels": 1} if scalar_head else {}
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map={"": device})
    model = cls.from_pretrained(
        settings.name_or_path,
        revision=settings.revision,
        dtype=dtype,
        trust_remote_code=settings.trust_remote_code,
        use_safetensors=True,  # never unpickle downloaded weights
        **kwargs,
    )
    if quant is None:
        model.to(device)
    else:
        set_cpu_4bit_kernel(model, "float32")
    model.requires_grad_(False)
    for module in model.modules():  # attention dropout is read at construction; PPO's logprobs need it off
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    alive = 1 + sum(ref() is not None for _, ref, _ in LOADED)
    LOADED.append((settings.name_or_path, weakref.ref(model), alive))
    log.info(
        "[base] %s loaded (%s, %s) in %.1f s: load %d of this process, %d base(s) in memory",
        settings.name_or_path, settings.quant, device, time.time() - started, len(LOADED), alive,
    )  # fmt: skip
    return model


# The kernels bitsandbytes can compute a 4-bit layer's forward with on a CPU:
#   float32     dequantise the weight to float32 and multiply in float32 (every CPU; the only one autograd uses);
#   avx512bf16  repack the weight once into another layout and multiply in bf16 (CPUs with AVX512-BF16, that is
#               Intel Sapphire Rapids and later, AMD Zen 4 and later; eval-mode forwards without gradients only).
# bitsandbytes picks avx512bf16 by itself wherever the CPU has it; the project always sets the kernel explicitly.
CPU_4BIT_KERNELS = ("float32", "avx512bf16")


def cpu_has_avx512bf16() -> bool:
    """Whether this CPU can run bitsandbytes' avx512bf16 kernel (it registers that kernel only then, at import)."""
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def set_cpu_4bit_kernel(model: nn.Module, kernel: str = "float32") -> None:
    """Make every 4-bit layer of `model` compute its CPU forwards with `kernel` (one of `CPU_4BIT_KERNELS`).

    The pipeline keeps float32: with avx512bf16, rollout and reference log-probabilities (no gradients) would come
    from bf16 arithmetic and the PPO update's (with gradients) from float32, so the first importance ratio would not
    be 1, and results would depend on which CPU ran them. Set the kernel before the first forward: a layer that
    avx512bf16 already repacked has had its block scales rounded to bf16, which no unpacking restores, so it is
    refused.
    """
    if kernel not in CPU_4BIT_KERNELS:
        raise AdapterError(f"4-bit CPU kernel must be one of {CPU_4BIT_KERNELS}, got {kernel!r}")
    if kernel == "avx512bf16" and not cpu_has_avx512bf16():
        raise AdapterError("the avx512bf16 4-bit kernel needs a CPU with AVX512-BF16, which this one lacks")
    for name, module in model.named_modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        if kernel == "float32" and getattr(module.weight.quant_state, "packing_format_for_cpu", False):
            raise AdapterError(
                f"4-bit layer {name or type(module).__name__} was already repacked for the avx512bf16 kernel, which "
                "rounded its scales to bf16: reload the model and set the kernel before its first forward"
            )
        module.support_avx512bf16_for_cpu = kernel == "avx512bf16"


def cpu_4bit_kernel(model: nn.Module) -> str | None:
    """The kernel the 4-bit layers of `model` use for CPU forwards without gradients: one of `CPU_4BIT_KERNELS`,
    "mixed" where layers differ, None where there is no 4-bit layer."""
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    if not layers:
        return None
    bf16 = {
        bool(m.support_avx512bf16_for_cpu and cpu_has_avx512bf16())
        or getattr(m.weight.quant_state, "packing_format_for_cpu", False)
        for m in layers
    }
    if len(bf16) > 1:
        return "mixed"
    return "avx512bf16" if bf16.pop() else "float32"


def enable_checkpointing(model: nn.Module, context_fn=None) -> None:
    """Non-reentrant activation checkpointing (works with frozen inputs), with an optional recompute context."""
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if context_fn is not None:
        kwargs["context_fn"] = context_fn
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers releases before the rename
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def checkpoint_trainable_only(module: nn.Module) -> nn.Module:
    """Make `module`'s state dict (and so Lightning's resume checkpoints) hold only its trainable tensors.

    The frozen base and frozen adapters never change and are reloaded from their own files, so checkpointing them
    every interval would only cost time and disk (a whole 4-bit base each time); when a checkpoint is loaded their
    absence is not an error.
    """
    frozen = {name for name, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}  # tied too
    frozen_modules = {name.rsplit(".", 1)[0] for name in frozen}

    def is_frozen(name: str) -> bool:  # `name` relative to `module`
        head, sep, _ = name.partition(".weight.")  # the quantisation state 4-bit layers save beside a weight
        return name in frozen or (bool(sep) and head in frozen_modules)

    def drop(mod, state_dict, prefix, local_metadata):
        for key in [k for k in state_dict if k.startswith(prefix) and is_frozen(k[len(prefix) :])]:
            del state_dict[key]

    def allow_missing(mod, incompatible_keys):  # keys are named from the root module: try each suffix
        def frozen_key(key: str) -> bool:
            parts = key.split(".")
            return any(is_frozen(".".join(parts[i:])) for i in range(len(parts)))

        incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if not frozen_key(k)]

    module.register_state_dict_post_hook(drop)
    module.register_load_state_dict_post_hook(allow_missing)
    return module


class ScalarHead(nn.Linear):
    """The reward/value head: hidden → one number, in float32 whatever the base's compute dtype."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden.to(self.weight.dtype))


def float32_head(model: nn.Module) -> None:
    """Replace the reward model's `score` head by a float32 `ScalarHead` with the same initial weights.

    On GPUs the base computes in bf16 and its fresh head would be bf16 too; peft upcasts only the LoRA layers, so
    the head would train in bf16, where an Adam step of ~lr (5e-5) is below the resolution of weights of ~0.02 and
    most updates round away. Every trainable tensor of the pipeline trains in float32.
    """
    old = getattr(model, HEAD)
    head = ScalarHead(old.in_features, old.out_features, bias=old.bias is not None, device=old.weight.device)
    with torch.no_grad():
        head.weight.copy_(old.weight.float())
        if old.bias is not None:
            head.bias.copy_(old.bias.float())
    setattr(model, HEAD, head)


def new_adapter_model(settings: BaseSettings, device: torch.device | str, scalar_head: bool = False):
    """(tokenizer, peft model): a fresh trainable LoRA adapter on the frozen base, for SFT (a causal LM) or the
    reward model (`scalar_head`: a one-output float32 head, trained and saved with the adapter). Adapters and head
    train in float32 whatever the base's compute dtype. Seed torch first: the adapter's initial A is random."""
    model = load_base(settings, device, scalar_head=scalar_head)
    if scalar_head:
        float32_head(model)
    if settings.gradient_checkpointing:
        enable_checkpointing(model)
    extra = {"task_type": "SEQ_CLS", "modules_to_save": [HEAD]} if scalar_head else {"task_type": "CAUSAL_LM"}
    adapted = peft().get_peft_model(model, settings.lora.config(**extra), autocast_adapter_dtype=True)
    for p in adapted.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    checkpoint_trainable_only(adapted.get_base_model())  # also when the adapted model is trained unwrapped (RM)
    return base_tokenizer(settings), checkpoint_trainable_only(adapted)


def base_tokenizer(settings: BaseSettings):
    return load_tokenizer(settings.name_or_path, trust_remote_code=settings.trust_remote_code)
