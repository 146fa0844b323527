"""HC-RLHF pieces: the pessimistic (inflated) cost bound and its augmented cost.

Candidate selection in HC-RLHF (Chittepu et al., 2025) constrains a
pessimistic upper bound on the expected cost instead of its plain mean::

    U(theta) = mu + k * sigma
    k        = C1 * t_{1-delta, m-1} / sqrt(m) + C2 * t_{1-delta, n-1} / sqrt(n)

m is the number of candidate-side cost samples, n the safety-test size.
The C2 term predicts the width of the later Student-t safety test (C2=2 is
the classic Seldonian "2x inflation"); the C1 term is an extra margin for the
error of the candidate-side estimate itself.

Its score-function gradient (mu, sigma treated as constants, sigma =
sqrt(E[c^2] - mu^2)) replaces each sampled cost by an augmented cost::

    grad U = E[ (c + k * (c^2 - 2 mu c) / (2 sigma)) * grad log pi(y|x) ]

Cost convention: higher cost = more harmful; constraint E[C] <= threshold.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from scipy.stats import t as student_t

__all__ = ["hc_inflation_k", "pessimistic_cost", "augmented_costs"]

SIGMA_EPS = 1e-6


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or int(value) != value:
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < 2:
        raise ValueError(f"{name} must be >= 2 when its coefficient is non-zero, got {value}")
    return value


def hc_inflation_k(m: int, n: int, delta: float, c1: float = 1.0, c2: float = 1.0) -> float:
    """Inflation factor ``k = c1 * t_{1-delta,m-1}/sqrt(m) + c2 * t_{1-delta,n-1}/sqrt(n)``.

    ``t_{q,df}`` is the one-sided Student-t quantile (``scipy.stats.t.ppf``).
    A term whose coefficient is 0 is skipped, so its count is not checked
    (e.g. m may be 0 or 1 when c1 == 0).

    m:     number of candidate-side cost samples (>= 2 if c1 > 0)
    n:     safety-test set size (>= 2 if c2 > 0)
    delta: failure probability, 0 < delta < 1
    c1,c2: finite coefficients >= 0
    returns k (float, >= 0)
    """
    delta = float(delta)
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    k = 0.0
    for name, coef, count in (("m", c1, m), ("n", c2, n)):
        coef = float(coef)
        if not math.isfinite(coef) or coef < 0:
            raise ValueError(f"coefficient for {name} must be finite and >= 0, got {coef}")
        if coef == 0.0:
            continue
        count = _check_count(name, count)
        k += coef * float(student_t.ppf(1.0 - delta, count - 1)) / math.sqrt(count)
    return k


def _as_float64(costs: torch.Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    if isinstance(costs, torch.Tensor):
        costs = costs.detach().cpu().double().numpy()
    arr = np.asarray(costs, dtype=np.float64).reshape(-1)  # [N]
    if not np.all(np.isfinite(arr)):
        raise ValueError("costs contain NaN or inf")
    return arr


def pessimistic_cost(costs: torch.Tensor | np.ndarray | Sequence[float], k: float) -> float:
    """Pessimistic cost bound ``mean(c) + k * std(c)`` (std with ddof=1).

    N < 2 case: the sample std is undefined, so for k > 0 a ValueError is
    raised (a bound that silently used std=0 would be optimistic, not
    pessimistic).  For k == 0 the plain mean is returned (needs N >= 1).

    costs: [N] sequence-level costs (tensor, array or list)
    k:     inflation factor >= 0 (``hc_inflation_k``)
    returns float
    """
    k = float(k)
    if not math.isfinite(k) or k < 0:
        raise ValueError(f"k must be finite and >= 0, got {k}")
    arr = _as_float64(costs)  # [N]
    if arr.size == 0:
        raise ValueError("pessimistic_cost needs at least one cost")
    if k == 0.0:
        return float(arr.mean())
    if arr.size < 2:
        raise ValueError("pessimistic_cost with k > 0 needs at least 2 costs (sample std)")
    return float(arr.mean() + k * arr.std(ddof=1))


def augmented_costs(
    costs: torch.Tensor, mu: float, sigma: float, k: float, eps: float = SIGMA_EPS
) -> torch.Tensor:
    """Per-sample augmented cost whose policy gradient is that of ``mu + k*sigma``.

    ``c~_i = c_i + k * (c_i^2 - 2 * mu * c_i) / (2 * max(sigma, eps))``

    mu and sigma are constants (buffer mean and std).  sigma is floored at eps
    because grad sigma = E[(c^2 - 2 mu c) grad log pi] / (2 sigma) is singular
    at sigma = 0: a buffer of (nearly) identical costs, e.g. a saturated cost
    model or a tiny window, would otherwise give inf/NaN costs and poison the
    policy update.  With k = 0 the costs are returned unchanged.

    costs: [N] (tensor; lists/arrays are converted to float64 tensors)
    returns [N], same dtype/device as a tensor input
    """
    if not isinstance(costs, torch.Tensor):
        costs = torch.as_tensor(_as_float64(costs))
    k, mu, sigma = float(k), float(mu), float(sigma)
    if not math.isfinite(k) or k < 0:
        raise ValueError(f"k must be finite and >= 0, got {k}")
    if not (math.isfinite(mu) and math.isfinite(sigma)) or sigma < 0:
        raise ValueError(f"mu must be finite and sigma finite and >= 0, got {mu}, {sigma}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    sigma = max(sigma, eps)
    return costs + k * (costs * costs - 2.0 * mu * costs) / (2.0 * sigma)
