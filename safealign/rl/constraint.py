"""The cost constraint E[C] <= threshold of an RL run: the episode-cost window, the J_c estimate
(its mean over every process, or the HC-RLHF pessimistic bound) and the Lagrange multiplier.

Every process adds its own costs to its own window; J_c is computed from the windows of every
process (gathered), so every process moves lambda identically. With ``--constraint hc`` J_c is the
pessimistic bound mean + k*std and the policy gradient sees the augmented per-sample costs
(research/hc-rlhf.md §1.3). The algorithm decides whether lambda is learned ("lagrangian"), fixed
at lambda_init ("fixed": reward shaping) or absent ("none").
"""

from __future__ import annotations

import torch

from safealign.algorithms import hc as HC
from safealign.algorithms.lagrange import EpisodeCostWindow, LagrangeMultiplier
from safealign.errors import BadInput
from safealign.rl.algorithms import Algorithm


class Constraint:
    def __init__(self, cfg, algo: Algorithm):
        self.cfg, self.algo = cfg, algo
        try:
            self.lam = LagrangeMultiplier(init=cfg.lambda_init, lr=cfg.lambda_lr, max_value=cfg.lambda_max, update_delay=cfg.lambda_update_delay,
                                          threshold=cfg.threshold, method=cfg.lambda_method, pid_kp=cfg.pid_kp, pid_ki=cfg.pid_ki, pid_kd=cfg.pid_kd)
        except ValueError as e:
            raise BadInput(f"Lagrange multiplier settings: {e}") from None
        self.window = EpisodeCostWindow(cfg.episode_cost_window)

    @property
    def value(self) -> float:
        """The lambda the objective uses now."""
        return {"lagrangian": self.lam.value, "fixed": self.cfg.lambda_init}.get(self.algo.cost, 0.0)

    def update(self, acc, cost: torch.Tensor | None, step: int) -> tuple[float, torch.Tensor | None, dict]:
        """Add this rollout's costs [B] to the window, compute J_c over the windows of every process and
        move lambda. Returns (lambda, the per-sample cost for the policy gradient [B], stats)."""
        cfg = self.cfg
        if cost is None:
            return self.value, None, {}
        self.window.extend(cost)
        all_costs = acc.gather(torch.tensor(self.window.values(), dtype=torch.float64, device=acc.device)).cpu()   # [world * window]
        j_mean = float(all_costs.mean())
        j_c, pg_cost, stats = j_mean, cost, {}
        if cfg.constraint == "hc":
            k = HC.hc_inflation_k(len(all_costs), cfg.hc_safety_size, cfg.hc_delta, cfg.hc_c1, cfg.hc_c2)
            j_c = HC.pessimistic_cost(all_costs, k)
            sigma = float(all_costs.std())                                                                   # ddof=1
            pg_cost = HC.augmented_costs(cost.double(), j_mean, sigma, k).to(cost.dtype)
            stats = {"hc/k": k, "hc/sigma": sigma, "hc/m": len(all_costs)}
        if self.algo.lagrangian:
            self.lam.update(j_c, step)
        stats.update({"J_c": j_c, "J_c_mean": j_mean, "threshold": cfg.threshold, "cost_window": len(all_costs)})
        return self.value, pg_cost, stats

    # -- checkpoint state (JSON) ------------------------------------------------------------
    def state_dict(self, acc) -> dict:
        """Collective: the multiplier and the cost window of every process."""
        world = acc.num_processes
        windows = acc.gather(torch.tensor(self.window.values(), dtype=torch.float64, device=acc.device)).reshape(world, -1)
        return {"lagrange": self.lam.state_dict(), "cost_windows": windows.tolist()}

    def load_state_dict(self, state: dict, rank: int) -> None:
        self.lam.load_state_dict(state["lagrange"])
        self.window.load_state_dict({"values": state["cost_windows"][rank]})
