"""The math of SFT, reward modelling, PPO, GRPO, RLOO and DPO as small pure functions: tensors in, tensors out.

Conventions: `mask` is 1.0 on real response tokens and 0.0 on padding; per-token tensors are (batch, time); the k
samples of one prompt are consecutive rows (a group).
References: Ziegler et al. 2019 and Ouyang et al. 2022 (KL-shaped PPO-RLHF), Schulman et al. 2016 (GAE),
Schulman 2020 "Approximating KL divergence" (k1/k3 estimators), Huang et al. 2024 (N+ implementation details),
Shao et al. 2024 (GRPO), Ahmadian et al. 2024 (RLOO), Rafailov et al. 2023 (DPO), Azar et al. 2023 (IPO).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------------------------------
def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries; with shift_mean=False the mean is added back (for rewards)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


# ---------------------------------------------------------------------------------------------------------------
# Language-model log-probabilities
# ---------------------------------------------------------------------------------------------------------------
def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(tokens[t] | ...) from logits aligned with `tokens` (logits[:, t] predicts tokens[:, t])."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def logprobs_and_entropy(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_logprobs` and `entropy_from_logits` from one log-softmax, for callers that need both from the same
    logits (the PPO update). The entropy is a statistic: it carries no gradient."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    chosen = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1)
    return chosen, entropy


def lm_token_nll(logits: torch.Tensor, labels: torch.Tensor, ignore: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood and the number of scored tokens (for token-weighted means)."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), reduction="sum", ignore_index=ignore
    )
    return nll, (shift_labels != ignore).sum()


# ---------------------------------------------------------------------------------------------------------------
# Reward model
# ---------------------------------------------------------------------------------------------------------------
def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, center_coef: float = 0.0) -> torch.Tensor:
    """-log σ(r_c - r_r), plus center_coef · E[(r_c + r_r)²] to keep rewards centred at zero (Eisenstein et al.)."""
    loss = -F.logsigmoid(r_chosen - r_rejected).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    return loss


def unit_scale(mean: float, mean_square: float, min_sd: float = 1e-6) -> float:
    """The factor that gives scores of this mean E[s] and mean square E[s²] a unit standard deviation:
    1 / sqrt(E[s²] − E[s]²) (Ziegler et al. 2019 normalise their reward model this way, so that the KL
    coefficient weighs the same against every reward model). Scores that barely vary have no such factor."""
    var = mean_square - mean**2
    if not math.isfinite(var) or var < min_sd**2:
        raise ValueError(
            f"scores with mean {mean:.6g} and mean square {mean_square:.6g} do not vary (variance {var:.3g})"
        )
    return 1.0 / math.sqrt(var)


# ---------------------------------------------------------------------------------------------------------------
# KL to the reference
# ---------------------------------------------------------------------------------------------------------------
def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = log π(a) - log π_ref(a): unbiased for KL(π‖π_ref) under a ~ π, can be negative per token."""
    return logp - ref_logp


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r with r = π_ref(a)/π(a): unbiased, always ≥ 0, lower variance."""
    log_ratio = ref_logp - logp
    return torch.expm1(log_ratio) - log_ratio


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    if estimator == "k1":
        return kl_k1(logp, ref_logp)
    if estimator == "k3":
        return kl_k3(logp, ref_logp)
    raise ValueError(f"ppo.kl_estimator must be 'k1' or 'k3', got {estimator!r}")


def shaped_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: -kl_coef · KL at every response token, plus the sequence score at its last token."""
    rewards = -kl_coef * kl * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(score.size(0)), last] += score
    return rewards


class AdaptiveKLController:
    """Ziegler et al.'s proportional controller: grows kl_coef when KL is above target, shrinks it below."""

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


# ---------------------------------------------------------------------------------------------------------------
# GAE and PPO losses
# ---------------------------------------------------------------------------------------------------------------
def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded episodes; returns (advantages, returns).

    δ_t = r_t + γ V_{t+1} - V_t,  A_t = δ_t + γλ A_{t+1}, with V and A zero after the last token.
    """
    values = values * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    T = rewards.size(1)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, advantages + values


def ppo_policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """Clipped surrogate: mean over tokens of max(-A·ρ, -A·clip(ρ, 1-ε, 1+ε)), ρ = π/π_old (each token's term times
    `weights`, when given)."""
    surrogate, clipped = clipped_surrogate(logp, old_logp, advantages, clip, weights)
    loss = masked_mean(surrogate, mask)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean(clipped.float(), mask),
            "approx_kl": masked_mean(0.5 * (logp - old_logp) ** 2, mask),
        }
    return loss, stats


def ppo_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 · mean max((V - R)², (clip(V, V_old ± ε) - R)²)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        stats = {"value_clip_frac": masked_mean((loss_clipped > loss_unclipped).float(), mask)}
    return loss, stats


# ---------------------------------------------------------------------------------------------------------------
# Critic-free policy gradients: GRPO and RLOO (k samples per prompt, consecutive rows)
# ---------------------------------------------------------------------------------------------------------------
def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 2 or scores.dim() != 1 or scores.numel() % group_size:
        raise ValueError(f"need 1-d scores in groups of ≥ 2, got shape {tuple(scores.shape)}, groups of {group_size}")
    return scores.view(-1, group_size)


def group_advantages(scores: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantage of each sample: its score minus its group's mean, divided by the group's standard deviation
    (unbiased; `scale=False` keeps the plain difference, as Dr. GRPO does). A group of equal scores gets zeros."""
    g = _groups(scores, group_size)
    centred = g - g.mean(1, keepdim=True)
    if scale:
        centred = centred / (g.std(1, keepdim=True) + eps)
    return centred.reshape(-1)


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO's advantage: each sample's reward minus the mean reward of the other k − 1 samples of its prompt,
    r_i − (Σ_j r_j − r_i)/(k − 1) — an unbiased baseline, as it never uses the sample's own reward."""
    g = _groups(rewards, group_size)
    baseline = (g.sum(1, keepdim=True) - g) / (group_size - 1)
    return (g - baseline).reshape(-1)


def clipped_surrogate(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip: float,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per-token clipped objective, as a loss: max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)), ρ = π/π_old; and where it clipped.
    `advantages` is per token (B, T) or per sequence (B,), then shared by the sequence's tokens. `weights` (B, T),
    constants such as `truncated_is_weights`, multiply each token's term."""
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    surrogate = torch.maximum(unclipped, clipped)
    if weights is not None:
        surrogate = surrogate * weights.detach()
    return surrogate, (clipped > unclipped)


def truncated_is_weights(trainer_logp: torch.Tensor, engine_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance weights min(π_trainer/π_engine, cap) of tokens that an engine sampled (its own
    log-probs `engine_logp`) but the training model's π_trainer (`trainer_logp`) is optimised for: the policy
    gradient of samples drawn from π_engine, corrected towards π_trainer, with the weight's variance bounded by `cap`
    (≥ 1). Equal log-probs give weight 1."""
    return torch.exp(trainer_logp - engine_logp).clamp(max=cap)


def aggregate_tokens(per_token: torch.Tensor, mask: torch.Tensor, aggregation: str = "token") -> torch.Tensor:
    """A per-token loss reduced to one number: "token" = mean over every response token of the batch (long answers
    weigh more, as in DAPO); "sequence" = mean over each answer's tokens, then over answers (the GRPO paper's)."""
    if aggregation == "token":
        return masked_mean(per_token, mask)
    if aggregation == "sequence":
        return masked_mean(per_token, mask, dim=1).mean()
    raise ValueError(f"loss aggregation must be 'token' or 'sequence', got {aggregation!r}")


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
    kl_coef: float,
    aggregation: str = "token",
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's loss: the clipped surrogate with per-sequence advantages (each token's term times `weights`, when
    given), plus kl_coef · k3(π, π_ref) at every token (the KL is in the loss, not in the reward), reduced by
    `aggregate_tokens`."""
    surrogate, clipped = clipped_surrogate(logp, old_logp, advantages, clip, weights)
    # padding counts nothing, and must not overflow: k3 grows like e^(log π − log π_ref) there, and inf · 0 is NaN
    kl = kl_k3(logp * mask, ref_logp * mask)
    loss = aggregate_tokens(surrogate + kl_coef * kl, mask, aggregation)
    with torch.no_grad():
        stats = {"clip_frac": masked_mean(clipped.float(), mask), "kl_k3": masked_mean(kl, mask)}
    return loss, stats


# ---------------------------------------------------------------------------------------------------------------
# DPO and IPO on preference pairs
# ---------------------------------------------------------------------------------------------------------------
def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore: int = -100) -> torch.Tensor:
    """Σ_t log p(labels[t]) per row over the labelled tokens, from logits aligned with `labels` (logits[:, t]
    predicts labels[:, t], as in `token_logprobs`); positions labelled `ignore` count nothing."""
    keep = labels != ignore
    return (token_logprobs(logits, labels.masked_fill(~keep, 0)) * keep).sum(1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair preference loss from sequence log-probabilities. With h = (log π(c) − log π_ref(c)) −
    (log π(r) − log π_ref(r)): DPO ("sigmoid") = −log σ(β·h), which is log 2 wherever π = π_ref; IPO ("ipo") =
    (h − 1/(2β))². Stats: the implicit rewards β·(log π − log π_ref) of chosen and rejected, and how often the chosen
    one's is higher."""
    chosen = policy_chosen - ref_chosen
    rejected = policy_rejected - ref_rejected
    h = chosen - rejected
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"dpo.loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}")
    with torch.no_grad():
        stats = {
            "reward_chosen": (beta * chosen).mean(),
            "reward_rejected": (beta * rejected).mean(),
            "reward_margin": (beta * h).mean(),
            "reward_accuracy": (h > 0).float().mean(),
        }
    return losses, stats


# ---------------------------------------------------------------------------------------------------------------
# Moving references
# ---------------------------------------------------------------------------------------------------------------
def ema_update(reference: torch.Tensor, policy: torch.Tensor, rate: float) -> torch.Tensor:
    """One step of a reference moving toward the policy: (1 − rate) · reference + rate · policy (rate 1: an exact
    copy, as torch.lerp computes the upper half of the rates from the policy's side)."""
    return torch.lerp(reference, policy, rate)


def reference_rate(update: str, step: int, ema_rate: float, sync_every: int, sync_mix: float) -> float | None:
    """How far the reference moves toward the policy after optimizer step `step` (1, 2, ...): `ema_rate` after every
    step (ema), `sync_mix` after every `sync_every`-th (sync), never (frozen: None)."""
    if update == "ema":
        return ema_rate
    if update == "sync" and step % sync_every == 0:
        return sync_mix
    return None


# ---------------------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------------------
def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Learning-rate multiplier: linear warmup to 1 over `warmup` steps, then cosine decay to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------
def adjusted_win_rate(a: torch.Tensor, b: torch.Tensor, tie_tolerance: float = 0.0) -> float:
    """The paper's adjusted win rate of a over b: (wins + ½ · ties) / comparisons, pairing a[i] with b[i]."""
    if a.numel() == 0 or a.shape != b.shape:
        raise ValueError(
            f"win rate needs two equal, non-empty score vectors, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    diff = a.double() - b.double()
    wins = (diff > tie_tolerance).sum().item()
    ties = (diff.abs() <= tie_tolerance).sum().item()
    return (wins + 0.5 * ties) / a.numel()
