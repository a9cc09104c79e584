"""QLoRA on one shared base: hub or local checkpoints, 4-bit loading, and every model of the pipeline as adapters.

The memory plan (DESIGN.md §4): one frozen base in memory (4-bit nf4 under `quant: nf4`); everything else is a LoRA
adapter on it, switched on per call:
  reference = base + the soup's exact adapter (or one SFT ingredient's), frozen;
  policy    = reference's start + a new trainable adapter whose B is zero, so it starts exactly at that model;
  value     = a trainable copy of the reward model's adapter + its scalar head;
  reward    = the reward model's adapter + scalar head, frozen.
Reference log-probabilities come from the same weights with the policy's adapter switched off. `AdapterActors`
implements the interface of `salsa.actors.FullActors`, so the PPO module cannot tell the two apart.

Adapters are switched by setting the active adapters of every LoRA layer directly: peft's `set_adapter` also
changes `requires_grad`, which would unfreeze the reference while the policy runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig

from salsa.actors import FullActors
from salsa.errors import SalsaError
from salsa.models import load_causal_lm, load_reward_model, load_tokenizer, position_ids_from_mask
from salsa.soup import ADAPTER_CONFIG, ADAPTER_WEIGHTS, soup_lora_adapters
from salsa.validate import QUANT

if TYPE_CHECKING:
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

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
class LoraSettings:
    r: int = 16  # rank of every adapter the pipeline trains (SFT ingredients, RM, the PPO policy's delta)
    alpha: float = 32  # scale = alpha / r
    dropout: float = 0.05  # LoRA dropout while training SFT and RM (PPO adapters use none: see AdapterActors)
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def config(self, task_type: str | None = None, dropout: float | None = None, **extra: Any) -> LoraConfig:
        return peft().LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout if dropout is None else dropout,
            target_modules=list(self.target_modules),
            task_type=task_type,
            **extra,
        )


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


def uses_adapters(model_cfg: Mapping[str, Any]) -> bool:
    """Hub and local checkpoints are never fully fine-tuned: the pipeline trains LoRA adapters on a frozen base."""
    return bool(model_cfg.get("name_or_path"))


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


def load_base(settings: BaseSettings, device: torch.device | str, scalar_head: bool = False) -> nn.Module:
    """The frozen base (causal LM, or with a fresh one-output head for the reward model), quantised if asked."""
    device = local_device(device)
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
        portable_4bit_kernels(model)
    model.requires_grad_(False)
    for module in model.modules():  # attention dropout is read at construction; PPO's logprobs need it off
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    return model


def portable_4bit_kernels(model: nn.Module) -> None:
    """Keep every 4-bit layer on bitsandbytes' portable CPU path, whatever the CPU.

    On CPUs with AVX512-BF16 (Intel Sapphire Rapids and later), bitsandbytes repacks a 4-bit weight into another
    layout at its first forward in eval mode without gradients, and from then on computes such forwards in bf16.
    Rollout and reference log-probabilities (no gradients) would then come from other arithmetic than the same
    model's log-probabilities in the PPO update, so the first importance ratio would not be 1, and results would
    depend on which CPU ran them. Switching the repack off keeps one layout and float32 arithmetic everywhere; GPUs
    never take that path.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


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


def new_adapter_model(settings: BaseSettings, device: torch.device | str, scalar_head: bool = False):
    """(tokenizer, peft model): a fresh trainable LoRA adapter on the frozen base, for SFT (a causal LM) or the
    reward model (`scalar_head`: a one-output head, trained and saved with the adapter). Seed torch first: the
    adapter's initial A is random."""
    model = load_base(settings, device, scalar_head=scalar_head)
    if settings.gradient_checkpointing:
        enable_checkpointing(model)
    extra = {"task_type": "SEQ_CLS", "modules_to_save": [HEAD]} if scalar_head else {"task_type": "CAUSAL_LM"}
    adapted = peft().get_peft_model(model, settings.lora.config(**extra))
    checkpoint_trainable_only(adapted.get_base_model())  # also when the adapted model is trained unwrapped (RM)
    return base_tokenizer(settings), checkpoint_trainable_only(adapted)


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(adapter config, LoRA tensors, scalar-head tensors) of a saved peft adapter."""
    path = Path(path)
    if not is_adapter_dir(path) or not (path / ADAPTER_WEIGHTS).is_file():
        raise AdapterError(f"{path}: not a peft adapter ({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} expected)")
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type {config.get('peft_type')!r}; only LoRA adapters are supported")
    tensors = load_file(str(path / ADAPTER_WEIGHTS))
    lora = {k: v for k, v in tensors.items() if ".lora_" in k}
    head = {k.rsplit(".", 2)[-2] + "." + k.rsplit(".", 1)[-1]: v for k, v in tensors.items() if ".lora_" not in k}
    unknown = [k for k in head if not k.startswith(HEAD + ".")]
    if unknown:
        raise AdapterError(f"{path}: adapter tensors other than LoRA factors and a '{HEAD}' head: {unknown[:3]}")
    return config, lora, head


# ---------------------------------------------------------------------------------------------------------------
# One shared base with named adapters
# ---------------------------------------------------------------------------------------------------------------
class ScalarHead(nn.Linear):
    """The reward/value head: hidden → one number, in float32 whatever the base's compute dtype."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden.to(self.weight.dtype))


class SharedBase(nn.Module):
    """A frozen (optionally 4-bit) causal LM holding any number of named LoRA adapters and scalar heads.

    `active(names)` switches adapters on for the calls inside it. Views (`causal`, `scalar`) behave like a causal LM
    and a `*ForSequenceClassification` model respectively, each with its own adapters on.
    """

    def __init__(self, lm: nn.Module, base_name: str):
        super().__init__()
        self.lm = lm
        self.base_name = base_name
        self.heads = nn.ModuleDict()
        self._peft = None  # the PeftModel that manages the adapters (see `_add`)
        self._layers: list[BaseTunerLayer] = []
        self._trainable: set[str] = set()
        self._active: tuple[str, ...] = ()

    @classmethod
    def load(cls, settings: BaseSettings, device: torch.device | str) -> SharedBase:
        shared = cls(load_base(settings, device), settings.name_or_path)
        if settings.gradient_checkpointing:
            shared.enable_checkpointing()
        return shared

    @property
    def adapters(self) -> list[str]:
        return list(self._peft.peft_config) if self._peft is not None else []

    # -- adding adapters ------------------------------------------------------------------------------------------
    def _add(self, name: str, config: LoraConfig, trainable: bool) -> None:
        if name in self.adapters:
            raise AdapterError(f"adapter {name!r} already exists")
        config.inference_mode = not trainable
        if self._peft is None:
            # kept out of the module tree: it wraps `lm`, whose layers already hold the injected adapters
            object.__setattr__(self, "_peft", peft().get_peft_model(self.lm, config, adapter_name=name))
        else:
            self._peft.add_adapter(name, config)
        self._layers = [m for m in self.lm.modules() if isinstance(m, peft().tuners.tuners_utils.BaseTunerLayer)]
        if trainable:
            self._trainable.add(name)
        for pname, p in self.lm.named_parameters():
            if ".lora_" in pname:
                adapter = pname.split(".lora_", 1)[1].split(".")[1]
                if adapter == name and p.is_floating_point():
                    p.data = p.data.float()  # adapters live in float32 whatever the base's dtype
                p.requires_grad_(adapter in self._trainable)
            else:
                p.requires_grad_(False)
        self._set_active(self._active)

    def _remove(self, name: str) -> None:
        self._peft.delete_adapter(name)
        self._trainable.discard(name)
        self._layers = [m for m in self.lm.modules() if isinstance(m, peft().tuners.tuners_utils.BaseTunerLayer)]
        self._set_active([n for n in self._active if n != name])

    def new_adapter(self, name: str, lora: LoraSettings, trainable: bool = True) -> None:
        """A fresh adapter whose B is zero: it adds nothing until trained. No dropout (PPO's logprobs must match)."""
        self._add(name, lora.config(dropout=0.0), trainable)

    def load_adapter(self, name: str, path: str | os.PathLike, trainable: bool = False) -> None:
        """A saved peft LoRA adapter, under `name`; its scalar head (a reward model's) goes to `heads[name]`."""
        config, lora, head = read_adapter(path)
        for unsupported in ("use_dora", "rank_pattern", "alpha_pattern"):
            if config.get(unsupported):
                raise AdapterError(f"{path}: {unsupported} is not supported on the shared base")
        fields = {k: v for k, v in config.items() if k in peft().LoraConfig.__dataclass_fields__}
        peft_config = peft().PeftConfig.from_peft_type(**fields)
        peft_config.modules_to_save = None  # the head lives beside the base, not inside it
        peft_config.task_type = None
        peft_config.lora_dropout = 0.0
        self._add(name, peft_config, trainable)
        try:
            result = peft().set_peft_model_state_dict(self._peft, lora, adapter_name=name)
        except RuntimeError as e:  # shape mismatch
            self._remove(name)
            raise AdapterError(f"{path}: adapter does not fit the base {self.base_name} ({e})") from e
        unexpected = [k for k in result.unexpected_keys if ".lora_" in k]
        missing = [k for k in result.missing_keys if f".{name}." in k and ".lora_" in k]
        if unexpected or missing:
            self._remove(name)
            raise AdapterError(
                f"{path}: adapter does not fit the base {self.base_name} (unexpected {unexpected[:3]}, "
                f"missing {missing[:3]})"
            )
        if head:
            weight = head[f"{HEAD}.weight"]
            module = ScalarHead(weight.shape[1], weight.shape[0], bias=f"{HEAD}.bias" in head)
            module.load_state_dict({k.split(".", 1)[1]: v.float() for k, v in head.items()})
            module.to(next(self.lm.parameters()).device)
            module.requires_grad_(trainable)
            self.heads[name] = module

    # -- switching ------------------------------------------------------------------------------------------------
    def _set_active(self, names: Sequence[str]) -> None:
        self._active = tuple(names)
        for layer in self._layers:
            layer._active_adapter = list(names)

    @contextlib.contextmanager
    def active(self, names: Sequence[str]) -> Iterator[None]:
        unknown = set(names) - set(self.adapters)
        if unknown:
            raise AdapterError(f"unknown adapters {sorted(unknown)}; loaded: {self.adapters}")
        previous = self._active
        self._set_active(names)
        try:
            yield
        finally:
            self._set_active(previous)

    def enable_checkpointing(self) -> None:
        """Checkpointed layers are recomputed in the backward pass, maybe after other adapters were switched on
        (PPO's loss sums a policy and a value forward): the recompute runs with the adapters of its forward."""

        def context_fn():
            return contextlib.nullcontext(), self.active(self._active)

        enable_checkpointing(self.lm, context_fn)

    # -- views and saving -----------------------------------------------------------------------------------------
    def causal(self, names: Sequence[str]) -> CausalView:
        return CausalView(self, names)

    def scalar(self, names: Sequence[str], head: str) -> ScalarView:
        if head not in self.heads:
            raise AdapterError(f"no scalar head {head!r} (adapters with heads: {list(self.heads)})")
        return ScalarView(self, names, self.heads[head])

    def save_adapter(self, name: str, out: str | os.PathLike) -> None:
        """Write adapter `name` as a plain peft adapter directory (its LoRA factors only)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        state = peft().get_peft_model_state_dict(self._peft, adapter_name=name)
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(out / ADAPTER_WEIGHTS))
        config = self._peft.peft_config[name].to_dict()
        config.update(base_model_name_or_path=self.base_name, inference_mode=True, task_type="CAUSAL_LM")
        config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
        (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True, default=str))


class _View(nn.Module):
    """The shared base with some adapters on. The base is not registered as a submodule: it lives once in whatever
    owns the views, so state dicts and optimisers see each tensor once. Mode and parameters are the base's."""

    def __init__(self, shared: SharedBase, names: Sequence[str]):
        super().__init__()
        object.__setattr__(self, "shared", shared)
        self.names = tuple(names)

    def train(self, mode: bool = True):
        self.training = mode
        self.shared.train(mode)
        return self

    def parameters(self, recurse: bool = True):
        return self.shared.parameters(recurse)

    def named_parameters(self, *args, **kwargs):
        return self.shared.named_parameters(*args, **kwargs)


class CausalView(_View):
    """Usable where a causal LM is expected (forward, generate)."""

    @property
    def config(self):
        return self.shared.lm.config

    def forward(self, *args, **kwargs):
        with self.shared.active(self.names):
            return self.shared.lm(*args, **kwargs)

    def generate(self, *args, **kwargs):
        with self.shared.active(self.names):
            return self.shared.lm.generate(*args, **kwargs)


class _Backbone(_View):
    def forward(self, *args, **kwargs):
        lm = self.shared.lm
        with self.shared.active(self.names):
            return getattr(lm, lm.base_model_prefix)(*args, **kwargs)


class ScalarView(_View):
    """The backbone plus a scalar head: a `*ForSequenceClassification` look-alike (`base_model_prefix` backbone +
    `score`), so `salsa.models.scalar_head_outputs` reads it unchanged."""

    base_model_prefix = "backbone"

    def __init__(self, shared: SharedBase, names: Sequence[str], head: nn.Module):
        super().__init__(shared, names)
        object.__setattr__(self, "backbone", _Backbone(shared, names))
        object.__setattr__(self, "score", head)  # one of shared.heads


# ---------------------------------------------------------------------------------------------------------------
# The four PPO models on one base
# ---------------------------------------------------------------------------------------------------------------
def response_logits(model, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """As `salsa.actors.response_logits`, computing the LM head only on the positions that predict the response
    (the head's output is the largest activation of a big-vocabulary model)."""
    keep = sequences.size(1) - prompt_len + 1
    logits = model(
        input_ids=sequences,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        logits_to_keep=keep,
    ).logits
    return logits[:, :-1]


class AdapterActors(FullActors):
    """`FullActors`' interface on one shared base (see the module docstring for which adapters make which model)."""

    def __init__(self, shared: SharedBase, policy: Sequence[str], reference: Sequence[str], value: str, reward: str):
        nn.Module.__init__(self)  # not FullActors': freezing the reference would freeze the shared base's adapters
        if value not in shared.heads or reward not in shared.heads:
            raise AdapterError("value and reward adapters need scalar heads (load them from a reward model)")
        self.shared = shared
        self.policy = shared.causal(policy)
        self.reference = shared.causal(reference)
        self.value = shared.scalar([value], value)
        self.reward = shared.scalar([reward], reward)
        checkpoint_trainable_only(self)

    def train(self, mode: bool = True):
        return nn.Module.train(self, mode)  # one base for all: frozen models are frozen by their adapters

    def policy_logits(self, sequences, attention_mask, prompt_len):
        return response_logits(self.policy, sequences, attention_mask, prompt_len)

    def reference_logits(self, sequences, attention_mask, prompt_len):
        return response_logits(self.reference, sequences, attention_mask, prompt_len)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def save_policy(self, path) -> None:
        """The policy as one plain peft adapter: its adapters' deltas summed exactly (ranks concatenated)."""
        names = self.policy.names
        if len(names) == 1:
            self.shared.save_adapter(names[0], path)
            return
        with tempfile.TemporaryDirectory() as tmp:
            parts = [Path(tmp) / n for n in names]
            for n, part in zip(names, parts, strict=True):
                self.shared.save_adapter(n, part)
            soup_lora_adapters(parts, path, [1.0] * len(parts), normalize=False)


def build_adapter_actors(settings: BaseSettings, policy_init, reference, rm, device) -> AdapterActors:
    """Policy, value, reference and reward on one base from cache entries (SFT/soup adapters and a reward adapter)."""
    shared = SharedBase.load(settings, device)
    names: dict[str, str] = {}

    def frozen(entry) -> str:
        if entry.key not in names:
            names[entry.key] = f"{entry.stage}_{entry.key}"
            shared.load_adapter(names[entry.key], entry.path)
        return names[entry.key]

    ref, init = frozen(reference), frozen(policy_init)
    shared.new_adapter("policy", settings.lora)
    shared.load_adapter("reward", rm.path)
    shared.load_adapter("value", rm.path, trainable=True)  # the value function starts as the reward model
    return AdapterActors(shared, policy=[init, "policy"], reference=[ref], value="value", reward="reward")


# ---------------------------------------------------------------------------------------------------------------
# Loading stage outputs for evaluation and soups: full checkpoints, or adapters on one shared base
# ---------------------------------------------------------------------------------------------------------------
class FullLoader:
    """Stage outputs that are full checkpoints (the tiny model)."""

    def causal(self, path: str | os.PathLike) -> nn.Module:
        return load_causal_lm(path).eval()

    def reward(self, path: str | os.PathLike) -> nn.Module:
        return load_reward_model(path).eval()


class AdapterLoader:
    """Stage outputs that are adapters: the base is loaded once, each adapter once, views switch between them."""

    def __init__(self, settings: BaseSettings, device: torch.device | str):
        self.settings, self.device = settings, device
        self._shared: SharedBase | None = None
        self._names: dict[str, str] = {}

    @property
    def shared(self) -> SharedBase:
        if self._shared is None:
            settings = BaseSettings(**{**self.settings.__dict__, "gradient_checkpointing": False})  # inference only
            self._shared = SharedBase.load(settings, self.device)
        return self._shared

    def _adapter(self, path: str | os.PathLike) -> str:
        key = str(Path(path).resolve())
        if key not in self._names:
            self._names[key] = f"a{len(self._names)}"
            self.shared.load_adapter(self._names[key], path)
        return self._names[key]

    def causal(self, path: str | os.PathLike) -> nn.Module:
        return self.shared.causal([self._adapter(path)]).eval()

    def reward(self, path: str | os.PathLike) -> nn.Module:
        name = self._adapter(path)
        return self.shared.scalar([name], name).eval()


def model_loader(model_cfg: Mapping[str, Any], device: torch.device | str = "cpu") -> FullLoader | AdapterLoader:
    return AdapterLoader(BaseSettings.from_cfg(model_cfg), device) if uses_adapters(model_cfg) else FullLoader()


def base_tokenizer(settings: BaseSettings):
    return load_tokenizer(settings.name_or_path, trust_remote_code=settings.trust_remote_code)
