"""From scored responses to the advantage the policy follows (steps 4-5 of an RL update).

    shape       per-token streams: r_t = -beta*kl_t + [t=end] R,  c_t = +beta*kl_t + [t=end] C, clipped
                (Safe RLHF: a KL penalty on the reward stream, a bonus on the cost stream; no KL term
                when the KL sits in the loss instead). Reward shaping scores R - lambda_init * C.
    advantages  the algorithm's estimator on each stream (GAE with that stream's critic, or
                group-relative within the G responses to a prompt), optionally whitened
    combine     A = (A_r - lambda*A_c) / (1 + lambda) under a learned lambda, else A_r
"""

from __future__ import annotations

import torch

from safealign.algorithms import advantages as ADV
from safealign.algorithms import rl as RL
from safealign.rl.algorithms import Algorithm


def shape_streams(exp, kl: torch.Tensor, lam: float, pg_cost: torch.Tensor | None, algo: Algorithm, cfg, kl_in_reward: bool) -> dict:
    """{stream name: [B, T]} for the algorithm's streams. kl [B, T] per-token KL estimate (masked)."""
    beta = cfg.kl_coeff if kl_in_reward else 0.0
    reward_score = exp.reward - lam * exp.cost if algo.cost == "fixed" else exp.reward                     # [B]
    out = {"reward": RL.shape_token_rewards(reward_score, kl, exp.mask, beta, -1, cfg.clip_range_score)}
    if "cost" in algo.streams:
        out["cost"] = RL.shape_token_rewards(pg_cost.to(kl.dtype), kl, exp.mask, beta, +1, cfg.clip_range_score)
    return out


def advantages(streams: dict, exp, algo: Algorithm, cfg, group_size: int) -> tuple[dict, dict]:
    """({stream: advantages [B, T]}, {stream: critic targets [B, T]} for the streams that have a critic)."""
    adv, returns = {}, {}
    for name, stream in streams.items():
        a, ret = ADV.estimate(cfg.advantage_name(), stream, exp.mask, values=exp.old_values.get(name), group_size=group_size,
                              gamma=cfg.gamma, gae_lambda=cfg.gae_lambda)
        adv[name] = RL.masked_whiten(a, exp.mask) if cfg.whiten_advantages else a
        if ret is not None:
            returns[name] = ret
    return adv, returns


def combine(adv: dict, lam: float, cfg) -> torch.Tensor:
    """The advantage of the policy gradient [B, T]."""
    if "cost" in adv:
        return RL.combined_advantage(adv["reward"], adv["cost"], lam, cfg.normalize_by_lambda)
    return adv["reward"]
