"""The GRPO and RLOO stages: the policy, the reference and the reward model (no value model) from cached stages,
trained by `salsa.algorithms.grpo.GRPOModule` or `salsa.algorithms.rloo.RLOOModule` through PPO's stage runner
(`salsa.stages.ppo.run_online`: resumable, per-iteration history, the same QLoRA layouts)."""

from __future__ import annotations

from salsa.algorithms.grpo import GRPOConfig, GRPOModule
from salsa.algorithms.rloo import RLOOConfig, RLOOModule
from salsa.config import rollout_config
from salsa.infra.cache import Entry
from salsa.infra.context import Context
from salsa.models.actors import FullActors
from salsa.stages.ppo import build_actors, run_online


def build_group_actors(policy_init: Entry, reference: Entry, rm: Entry) -> FullActors:
    """Full-weight policy, reference and reward model: what GRPO and RLOO train with."""
    return build_actors(policy_init, reference, rm, value=False)


def _run(ctx: Context, group: str, module_cls, config_cls, policy_init, reference, rm, ref_name, ref_update) -> Entry:
    def make_module(actors, tok, moving):
        config = config_cls.from_cfg(ctx.cfg[group])
        return module_cls(actors, tok, ctx.data.prompts_train, config, ctx.data.judge, moving, rollout_config(ctx.cfg))

    return run_online(ctx, group, make_module, policy_init, reference, rm, ref_name, value=False, ref_update=ref_update)


def run_grpo(ctx: Context, policy_init: Entry, reference: Entry, rm: Entry, ref_name: str, ref_update=None) -> Entry:
    """The policy trained by GRPO from `policy_init` against `reference` and the reward model `rm`."""
    return _run(ctx, "grpo", GRPOModule, GRPOConfig, policy_init, reference, rm, ref_name, ref_update)


def run_rloo(ctx: Context, policy_init: Entry, reference: Entry, rm: Entry, ref_name: str, ref_update=None) -> Entry:
    """The policy trained by RLOO from `policy_init` against `reference` and the reward model `rm`."""
    return _run(ctx, "rloo", RLOOModule, RLOOConfig, policy_init, reference, rm, ref_name, ref_update)
