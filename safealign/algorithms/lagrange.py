"""Lagrange multiplier for the cost constraint ``E[C] <= threshold``.

Two update rules:

* "sgd" - Safe RLHF's rule (PKU-Alignment safe-rlhf, PR #124): SGD on
  ``log lambda`` for the loss ``-(J_c - threshold) * exp(log lambda)``, i.e.
  ``log lambda <- log lambda + lr * lambda * (J_c - threshold)``, then
  ``log lambda <- min(log lambda, log max_value)``.
* "pid" - the PID Lagrangian of Stooke, Achiam & Abbeel (ICML 2020,
  "Responsive Safety in RL by PID Lagrangian Methods", Algorithm 2), with the
  optional EMA smoothing and derivative delay described in that paper.

Both are plain-float state machines (no torch, no distributed calls): the
caller computes J_c (e.g. the mean of an ``EpisodeCostWindow``, averaged over
ranks) and broadcasts the returned lambda.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Iterable

import torch

__all__ = ["LagrangeMultiplier", "EpisodeCostWindow"]

METHODS = ("sgd", "pid")


def _finite(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


class LagrangeMultiplier:
    """Lagrange multiplier lambda >= 0 with a Safe-RLHF SGD rule or a PID rule.

    Args:
        init: initial lambda (> 0 for "sgd", which stores log lambda; >= 0 for "pid").
        lr: SGD step size on log lambda ("sgd"); default for pid_ki.
        max_value: upper bound on lambda (None = unbounded).
        update_delay: ``update(j_c, step)`` is a no-op while ``step < update_delay``.
        threshold: constraint level d in ``E[C] <= d``.
        method: "sgd" or "pid".
        pid_kp, pid_ki, pid_kd: PID gains (>= 0); pid_ki=None uses ``lr``.
        pid_p_ema, pid_d_ema: EMA factors in [0, 1) for the proportional error
            and for the cost used by the derivative (0 = no smoothing).
        pid_d_delay: the derivative compares the smoothed cost with its value
            ``pid_d_delay`` updates earlier (1 = previous update).

    "sgd" update (exactly safe-rlhf, in float64)::

        e          = J_c - d
        log_lam   <- log_lam + lr * exp(log_lam) * e
        log_lam   <- min(log_lam, log(max_value))
        lambda     = exp(log_lam)

    "pid" update (Stooke et al. 2020, Algorithm 2, with EMA and delay)::

        e      = J_c - d
        I     <- max(0, I + Ki * e)                     (I starts at init)
        I     <- min(I, max_value)                      (anti-windup, only if max_value)
        p     <- a_p * p + (1 - a_p) * e                (p starts at 0)
        c     <- a_d * c + (1 - a_d) * J_c              (c starts at 0)
        D      = max(0, c - c_hist[-pid_d_delay])       (c_hist starts as zeros: J_prev = 0)
        lambda = max(0, Kp * p + I + Kd * D), then min(lambda, max_value)

    With Kp = Kd = 0 this is a projected additive gradient ascent on lambda
    (the classic Lagrangian update).  Deviations from Algorithm 2: I starts at
    ``init`` (not 0) so lambda starts at ``init``; Ki is folded into I; the
    integral is capped at max_value so it cannot wind up while lambda is capped.
    """

    def __init__(
        self,
        init: float = 1.0,
        lr: float = 0.1,
        max_value: float | None = None,
        update_delay: int = 0,
        threshold: float = 0.0,
        method: str = "sgd",
        pid_kp: float = 0.0,
        pid_ki: float | None = None,
        pid_kd: float = 0.0,
        pid_p_ema: float = 0.0,
        pid_d_ema: float = 0.0,
        pid_d_delay: int = 1,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
        init = _finite("init", init)
        self.lr = _finite("lr", lr)
        self.threshold = _finite("threshold", threshold)
        if self.lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if max_value is not None:
            max_value = _finite("max_value", max_value)
            if max_value <= 0:
                raise ValueError(f"max_value must be > 0, got {max_value}")
            if init > max_value:
                raise ValueError(f"init ({init}) must be <= max_value ({max_value})")
        if int(update_delay) != update_delay or update_delay < 0:
            raise ValueError(f"update_delay must be an integer >= 0, got {update_delay}")
        self.method = method
        self.max_value = max_value
        self.update_delay = int(update_delay)

        pid_ki = self.lr if pid_ki is None else pid_ki
        self.pid_kp = _finite("pid_kp", pid_kp)
        self.pid_ki = _finite("pid_ki", pid_ki)
        self.pid_kd = _finite("pid_kd", pid_kd)
        if min(self.pid_kp, self.pid_ki, self.pid_kd) < 0:
            raise ValueError("PID gains must be >= 0")
        self.pid_p_ema = _finite("pid_p_ema", pid_p_ema)
        self.pid_d_ema = _finite("pid_d_ema", pid_d_ema)
        if not (0 <= self.pid_p_ema < 1 and 0 <= self.pid_d_ema < 1):
            raise ValueError("pid_p_ema and pid_d_ema must be in [0, 1)")
        if int(pid_d_delay) != pid_d_delay or pid_d_delay < 1:
            raise ValueError(f"pid_d_delay must be an integer >= 1, got {pid_d_delay}")
        self.pid_d_delay = int(pid_d_delay)

        if method == "sgd":
            if init <= 0:
                raise ValueError(f"init must be > 0 for method 'sgd' (log lambda), got {init}")
            self._log_lambda: float | None = math.log(init)
            self._lambda = init
        else:
            if init < 0:
                raise ValueError(f"init must be >= 0, got {init}")
            self._log_lambda = None
            self._lambda = init
        # PID state (unused by "sgd", kept so state_dict has one schema)
        self._integral = init
        self._p_ema = 0.0
        self._cost_ema = 0.0
        self._cost_hist: deque[float] = deque([0.0] * self.pid_d_delay, maxlen=self.pid_d_delay)
        self.num_updates = 0

    # ------------------------------------------------------------------ #
    @property
    def value(self) -> float:
        """Current lambda (float >= 0)."""
        if self._log_lambda is not None:
            return math.exp(self._log_lambda)
        return self._lambda

    @property
    def log_value(self) -> float:
        """log lambda (-inf when a PID lambda is 0)."""
        if self._log_lambda is not None:
            return self._log_lambda
        return math.log(self._lambda) if self._lambda > 0 else -math.inf

    def update(self, j_c: float, step: int) -> float:
        """Update lambda from the current cost estimate J_c; return the new lambda.

        No-op (returns the current lambda) while ``step < update_delay``.
        j_c must be finite (a NaN would poison lambda for the rest of the run).
        """
        if isinstance(j_c, torch.Tensor):
            j_c = j_c.item()
        j_c = _finite("j_c", j_c)
        if step < self.update_delay:
            return self.value
        error = j_c - self.threshold
        if self.method == "sgd":
            self._sgd_step(error)
        else:
            self._pid_step(j_c, error)
        self.num_updates += 1
        return self.value

    def _sgd_step(self, error: float) -> None:
        # d/d(log_lam) of -(J_c - d) * exp(log_lam) = -error * lam; SGD subtracts lr * grad
        log_lam = self._log_lambda + self.lr * math.exp(self._log_lambda) * error
        if self.max_value is not None:
            log_lam = min(log_lam, math.log(self.max_value))
        self._log_lambda = log_lam
        self._lambda = math.exp(log_lam)

    def _pid_step(self, j_c: float, error: float) -> None:
        integral = max(0.0, self._integral + self.pid_ki * error)
        if self.max_value is not None:
            integral = min(integral, self.max_value)
        self._integral = integral
        self._p_ema = self.pid_p_ema * self._p_ema + (1.0 - self.pid_p_ema) * error
        self._cost_ema = self.pid_d_ema * self._cost_ema + (1.0 - self.pid_d_ema) * j_c
        derivative = max(0.0, self._cost_ema - self._cost_hist[0])
        self._cost_hist.append(self._cost_ema)
        lam = max(0.0, self.pid_kp * self._p_ema + integral + self.pid_kd * derivative)
        if self.max_value is not None:
            lam = min(lam, self.max_value)
        self._lambda = lam

    # ------------------------------------------------------------------ #
    def state_dict(self) -> dict[str, Any]:
        """Plain-float, JSON-serialisable state (hyperparameters are not included)."""
        return {
            "method": self.method,
            "log_lambda": self._log_lambda,
            "lambda": self._lambda,
            "pid_integral": self._integral,
            "pid_p_ema": self._p_ema,
            "pid_cost_ema": self._cost_ema,
            "pid_cost_history": list(self._cost_hist),
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` output; later updates continue identically."""
        if state["method"] != self.method:
            raise ValueError(f"state is for method {state['method']!r}, not {self.method!r}")
        history = [float(v) for v in state["pid_cost_history"]]
        if len(history) != self.pid_d_delay:
            raise ValueError(
                f"state has a cost history of {len(history)}, expected pid_d_delay={self.pid_d_delay}"
            )
        if self.method == "sgd":
            self._log_lambda = float(state["log_lambda"])
            self._lambda = math.exp(self._log_lambda)
        else:
            self._log_lambda = None
            self._lambda = float(state["lambda"])
        self._integral = float(state["pid_integral"])
        self._p_ema = float(state["pid_p_ema"])
        self._cost_ema = float(state["pid_cost_ema"])
        self._cost_hist = deque(history, maxlen=self.pid_d_delay)
        self.num_updates = int(state["num_updates"])


class EpisodeCostWindow:
    """Moving window of the most recent episode (sequence) costs.

    safe-rlhf keeps ``deque(maxlen=128)`` per rank and uses its plain mean as
    J_c (no EMA).  Costs are stored as Python floats.
    """

    def __init__(self, maxlen: int = 128) -> None:
        if int(maxlen) != maxlen or maxlen < 1:
            raise ValueError(f"maxlen must be an integer >= 1, got {maxlen}")
        self.maxlen = int(maxlen)
        self._costs: deque[float] = deque(maxlen=self.maxlen)

    def extend(self, costs: torch.Tensor | Iterable[float]) -> None:
        """Append costs (tensor of any shape, flattened, or an iterable of numbers)."""
        if isinstance(costs, torch.Tensor):
            costs = costs.detach().float().cpu().reshape(-1).tolist()
        values = [float(c) for c in costs]
        if not all(math.isfinite(v) for v in values):
            raise ValueError("episode costs contain NaN or inf")
        self._costs.extend(values)

    def values(self) -> list[float]:
        """Costs in the window, oldest first."""
        return list(self._costs)

    def mean(self) -> float:
        """Plain mean of the window; ValueError when it is empty."""
        if not self._costs:
            raise ValueError("EpisodeCostWindow is empty")
        return math.fsum(self._costs) / len(self._costs)

    def std(self) -> float:
        """Sample standard deviation (ddof=1); ValueError with fewer than 2 costs."""
        n = len(self._costs)
        if n < 2:
            raise ValueError("EpisodeCostWindow.std needs at least 2 costs")
        mu = self.mean()
        return math.sqrt(math.fsum((c - mu) ** 2 for c in self._costs) / (n - 1))

    def __len__(self) -> int:
        return len(self._costs)

    def state_dict(self) -> dict[str, Any]:
        return {"maxlen": self.maxlen, "values": list(self._costs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore values; if this window's maxlen is smaller, the newest are kept."""
        self._costs = deque((float(v) for v in state["values"]), maxlen=self.maxlen)
