"""Pure math helpers, each against a hand-computed or closed-form case."""

import math

import pytest
import torch

from salsa.functional import (
    AdaptiveKLController,
    adjusted_win_rate,
    bradley_terry_loss,
    entropy_from_logits,
    gae,
    kl_estimate,
    kl_k1,
    kl_k3,
    lm_token_nll,
    logprobs_and_entropy,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    shaped_rewards,
    token_logprobs,
    unit_scale,
    warmup_cosine,
)


def test_warmup_cosine():
    assert warmup_cosine(0, warmup=4, total=14) == pytest.approx(0.25)
    assert warmup_cosine(3, warmup=4, total=14) == pytest.approx(1.0)
    assert warmup_cosine(4, warmup=4, total=14) == pytest.approx(1.0)
    # halfway through the decay: min + (1 - min) * 0.5
    assert warmup_cosine(9, warmup=4, total=14, min_ratio=0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert warmup_cosine(14, warmup=4, total=14, min_ratio=0.1) == pytest.approx(0.1)
    assert warmup_cosine(100, warmup=0, total=10, min_ratio=0.0) == pytest.approx(0.0, abs=1e-12)


def test_masked_mean_and_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 0.0, -7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    assert masked_mean(x, mask).item() == pytest.approx(3.0)  # (1+2+3+4+5)/5
    w = masked_whiten(x, mask)
    vals = w[mask.bool()]
    assert vals.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert vals.var(unbiased=True).item() == pytest.approx(1.0, rel=1e-5)
    assert torch.all(w[~mask.bool()] == 0)
    kept = masked_whiten(x, mask, shift_mean=False)[mask.bool()]
    assert kept.mean().item() == pytest.approx(3.0, rel=1e-5)
    # hand case: [1, 2, 3, 4, 5] has unbiased std sqrt(2.5)
    assert vals[0].item() == pytest.approx((1 - 3) / math.sqrt(2.5), rel=1e-5)


def test_token_logprobs_and_entropy():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]))
    tokens = torch.tensor([[1, 2]])
    lp = token_logprobs(logits, tokens)
    torch.testing.assert_close(lp, torch.log(torch.tensor([[0.25, 0.8]])))
    uniform = torch.zeros(1, 1, 7)
    assert entropy_from_logits(uniform).item() == pytest.approx(math.log(7))
    # temperature 2 on logits [0, ln 3] gives probabilities ∝ [1, √3]
    two = torch.tensor([[[0.0, math.log(3.0)]]])
    p = 1 / (1 + math.sqrt(3))
    assert token_logprobs(two, torch.tensor([[0]]), temperature=2.0).item() == pytest.approx(math.log(p))


def test_logprobs_and_entropy_from_one_log_softmax():
    # the hand case above: probabilities [0.5, 0.25, 0.25] and [0.1, 0.1, 0.8]
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]])).requires_grad_()
    lp, ent = logprobs_and_entropy(logits, torch.tensor([[1, 2]]))
    torch.testing.assert_close(lp, torch.log(torch.tensor([[0.25, 0.8]])))
    h = [-(0.5 * math.log(0.5) + 0.5 * math.log(0.25)), -(0.2 * math.log(0.1) + 0.8 * math.log(0.8))]
    torch.testing.assert_close(ent, torch.tensor([h]))
    assert lp.requires_grad and not ent.requires_grad  # the entropy is a statistic, not part of the loss
    # and it agrees with the two separate functions at a temperature
    x, t = torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3))
    lp2, ent2 = logprobs_and_entropy(x, t, temperature=0.7)
    torch.testing.assert_close(lp2, token_logprobs(x, t, 0.7))
    torch.testing.assert_close(ent2, entropy_from_logits(x, 0.7))


def test_lm_token_nll_counts_only_labels():
    logits = torch.zeros(1, 3, 4)  # uniform over 4 tokens
    labels = torch.tensor([[-100, 2, -100]])
    nll, n = lm_token_nll(logits, labels)
    assert n.item() == 1 and nll.item() == pytest.approx(math.log(4))


def test_bradley_terry_loss():
    zero = torch.zeros(3)
    assert bradley_terry_loss(zero, zero).item() == pytest.approx(math.log(2))
    assert bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.0])).item() == pytest.approx(
        math.log1p(math.exp(-2.0))
    )
    # centering adds coef * (r_c + r_r)^2
    assert bradley_terry_loss(torch.tensor([1.0]), torch.tensor([1.0]), center_coef=0.5).item() == pytest.approx(
        math.log(2) + 0.5 * 4.0
    )


def test_kl_estimators():
    g = torch.Generator().manual_seed(0)
    logp, ref = -torch.rand(4, 9, generator=g) * 3, -torch.rand(4, 9, generator=g) * 3
    assert torch.all(kl_k3(logp, ref) >= 0)
    torch.testing.assert_close(kl_k1(logp, ref), logp - ref)
    for est in ("k1", "k3"):
        assert torch.all(kl_estimate(logp, logp, est) == 0)  # policy = reference
    # hand case: log r = ln 2  ->  k3 = (2 - 1) - ln 2
    assert kl_k3(torch.tensor([0.0]), torch.tensor([math.log(2)])).item() == pytest.approx(1 - math.log(2))
    with pytest.raises(ValueError, match="k1"):
        kl_estimate(logp, ref, "k2")
    # both are unbiased for KL(p || q) of two categoricals: check by exact expectation
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    exact = (p * (p / q).log()).sum()
    for est in (kl_k1, kl_k3):
        assert (p * est(p.log(), q.log())).sum().item() == pytest.approx(exact.item(), rel=1e-6)


def test_shaped_rewards_hand_case():
    score = torch.tensor([1.0, 2.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    r = shaped_rewards(score, kl, mask, kl_coef=0.5)
    torch.testing.assert_close(r, torch.tensor([[-0.05, -0.1, -0.15 + 1.0], [-0.2 + 2.0, 0.0, 0.0]]))


def _gae_closed_form(rewards, values, mask, gamma, lam):
    """A_t = Σ_l (γλ)^l δ_{t+l} over the episode's tokens, with V = 0 past the last one."""
    B, T = rewards.shape
    out = torch.zeros_like(rewards)
    for b in range(B):
        n = int(mask[b].sum())
        v = torch.cat([values[b, :n], torch.zeros(1)])
        delta = rewards[b, :n] + gamma * v[1:] - v[:-1]
        for t in range(n):
            out[b, t] = sum((gamma * lam) ** k * delta[t + k] for k in range(n - t))
    return out


def test_gae_matches_closed_form():
    g = torch.Generator().manual_seed(1)
    rewards, values = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    mask = torch.tensor([[1.0] * 6, [1.0] * 4 + [0.0] * 2, [1.0] + [0.0] * 5])
    for gamma, lam in [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)]:
        adv, ret = gae(rewards * mask, values, mask, gamma, lam)
        expected = _gae_closed_form(rewards * mask, values, mask, gamma, lam)
        torch.testing.assert_close(adv, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ret, adv + values * mask)
    # λ = 1, γ = 1: the return is the sum of remaining rewards
    _, ret = gae(rewards * mask, values, mask, 1.0, 1.0)
    torch.testing.assert_close(ret[0], (rewards[0]).flip(0).cumsum(0).flip(0), rtol=1e-5, atol=1e-6)


def test_gae_hand_case():
    # two tokens, r = [0, 1], V = [0.5, 0.2], γ = 1, λ = 0.5
    # δ1 = 1 - 0.2 = 0.8; δ0 = 0 + 0.2 - 0.5 = -0.3; A1 = 0.8; A0 = -0.3 + 0.5 * 0.8 = 0.1
    adv, ret = gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.2]]), torch.ones(1, 2), 1.0, 0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.1, 0.8]]))
    torch.testing.assert_close(ret, torch.tensor([[0.6, 1.0]]))


def test_policy_loss_clips_at_ratio_bounds():
    mask = torch.ones(1, 4)
    old = torch.zeros(1, 4)
    ratio = torch.tensor([[1.5, 0.5, 1.1, 0.5]])
    adv = torch.tensor([[1.0, 1.0, -2.0, -1.0]])
    logp = ratio.log().requires_grad_(True)
    loss, stats = ppo_policy_loss(logp, old, adv, mask, clip=0.2)
    # per token max(-A·ρ, -A·clip(ρ)): [-1.2, -0.5, 2.2, 0.8]
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.2 + 0.8) / 4)
    assert stats["clip_frac"].item() == pytest.approx(0.5)  # tokens 0 and 3 use the clipped term
    loss.backward()
    # clipped tokens get no gradient; the others get -A·ρ / n
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.5 / 4, 2.0 * 1.1 / 4, 0.0]]))
    # ratio 1 everywhere: no clipping and approx_kl 0
    _, s = ppo_policy_loss(old.clone(), old, adv, mask, clip=0.2)
    assert s["clip_frac"].item() == 0 and s["approx_kl"].item() == 0


def test_value_loss_clipping():
    mask = torch.ones(1, 2)
    old = torch.tensor([[0.0, 0.0]])
    values = torch.tensor([[1.0, 0.1]])
    returns = torch.tensor([[2.0, 0.0]])
    loss, stats = ppo_value_loss(values, old, returns, mask, clip=0.2)
    # token 0: unclipped (1-2)^2 = 1, clipped (0.2-2)^2 = 3.24 -> 3.24; token 1: 0.01 vs 0.01 -> 0.01
    assert loss.item() == pytest.approx(0.5 * (3.24 + 0.01) / 2)
    assert stats["value_clip_frac"].item() == pytest.approx(0.5)


def test_adaptive_kl_controller():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # error = clip(12/6 - 1, -0.2, 0.2) = 0.2; value *= 1 + 0.2 * 256 / 10000
    assert ctl.update(12.0, 256) == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    ctl2 = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert ctl2.update(5.4, 100) == pytest.approx(0.1 * (1 - 0.1 * 100 / 10000))
    state = ctl.state_dict()
    ctl3 = AdaptiveKLController(1.0, 6.0, 10000)
    ctl3.load_state_dict(state)
    assert ctl3.value == ctl.value


def test_adjusted_win_rate():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    b = torch.tensor([0.0, 2.0, 5.0, 4.0])
    assert adjusted_win_rate(a, b) == pytest.approx((1 + 0.5 * 2) / 4)
    assert adjusted_win_rate(b, a) == pytest.approx((1 + 0.5 * 2) / 4)
    assert adjusted_win_rate(a, a) == 0.5
    assert adjusted_win_rate(a, a + 0.01, tie_tolerance=0.1) == 0.5
    with pytest.raises(ValueError):
        adjusted_win_rate(a, b[:2])


# ---------------------------------------------------------------------------------------------------------------
# GRPO, RLOO and DPO — each against a case computed by hand
# ---------------------------------------------------------------------------------------------------------------
def test_group_advantages_by_hand():
    from salsa.functional import group_advantages

    # group 1: scores 1, 3 → mean 2, unbiased std √2; group 2: 5, 5, flat → zeros
    scores = torch.tensor([1.0, 3.0, 5.0, 5.0])
    s = math.sqrt(2.0)
    torch.testing.assert_close(group_advantages(scores[:2], 2, eps=0.0), torch.tensor([-1 / s, 1 / s]))
    torch.testing.assert_close(group_advantages(scores, 2), torch.tensor([-1 / (s + 1e-4), 1 / (s + 1e-4), 0.0, 0.0]))
    torch.testing.assert_close(group_advantages(scores, 2, scale=False), torch.tensor([-1.0, 1.0, 0.0, 0.0]))
    # a group of three: 0, 3, 6 → mean 3, std 3 → −1, 0, 1
    torch.testing.assert_close(group_advantages(torch.tensor([0.0, 3.0, 6.0]), 3, eps=0.0), torch.tensor([-1.0, 0, 1]))
    with pytest.raises(ValueError, match="groups"):
        group_advantages(torch.tensor([1.0, 2.0, 3.0]), 2)


def test_leave_one_out_advantages_by_hand():
    from salsa.functional import leave_one_out_advantages

    # rewards 1, 2, 6: baselines (2+6)/2 = 4, (1+6)/2 = 3.5, (1+2)/2 = 1.5
    adv = leave_one_out_advantages(torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 0.0]), 3)
    torch.testing.assert_close(adv, torch.tensor([-3.0, -1.5, 4.5, 0.0, 0.0, 0.0]))
    # = k/(k−1) · (r − mean): the closed form
    r = torch.tensor([0.3, -1.2, 2.5, 0.7])
    torch.testing.assert_close(leave_one_out_advantages(r, 4), 4 / 3 * (r - r.mean()))


def test_clipped_surrogate_and_grpo_loss_by_hand():
    from salsa.functional import aggregate_tokens, clipped_surrogate, grpo_loss

    # row 0 (A = +1): ratios e^0.5 ≈ 1.6487 (clipped to 1.2 → loss −1.2) and 1 (loss −1)
    # row 1 (A = −2): ratio e^−0.5 ≈ 0.6065 (clipped to 0.8 → loss max(1.2131, 1.6) = 1.6) and padding
    logp = torch.tensor([[0.5, 0.0], [-0.5, 0.0]])
    old = torch.zeros(2, 2)
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    per_token, clipped = clipped_surrogate(logp, old, adv, clip=0.2)
    torch.testing.assert_close(per_token[0], torch.tensor([-1.2, -1.0]))
    torch.testing.assert_close(per_token[1, 0], torch.tensor(1.6))
    assert clipped.tolist() == [[True, False], [True, False]]
    # token mean: (−1.2 − 1 + 1.6) / 3 = −0.2; sequence mean: ((−1.2 − 1)/2 + 1.6) / 2 = 0.25
    torch.testing.assert_close(aggregate_tokens(per_token, mask, "token"), torch.tensor(-0.2))
    torch.testing.assert_close(aggregate_tokens(per_token, mask, "sequence"), torch.tensor(0.25))

    # with the reference: k3 at a token with log π − log π_ref = d is e^−d − 1 + d
    ref = torch.tensor([[0.5, -1.0], [-0.5, 0.0]])  # d = 0, 1, 0
    loss, stats = grpo_loss(logp, old, ref, adv, mask, clip=0.2, kl_coef=0.1, aggregation="token")
    k3 = math.exp(-1.0) - 1.0 + 1.0
    torch.testing.assert_close(loss, torch.tensor((-1.2 - 1.0 + 1.6 + 0.1 * k3) / 3))
    torch.testing.assert_close(stats["kl_k3"], torch.tensor(k3 / 3))
    torch.testing.assert_close(stats["clip_frac"], torch.tensor(2 / 3))
    # a padded position where the policy gives its token almost no probability: no overflow, no gradient
    logp = torch.tensor([[-1.0, -95.0]], requires_grad=True)
    loss, _ = grpo_loss(logp, logp.detach(), torch.zeros(1, 2), torch.ones(1), torch.tensor([[1.0, 0.0]]), 0.2, 0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all() and logp.grad[0, 1] == 0


def test_sequence_logprobs_by_hand():
    from salsa.functional import sequence_logprobs

    # two equal logits at every position: each labelled token has probability ½
    logits = torch.zeros(2, 3, 2)
    labels = torch.tensor([[-100, 1, 0], [1, -100, -100]])
    torch.testing.assert_close(sequence_logprobs(logits, labels), torch.tensor([2 * math.log(0.5), math.log(0.5)]))


def test_dpo_and_ipo_losses_by_hand():
    from salsa.functional import dpo_loss

    # policy = reference: h = 0, so DPO's loss is log 2 for every pair, whatever the log-probabilities
    pc, pr = torch.tensor([-3.0, -10.0]), torch.tensor([-4.0, -2.0])
    losses, stats = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.1)
    torch.testing.assert_close(losses, torch.full((2,), math.log(2.0)))
    assert stats["reward_accuracy"] == 0.0 and stats["reward_margin"] == 0.0
    # h = (−1 − (−2)) − (−5 − (−4)) = 1 + 1 = 2; β = 0.5: −log σ(1) = log(1 + e^−1)
    one = (torch.tensor([-1.0]), torch.tensor([-5.0]), torch.tensor([-2.0]), torch.tensor([-4.0]))
    losses, stats = dpo_loss(*one, beta=0.5)
    torch.testing.assert_close(losses, torch.tensor([math.log(1 + math.exp(-1.0))]))
    torch.testing.assert_close(stats["reward_chosen"], torch.tensor(0.5))
    torch.testing.assert_close(stats["reward_rejected"], torch.tensor(-0.5))
    assert stats["reward_accuracy"] == 1.0
    # IPO: (h − 1/(2β))² = (2 − 1)² = 1
    losses, _ = dpo_loss(*one, beta=0.5, loss_type="ipo")
    torch.testing.assert_close(losses, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(*one, beta=0.5, loss_type="hinge")


def test_unit_scale_of_scores():
    # scores 0 and 4: mean 2, mean square 8, variance 4, s.d. 2 → factor 1/2
    assert unit_scale(2.0, 8.0) == pytest.approx(0.5)
    # scores −1, 1, 3: mean 1, mean square 11/3, variance 8/3
    assert unit_scale(1.0, 11 / 3) == pytest.approx(math.sqrt(3 / 8))
    scores = torch.tensor([0.3, -1.2, 2.5, 0.0])  # scaled by it, the scores have unit (population) s.d.
    scale = unit_scale(scores.mean().item(), (scores**2).mean().item())
    assert (scores * scale).std(unbiased=False).item() == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match="do not vary"):
        unit_scale(1.0, 1.0)  # constant scores
    with pytest.raises(ValueError, match="do not vary"):
        unit_scale(float("nan"), 1.0)
