"""The four PPO models as adapters on one shared base, behind `salsa.models.actors.FullActors`' interface, so the
PPO module cannot tell the two layouts apart."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from salsa.merge.soup import soup_lora_adapters
from salsa.models.actors import FullActors, response_logits

if TYPE_CHECKING:
    pass

from salsa.models.qlora import AdapterError, BaseSettings, checkpoint_trainable_only
from salsa.models.shared_base import SharedBase


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
