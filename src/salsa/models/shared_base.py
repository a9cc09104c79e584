"""One shared frozen base holding named LoRA adapters and scalar heads, and views that look like ordinary models.

Adapters are switched by setting the active adapters of every LoRA layer directly: peft's `set_adapter` also
changes `requires_grad`, which would unfreeze the reference while the policy runs.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from salsa.merge.soup import ADAPTER_CONFIG, ADAPTER_WEIGHTS

if TYPE_CHECKING:
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

from salsa.models.qlora import (
    HEAD,
    AdapterError,
    BaseSettings,
    LoraSettings,
    ScalarHead,
    enable_checkpointing,
    load_base,
    peft,
)


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

    def load_adapter(self, name: str, path: str | os.PathLike, trainable: bool = False, negate: bool = False) -> None:
        """A saved peft LoRA adapter, under `name`; its scalar head (a reward model's) goes to `heads[name]`.
        `negate` loads it with the opposite delta (−B·A·scale): on a base the adapter was merged into, it undoes
        the merge for the models that must not see it."""
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
        if negate:
            if head:
                raise AdapterError(f"{path}: a reward model's adapter cannot be negated (its head would not be)")
            for layer in self._layers:
                if name in layer.lora_B:
                    layer.lora_B[name].weight.data.neg_()
        if head:
            weight = head[f"{HEAD}.weight"]
            module = ScalarHead(weight.shape[1], weight.shape[0], bias=f"{HEAD}.bias" in head)
            module.load_state_dict({k.split(".", 1)[1]: v.float() for k, v in head.items()})
            module.to(next(self.lm.parameters()).device)
            module.requires_grad_(trainable)
            self.heads[name] = module

    @torch.no_grad()
    def copy_adapter(self, source: str, target: str) -> None:
        """Adapter `target` takes `source`'s LoRA factors (same rank and modules): the two add the same delta."""
        for layer in self._layers:
            if source in layer.lora_A:
                layer.lora_A[target].weight.copy_(layer.lora_A[source].weight)
                layer.lora_B[target].weight.copy_(layer.lora_B[source].weight)

    def merge_adapter(self, name: str) -> None:
        """Fold adapter `name` into the base's weights, W ← W + B·A·scale (summed in float32, stored in the base's
        dtype), and remove it: models that had it on now run without it, and all others see it in the weights.
        Needs plain weights (`model.quant: none`); a 4-bit base cannot take a merge without requantising."""
        if name not in self.adapters:
            raise AdapterError(f"unknown adapter {name!r}; loaded: {self.adapters}")
        for layer in self._layers:
            if name not in layer.lora_A:
                continue
            base = layer.get_base_layer()
            if not base.weight.is_floating_point() or base.weight.__class__.__name__ == "Params4bit":
                raise AdapterError("merging an adapter into the base needs plain weights (model.quant=none)")
            delta = layer.get_delta_weight(name).float()
            base.weight.data = (base.weight.data.float() + delta).to(base.weight.dtype)
        self._remove(name)

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

    def get_output_embeddings(self):
        return self.shared.lm.get_output_embeddings()


class _Backbone(_View):
    def forward(self, *args, **kwargs):
        lm = self.shared.lm
        with self.shared.active(self.names):
            return getattr(lm, lm.base_model_prefix)(*args, **kwargs)


class ScalarView(_View):
    """The backbone plus a scalar head: a `*ForSequenceClassification` look-alike (`base_model_prefix` backbone +
    `score`), so `salsa.models.hf.scalar_head_outputs` reads it unchanged."""

    base_model_prefix = "backbone"

    def __init__(self, shared: SharedBase, names: Sequence[str], head: nn.Module):
        super().__init__(shared, names)
        object.__setattr__(self, "backbone", _Backbone(shared, names))
        object.__setattr__(self, "score", head)  # one of shared.heads
