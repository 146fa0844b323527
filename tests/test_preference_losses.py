"""Reward/cost-model losses against values worked out by hand (math module, not torch)."""

import math

import pytest
import torch

from safealign.algorithms import preference as L


def nls(x: float) -> float:
    """-log sigmoid(x) = log(1 + e^-x), by hand."""
    return math.log1p(math.exp(-x))


def test_bradley_terry_with_regularisation():
    better, worse = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    loss, acc = L.bradley_terry_loss(better, worse, reg=0.1)
    # pair 1: -log sig(1) = 0.31326; pair 2: -log sig(-1) = 1.31326; reg: 0.1 * mean(1,0,0,1) = 0.05
    expected = (nls(1.0) + nls(-1.0)) / 2 + 0.1 * 0.5
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert loss.item() == pytest.approx(0.86326, abs=1e-5)
    assert acc.item() == 0.5


def test_cost_loss_ranking_and_sign_terms():
    safer, unsafer = torch.tensor([-1.0]), torch.tensor([2.0])
    safe, unsafe = torch.tensor([-1.0]), torch.tensor([1.0])  # cost signs: -1 safe, +1 unsafe
    loss, st = L.cost_loss(safer, unsafer, safe, unsafe, sign_weight=1.0)
    # rank: -log sig(2 - (-1)) ; safe term: -log sig(-1 * -1) ; unsafe term: -log sig(+1 * 2)
    assert loss.item() == pytest.approx(nls(3.0) + nls(1.0) + nls(2.0), abs=1e-6)
    assert loss.item() == pytest.approx(0.488777, abs=1e-5)
    assert st["accuracy"].item() == 1.0 and st["sign_accuracy"].item() == 1.0
    half, _ = L.cost_loss(safer, unsafer, safe, unsafe, sign_weight=0.5)
    assert half.item() == pytest.approx(nls(3.0) + 0.5 * (nls(1.0) + nls(2.0)), abs=1e-6)


def test_cost_loss_unknown_labels_is_ranking_only():
    safer, unsafer = torch.tensor([0.3, -0.2]), torch.tensor([0.1, 0.4])
    zero = torch.zeros(2)
    loss, st = L.cost_loss(safer, unsafer, zero, zero, sign_weight=1.0)
    assert loss.item() == pytest.approx((nls(0.1 - 0.3) + nls(0.4 + 0.2)) / 2, abs=1e-6)
    assert st["sign_count"].item() == 0 and st["accuracy"].item() == 0.5


def test_cost_loss_contradicting_labels_pull_against_ranking():
    # the safer response is labelled unsafe (+1), the less safe one safe (-1): kept rows still give a finite loss
    loss, st = L.cost_loss(torch.tensor([0.5]), torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([-1.0]))
    assert loss.item() == pytest.approx(nls(0.5) + nls(0.5) + nls(-1.0), abs=1e-6)
    assert st["sign_accuracy"].item() == 0.5


def test_cost_loss_regularisation():
    loss, _ = L.cost_loss(torch.tensor([-1.0]), torch.tensor([2.0]), torch.tensor([-1.0]), torch.tensor([1.0]), reg=0.01)
    assert loss.item() == pytest.approx(nls(3.0) + nls(1.0) + nls(2.0) + 0.01 * (1 + 4) / 2, abs=1e-6)


def test_token_wise_span_uses_own_eos_score_past_the_end():
    b = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    w = torch.tensor([[0.0, 1.0, 0.0, 5.0]])  # its EOS is at 2: position 3 is padding and must read w[2]
    bs, ws, mask = L.token_wise_terms(b, w, torch.tensor([3]), torch.tensor([2]), torch.tensor([2]))
    assert mask.tolist() == [[0, 0, 1, 1]]
    assert ws[0, 2:].tolist() == [0.0, 0.0]
    loss, acc = L.token_wise_bt_loss(bs, ws, mask, torch.tensor([3.0]), torch.tensor([0.0]))
    assert loss.item() == pytest.approx((nls(2.0) + nls(3.0)) / 2, abs=1e-6)
    assert acc.item() == 1.0


def test_token_wise_cost_loss_matches_sequence_loss_on_one_token_span():
    safer, unsafer = torch.tensor([[0.0, -1.0]]), torch.tensor([[0.0, 2.0]])
    s, u, mask = L.token_wise_terms(safer, unsafer, torch.tensor([1]), torch.tensor([1]), torch.tensor([1]))
    tw, _ = L.token_wise_cost_loss(s, u, mask, torch.tensor([-1.0]), torch.tensor([1.0]), torch.tensor([-1.0]), torch.tensor([2.0]))
    seq, _ = L.cost_loss(torch.tensor([-1.0]), torch.tensor([2.0]), torch.tensor([-1.0]), torch.tensor([1.0]))
    assert tw.item() == pytest.approx(seq.item(), abs=1e-6)


def test_expected_calibration_error_by_hand():
    prob = torch.tensor([0.1, 0.2, 0.8, 0.9])
    label = torch.tensor([0, 0, 1, 0])
    ece, rows = L.expected_calibration_error(prob, label, bins=2)
    # bin [0, .5): conf .15, acc 0 -> 2/4 * .15 ; bin [.5, 1]: conf .85, acc .5 -> 2/4 * .35
    assert ece == pytest.approx(0.5 * 0.15 + 0.5 * 0.35, abs=1e-6)
    assert [r[2] for r in rows] == [2, 2]
