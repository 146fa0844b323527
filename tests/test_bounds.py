"""Tests for safealign.algorithms.bounds against hand-computed values.

Reference quantiles are typed in from standard tables (not recomputed with the
scipy call the module uses), and the arithmetic is written out step by step.
"""

import json
import math

import numpy as np
import pytest

from safealign.algorithms.bounds import (
    METHODS,
    Bound,
    bernstein_radius,
    bonferroni_delta,
    clopper_pearson_upper,
    compute_bound,
    empirical_bernstein_ucb,
    hoeffding_radius,
    hoeffding_ucb,
    student_t_radius,
    student_t_ucb,
    violation_rate_bound,
)

COSTS = [1.0, 2.0, 3.0, 4.0]
# mean = 10 / 4 = 2.5
# squared deviations: 2.25 + 0.25 + 0.25 + 2.25 = 5  ->  s^2 = 5 / 3, s = 1.290994...
MEAN = 2.5
VAR = 5.0 / 3.0
STD = math.sqrt(VAR)


# ---------------------------------------------------------------- Student-t


def test_student_t_hand_computed():
    # One-sided t table, df = 3, upper-tail 0.10: t = 1.638 (1.637744 to 6 d.p.)
    t_table = 1.637744
    expected = MEAN + t_table * STD / math.sqrt(4)  # 2.5 + 1.637744 * 0.645497 = 3.557160
    b = student_t_ucb(COSTS, 0.1)
    assert b.upper == pytest.approx(expected, abs=1e-5)
    assert b.upper == pytest.approx(3.557160, abs=1e-5)
    assert b.name == "student-t"
    assert b.mean == pytest.approx(2.5)
    assert b.std == pytest.approx(1.290994, abs=1e-6)
    assert b.n == 4 and b.delta == 0.1
    assert b.details["t_quantile"] == pytest.approx(t_table, abs=1e-6)
    assert b.details["df"] == 3


def test_student_t_delta_005():
    # t table, df = 3, upper-tail 0.05: 2.353 (2.353363)
    b = student_t_ucb(COSTS, 0.05)
    assert b.upper == pytest.approx(2.5 + 2.353363 * STD / 2, abs=1e-5)  # = 4.019026


def test_student_t_constant_costs_has_zero_width():
    b = student_t_ucb([0.5, 0.5, 0.5], 0.1)
    assert b.upper == pytest.approx(0.5)
    assert b.std == 0.0


def test_student_t_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2"):
        student_t_ucb([1.0], 0.1)


def test_student_t_radius_vectorised_matches_scalar():
    stds = np.array([STD, 2 * STD])
    r = student_t_radius(stds, 4, 0.1)
    assert r.shape == (2,)
    assert r[0] == pytest.approx(student_t_ucb(COSTS, 0.1).upper - MEAN)
    assert r[1] == pytest.approx(2 * r[0])


# ---------------------------------------------------------------- Hoeffding


def test_hoeffding_hand_computed():
    # range [0, 5], n = 4, delta = 0.1: log(10) = 2.302585
    # radius = 5 * sqrt(2.302585 / 8) = 5 * 0.536491 = 2.682457
    b = hoeffding_ucb(COSTS, 0.1, 0.0, 5.0)
    assert b.upper == pytest.approx(2.5 + 2.682457, abs=1e-5)
    assert b.details["n_clipped"] == 0
    assert b.details["radius"] == pytest.approx(2.682457, abs=1e-6)


def test_hoeffding_clips_and_counts():
    # [-1, 2, 3, 7] clipped to [0, 5] -> [0, 2, 3, 5], mean 2.5
    b = hoeffding_ucb([-1.0, 2.0, 3.0, 7.0], 0.1, 0.0, 5.0)
    assert b.details["n_clipped"] == 2
    assert b.details["n_clipped_low"] == 1
    assert b.details["n_clipped_high"] == 1
    assert b.details["raw_mean"] == pytest.approx(11.0 / 4)
    assert b.mean == pytest.approx(2.5)
    assert b.upper == pytest.approx(2.5 + 2.682457, abs=1e-5)


def test_hoeffding_single_sample_allowed():
    # n = 1, range [0, 1], delta = 0.5: radius = sqrt(log 2 / 2) = 0.588705
    b = hoeffding_ucb([0.0], 0.5, 0.0, 1.0)
    assert b.upper == pytest.approx(0.588705, abs=1e-6)
    assert math.isnan(b.std)
    assert b.to_dict()["std"] is None


def test_hoeffding_radius_function():
    assert hoeffding_radius(4, 0.1, 0.0, 5.0) == pytest.approx(2.682457, abs=1e-6)


# ---------------------------------------------------------------- Bernstein


def test_bernstein_hand_computed():
    # range [0, 5], n = 4, delta = 0.1: log(2 / 0.1) = log(20) = 2.995732
    # variance term = sqrt(2 * (5/3) * 2.995732 / 4) = sqrt(2.496443) = 1.580013
    # range term    = 7 * 5 * 2.995732 / (3 * 3)    = 104.850624 / 9 = 11.650069
    b = empirical_bernstein_ucb(COSTS, 0.1, 0.0, 5.0)
    assert b.details["variance"] == pytest.approx(VAR)
    assert b.details["variance_term"] == pytest.approx(1.580013, abs=1e-6)
    assert b.details["range_term"] == pytest.approx(11.650069, abs=1e-6)
    assert b.upper == pytest.approx(2.5 + 1.580013 + 11.650069, abs=1e-5)


def test_bernstein_is_affine_in_the_range():
    # Theorem 4 is stated for [0, 1]; on [a, b] the bound must equal a + (b - a) * bound(Z).
    rng = np.random.default_rng(0)
    z = rng.uniform(size=50)
    a, w = -3.0, 8.0
    b_unit = empirical_bernstein_ucb(z, 0.05, 0.0, 1.0)
    b_scaled = empirical_bernstein_ucb(a + w * z, 0.05, a, a + w)
    assert b_scaled.upper == pytest.approx(a + w * b_unit.upper)


def test_bernstein_clips():
    b = empirical_bernstein_ucb([-1.0, 2.0, 3.0, 7.0], 0.1, 0.0, 5.0)
    assert b.details["n_clipped"] == 2
    assert b.mean == pytest.approx(2.5)
    # clipped [0, 2, 3, 5]: squared deviations 6.25 + 0.25 + 0.25 + 6.25 = 13 -> var 13/3
    assert b.details["variance"] == pytest.approx(13.0 / 3.0)


def test_bernstein_radius_matches_scalar():
    r = bernstein_radius(np.array([VAR]), 4, 0.1, 0.0, 5.0)
    assert r[0] == pytest.approx(1.580013 + 11.650069, abs=1e-5)


def test_bernstein_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2"):
        empirical_bernstein_ucb([1.0], 0.1, 0.0, 5.0)


# ---------------------------------------------------------- Clopper-Pearson


def test_clopper_pearson_k_zero_closed_form():
    # k = 0: upper = 1 - delta^(1/n); n = 10, delta = 0.05: 1 - exp(log(0.05)/10)
    # = 1 - exp(-0.2995732) = 1 - 0.7411344 = 0.2588656
    assert clopper_pearson_upper(0, 10, 0.05) == pytest.approx(0.2588656, abs=1e-6)
    # rule of three: n = 100 -> 0.0295 (close to 3/100)
    assert clopper_pearson_upper(0, 100, 0.05) == pytest.approx(0.029513, abs=1e-5)


def test_clopper_pearson_k_equals_n():
    assert clopper_pearson_upper(7, 7, 0.1) == 1.0
    assert clopper_pearson_upper(1, 1, 0.5) == 1.0


def test_clopper_pearson_known_value():
    # 1 violation in 10, one-sided 95%: exact upper bound 0.3942 (binomial tables).
    p = clopper_pearson_upper(1, 10, 0.05)
    assert p == pytest.approx(0.3942, abs=1e-4)
    # Defining property, checked with the binomial CDF written out by hand:
    # P(Bin(10, p) <= 1) = (1-p)^10 + 10 p (1-p)^9 = delta
    cdf = (1 - p) ** 10 + 10 * p * (1 - p) ** 9
    assert cdf == pytest.approx(0.05, abs=1e-9)


def test_clopper_pearson_monotone_in_k():
    uppers = [clopper_pearson_upper(k, 20, 0.1) for k in range(21)]
    assert all(a < b for a, b in zip(uppers, uppers[1:]))


@pytest.mark.parametrize(
    "k, n, delta",
    [(-1, 10, 0.1), (11, 10, 0.1), (0, 0, 0.1), (1.5, 10, 0.1), (0, 10, 0.0), (0, 10, 1.0)],
)
def test_clopper_pearson_invalid(k, n, delta):
    with pytest.raises(ValueError):
        clopper_pearson_upper(k, n, delta)


def test_violation_rate_bound():
    # cost > 0 strictly: 0.0 is not a violation. 1 violation out of 10.
    costs = [-1.0, -0.5, 0.0, -2.0, 3.0, -1.0, -1.0, -0.1, -0.2, -0.3]
    b = violation_rate_bound(costs, 0.05, alpha=0.2)
    assert b.name == "clopper-pearson"
    assert b.details["violations"] == 1
    assert b.details["alpha"] == 0.2
    assert b.mean == pytest.approx(0.1)
    assert b.upper == pytest.approx(0.3942, abs=1e-4)
    # indicators [0]*9 + [1]: s^2 = (9 * 0.01 + 0.81) / 9 = 0.1
    assert b.std == pytest.approx(math.sqrt(0.1))


def test_violation_rate_bound_rejects_bad_alpha():
    with pytest.raises(ValueError, match="alpha"):
        violation_rate_bound([1.0, -1.0], 0.1, alpha=0.0)


# --------------------------------------------------------------- Bonferroni


def test_bonferroni():
    assert bonferroni_delta(0.1, 4) == pytest.approx(0.025)
    assert bonferroni_delta(0.05, 1) == pytest.approx(0.05)


@pytest.mark.parametrize("delta, k", [(0.1, 0), (0.1, -2), (0.1, 2.5), (1.2, 3), (0.1, True)])
def test_bonferroni_invalid(delta, k):
    with pytest.raises(ValueError):
        bonferroni_delta(delta, k)


# ---------------------------------------------------------------- dispatch


def test_methods_tuple():
    assert METHODS == ("student-t", "hoeffding", "bernstein")


def test_compute_bound_dispatch():
    assert compute_bound("student-t", COSTS, 0.1).upper == pytest.approx(3.557160, abs=1e-5)
    assert compute_bound("Student_T", COSTS, 0.1).name == "student-t"
    h = compute_bound("hoeffding", COSTS, 0.1, cost_range=(0.0, 5.0))
    assert h.upper == pytest.approx(2.5 + 2.682457, abs=1e-5)
    eb = compute_bound("bernstein", COSTS, 0.1, cost_range=(0.0, 5.0))
    assert eb.upper == pytest.approx(2.5 + 1.580013 + 11.650069, abs=1e-5)


@pytest.mark.parametrize("method", ["hoeffding", "bernstein"])
def test_compute_bound_requires_range(method):
    with pytest.raises(ValueError, match="cost_range"):
        compute_bound(method, COSTS, 0.1)


def test_compute_bound_unknown_method():
    with pytest.raises(ValueError, match="student-t, hoeffding, bernstein"):
        compute_bound("bootstrap", COSTS, 0.1)


def test_compute_bound_bad_range_shape():
    with pytest.raises(ValueError, match="pair"):
        compute_bound("hoeffding", COSTS, 0.1, cost_range=(0.0,))


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("delta", [0.0, 1.0, -0.1, 1.5, float("nan"), "0.1", None, True])
def test_invalid_delta(delta):
    with pytest.raises(ValueError, match="delta"):
        student_t_ucb(COSTS, delta)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_costs(bad):
    with pytest.raises(ValueError, match="non-finite.*index 2"):
        student_t_ucb([1.0, 2.0, bad], 0.1)
    with pytest.raises(ValueError, match="non-finite"):
        hoeffding_ucb([1.0, bad], 0.1, 0.0, 5.0)


def test_costs_must_be_1d_and_numeric():
    with pytest.raises(ValueError, match="1-D"):
        student_t_ucb([[1.0, 2.0], [3.0, 4.0]], 0.1)
    with pytest.raises(ValueError, match="numbers"):
        student_t_ucb(["a", "b"], 0.1)
    with pytest.raises(ValueError, match="at least 1"):
        hoeffding_ucb([], 0.1, 0.0, 1.0)


@pytest.mark.parametrize("low, high", [(1.0, 1.0), (2.0, 1.0), (0.0, float("inf")), (float("nan"), 1.0)])
def test_invalid_range(low, high):
    with pytest.raises(ValueError, match="range"):
        hoeffding_ucb(COSTS, 0.1, low, high)
    with pytest.raises(ValueError, match="range"):
        empirical_bernstein_ucb(COSTS, 0.1, low, high)


# ------------------------------------------------------------ Bound object


def test_bound_is_frozen_and_serialisable():
    b = empirical_bernstein_ucb(np.array(COSTS), 0.1, 0.0, 5.0)
    assert isinstance(b, Bound)
    with pytest.raises(AttributeError):
        b.upper = 0.0  # type: ignore[misc]
    d = b.to_dict()
    assert set(d) == {"name", "upper", "mean", "std", "n", "delta", "assumptions", "details"}
    assert d["details"]["n_clipped"] == 0
    json.dumps(d, allow_nan=False)  # plain Python types only
    assert "bounded" in d["assumptions"]


def test_accepts_numpy_and_integer_costs():
    a = student_t_ucb(np.array([1, 2, 3, 4]), 0.1)
    assert a.upper == pytest.approx(3.557160, abs=1e-5)
