"""Length-grouped batching of the preference trainer (stages.trainer.DataOrder / group_by_length).

Grouping may change which pairs share a micro-batch and the batch order, never which pairs an epoch
sees; it must stay a pure function of (seed, position) so --resume sees the same batches, and it must
keep micro-batches aligned across epoch boundaries (an epoch of n % batch != 0 pairs)."""

from __future__ import annotations

import numpy as np
import pytest

from safealign.stages.trainer import DataOrder, group_by_length


def test_group_by_length_hand_case():
    # lengths = the index itself; one window holds everything: sorted longest first, cut into pairs,
    # the pairs shuffled. Each batch must be two neighbours in length: {9, 8}, {7, 6}, ...
    lengths = np.arange(10)
    perm = np.random.default_rng(0).permutation(10)
    out = group_by_length(perm, lengths, batch=2, window=64, rng=np.random.default_rng(1))
    assert sorted(out.tolist()) == list(range(10))
    assert sorted(tuple(sorted(b)) for b in out.reshape(-1, 2).tolist()) == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]


def test_head_stays_and_remainder_goes_last():
    lengths = np.arange(10)
    perm = np.array([4, 0, 8, 1, 7, 2, 6, 3, 5, 9])
    out = group_by_length(perm, lengths, batch=2, window=64, rng=np.random.default_rng(0), head=1)
    assert out[0] == 4                                  # finishes the batch the previous epoch began
    assert out[-1] == 0                                 # the shortest of the rest: the leftover after full batches
    assert sorted(tuple(sorted(b)) for b in out[1:-1].reshape(-1, 2).tolist()) == [(1, 2), (3, 5), (6, 7), (8, 9)]


def _padding(order: DataOrder, lengths, n_batches: int, batch: int) -> float:
    """Fraction of the padded [batch, max_len] tokens that are padding over the first n_batches micro-batches."""
    pad = real = 0
    for b in range(n_batches):
        ls = [lengths[i] for i in order.take(b * batch, batch)]
        pad += batch * max(ls) - sum(ls)
        real += sum(ls)
    return pad / (pad + real)


@pytest.mark.parametrize("n", [1000, 1003])   # 1003 % 16 != 0: epochs start mid-batch
def test_data_order_groups_every_epoch_and_is_deterministic(n):
    lengths = np.random.default_rng(3).lognormal(5, 0.6, size=n).astype(int) + 1
    batch = 16
    grouped, plain = DataOrder(n, 7, lengths=lengths.tolist(), batch=batch), DataOrder(n, 7)
    for epoch in range(3):
        idx = grouped.take(epoch * n, n)
        assert sorted(idx) == list(range(n)), "an epoch must see every pair exactly once"
    n_batches = 3 * n // batch
    g, p = _padding(grouped, lengths, n_batches, batch), _padding(plain, lengths, n_batches, batch)
    assert p > 0.3 and g < 0.1, (g, p)
    # epochs 2 and 3 alone (after a boundary that falls mid-batch) are grouped as well
    late = [np.ptp(lengths[grouped.take(b * batch, batch)]) for b in range(n // batch + 1, n_batches)]
    assert np.median(late) < 0.1 * np.ptp(lengths)
    # a pure function of (seed, position): a fresh order (a resumed run) gives the same batches
    again = DataOrder(n, 7, lengths=lengths.tolist(), batch=batch)
    assert again.take(n + 5, 40) == grouped.take(n + 5, 40)
    assert DataOrder(n, 8, lengths=lengths.tolist(), batch=batch).take(0, 40) != grouped.take(0, 40)


def test_two_dimensional_lengths_group_both():
    # (prefix, continuation): sorted by the continuation, then runs of `sub` batches by the prefix
    rng = np.random.default_rng(5)
    n, batch = 1024, 16
    lengths = np.stack([rng.integers(1, 400, n), rng.integers(1, 200, n)], axis=1)
    out = group_by_length(rng.permutation(n), lengths, batch=batch, window=64, rng=np.random.default_rng(0))
    assert sorted(out.tolist()) == list(range(n))
    cost = lambda order: sum(lengths[b, 0].max() + 2 * lengths[b, 1].max() for b in order.reshape(-1, batch))  # noqa: E731
    one_d = group_by_length(rng.permutation(n), lengths[:, 0] + 2 * lengths[:, 1], batch=batch, window=64, rng=np.random.default_rng(0))
    real = (lengths[:, 0] + 2 * lengths[:, 1]).sum() / batch
    assert cost(out) < 0.85 * cost(one_d) and cost(out) < 1.3 * real
    order = DataOrder(n, 1, lengths=lengths.tolist(), batch=batch)
    assert sorted(order.take(0, n)) == list(range(n)) and order.take(n, 32) == DataOrder(n, 1, lengths=lengths.tolist(), batch=batch).take(n, 32)
