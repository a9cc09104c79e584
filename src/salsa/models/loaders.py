"""Loading stage outputs for evaluation and soups: full checkpoints, or adapters on one shared base."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from salsa.models.hf import load_causal_lm, load_reward_model

if TYPE_CHECKING:
    pass

from salsa.models.qlora import BaseSettings, uses_adapters
from salsa.models.shared_base import SharedBase


class FullLoader:
    """Stage outputs that are full checkpoints (the embedded model, `model.finetune=full`), each on `device`."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = device

    def causal(self, path: str | os.PathLike) -> nn.Module:
        return load_causal_lm(path).to(self.device).eval()

    def reward(self, path: str | os.PathLike) -> nn.Module:
        return load_reward_model(path).to(self.device).eval()


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


def model_loader(
    model_cfg: Mapping[str, Any], device: torch.device | str = "cpu", settings: BaseSettings | None = None
) -> FullLoader | AdapterLoader:
    """Full checkpoints, or adapters on the base `settings` says (default: as `model_cfg` says)."""
    if not uses_adapters(model_cfg):
        return FullLoader(device)
    return AdapterLoader(settings or BaseSettings.from_cfg(model_cfg), device)
