"""GRPO (Shao et al. 2024) against a frozen reference — an SFT model, πother or a soup.

Each prompt's k answers form a group: an answer's advantage is its reward-model score minus the group's mean,
divided by the group's standard deviation (`grpo.scale_rewards`), shared by all its tokens. The loss is the clipped
surrogate plus kl_coef · k3(π, π_ref) at every token: the KL to the reference is in the loss, not in the reward, and
no value model is trained. The rollout and update loop is `salsa.algorithms.group.GroupModule`'s.
"""

from __future__ import annotations

import torch

from salsa.algorithms.group import GroupModule
from salsa.config import GRPOConfig
from salsa.functional import group_advantages, grpo_loss

__all__ = ["GRPOConfig", "GRPOModule"]


class GRPOModule(GroupModule):
    name = "grpo"
    config: GRPOConfig

    def advantages(self, scores, logprobs, ref_logprobs, mask):
        c = self.config
        adv = group_advantages(scores, c.group_size, scale=c.scale_rewards)
        return adv, {"advantage_abs": adv.abs().mean()}

    def loss(self, logp: torch.Tensor, mb: dict[str, torch.Tensor]):
        c = self.config
        return grpo_loss(
            logp, mb["logprobs"], mb["ref_logprobs"], mb["advantages"], mb["mask"], c.clip, c.kl_coef,
            c.loss_aggregation, mb.get("is_weights"),
        )  # fmt: skip
