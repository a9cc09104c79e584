"""The four PPO models as adapters on one shared base, behind `salsa.models.actors.FullActors`' interface, so the
PPO module cannot tell the two layouts apart.

Two layouts of the same four models:
- adapters (any base): policy = base + start + new delta, reference = base + reference adapter, value and reward =
  base + reward adapter (+ head);
- merged start (`ppo.merge_start` with `model.quant: none`): the policy's start (the soup under SALSA) is folded
  into the base's weights once, so the policy generates through one adapter instead of two and the reference, when
  it is the start, through none; the value and reward models, trained on the plain base, see the start undone by
  its negated adapter beneath theirs.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from salsa.merge.soup import soup_lora_adapters
from salsa.models.actors import FullActors, response_logits
from salsa.models.qlora import AdapterError, BaseSettings, checkpoint_trainable_only
from salsa.models.shared_base import SharedBase

log = logging.getLogger("salsa")
REFERENCE_DELTA = "ref_delta"  # a moving reference's copy of the policy's trained adapter


class AdapterActors(FullActors):
    """`FullActors`' interface on one shared base (see the module docstring for which adapters make which model)."""

    def __init__(
        self,
        shared: SharedBase,
        policy: Sequence[str],
        reference: Sequence[str],
        value: str | None,
        reward: str | None,
        beneath: Sequence[str] = (),
        merged: Path | None = None,
    ):
        """`value`, `reward`: adapter names with scalar heads, or None where the algorithm has no such model;
        `beneath`: adapters under the value's and the reward's own (the merged start, negated); `merged`: the
        adapter directory folded into the base, which the saved policy includes."""
        nn.Module.__init__(self)  # not FullActors': freezing the reference would freeze the shared base's adapters
        if any(name is not None and name not in shared.heads for name in (value, reward)):
            raise AdapterError("value and reward adapters need scalar heads (load them from a reward model)")
        self.shared = shared
        self.policy = shared.causal(policy)
        self.reference = shared.causal(reference)
        self.value = shared.scalar([*beneath, value], value) if value is not None else None
        self.reward = shared.scalar([*beneath, reward], reward) if reward is not None else None
        self.merged = merged
        checkpoint_trainable_only(self)

    def train(self, mode: bool = True):
        return nn.Module.train(self, mode)  # one base for all: frozen models are frozen by their adapters

    def policy_logits(self, sequences, attention_mask, prompt_len):
        return response_logits(self.policy, sequences, attention_mask, prompt_len)

    def reference_logits(self, sequences, attention_mask, prompt_len):
        return response_logits(self.reference, sequences, attention_mask, prompt_len)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def shard(self, mesh) -> None:
        raise AdapterError("adapters on one shared base are not sharded (trainer=fsdp2): use trainer=ddp")

    def move_reference(self, rate: float) -> None:
        """The reference becomes the policy: its adapters are the policy's, with the trained one's factors copied
        into `ref_delta` (loaded when the run moves its reference). Only a copy (rate 1): averaging two adapters'
        LoRA factors is not averaging the models."""
        if rate != 1.0:
            raise AdapterError("on adapters a moving reference can only copy the policy (ref.update=sync, sync_mix=1)")
        if REFERENCE_DELTA not in self.shared.adapters:
            raise AdapterError(f"no {REFERENCE_DELTA!r} adapter: build the actors with moving_reference=True")
        self.shared.copy_adapter("policy", REFERENCE_DELTA)
        self.reference.names = tuple(REFERENCE_DELTA if n == "policy" else n for n in self.policy.names)

    def save_policy(self, path) -> None:
        """The policy as one plain peft adapter on the unmerged base: its adapters' deltas (and the merged start's)
        summed exactly (ranks concatenated)."""
        names = self.policy.names
        if len(names) == 1 and self.merged is None:
            self.shared.save_adapter(names[0], path)
            return
        with tempfile.TemporaryDirectory() as tmp:
            parts = [Path(tmp) / n for n in names]
            for n, part in zip(names, parts, strict=True):
                self.shared.save_adapter(n, part)
            parts = [self.merged, *parts] if self.merged is not None else parts
            soup_lora_adapters(parts, path, [1.0] * len(parts), normalize=False)


def merges_start(settings: BaseSettings, merge_start: bool) -> bool:
    """Whether PPO folds the policy's start into the base: asked for, and the base holds plain weights."""
    return merge_start and settings.quant == "none"


def build_adapter_actors(
    settings: BaseSettings, policy_init, reference, rm, device, merge_start: bool = False, value: bool = True,
    moving_reference: bool = False,
) -> AdapterActors:  # fmt: skip
    """Policy, value, reference and reward on one base from cache entries (SFT/soup adapters and a reward adapter);
    with `merge_start` on a plain-weight base, the policy's start is folded into the base (module docstring).
    Without a value model (`value=False`: GRPO, RLOO) or a reward model (`rm=None`: DPO) those adapters are not
    loaded; with `moving_reference`, a frozen `ref_delta` adapter shaped like the policy's receives its copies."""
    shared = SharedBase.load(settings, device)
    names: dict[str, str] = {}

    def frozen(entry) -> str:
        if entry.key not in names:
            names[entry.key] = f"{entry.stage}_{entry.key}"
            shared.load_adapter(names[entry.key], entry.path)
        return names[entry.key]

    merged = merges_start(settings, merge_start)
    if merged:
        shared.load_adapter("start_negated", policy_init.path, negate=True)
        shared.load_adapter("start", policy_init.path)
        shared.merge_adapter("start")
        log.info("[ppo] the policy's start %s is merged into the base: the policy generates through one adapter",
                 policy_init.key)  # fmt: skip
        beneath, policy = ["start_negated"], ["policy"]
        # the merged base is the reference when it is the start; any other reference sits on the start undone
        ref = [] if reference.key == policy_init.key else [*beneath, frozen(reference)]
    else:
        beneath, ref = [], [frozen(reference)]
        policy = [frozen(policy_init), "policy"]
    shared.new_adapter("policy", settings.lora)
    if moving_reference:
        shared.new_adapter(REFERENCE_DELTA, settings.lora, trainable=False)
    if rm is not None:
        shared.load_adapter("reward", rm.path)
    if value:
        shared.load_adapter("value", rm.path, trainable=True)  # the value function starts as the reward model
    return AdapterActors(
        shared, policy, ref, "value" if value else None, "reward" if rm is not None else None, beneath=beneath,
        merged=Path(policy_init.path) if merged else None,
    )  # fmt: skip
