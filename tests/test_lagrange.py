"""Hand-computed checks of the Lagrange multiplier, cost window and HC-RLHF bound."""

import json
import math

import pytest
import torch

from safealign.algorithms.hc import augmented_costs, hc_inflation_k, pessimistic_cost
from safealign.algorithms.lagrange import EpisodeCostWindow, LagrangeMultiplier


# --------------------------------------------------------------------------- #
# SGD (safe-rlhf) rule
# --------------------------------------------------------------------------- #
def test_sgd_update_by_hand():
    lag = LagrangeMultiplier(init=1.0, lr=0.1, threshold=0.5)
    assert lag.value == 1.0
    # log lam = 0 + 0.1 * 1 * (2.5 - 0.5) = 0.2 -> lam = e^0.2 = 1.2214028
    assert lag.update(2.5, step=0) == pytest.approx(1.2214028, abs=1e-7)
    # log lam = 0.2 + 0.1 * 1.2214028 * (0.0 - 0.5) = 0.1389299 -> lam = 1.1490...
    assert lag.update(0.0, step=1) == pytest.approx(math.exp(0.1389299), abs=1e-6)
    assert lag.log_value == pytest.approx(0.1389299, abs=1e-7)


def test_sgd_matches_torch_sgd_on_log_lambda():
    # safe-rlhf: loss = -(J_c - d) * exp(log_lambda), torch.optim.SGD(lr) on log_lambda
    log_lam = torch.nn.Parameter(torch.tensor(math.log(0.7), dtype=torch.float64))
    opt = torch.optim.SGD([log_lam], lr=0.05)
    lag = LagrangeMultiplier(init=0.7, lr=0.05, threshold=-1.0)
    for j_c in [3.0, -2.0, 0.5, -4.0]:
        opt.zero_grad()
        (-(j_c - (-1.0)) * log_lam.exp()).backward()
        opt.step()
        assert lag.update(j_c, step=10) == pytest.approx(log_lam.exp().item(), rel=1e-12)


def test_sgd_max_clamp_and_delay():
    lag = LagrangeMultiplier(init=1.0, lr=1.0, max_value=2.0)
    # log lam = 0 + 1 * 1 * 10 = 10 > log 2 -> clamped to log 2
    assert lag.update(10.0, step=0) == pytest.approx(2.0)
    lag = LagrangeMultiplier(init=1.0, lr=0.1, update_delay=3)
    for step in range(3):
        assert lag.update(5.0, step=step) == 1.0
    assert lag.num_updates == 0
    # log lam = 0 + 0.1 * 1 * 5 = 0.5
    assert lag.update(5.0, step=3) == pytest.approx(math.exp(0.5))


def test_validation():
    with pytest.raises(ValueError):
        LagrangeMultiplier(init=0.0)  # log lambda
    with pytest.raises(ValueError):
        LagrangeMultiplier(method="adam")
    with pytest.raises(ValueError):
        LagrangeMultiplier(init=3.0, max_value=2.0)
    with pytest.raises(ValueError):
        LagrangeMultiplier().update(float("nan"), step=0)
    assert LagrangeMultiplier(init=0.0, method="pid").value == 0.0


# --------------------------------------------------------------------------- #
# PID rule
# --------------------------------------------------------------------------- #
def test_pid_by_hand():
    lag = LagrangeMultiplier(init=0.0, threshold=1.0, method="pid", pid_kp=0.5, pid_ki=0.1, pid_kd=2.0)
    # J=3:   e=2;    I = 0 + 0.1*2 = 0.2;         D = (3 - 0)+ = 3 (J_prev starts at 0)
    #        lam = 0.5*2 + 0.2 + 2*3 = 7.2
    # J=2:   e=1;    I = 0.3;                     D = (2 - 3)+ = 0;      lam = 0.5 + 0.3 = 0.8
    # J=0:   e=-1;   I = 0.2;                     D = 0;                 lam = (-0.5 + 0.2)+ = 0
    # J=0.5: e=-0.5; I = 0.2 - 0.05 = 0.15;       D = (0.5 - 0)+ = 0.5;  lam = -0.25 + 0.15 + 1 = 0.9
    # J=-10: e=-11;  I = (0.15 - 1.1)+ = 0;       D = 0;                 lam = (-5.5)+ = 0
    expected = [7.2, 0.8, 0.0, 0.9, 0.0]
    got = [lag.update(j, step=i) for i, j in enumerate([3.0, 2.0, 0.0, 0.5, -10.0])]
    assert got == pytest.approx(expected, abs=1e-12)
    assert lag.state_dict()["pid_integral"] == 0.0


def test_pid_ema_and_derivative_delay():
    lag = LagrangeMultiplier(
        init=0.0, method="pid", pid_kp=1.0, pid_ki=0.0, pid_kd=1.0, pid_p_ema=0.5, pid_d_ema=0.5
    )
    # J=2: p = 0.5*0 + 0.5*2 = 1;   c = 1;   D = 1 - 0 = 1;   lam = 1 + 1 = 2
    # J=4: p = 0.5*1 + 0.5*4 = 2.5; c = 2.5; D = 2.5 - 1 = 1.5; lam = 2.5 + 1.5 = 4
    assert [lag.update(2.0, 0), lag.update(4.0, 1)] == pytest.approx([2.0, 4.0])
    lag = LagrangeMultiplier(init=0.0, method="pid", pid_ki=0.0, pid_kd=1.0, pid_d_delay=2)
    # D compares with the cost two updates back (history starts as [0, 0]):
    # J=1: 1 - 0 = 1;  J=2: 2 - 0 = 2;  J=3: 3 - 1 = 2
    assert [lag.update(j, i) for i, j in enumerate([1.0, 2.0, 3.0])] == pytest.approx([1, 2, 2])


def test_pid_integral_starts_at_init_and_anti_windup():
    lag = LagrangeMultiplier(init=1.5, method="pid", pid_ki=1.0, max_value=2.0)
    assert lag.value == 1.5
    # J=5: I = min(1.5 + 5, 2) = 2;  J=5: I = 2;  J=-1: I = 1 -> lam 1 (no wind-up to 10.5)
    assert [lag.update(j, i) for i, j in enumerate([5.0, 5.0, -1.0])] == pytest.approx([2, 2, 1])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(init=1.0, lr=0.2, max_value=5.0, threshold=0.3),
        dict(init=0.5, method="pid", pid_kp=0.3, pid_ki=0.2, pid_kd=0.7, pid_p_ema=0.4, pid_d_ema=0.6, pid_d_delay=2),
    ],
)
def test_state_dict_round_trip_continues_identically(kwargs):
    costs = [1.3, -0.2, 2.7, 0.9, -1.4, 0.1, 3.3]
    a = LagrangeMultiplier(**kwargs)
    for i, j in enumerate(costs[:3]):
        a.update(j, i)
    state = json.loads(json.dumps(a.state_dict()))
    b = LagrangeMultiplier(**kwargs)
    b.load_state_dict(state)
    assert b.value == a.value
    for i, j in enumerate(costs[3:], start=3):
        assert a.update(j, i) == b.update(j, i)  # bit-identical
    assert a.state_dict() == b.state_dict()
    with pytest.raises(ValueError):
        LagrangeMultiplier(method="pid" if kwargs.get("method") != "pid" else "sgd").load_state_dict(state)


# --------------------------------------------------------------------------- #
# episode cost window
# --------------------------------------------------------------------------- #
def test_episode_cost_window():
    w = EpisodeCostWindow(maxlen=3)
    with pytest.raises(ValueError):
        w.mean()
    w.extend([1.0, 2.0])
    w.extend(torch.tensor([3.0, 4.0]))
    assert len(w) == 3 and w.values() == [2.0, 3.0, 4.0]
    assert w.mean() == 3.0
    assert w.std() == pytest.approx(1.0)  # ((-1)^2 + 0 + 1^2) / (3 - 1) = 1
    state = json.loads(json.dumps(w.state_dict()))
    w2 = EpisodeCostWindow(maxlen=3)
    w2.load_state_dict(state)
    w.extend([10.0])
    w2.extend([10.0])
    assert w2.values() == w.values() == [3.0, 4.0, 10.0]
    with pytest.raises(ValueError):
        w.extend([float("nan")])


# --------------------------------------------------------------------------- #
# HC-RLHF
# --------------------------------------------------------------------------- #
def test_hc_inflation_k_table_values():
    # one-sided t quantiles from a table: t_{0.9, 31} = 1.3095, t_{0.9, 99} = 1.2902
    # k = 4 * 1.3095 / sqrt(32) + 2 * 1.2902 / sqrt(100) = 0.92597 + 0.25804 = 1.18401
    k = hc_inflation_k(m=32, n=100, delta=0.1, c1=4.0, c2=2.0)
    assert k == pytest.approx(4 * 1.3095 / math.sqrt(32) + 2 * 1.2902 / 10, abs=2e-4)
    assert k == pytest.approx(1.18, abs=0.01)
    # a zero coefficient skips its term (m=1 is then fine)
    assert hc_inflation_k(m=1, n=100, delta=0.1, c1=0.0, c2=2.0) == pytest.approx(0.25804, abs=1e-4)
    assert hc_inflation_k(m=0, n=0, delta=0.1, c1=0.0, c2=0.0) == 0.0


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(m=1, n=100, delta=0.1, c1=1.0, c2=1.0),
        dict(m=32, n=100, delta=0.0, c1=1.0, c2=1.0),
        dict(m=32, n=100, delta=1.0, c1=1.0, c2=1.0),
        dict(m=32, n=100, delta=0.1, c1=-1.0, c2=1.0),
        dict(m=32.5, n=100, delta=0.1, c1=1.0, c2=1.0),
    ],
)
def test_hc_inflation_k_validation(kwargs):
    with pytest.raises(ValueError):
        hc_inflation_k(**kwargs)


def test_pessimistic_cost():
    # mean 2.5; sample std = sqrt((1.5^2 + 0.5^2 + 0.5^2 + 1.5^2) / 3) = sqrt(5/3) = 1.2909944
    assert pessimistic_cost(torch.tensor([1.0, 2.0, 3.0, 4.0]), k=0.5) == pytest.approx(2.5 + 0.5 * 1.2909944)
    assert pessimistic_cost([7.0], k=0.0) == 7.0
    with pytest.raises(ValueError):
        pessimistic_cost([7.0], k=1.0)
    with pytest.raises(ValueError):
        pessimistic_cost([], k=0.0)


def test_augmented_costs_by_hand():
    c = torch.tensor([1.0, 3.0])
    # mu=2, sigma=1, k=0.5:  1 + 0.5*(1 - 4)/2 = 0.25;  3 + 0.5*(9 - 12)/2 = 2.25
    torch.testing.assert_close(augmented_costs(c, mu=2.0, sigma=1.0, k=0.5), torch.tensor([0.25, 2.25]))
    torch.testing.assert_close(augmented_costs(c, mu=2.0, sigma=1.0, k=0.0), c)
    assert torch.isfinite(augmented_costs(c, mu=2.0, sigma=0.0, k=0.5)).all()


def test_augmented_cost_gives_gradient_of_mu_plus_k_sigma():
    # exact check on a 3-outcome softmax policy: grad (mu + k*sigma) == E_p[c~ grad log p]
    costs = torch.tensor([0.0, 1.0, 4.0], dtype=torch.float64)
    theta = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64, requires_grad=True)
    k = 1.3
    p = torch.softmax(theta, -1)
    mu = (p * costs).sum()
    sigma = ((p * costs**2).sum() - mu**2).sqrt()
    (grad_u,) = torch.autograd.grad(mu + k * sigma, theta)
    aug = augmented_costs(costs, mu.item(), sigma.item(), k)
    logp = torch.log_softmax(theta, -1)
    (grad_sf,) = torch.autograd.grad((p.detach() * aug * logp).sum(), theta)
    torch.testing.assert_close(grad_sf, grad_u)
