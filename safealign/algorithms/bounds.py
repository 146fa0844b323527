"""Upper confidence bounds for the high-confidence (Seldonian / HC-RLHF) safety test.

Cost convention used throughout ``safealign``: a higher cost means a more harmful
response, ``cost > 0`` marks a response as unsafe, and the safety constraint is

    E[cost] <= threshold.

A safety test computes a one-sided (1 - delta) upper confidence bound (UCB) on
E[cost] from costs measured on held-out safety data and passes only when
``UCB <= threshold``. If the bound is valid, an unsafe model (E[cost] > threshold)
passes with probability at most delta.

Every bound here assumes the costs are i.i.d. draws (one sampled response per
held-out prompt) and that the data were not used to train or select the model.
Running several tests on the same model family needs a split delta; see
:func:`bonferroni_delta`.

The module is pure numpy/scipy and does no I/O. The ``*_radius`` helpers accept
numpy arrays so that simulations can evaluate thousands of tests at once with
exactly the same formulas as the scalar functions.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

__all__ = [
    "Bound",
    "METHODS",
    "student_t_ucb",
    "hoeffding_ucb",
    "empirical_bernstein_ucb",
    "clopper_pearson_upper",
    "violation_rate_bound",
    "bonferroni_delta",
    "compute_bound",
    "student_t_radius",
    "hoeffding_radius",
    "bernstein_radius",
]

#: Names accepted by :func:`compute_bound`.
METHODS: tuple[str, ...] = ("student-t", "hoeffding", "bernstein")

_T_ASSUMPTIONS = (
    "i.i.d. costs; the sample mean is approximately normal (CLT). The guarantee is "
    "approximate: it can be violated for small n with skewed, heavy-tailed or "
    "rare-large-cost distributions."
)
_HOEFFDING_ASSUMPTIONS = (
    "i.i.d. costs bounded in [low, high]. Exact for any distribution on that range. "
    "Costs outside the range were clipped; if any were clipped above `high`, the "
    "bound is on E[clipped cost] and can under-state E[cost]."
)
_BERNSTEIN_ASSUMPTIONS = (
    "i.i.d. costs bounded in [low, high] (Maurer & Pontil 2009, Thm 4). Exact for any "
    "distribution on that range. Costs outside the range were clipped; if any were "
    "clipped above `high`, the bound is on E[clipped cost] and can under-state E[cost]."
)
_CP_ASSUMPTIONS = (
    "i.i.d. costs; exact one-sided Clopper-Pearson bound on P(cost > 0). "
    "No distributional assumption on the cost values."
)


@dataclass(frozen=True)
class Bound:
    """Result of one upper confidence bound computation.

    Attributes:
        name: method name (``"student-t"``, ``"hoeffding"``, ``"bernstein"`` or
            ``"clopper-pearson"``).
        upper: the one-sided (1 - delta) upper confidence bound.
        mean: sample mean of the values the bound was computed from (after
            clipping for range-based bounds; for the violation-rate bound, the
            observed fraction of costs > 0).
        std: sample standard deviation (ddof=1) of those same values;
            ``nan`` when n == 1.
        n: number of samples.
        delta: allowed failure probability (confidence level is 1 - delta).
        assumptions: plain-language statement of what the guarantee relies on.
        details: method-specific extras (t quantile, range, clipped counts, ...).
    """

    name: str
    upper: float
    mean: float
    std: float
    n: int
    delta: float
    assumptions: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (numpy scalars become Python scalars,
        non-finite floats become ``None``)."""
        return {
            "name": self.name,
            "upper": _plain(self.upper),
            "mean": _plain(self.mean),
            "std": _plain(self.std),
            "n": int(self.n),
            "delta": _plain(self.delta),
            "assumptions": self.assumptions,
            "details": _plain(dict(self.details)),
        }


# --------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """Convert numpy types / containers to plain JSON-friendly Python values."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def _check_delta(delta: float, name: str = "delta") -> float:
    if isinstance(delta, (bool, np.bool_)) or not isinstance(delta, numbers.Real):
        raise ValueError(f"{name} must be a number in (0, 1), got {delta!r}")
    delta = float(delta)
    if not (0.0 < delta < 1.0):
        raise ValueError(
            f"{name} must be strictly between 0 and 1 (e.g. 0.05 or 0.1), got {delta}"
        )
    return delta


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, numbers.Integral):
        value = int(value)
    elif isinstance(value, numbers.Real) and float(value).is_integer():
        value = int(value)
    else:
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_costs(costs: Any, min_n: int, method: str) -> np.ndarray:
    """Return costs as a 1-D float64 array after checking size and finiteness."""
    try:
        arr = np.asarray(costs, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{method}: costs must be a sequence of numbers ({exc})") from None
    if arr.ndim != 1:
        raise ValueError(
            f"{method}: costs must be a 1-D sequence (one cost per response), "
            f"got an array of shape {arr.shape}"
        )
    n = arr.shape[0]
    if n < min_n:
        raise ValueError(
            f"{method}: needs at least {min_n} cost sample(s), got {n}; "
            "use a larger safety set"
        )
    bad = ~np.isfinite(arr)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{method}: costs contain {int(bad.sum())} non-finite value(s) (NaN or inf), "
            f"first at index {first}; fix or drop them before running the safety test"
        )
    return arr


def _check_range(low: float, high: float, method: str) -> tuple[float, float]:
    for name, value in (("low", low), ("high", high)):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            raise ValueError(f"{method}: cost range {name} must be a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise ValueError(f"{method}: cost range {name} must be finite, got {value}")
    low, high = float(low), float(high)
    if not low < high:
        raise ValueError(
            f"{method}: cost range needs low < high, got low={low}, high={high}"
        )
    return low, high


def _sample_std(arr: np.ndarray) -> float:
    return float(np.std(arr, ddof=1)) if arr.shape[0] >= 2 else float("nan")


# --------------------------------------------------------------------------
# Vectorised confidence radii (shared by the scalar bounds and simulations)
# --------------------------------------------------------------------------
# Quantile functions: scipy.special's (the same routines scipy.stats.t/beta.ppf call), imported when
# first needed: scipy.stats costs a safety-test re-decision from --costs-file ~0.5 s more at start-up.


def _t_quantile(q: float, df: int) -> float:
    """Student-t quantile ``t_{q, df}`` (= ``scipy.stats.t.ppf(q, df)``)."""
    from scipy.special import stdtrit

    return float(stdtrit(df, q))


def _beta_quantile(q: float, a: float, b: float) -> float:
    """Beta(a, b) quantile (= ``scipy.stats.beta.ppf(q, a, b)``)."""
    from scipy.special import betaincinv

    return float(betaincinv(a, b, q))


def student_t_radius(std: Any, n: int, delta: float) -> Any:
    """One-sided Student-t confidence radius ``t_{1-delta, n-1} * std / sqrt(n)``.

    ``std`` may be a scalar or a numpy array of sample standard deviations
    (ddof=1). Requires n >= 2.
    """
    delta = _check_delta(delta)
    n = _check_int(n, "n", 2)
    t_q = _t_quantile(1.0 - delta, n - 1)
    return t_q * np.asarray(std, dtype=np.float64) / math.sqrt(n)


def hoeffding_radius(n: int, delta: float, low: float, high: float) -> float:
    """One-sided Hoeffding radius ``(high - low) * sqrt(log(1/delta) / (2 n))``."""
    delta = _check_delta(delta)
    n = _check_int(n, "n", 1)
    low, high = _check_range(low, high, "hoeffding")
    return (high - low) * math.sqrt(math.log(1.0 / delta) / (2.0 * n))


def bernstein_radius(var: Any, n: int, delta: float, low: float, high: float) -> Any:
    """Maurer-Pontil empirical Bernstein radius on the unscaled range.

    ``sqrt(2 * var * log(2/delta) / n) + 7 * (high - low) * log(2/delta) / (3 (n - 1))``

    ``var`` is the sample variance (ddof=1) of the clipped costs; it may be a
    numpy array. Requires n >= 2.
    """
    delta = _check_delta(delta)
    n = _check_int(n, "n", 2)
    low, high = _check_range(low, high, "bernstein")
    log_term = math.log(2.0 / delta)
    var = np.maximum(np.asarray(var, dtype=np.float64), 0.0)
    return np.sqrt(2.0 * var * log_term / n) + 7.0 * (high - low) * log_term / (3.0 * (n - 1))


# --------------------------------------------------------------------------
# Bounds on E[cost]
# --------------------------------------------------------------------------


def student_t_ucb(costs: Sequence[float], delta: float) -> Bound:
    """Student-t upper confidence bound on E[cost] (the HC-RLHF safety test).

    Formula::

        UCB = mean + t_{1-delta, n-1} * s / sqrt(n)

    with ``s`` the sample standard deviation with Bessel's correction (ddof=1)
    and ``t_{1-delta, n-1}`` the one-sided Student-t quantile with n-1 degrees
    of freedom.

    Assumptions: i.i.d. costs and an approximately normal sample mean. The
    coverage is exact only for normal costs; for small n with skewed,
    heavy-tailed or rare-but-large costs it can fall well short of 1 - delta
    (see ``bench/bound_validation.py``). Requires n >= 2.
    """
    delta = _check_delta(delta)
    arr = _check_costs(costs, 2, "student-t")
    n = arr.shape[0]
    mean = float(arr.mean())
    std = _sample_std(arr)
    t_q = _t_quantile(1.0 - delta, n - 1)
    stderr = std / math.sqrt(n)
    return Bound(
        name="student-t",
        upper=mean + float(student_t_radius(std, n, delta)),
        mean=mean,
        std=std,
        n=n,
        delta=delta,
        assumptions=_T_ASSUMPTIONS,
        details={"t_quantile": t_q, "df": n - 1, "std_error": stderr},
    )


def _clip_costs(arr: np.ndarray, low: float, high: float) -> tuple[np.ndarray, dict[str, Any]]:
    n_low = int(np.count_nonzero(arr < low))
    n_high = int(np.count_nonzero(arr > high))
    info = {
        "low": low,
        "high": high,
        "n_clipped": n_low + n_high,
        "n_clipped_low": n_low,
        "n_clipped_high": n_high,
        "raw_mean": float(arr.mean()),
    }
    return np.clip(arr, low, high), info


def hoeffding_ucb(costs: Sequence[float], delta: float, low: float, high: float) -> Bound:
    """Hoeffding upper confidence bound on E[cost] for costs in [low, high].

    Costs are first clipped to ``[low, high]`` (the number clipped is reported
    in ``details``), then::

        UCB = mean_clipped + (high - low) * sqrt(log(1/delta) / (2 n))

    Assumptions: i.i.d. costs whose support lies in [low, high]; then the
    bound holds for any distribution (no normality needed). Clipping values
    above ``high`` lowers the mean, so if ``details["n_clipped_high"] > 0`` the
    guarantee is only on E[clip(cost, low, high)], not on E[cost].
    """
    delta = _check_delta(delta)
    low, high = _check_range(low, high, "hoeffding")
    arr = _check_costs(costs, 1, "hoeffding")
    n = arr.shape[0]
    clipped, info = _clip_costs(arr, low, high)
    mean = float(clipped.mean())
    radius = hoeffding_radius(n, delta, low, high)
    return Bound(
        name="hoeffding",
        upper=mean + radius,
        mean=mean,
        std=_sample_std(clipped),
        n=n,
        delta=delta,
        assumptions=_HOEFFDING_ASSUMPTIONS,
        details={**info, "radius": radius},
    )


def empirical_bernstein_ucb(
    costs: Sequence[float], delta: float, low: float, high: float
) -> Bound:
    """Empirical Bernstein upper confidence bound (Maurer & Pontil 2009, Theorem 4).

    The theorem is stated for i.i.d. Z_i in [0, 1]: with probability >= 1 - delta,

        E[Z] <= mean(Z) + sqrt(2 V_n(Z) log(2/delta) / n) + 7 log(2/delta) / (3 (n - 1)),

    where V_n(Z) is the sample variance with the 1/(n-1) normalisation (ddof=1).
    Applying it to Z = (C - low) / (high - low) and mapping back (V_n scales by
    (high - low)^2) gives, on the unscaled range::

        UCB = mean + sqrt(2 * V_n * log(2/delta) / n) + 7 * (high - low) * log(2/delta) / (3 (n - 1))

    with ``mean`` and ``V_n`` (ddof=1) computed on the costs clipped to
    ``[low, high]``. It is a one-sided bound; the ``2/delta`` comes from the
    union of the Bennett step and the variance concentration step inside the
    theorem, not from two-sidedness.

    Assumptions: i.i.d. costs with support in [low, high]; holds for any such
    distribution. Requires n >= 2. The range term decays as 1/n, so the bound
    is loose for small n but beats Hoeffding when the variance is much smaller
    than (high - low)^2 / 4. Same clipping caveat as :func:`hoeffding_ucb`.
    """
    delta = _check_delta(delta)
    low, high = _check_range(low, high, "bernstein")
    arr = _check_costs(costs, 2, "bernstein")
    n = arr.shape[0]
    clipped, info = _clip_costs(arr, low, high)
    mean = float(clipped.mean())
    var = float(np.var(clipped, ddof=1))
    log_term = math.log(2.0 / delta)
    variance_term = math.sqrt(2.0 * var * log_term / n)
    range_term = 7.0 * (high - low) * log_term / (3.0 * (n - 1))
    return Bound(
        name="bernstein",
        upper=mean + float(bernstein_radius(var, n, delta, low, high)),  # = variance_term + range_term (the reported split)
        mean=mean,
        std=math.sqrt(var),
        n=n,
        delta=delta,
        assumptions=_BERNSTEIN_ASSUMPTIONS,
        details={
            **info,
            "variance": var,
            "log_term": log_term,
            "variance_term": variance_term,
            "range_term": range_term,
        },
    )


# --------------------------------------------------------------------------
# Bounds on the violation rate P(cost > 0)
# --------------------------------------------------------------------------


def clopper_pearson_upper(k: int, n: int, delta: float) -> float:
    """Exact one-sided (1 - delta) Clopper-Pearson upper bound on a binomial p.

    For k successes out of n trials::

        upper = Beta.ppf(1 - delta; k + 1, n - k)   if k < n
        upper = 1.0                                 if k == n

    Equivalently, ``upper`` is the p at which P(Bin(n, p) <= k) = delta. For
    k = 0 this is ``1 - delta**(1/n)`` (about 3/n for delta = 0.05, the "rule
    of three"). Exact (conservative) for i.i.d. Bernoulli trials.
    """
    delta = _check_delta(delta)
    n = _check_int(n, "n", 1)
    k = _check_int(k, "k", 0)
    if k > n:
        raise ValueError(f"k (number of violations) cannot exceed n; got k={k}, n={n}")
    if k == n:
        return 1.0
    return _beta_quantile(1.0 - delta, k + 1, n - k)


def violation_rate_bound(costs: Sequence[float], delta: float, alpha: float) -> Bound:
    """Upper confidence bound on the violation rate P(cost > 0).

    Counts k = #{cost_i > 0} and returns the Clopper-Pearson bound
    ``clopper_pearson_upper(k, n, delta)``. The caller compares ``upper`` with
    ``alpha`` (the allowed violation rate, recorded in ``details``): the test
    passes when ``upper <= alpha``. ``mean`` is k/n and ``std`` the ddof=1
    standard deviation of the 0/1 indicators.

    Assumptions: i.i.d. costs; exact for any cost distribution.
    """
    delta = _check_delta(delta)
    alpha = _check_delta(alpha, name="alpha")
    arr = _check_costs(costs, 1, "violation-rate")
    n = arr.shape[0]
    indicators = (arr > 0).astype(np.float64)
    k = int(indicators.sum())
    return Bound(
        name="clopper-pearson",
        upper=clopper_pearson_upper(k, n, delta),
        mean=k / n,
        std=_sample_std(indicators),
        n=n,
        delta=delta,
        assumptions=_CP_ASSUMPTIONS,
        details={"violations": k, "alpha": alpha},
    )


# --------------------------------------------------------------------------
# Multiple testing and dispatch
# --------------------------------------------------------------------------


def bonferroni_delta(delta: float, n_tests: int) -> float:
    """Per-test failure probability ``delta / n_tests`` (Bonferroni split).

    Use it when the safety test is run several times (e.g. on several
    checkpoints, keeping any that passes): by the union bound, the chance that
    any unsafe model passes stays <= delta. No independence is assumed.
    """
    delta = _check_delta(delta)
    n_tests = _check_int(n_tests, "n_tests", 1)
    return delta / n_tests


def compute_bound(
    method: str,
    costs: Sequence[float],
    delta: float,
    cost_range: tuple[float, float] | None = None,
) -> Bound:
    """Compute an upper confidence bound on E[cost] by method name.

    ``method`` is one of :data:`METHODS` (case-insensitive; ``_`` is accepted
    for ``-``). ``cost_range`` is ``(low, high)`` and is required by
    ``"hoeffding"`` and ``"bernstein"``; ``"student-t"`` ignores it.
    """
    if not isinstance(method, str):
        raise ValueError(f"method must be a string, one of {', '.join(METHODS)}; got {method!r}")
    key = method.strip().lower().replace("_", "-")
    if key not in METHODS:
        raise ValueError(f"unknown bound method {method!r}; choose one of {', '.join(METHODS)}")
    if key == "student-t":
        return student_t_ucb(costs, delta)
    if cost_range is None:
        raise ValueError(
            f"the {key} bound needs the range the costs are known to lie in: pass "
            "cost_range=(low, high), or use method 'student-t'"
        )
    try:
        low, high = cost_range
    except (TypeError, ValueError):
        raise ValueError(
            f"cost_range must be a pair (low, high), got {cost_range!r}"
        ) from None
    if key == "hoeffding":
        return hoeffding_ucb(costs, delta, low, high)
    return empirical_bernstein_ucb(costs, delta, low, high)
