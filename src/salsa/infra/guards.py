"""Stop training at the first non-finite number, naming it, instead of training on NaNs."""

from __future__ import annotations

import torch

from salsa.errors import SalsaError


class NonFiniteError(SalsaError, RuntimeError):
    """A loss, log-probability, value or reward became NaN or infinite."""


def check_finite(values: dict[str, torch.Tensor], step: int, unit: str = "step") -> None:
    """Raise NonFiniteError naming the first quantity in `values` with a NaN or inf, and the step.

    One device sync for all quantities together; the names are looked up only when something is wrong.
    """
    flags = torch.stack([torch.isfinite(v.detach()).all() for v in values.values()])
    if bool(flags.all()):
        return
    bad = [name for name, ok in zip(values, flags.tolist(), strict=True) if not ok]
    raise NonFiniteError(f"non-finite {', '.join(bad)} at {unit} {step}")
