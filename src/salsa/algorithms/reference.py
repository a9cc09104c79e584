"""A reference that moves during training (`ref.update=ema|sync`), for every algorithm.

The reference starts at the `ref=` model. After optimizer step s (1, 2, ...) it moves toward the policy by the rate
`salsa.functional.reference_rate` gives: `ema` after every step (WARP's EMA anchor), `sync` every `ref.sync_every`
steps with mixing `ref.sync_mix` (TR-DPO's α and τ; α = 1 copies the policy). The online algorithms score the
reference at each rollout, so a move takes effect from the next rollout; DPO then scores the reference per batch
instead of once. The moved reference is part of every checkpoint, so a resumed run continues from the same one.

Full-weight models move parameter by parameter. On adapters over one shared base the reference can only be copied
(`sync` with `sync_mix: 1`): the average of two LoRA adapters' factors is not the average of the models, so mixing
is refused before anything runs.
"""

from __future__ import annotations

from typing import Any

from salsa.functional import reference_rate

REFERENCE_NAMES = "reference_adapters"  # checkpoint key: the adapters the moved reference runs through


def update_spec(ref_cfg: Any | None) -> dict[str, Any]:
    """What a moving reference adds to a policy stage's cache key ({} when frozen or None: those keys stay
    unchanged)."""
    update = str(ref_cfg.get("update", "frozen")) if ref_cfg is not None else "frozen"
    if update == "frozen":
        return {}
    params = {"ema_rate": float(ref_cfg.ema_rate)} if update == "ema" else {
        "sync_every": int(ref_cfg.sync_every), "sync_mix": float(ref_cfg.sync_mix)
    }  # fmt: skip
    return {"ref_update": {"update": update, **params}}


class MovingReference:
    """Moves `actors.reference` toward `actors.policy` after optimizer steps, as `ref_cfg` (the `ref` group) says;
    never with `ref_cfg` None (a frozen reference: the baselines')."""

    def __init__(self, actors, ref_cfg: Any | None):
        self.actors = actors
        ref_cfg = ref_cfg if ref_cfg is not None else {}
        self.update = str(ref_cfg.get("update", "frozen"))
        self.ema_rate, self.sync_every, self.sync_mix = (
            float(ref_cfg.get("ema_rate", 0.01)), int(ref_cfg.get("sync_every", 10)), float(ref_cfg.get("sync_mix", 1))
        )  # fmt: skip
        self.moves = 0  # how many times it moved (logged)

    @property
    def moving(self) -> bool:
        return self.update != "frozen"

    def after_step(self, step: int) -> bool:
        """Move after optimizer step `step` if one is due; whether it moved."""
        rate = reference_rate(self.update, step, self.ema_rate, self.sync_every, self.sync_mix)
        if rate is None:
            return False
        self.actors.move_reference(rate)
        self.moves += 1
        return True

    def state_keys(self, state_dict: dict) -> list[str]:
        """The keys of a module's state dict that hold the moved reference (none when frozen)."""
        if not self.moving:
            return []
        return [k for k in state_dict if ".reference." in f".{k}" or ".ref_delta." in k]

    def save(self, checkpoint: dict, full_state: dict) -> None:
        for k in self.state_keys(full_state):
            checkpoint["state_dict"][k] = full_state[k]
        names = getattr(self.actors.reference, "names", None)
        if self.moving and names is not None:
            checkpoint[REFERENCE_NAMES] = list(names)
        checkpoint["reference_moves"] = self.moves

    def load(self, checkpoint: dict) -> None:
        if REFERENCE_NAMES in checkpoint:
            self.actors.reference.names = tuple(checkpoint[REFERENCE_NAMES])
        self.moves = int(checkpoint.get("reference_moves", 0))


def keep_trainable(module, checkpoint: dict, moving: MovingReference | None) -> None:
    """A checkpoint's state reduced to what training changes: the trainable weights and, when it moves, the
    reference (frozen models and a shared frozen base are rebuilt from the cache, not checkpointed)."""
    full = checkpoint["state_dict"]
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    checkpoint["state_dict"] = {k: v for k, v in full.items() if k in trainable}
    if moving is not None:
        moving.save(checkpoint, full)
