"""Policy-optimisation algorithms as Lightning modules, free of caching and tracking; their stages in
`salsa.stages` do the wiring. `ALGORITHMS` is what `algo=<name>` can choose.

Every algorithm's stage has one signature, `stage(ctx, init, reference, reward_model, label, ref_update) -> Entry`:
the policy starts from `init`, is held near `reference` (both cache entries of SFT models or soups), is trained
against `reward_model` (None for algorithms that learn from preference pairs directly), and `label` names the run's
reference in logs and plots; `ref_update` (the `ref` config, or None for a frozen reference) says whether and how the
reference moves. The pipeline calls the chosen one for the run and for its baseline (the same algorithm with
`ref=sft`, frozen).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Algorithm:
    name: str
    stage: str  # "module:function" of its stage, imported when it runs (choosing one loads nothing)
    needs_reward_model: bool = True

    def run(self, ctx: Any, init: Any, reference: Any, reward_model: Any, label: str, ref_update: Any = None) -> Any:
        module, _, function = self.stage.partition(":")
        stage = getattr(importlib.import_module(module), function)
        return stage(ctx, init, reference, reward_model, label, ref_update)


ALGORITHMS = {
    "ppo": Algorithm("ppo", "salsa.stages.ppo:run_ppo"),
    "dpo": Algorithm("dpo", "salsa.stages.dpo:run_dpo", needs_reward_model=False),
    "grpo": Algorithm("grpo", "salsa.stages.group:run_grpo"),
    "rloo": Algorithm("rloo", "salsa.stages.group:run_rloo"),
}
