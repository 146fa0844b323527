"""Safe crowd skills: the maths against hand-computed values, and VPL on hand-made data with two known users."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from safealign.algorithms import skills as S


def test_gaussian_kl_hand_values():
    mu, logvar = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(4.0)]])
    pm, plv = torch.tensor([0.0, 0.0]), torch.tensor([0.0, 0.0])
    # dim 0: 0.5 * (0 - 0 + (1 + 1) / 1 - 1) = 0.5; dim 1: 0.5 * (0 - ln 4 + 4 - 1) = 1.5 - ln 2
    assert S.gaussian_kl(mu, logvar, pm, plv).item() == pytest.approx(0.5 + 1.5 - math.log(2.0), abs=1e-6)
    assert S.gaussian_kl(pm[None], plv[None], pm, plv).item() == pytest.approx(0.0)


def test_bt_loss_and_reparameterize():
    r0, r1 = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    label = torch.tensor([1.0, 0.0])
    want = (-math.log(1 / (1 + math.exp(-2.0))) - math.log(1 - 1 / (1 + math.exp(1.0)))) / 2
    assert S.bt_loss(r0, r1, label).item() == pytest.approx(want, rel=1e-6)
    assert S.bt_loss(r0, r1, label, mask=torch.tensor([1.0, 0.0])).item() == pytest.approx(math.log(1 + math.exp(-2.0)), rel=1e-6)
    z = S.reparameterize(torch.tensor([1.0]), torch.tensor([math.log(9.0)]), torch.tensor([2.0]))
    assert z.item() == pytest.approx(1.0 + 3.0 * 2.0)


def test_cyclic_kl_weight():
    # 100 steps, 4 cycles of 25: cosine ramp over the first 12.5 steps of each, then beta
    assert S.cyclic_kl_weight(0, 100, 4, 1e-3) == 0.0
    assert S.cyclic_kl_weight(25, 100, 4, 1e-3) == 0.0
    assert S.cyclic_kl_weight(6.25, 100, 4, 1e-3) == pytest.approx(0.5e-3)
    assert S.cyclic_kl_weight(20, 100, 4, 1e-3) == pytest.approx(1e-3)
    assert S.cyclic_kl_weight(7, 100, 0, 2e-3) == 2e-3


def test_cpl_loss_hand_values():
    lw, ll = torch.tensor([-2.0]), torch.tensor([-3.0])
    # CPL without reference: -log sigmoid(beta * lw - lam * beta * ll) = -log sigmoid(0.5 * -2 - 0.5 * 0.5 * -3) = -log sigmoid(-0.25)
    assert S.cpl_loss(lw, ll, beta=0.5, lam=0.5).item() == pytest.approx(math.log(1 + math.exp(0.25)), rel=1e-6)
    # DPO (lam 1, reference): -log sigmoid(0.1 * ((-2 + 2.5) - (-3 + 2.0))) = -log sigmoid(0.15)
    got = S.cpl_loss(lw, ll, beta=0.1, lam=1.0, ref_w=torch.tensor([-2.5]), ref_l=torch.tensor([-2.0]))
    assert got.item() == pytest.approx(math.log(1 + math.exp(-0.15)), rel=1e-6)
    # gradient pushes the chosen up and the rejected down
    lw, ll = torch.tensor([-2.0], requires_grad=True), torch.tensor([-3.0], requires_grad=True)
    S.cpl_loss(lw, ll, beta=1.0).sum().backward()
    assert lw.grad.item() < 0 < ll.grad.item()


def test_squash_and_log_prob():
    z = S.squash_to_prior(torch.tensor([[0.0, 100.0, -100.0]]), torch.tensor([1.0, 1.0, 1.0]), torch.tensor([2.0, 2.0, 2.0]))
    assert z[0].tolist() == pytest.approx([1.0, 7.0, -5.0])
    lp = S.gaussian_log_prob(torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([math.log(2.0)]))
    assert lp.item() == pytest.approx(-0.5 * 0.25 - math.log(2.0) - 0.5 * math.log(2 * math.pi))


def test_bow_features_are_stable_and_binary():
    a = S.bow_features(["boil the rice rice", "Boil THE"], 64)
    assert a.shape == (2, 64) and set(a.unique().tolist()) <= {0.0, 1.0}
    assert a[0].sum() == 3 and a[1].sum() == 2
    assert torch.equal(S.bow_features(["boil"], 64), S.bow_features(["boil"], 64))


def test_vpl_separates_two_known_users_and_recovers_their_orderings():
    """Two users: 'alpha' rates kind x > y > w, 'beta' the reverse; both reject 'poison'. The posterior z of each user's
    context sets separates them, and the decoder at each user's z ranks the kinds in that user's order."""
    from safealign.config import CrowdLatentConfig
    from safealign.data.records import Pair
    from safealign.stages.crowd_latent import LatentNet, PairBank, annotator_posteriors, make_collate, make_loss, z_separation

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    kinds = ["xray xenon", "yacht yodel", "walrus wombat"]
    pairs = []
    for user, order in (("alpha", (0, 1, 2)), ("beta", (2, 1, 0))):
        for _ in range(120):
            a, b = rng.choice(3, size=2, replace=False)
            ta, tb = kinds[a], kinds[b]
            if rng.random() < 0.3:
                tb += " poison"
                pairs.append(Pair(["q"], ta, tb, annotator=user))
                continue
            best_first = order.index(a) < order.index(b)
            pairs.append(Pair(["q"], ta if best_first else tb, tb if best_first else ta, annotator=user))
    cfg = CrowdLatentConfig(data="x", output_dir="y", bow_dim=64, hidden=16, z_dim=2)
    bank = PairBank(pairs, cfg.bow_dim)
    net = LatentNet(cfg.bow_dim, cfg.hidden, cfg.z_dim)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    collate, loss_fn = make_collate(bank, cfg), make_loss(cfg, 150)
    for _ in range(150):
        loss, _ = loss_fn(net, collate([int(i) for i in rng.integers(0, len(pairs), size=16)]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    sep, _ = z_separation(net.vpl, bank, cfg.context_pairs, 10, 0)
    assert sep["identity_accuracy"] == 1.0 and sep["separation_ratio"] > 2
    z = annotator_posteriors(net.vpl, bank)
    feats = S.bow_features(kinds + [kinds[0] + " poison"], cfg.bow_dim)[None]
    with torch.no_grad():
        for user, order in (("alpha", (0, 1, 2)), ("beta", (2, 1, 0))):
            r = net.vpl.reward(feats, z[user][0][None])[0]
            assert r[order[0]] > r[order[1]] > r[order[2]], user
            assert r[3] < r[0], "the shared rule: a poisoned answer is worse than the same answer without"
        # the pooled model cannot hold both orders: it ranks at most one user's best first
        p = net.pooled(feats[0])
        assert not (p[0] > p[1] > p[2] and p[2] > p[1] > p[0])
