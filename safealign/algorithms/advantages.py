"""Advantage estimators, chosen by name: one pure function each (no I/O, no distributed calls).

Every estimator has the same keyword signature, so the RL loop calls ``estimate(name, ...)`` and
never branches on the algorithm::

    fn(token_rewards [B, T], mask [B, T], *, values [B, T] | None, group_size G, gamma, gae_lambda)
        -> (advantages [B, T], returns [B, T] | None)

``token_rewards`` is one shaped per-token stream (``rl.shape_token_rewards``: the sequence score on
the last response token, plus a KL term when the KL sits in the reward). ``returns`` are the critic
targets; estimators that need no critic return None. Rows of a group are contiguous: rows
``g*G .. g*G + G - 1`` are G responses to the same prompt.

Registered:

* ``gae``   - generalised advantage estimation with a critic (PPO; Schulman et al. 2016).
* ``group`` - group-relative (GRPO; Shao et al. 2024): the sequence return of each response minus
  the mean of its group, divided by the group's standard deviation; the same value on every token.
* ``group-mean`` - the same without the division (Dr. GRPO; Liu et al. 2025): no up-weighting of
  groups whose returns hardly differ.
* ``group-batch`` - centred within the group, divided by the standard deviation of the centred
  returns over the whole batch: one scale per stream and step, so a group whose returns differ by
  noise alone (a cost stream on prompts every response answers safely) is not blown up to the
  scale of a group with a real difference, while the stream still has unit scale overall.
* ``rloo``  - leave-one-out baseline (Ahmadian et al. 2024): return minus the mean of the *other*
  responses of its group.
"""

from __future__ import annotations

import torch

from safealign.algorithms.registry import Registry
from safealign.algorithms.rl import gae

__all__ = ["ADVANTAGES", "register", "get", "estimate", "sequence_returns", "group_normalize", "batch_scaled", "leave_one_out"]


ADVANTAGES = Registry("advantage estimator")   # name -> Entry(fn, needs_critic=..., groups=...)
register, get = ADVANTAGES.register, ADVANTAGES.get


def estimate(name: str, token_rewards: torch.Tensor, mask: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the registered estimator ``name`` (see the module docstring for the signature)."""
    return get(name).fn(token_rewards, mask, **kwargs)


# --------------------------------------------------------------------------------------------
# group statistics


def sequence_returns(token_rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Undiscounted return of each response: the sum of its masked per-token stream.

    token_rewards, mask: [B, T] -> [B]"""
    return (token_rewards * mask.to(token_rewards.dtype)).sum(dim=-1)


def _groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B] -> [B / G, G]; refuses G < 2 (a group of one has no baseline) and B not divisible by G."""
    if int(group_size) != group_size or group_size < 2:
        raise ValueError(f"group-relative advantages need group_size >= 2, got {group_size}")
    if x.shape[0] % group_size:
        raise ValueError(f"batch of {x.shape[0]} responses is not a whole number of groups of {group_size}")
    return x.reshape(-1, group_size)


def group_normalize(returns: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantage of each response.

    ``A_i = (R_i - mean_g R) / (std_g R + eps)``  (std with ddof=1, as GRPO; ``scale=False``: no division)

    A group whose returns are all equal gets A = 0 for every response (nothing to prefer).
    returns: [B] with B = n_groups * G, groups contiguous -> [B]"""
    g = _groups(returns, group_size)                                    # [N, G]
    centred = g - g.mean(dim=1, keepdim=True)                           # [N, G]
    if scale:
        centred = centred / (g.std(dim=1, keepdim=True) + eps)          # ddof = 1
    return centred.reshape(-1)


def batch_scaled(returns: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """Centred within the group, scaled by the batch: ``c_i = R_i - mean_g R``, ``A_i = c_i / (std(c) + eps)``
    with std over every response of the batch (ddof=1).

    returns: [B] with B = n_groups * G, groups contiguous -> [B]"""
    centred = group_normalize(returns, group_size, scale=False)                     # [B]
    return centred / (centred.std() + eps) if centred.numel() > 1 else centred


def leave_one_out(returns: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO advantage: ``A_i = R_i - mean_{j != i} R_j = G / (G - 1) * (R_i - mean_g R)``.

    returns: [B] with B = n_groups * G, groups contiguous -> [B]"""
    g = _groups(returns, group_size)                                    # [N, G]
    others = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)        # [N, G]
    return (g - others).reshape(-1)


def _broadcast(seq_adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, T]: the sequence advantage on every response token, 0 on padding."""
    return seq_adv[:, None] * mask.to(seq_adv.dtype)


# --------------------------------------------------------------------------------------------
# the estimators


@register("gae", needs_critic=True, groups=False)
def gae_estimator(token_rewards, mask, *, values=None, gamma: float = 1.0, gae_lambda: float = 0.95, **_):
    """Generalised advantage estimation on the critic's values (PPO)."""
    if values is None:
        raise ValueError("gae needs the critic's values")
    return gae(token_rewards, values, mask, gamma, gae_lambda)


@register("group", needs_critic=False, groups=True)
def group_estimator(token_rewards, mask, *, group_size: int = 0, **_):
    """Group-relative: (R - group mean) / group std on every token (GRPO)."""
    seq = group_normalize(sequence_returns(token_rewards, mask), group_size, scale=True)
    return _broadcast(seq, mask), None


@register("group-mean", needs_critic=False, groups=True)
def group_mean_estimator(token_rewards, mask, *, group_size: int = 0, **_):
    """Group-relative without the std division: R - group mean on every token (Dr. GRPO)."""
    seq = group_normalize(sequence_returns(token_rewards, mask), group_size, scale=False)
    return _broadcast(seq, mask), None


@register("group-batch", needs_critic=False, groups=True)
def group_batch_estimator(token_rewards, mask, *, group_size: int = 0, **_):
    """Group-centred, batch-scaled: (R - group mean) / batch std of the centred returns, on every token."""
    seq = batch_scaled(sequence_returns(token_rewards, mask), group_size)
    return _broadcast(seq, mask), None


@register("rloo", needs_critic=False, groups=True)
def rloo_estimator(token_rewards, mask, *, group_size: int = 0, **_):
    """Leave-one-out: R minus the mean return of the other responses of its group (RLOO)."""
    seq = leave_one_out(sequence_returns(token_rewards, mask), group_size)
    return _broadcast(seq, mask), None
