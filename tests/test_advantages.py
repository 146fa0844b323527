"""The advantage and policy-loss registries against hand-computed values."""

import math

import pytest
import torch

from safealign.algorithms import advantages as A
from safealign.algorithms import policy_losses as PL
from safealign.algorithms.rl import gae, ppo_policy_loss


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def close(actual, expected, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64),
                               atol=tol, rtol=tol)


def terminal(scores, lengths, T=3):
    """Token streams with each score on the last of ``lengths`` tokens, and their masks."""
    rewards = torch.zeros(len(scores), T, dtype=torch.float64)
    mask = torch.zeros(len(scores), T, dtype=torch.float64)
    for i, (s, n) in enumerate(zip(scores, lengths)):
        mask[i, :n] = 1
        rewards[i, n - 1] = s
    return rewards, mask


def test_group_advantage_by_hand_with_ties():
    # one group of 4: returns 1, 2, 3, 3 -> mean 2.25, std (ddof 1) sqrt(2.75 / 3)
    std = math.sqrt(2.75 / 3)
    expected = [(r - 2.25) / (std + 1e-6) for r in (1, 2, 3, 3)]
    close(A.group_normalize(t(1, 2, 3, 3), 4), expected)
    rewards, mask = terminal([1, 2, 3, 3], [1, 3, 2, 3])
    adv, returns = A.estimate("group", rewards, mask, group_size=4)
    assert returns is None
    close(adv, torch.tensor(expected, dtype=torch.float64)[:, None] * mask)   # the same value on every response token
    assert adv[2, 0] == adv[3, 0]                                              # ties get the same advantage


def test_group_of_identical_rewards_has_zero_advantage_and_groups_are_independent():
    close(A.group_normalize(t(0, 1, 2, 2), 2), [-1 / (math.sqrt(0.5) + 1e-6) * 0.5, 0.5 / (math.sqrt(0.5) + 1e-6), 0, 0])
    close(A.group_normalize(t(5, 5, 5), 3), [0, 0, 0])
    close(A.group_normalize(t(1, 2, 3, 3), 4, scale=False), [-1.25, -0.25, 0.75, 0.75])


def test_group_size_one_and_ragged_batches_are_refused():
    with pytest.raises(ValueError, match="group_size >= 2"):
        A.group_normalize(t(1, 2), 1)
    with pytest.raises(ValueError, match="whole number of groups"):
        A.group_normalize(t(1, 2, 3), 2)
    rewards, mask = terminal([1, 2], [1, 1])
    with pytest.raises(ValueError, match="group_size >= 2"):
        A.estimate("rloo", rewards, mask, group_size=1)


def test_rloo_by_hand():
    close(A.leave_one_out(t(1, 2, 3, 3), 4), [1 - 8 / 3, 2 - 7 / 3, 3 - 2, 3 - 2])
    # equals G/(G-1) times the centred return
    close(A.leave_one_out(t(1, 2, 3, 3), 4), A.group_normalize(t(1, 2, 3, 3), 4, scale=False) * 4 / 3)


def test_group_return_includes_a_kl_term_in_the_stream():
    # KL in the reward: the sequence return is the sum of the stream, not only the terminal score
    rewards = t([-0.1, -0.1, 1.0], [0.0, 0.0, 1.0])
    mask = torch.ones_like(rewards)
    close(A.sequence_returns(rewards, mask), [0.8, 1.0])
    adv, _ = A.estimate("group-mean", rewards, mask, group_size=2)
    close(adv[:, 0], [-0.1, 0.1])


def test_gae_entry_is_the_gae_function():
    rewards, mask = terminal([1.0, -2.0], [3, 2])
    values = t([0.1, 0.2, 0.3], [0.5, -0.5, 0.0])
    adv, ret = A.estimate("gae", rewards, mask, values=values, gamma=0.9, gae_lambda=0.8)
    adv2, ret2 = gae(rewards, values, mask, 0.9, 0.8)
    close(adv, adv2)
    close(ret, ret2)
    with pytest.raises(ValueError, match="critic"):
        A.estimate("gae", rewards, mask, values=None)
    assert A.get("gae").needs_critic and not A.get("group").needs_critic and A.get("group").groups


def test_unknown_names_list_the_registered_ones():
    with pytest.raises(KeyError, match="group"):
        A.get("nope")
    with pytest.raises(KeyError, match="ppo-clip"):
        PL.get("nope")


def test_policy_losses():
    logp = t([-1.0, -2.0]).requires_grad_()
    old = t([-1.2, -1.5])
    adv = t([1.0, -1.0])
    mask = t([1.0, 1.0])
    loss, _ = PL.get("ppo-clip").fn(logp, old, adv, mask, clip_eps=0.2, reduction="token")
    ref, _ = ppo_policy_loss(logp, old, adv, mask, 0.2, "token")
    close(loss, ref)
    # reinforce: -mean(A * logp) = -(1 * -1 + -1 * -2) / 2 = -0.5; gradient -A / 2
    loss, _ = PL.get("reinforce").fn(logp, old, adv, mask, reduction="token")
    close(loss, -0.5)
    loss.backward()
    close(logp.grad, [[-0.5, 0.5]])


def test_kl_penalty_k3_by_hand():
    logp = t([math.log(0.5), math.log(0.25)]).requires_grad_()
    ref = t([math.log(0.25), math.log(0.25)])
    mask = t([1.0, 1.0])
    # r = ref / pi = 0.5 and 1: k3 = (r - 1) - log r = (-0.5 + log 2) and 0; token mean
    close(PL.kl_penalty(logp, ref, mask, kind="k3", reduction="token"), (-0.5 + math.log(2)) / 2)
    # at pi = pi_ref the k3 term and its gradient vanish
    same = ref.clone().requires_grad_()
    val = PL.kl_penalty(same, ref, mask, kind="k3")
    val.backward()
    close(val, 0.0)
    close(same.grad, [[0.0, 0.0]])


def test_group_batch_scales_by_the_batch_not_the_group():
    # groups [1, 2] and [5, 5.01]: centred [-0.5, 0.5, -0.005, 0.005]; one batch std for all four
    centred = [-0.5, 0.5, -0.005, 0.005]
    mean = 0.0
    std = math.sqrt(sum((c - mean) ** 2 for c in centred) / 3)
    close(A.batch_scaled(t(1, 2, 5, 5.01), 2), [c / (std + 1e-6) for c in centred])
    # per-group scaling would give the noise group the same +-0.707 as the real difference
    g = A.group_normalize(t(1, 2, 5, 5.01), 2)
    assert abs(float(g[2])) > 0.7 and abs(float(A.batch_scaled(t(1, 2, 5, 5.01), 2)[2])) < 0.02
    rewards, mask = terminal([1, 2, 5, 5.01], [1, 2, 1, 3])
    adv, ret = A.estimate("group-batch", rewards, mask, group_size=2)
    assert ret is None
    close(adv[:, 0], [c / (std + 1e-6) for c in centred])


@pytest.mark.parametrize("algorithm,advantage,ok", [("grpo-lag", "group-batch", True), ("grpo-lag", "rloo", True), ("grpo-lag", "gae", False),
                                                     ("ppo-lag", "group", False), ("ppo-lag", "gae", True), ("grpo", "nope", False)])
def test_advantage_must_fit_the_algorithm(algorithm, advantage, ok):
    from safealign import config as C
    from safealign.errors import BadInput

    base = dict(model="p", reward_model="r", cost_model="c", data="d", output_dir="o", algorithm=algorithm, advantage=advantage)
    if ok:
        assert C.build_config(C.PPOLagConfig, None, base).advantage_name() == advantage
    else:
        with pytest.raises(BadInput):
            C.build_config(C.PPOLagConfig, None, base)
