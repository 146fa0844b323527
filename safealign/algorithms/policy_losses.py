"""Policy losses, chosen by name: one pure function each, with one keyword signature::

    fn(logp [B, T], old_logp [B, T], advantages [B, T], mask [B, T], *, clip_eps, reduction)
        -> (loss [], stats {name: 0-dim detached tensor})

``logp`` carries the gradient; ``old_logp`` are the rollout-time log-probs. ``reduction`` is "seq"
(mean over each response's tokens, then over responses: safe-rlhf) or "token" (mean over every
token of the batch).

Registered:

* ``ppo-clip``  - the PPO clipped surrogate (Schulman et al. 2017), ``rl.ppo_policy_loss``.
* ``reinforce`` - the plain policy gradient ``-A * logp`` (no ratio, no clipping): for one update
  per rollout, where the ratio is 1 anyway.

Separate terms that an algorithm adds to the policy loss live next to them: :func:`kl_penalty`
(the KL to the reference as a loss term, as GRPO does).
"""

from __future__ import annotations

import torch

from safealign.algorithms.registry import Registry
from safealign.algorithms.rl import kl_estimate, masked_mean, masked_reduce, ppo_policy_loss

__all__ = ["POLICY_LOSSES", "register", "get", "kl_penalty"]


POLICY_LOSSES = Registry("policy loss")
register, get = POLICY_LOSSES.register, POLICY_LOSSES.get


@register("ppo-clip")
def ppo_clip(logp, old_logp, advantages, mask, *, clip_eps: float = 0.2, reduction: str = "seq"):
    """PPO clipped surrogate: -reduce(min(ratio A, clip(ratio, 1 - eps, 1 + eps) A))."""
    return ppo_policy_loss(logp, old_logp, advantages, mask, clip_eps, reduction)


@register("reinforce")
def reinforce(logp, old_logp, advantages, mask, *, reduction: str = "seq", **_):
    """Vanilla policy gradient: -reduce(A * logp)."""
    loss = -masked_reduce(advantages.detach() * logp, mask, reduction)
    with torch.no_grad():
        ratio = torch.exp(logp - old_logp)
        stats = {"ratio_mean": masked_mean(ratio, mask)}
    return loss, stats


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, *, kind: str = "k3",
               reduction: str = "seq") -> torch.Tensor:
    """KL(pi || pi_ref) as a loss term (GRPO): ``reduce(kl_t)`` with the per-token estimator ``kind``.

    The k3 estimator ``(r - 1) - log r``, r = pi_ref / pi, is >= 0 and its gradient at pi = pi_ref is 0.
    logp [B, T] (with grad), ref_logp [B, T], mask [B, T] -> []"""
    return masked_reduce(kl_estimate(logp, ref_logp.detach(), kind), mask, reduction)
