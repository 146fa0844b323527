"""The RL algorithms of `safealign ppo-lag --algorithm NAME`: one entry each, nothing else to edit.

An entry says which roles the algorithm trains, how its advantage is estimated (a name in
``algorithms.advantages``), how the cost enters the objective and where the KL to the reference
goes. The loop in ``stages/ppo_lag.py`` reads these fields; it never tests the algorithm's name.

No torch import here: config.py and ``--help`` read this table.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Algorithm:
    name: str
    critics: tuple[str, ...]    # value models trained with the actor, one per stream that needs one ("reward", "cost")
    advantage: str              # estimator in safealign.algorithms.advantages ("gae", "group", ...)
    cost: str                   # "lagrangian": learned lambda on E[C] <= d; "fixed": reward R - lambda_init * C; "none": reward only
    kl: str                     # default place of the KL to the reference: "reward" (per-token shaping) or "loss" (a loss term)
    group_size: int             # default responses per prompt (--group-size 0); group estimators need >= 2
    summary: str
    policy_loss: str = "ppo-clip"   # loss in safealign.algorithms.policy_losses

    @property
    def lagrangian(self) -> bool:
        return self.cost == "lagrangian"

    @property
    def streams(self) -> tuple[str, ...]:
        """The per-token streams with an advantage of their own: the reward, and the cost under a learned lambda."""
        return ("reward", "cost") if self.lagrangian else ("reward",)

    @property
    def roles(self) -> tuple[str, ...]:
        """Every model the algorithm holds (for the plan command and the report)."""
        return ("actor", "reference", "reward model", "cost model", *(f"{c} critic" for c in self.critics))


ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    Algorithm("ppo-lag", ("reward", "cost"), "gae", "lagrangian", "reward", 1,
              "PPO-Lagrangian (Safe RLHF): maximise reward subject to E[cost] <= threshold; reward and cost critics, GAE per "
              "stream, A = (A_r - lambda A_c)/(1 + lambda); lambda learned by gradient ascent on J_c - threshold."),
    Algorithm("ppo", ("reward",), "gae", "none", "reward", 1,
              "Reward-only PPO baseline (no cost in the objective; cost reported when a cost model is given)."),
    Algorithm("reward-shaping", ("reward",), "gae", "fixed", "reward", 1,
              "Fixed-lambda reward-shaping baseline: PPO on R - lambda_init * C with one critic."),
    Algorithm("grpo-lag", (), "group", "lagrangian", "loss", 4,
              "GRPO-Lagrangian: no critics; G responses per prompt, each stream's advantage normalised within its group, "
              "A = (A_r - lambda A_c)/(1 + lambda); the same learned lambda as ppo-lag; KL to the reference as a loss term."),
    Algorithm("grpo", (), "group", "none", "loss", 4,
              "Reward-only GRPO baseline: group-relative advantages of the reward, no critics, no cost in the objective."),
)}


def get(name: str) -> Algorithm:
    return ALGORITHMS[name]
