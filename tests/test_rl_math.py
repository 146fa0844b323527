"""Hand-computed checks of the PPO-Lagrangian tensor maths (safealign.algorithms.rl)."""

import math

import pytest
import torch

from safealign.algorithms.rl import (
    clipped_value_loss,
    combined_advantage,
    entropy_from_logits,
    gae,
    kl_estimate,
    logprobs_from_logits,
    masked_mean,
    masked_seq_mean,
    masked_whiten,
    ppo_policy_loss,
    shape_token_rewards,
)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def close(actual, expected, tol=1e-6):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        atol=tol,
        rtol=0,
    )


# --------------------------------------------------------------------------- #
# masked reductions
# --------------------------------------------------------------------------- #
def test_masked_mean_and_seq_mean():
    x = t([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    mask = t([1, 1, 0], [1, 0, 0])
    # all masked tokens: (1 + 2 + 4) / 3
    close(masked_mean(x, mask), 7 / 3)
    # per row: (1+2)/2 = 1.5 and 4/1 = 4; batch mean (1.5 + 4) / 2 = 2.75
    close(masked_seq_mean(x, mask), 2.75)


def test_masked_means_with_empty_rows():
    x = t([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    mask = t([1, 1, 0], [0, 0, 0])
    close(masked_mean(x, mask), 1.5)
    close(masked_seq_mean(x, mask), 1.5)  # empty row is left out, not NaN
    close(masked_mean(x, torch.zeros_like(x)), 0.0)
    close(masked_seq_mean(x, torch.zeros_like(x)), 0.0)


def test_masked_whiten():
    x = t([1.0, 3.0, 99.0])
    mask = t([1, 1, 0])
    # mu = 2, population var = ((1-2)^2 + (3-2)^2) / 2 = 1
    close(masked_whiten(x, mask), t([-1.0, 1.0, 0.0]), tol=1e-6)
    close(masked_whiten(x, mask, shift_mean=False), t([1.0, 3.0, 0.0]), tol=1e-6)


# --------------------------------------------------------------------------- #
# log-probs, entropy, KL
# --------------------------------------------------------------------------- #
def test_logprobs_from_logits_by_hand():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]])  # [1, 3, 3]
    labels = torch.tensor([[2, 0, -100]])
    # logsumexp(1,2,3) = 3 + log(1 + e^-1 + e^-2) = 3.4076059644
    lse = 3 + math.log(1 + math.exp(-1) + math.exp(-2))
    expected = [[3 - lse, 1 - lse, 0.0]]  # label -100 -> 0
    close(logprobs_from_logits(logits, labels), expected, tol=1e-6)


def test_logprobs_half_precision_matches_float():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 11, generator=g)
    labels = torch.randint(0, 11, (2, 4), generator=g)
    ref = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    close(logprobs_from_logits(logits, labels), ref, tol=1e-5)
    half = logprobs_from_logits(logits.bfloat16(), labels)
    assert half.dtype == torch.float32
    close(half, ref, tol=5e-2)


def test_entropy_from_logits():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, -1e9]]])  # [1, 2, 4]
    # uniform over 4: log 4; softmax(1,2,3) = (.0900306, .2447285, .6652410):
    # H = -sum p log p = 0.8323956
    close(entropy_from_logits(logits), [[math.log(4), 0.8323956]], tol=1e-6)


def test_kl_estimate():
    logp = torch.tensor([[math.log(0.5)]])
    ref = torch.tensor([[math.log(0.25)]])
    # k1 = log 0.5 - log 0.25 = log 2;  k3: r = 0.25/0.5 = 0.5, (0.5 - 1) - log 0.5 = 0.1931472
    close(kl_estimate(logp, ref, "k1"), [[math.log(2)]])
    close(kl_estimate(logp, ref, "k3"), [[-0.5 + math.log(2)]])
    assert kl_estimate(logp, logp, "k3").item() == 0.0
    with pytest.raises(ValueError):
        kl_estimate(logp, ref, "k2")


# --------------------------------------------------------------------------- #
# shaping, GAE, combined advantage
# --------------------------------------------------------------------------- #
def test_shape_token_rewards_reward_and_cost_streams():
    kl = t([0.1, 0.2, 0.3], [1.0, -2.0, 0.5])
    mask = t([1, 1, 0], [1, 1, 1])
    score = t(2.0, 100.0)
    # reward: -beta*kl with beta=0.5, score on last masked token, clamp to [-10, 10]
    # row0: -0.05, -0.1 + 2 = 1.9, (pad) 0
    # row1: -0.5, +1.0, -0.25 + 100 = 99.75 -> 10
    out = shape_token_rewards(score, kl, mask, beta=0.5, kl_sign=-1, clip=10.0)
    close(out, t([-0.05, 1.9, 0.0], [-0.5, 1.0, 10.0]))
    # cost: +beta*kl (bonus): row0: 0.05, 0.1 + 2 = 2.1, 0; row1: 0.5, -1.0, 0.25 + 100 -> 10
    out = shape_token_rewards(score, kl, mask, beta=0.5, kl_sign=+1, clip=10.0)
    close(out, t([0.05, 2.1, 0.0], [0.5, -1.0, 10.0]))
    # no clamp
    out = shape_token_rewards(score, kl, mask, beta=0.5, kl_sign=+1, clip=None)
    close(out[1, 2], 100.25)
    # clamp also applies to the KL part: beta*kl = -15 -> -10
    out = shape_token_rewards(t(0.0), t([-30.0]), t([1]), beta=0.5, kl_sign=1, clip=10.0)
    close(out, t([-10.0]))


def test_shape_token_rewards_empty_row_drops_score():
    kl = t([0.1, 0.2], [0.3, 0.4])
    mask = t([0, 0], [1, 0])
    out = shape_token_rewards(t(5.0, 7.0), kl, mask, beta=1.0, kl_sign=-1, clip=50.0)
    close(out, t([0.0, 0.0], [-0.3 + 7.0, 0.0]))
    with pytest.raises(ValueError):
        shape_token_rewards(t(5.0, 7.0), kl, mask, beta=1.0, kl_sign=2, clip=50.0)


def test_gae_by_hand_gamma1_lambda095():
    rewards = t([0.0, 0.0, 1.0], [0.0, 2.0, 99.0])
    values = t([0.5, 0.6, 0.7], [1.0, 0.5, 99.0])
    mask = t([1, 1, 1], [1, 1, 0])
    # row 0 (gamma = 1, lam = 0.95):
    #   t=2: delta = 1 + 0 - 0.7 = 0.3                A2 = 0.3
    #   t=1: delta = 0 + 0.7 - 0.6 = 0.1              A1 = 0.1 + 0.95*0.3   = 0.385
    #   t=0: delta = 0 + 0.6 - 0.5 = 0.1              A0 = 0.1 + 0.95*0.385 = 0.46575
    #   returns = A + V = 0.96575, 0.985, 1.0
    # row 1 (last token is padding: its reward 99 and value 99 are ignored):
    #   t=1: delta = 2 + 0 - 0.5 = 1.5                A1 = 1.5
    #   t=0: delta = 0 + 0.5 - 1.0 = -0.5             A0 = -0.5 + 0.95*1.5 = 0.925
    #   returns = 1.925, 2.0, 0
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    close(adv, t([0.46575, 0.385, 0.3], [0.925, 1.5, 0.0]))
    close(ret, t([0.96575, 0.985, 1.0], [1.925, 2.0, 0.0]))


def test_gae_discounted_and_detached():
    rewards = t([1.0, 1.0]).requires_grad_()
    values = t([0.0, 0.0]).requires_grad_()
    # gamma = 0.5, lam = 1: A1 = 1;  A0 = (1 + 0.5*0 - 0) + 0.5*1*1 = 1.5
    adv, ret = gae(rewards, values, t([1, 1]), gamma=0.5, lam=1.0)
    close(adv, t([1.5, 1.0]))
    close(ret, t([1.5, 1.0]))
    assert not adv.requires_grad and not ret.requires_grad


def test_combined_advantage():
    a_r = t([1.0, -2.0])
    a_c = t([0.5, 1.0])
    # lam = 3: (1 - 1.5)/4 = -0.125, (-2 - 3)/4 = -1.25
    close(combined_advantage(a_r, a_c, 3.0), t([-0.125, -1.25]))
    close(combined_advantage(a_r, a_c, 3.0, normalize=False), t([-0.5, -5.0]))
    close(combined_advantage(a_r, a_c, 0.0), a_r)
    with pytest.raises(ValueError):
        combined_advantage(a_r, a_c, -1.0)


# --------------------------------------------------------------------------- #
# losses
# --------------------------------------------------------------------------- #
def test_ppo_policy_loss_clipped_and_unclipped():
    old = t([0.0, 0.0])
    logp = t([math.log(1.1), math.log(1.5)]).requires_grad_()
    adv = t([1.0, 2.0])
    mask = t([1, 1])
    # token 0: ratio 1.1 inside [0.8, 1.2]: min(1.1*1, 1.1*1) = 1.1
    # token 1: ratio 1.5 -> clipped 1.2: min(1.5*2, 1.2*2) = 2.4 (clip active)
    # loss = -(1.1 + 2.4)/2 = -1.75
    loss, stats = ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    close(loss, -1.75)
    close(stats["clipfrac"], 0.5)
    close(stats["ratio_mean"], 1.3)
    # approx_kl = mean((r - 1) - log r) = ((0.1 - log 1.1) + (0.5 - log 1.5)) / 2
    close(stats["approx_kl"], ((0.1 - math.log(1.1)) + (0.5 - math.log(1.5))) / 2)
    loss.backward()
    # d/dlogp of -(ratio*A)/2 = -ratio*A/2 = -0.55 on token 0; clipped token has no gradient
    close(logp.grad, t([-0.55, 0.0]))


def test_ppo_policy_loss_negative_advantage():
    old = t([0.0, 0.0])
    logp = t([math.log(0.5), math.log(1.5)])
    adv = t([-1.0, -1.0])
    # ratio 0.5: min(-0.5, 0.8*-1 = -0.8) = -0.8 (clipped branch)
    # ratio 1.5: min(-1.5, 1.2*-1 = -1.2) = -1.5 (unclipped branch, pessimistic)
    # loss = -(-0.8 - 1.5)/2 = 1.15
    loss, _ = ppo_policy_loss(logp, old, adv, t([1, 1]), clip_eps=0.2)
    close(loss, 1.15)


def test_ppo_policy_loss_reductions():
    zeros = torch.zeros(2, 2, dtype=torch.float64)  # ratio = 1
    adv = t([1.0, 3.0], [5.0, 100.0])
    mask = t([1, 1], [1, 0])
    # token: -(1 + 3 + 5)/3 = -3;  seq: -((1+3)/2 + 5/1)/2 = -3.5
    close(ppo_policy_loss(zeros, zeros, adv, mask, 0.2, reduction="token")[0], -3.0)
    close(ppo_policy_loss(zeros, zeros, adv, mask, 0.2, reduction="seq")[0], -3.5)
    close(ppo_policy_loss(zeros, zeros, adv, mask, 0.2)[0], -3.5)  # default "seq"
    with pytest.raises(ValueError):
        ppo_policy_loss(zeros, zeros, adv, mask, 0.2, reduction="sum")


def test_clipped_value_loss():
    values = t([1.0, 3.0]).requires_grad_()
    old = t([0.0, 2.5])
    returns = t([2.0, 0.0])
    mask = t([1, 1])
    # token 0: (1 - 2)^2 = 1; V_clip = clip(1, -0.5, 0.5) = 0.5 -> (0.5 - 2)^2 = 2.25; max 2.25 (clip active)
    # token 1: (3 - 0)^2 = 9; V_clip = clip(3, 2, 3) = 3 -> 9; max 9 (clip inactive)
    # loss = 0.5 * (2.25 + 9)/2 = 2.8125
    loss, stats = clipped_value_loss(values, old, returns, mask, clip_range=0.5, reduction="token")
    close(loss, 2.8125)
    close(stats["vf_clipfrac"], 0.5)
    loss.backward()
    # clipped token: V_clip is constant in V -> zero grad; token 1: 0.5 * 2*(3-0) / 2 = 1.5
    close(values.grad, t([0.0, 1.5]))
    # without clipping: 0.5 * (1 + 9)/2 = 2.5
    loss, stats = clipped_value_loss(values, old, returns, mask, clip_range=None, reduction="token")
    close(loss, 2.5)
    close(stats["vf_clipfrac"], 0.0)
