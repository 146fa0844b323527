"""Pure tensor maths for PPO-Lagrangian (Safe RLHF style).

No I/O and no distributed calls: every function takes tensors and returns
tensors (or scalars), so it can be unit-tested on tiny hand-computed inputs.

Shape conventions (response-only tensors, right-padded):

* ``B`` - number of sequences in the batch
* ``T`` - number of response tokens (after right padding)
* ``V`` - vocabulary size
* ``mask`` ``[B, T]`` - 1 on real response tokens, 0 on padding

Cost convention: higher cost = more harmful; the constraint is
``E[C] <= threshold``.
"""

from __future__ import annotations

import torch

__all__ = [
    "masked_mean",
    "masked_seq_mean",
    "masked_reduce",
    "masked_whiten",
    "logprobs_from_logits",
    "entropy_from_logits",
    "kl_estimate",
    "shape_token_rewards",
    "gae",
    "combined_advantage",
    "ppo_policy_loss",
    "clipped_value_loss",
]

REDUCTIONS = ("token", "seq")


# --------------------------------------------------------------------------- #
# masked reductions
# --------------------------------------------------------------------------- #
def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over all masked tokens of the batch.

    ``sum_{b,t} x[b,t] m[b,t] / sum_{b,t} m[b,t]``

    x:    [B, T]
    mask: [B, T]  (bool or 0/1)
    returns a 0-dim tensor; 0 when the mask is empty (instead of NaN).
    """
    mask = mask.to(x.dtype)  # [B, T]
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


def masked_seq_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence token mean, then mean over sequences (safe-rlhf convention).

    ``mean_b [ sum_t x[b,t] m[b,t] / sum_t m[b,t] ]``

    Every sequence weighs the same, whatever its length.  Rows whose mask is
    all zero have no defined mean: they are left out of the batch mean
    (safe-rlhf would produce NaN there).  If every row is empty the result is 0.

    x:    [B, T]
    mask: [B, T]
    returns a 0-dim tensor.
    """
    mask = mask.to(x.dtype)  # [B, T]
    tokens = mask.sum(dim=-1)  # [B]
    seq_mean = (x * mask).sum(dim=-1) / tokens.clamp_min(1.0)  # [B]
    has_tokens = (tokens > 0).to(x.dtype)  # [B]
    return (seq_mean * has_tokens).sum() / has_tokens.sum().clamp_min(1.0)


def masked_reduce(x: torch.Tensor, mask: torch.Tensor, reduction: str = "seq") -> torch.Tensor:
    """``masked_mean`` for reduction="token", ``masked_seq_mean`` for "seq".

    x, mask: [B, T]; returns a 0-dim tensor.
    """
    if reduction == "token":
        return masked_mean(x, mask)
    if reduction == "seq":
        return masked_seq_mean(x, mask)
    raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Whiten ``x`` with the mean/variance of its masked tokens.

    ``mu = masked_mean(x)``, ``var = masked_mean((x - mu)^2)`` (population
    variance over all masked tokens of the batch), then

    * shift_mean=True:  ``(x - mu) / sqrt(var + eps)``
    * shift_mean=False: ``(x - mu) / sqrt(var + eps) + mu`` (rescale only)

    Padding positions are set to 0 in the output.

    x:    [B, T]
    mask: [B, T]
    returns [B, T]
    """
    mu = masked_mean(x, mask)  # []
    var = masked_mean((x - mu) ** 2, mask)  # []
    white = (x - mu) * torch.rsqrt(var + eps)  # [B, T]
    if not shift_mean:
        white = white + mu
    return white * mask.to(x.dtype)


# --------------------------------------------------------------------------- #
# log-probs, entropy, KL
# --------------------------------------------------------------------------- #
def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each label token: ``log softmax(logits)[label]``.

    Computed as ``logits[label] - logsumexp(logits)``, one sequence at a time,
    so no [B, T, V] log-softmax (or float32 copy of bf16 logits) is ever
    materialised: the extra memory is one [T, V] block.  Half/bfloat16 logits
    are upcast per row, and the result is float32 (float64 for float64 input).

    Labels < 0 (e.g. -100 "ignore" ids on padding) are allowed: their
    log-prob is returned as 0.

    logits: [B, T, V]
    labels: [B, T]  (int64 token ids)
    returns [B, T]
    """
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    labels = labels.long()
    valid = labels >= 0  # [B, T]
    safe_labels = labels.clamp_min(0).unsqueeze(-1)  # [B, T, 1]
    rows = []
    for row_logits, row_labels in zip(logits, safe_labels):  # [T, V], [T, 1]
        row_logits = row_logits.to(out_dtype)
        picked = row_logits.gather(-1, row_labels).squeeze(-1)  # [T]
        rows.append(picked - torch.logsumexp(row_logits, dim=-1))  # [T]
    logp = torch.stack(rows, dim=0)  # [B, T]
    return logp * valid.to(logp.dtype)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position.

    ``H = logsumexp(z) - sum_v softmax(z)_v z_v``, computed one sequence at a
    time in float32 (bounded extra memory).

    logits: [B, T, V]
    returns [B, T]  (float32, or float64 for float64 input)
    """
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    rows = []
    for row in logits:  # [T, V]
        z = row.to(out_dtype)
        probs = torch.softmax(z, dim=-1)  # [T, V]
        rows.append(torch.logsumexp(z, dim=-1) - (probs * z).sum(dim=-1))  # [T]
    return torch.stack(rows, dim=0)  # [B, T]


def kl_estimate(
    logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1"
) -> torch.Tensor:
    """Per-token sample estimate of KL(pi || pi_ref) from sampled-token log-probs.

    * "k1": ``logp - ref_logp`` (unbiased, can be negative; safe-rlhf's choice)
    * "k3": ``(r - 1) - log r`` with ``r = exp(ref_logp - logp)``
      (unbiased, always >= 0, lower variance)

    logp, ref_logp: [B, T]
    returns [B, T]  (padding positions are not masked here)
    """
    if kind == "k1":
        return logp - ref_logp
    if kind == "k3":
        log_r = ref_logp - logp  # [B, T]
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator kind {kind!r}; expected 'k1' or 'k3'")


# --------------------------------------------------------------------------- #
# reward shaping and advantages
# --------------------------------------------------------------------------- #
def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last masked token of each row, -1 for an all-zero row.

    mask: [B, T]; returns [B] (int64).
    """
    T = mask.shape[-1]
    positions = torch.arange(T, device=mask.device).expand_as(mask)  # [B, T]
    return torch.where(mask.bool(), positions, torch.full_like(positions, -1)).amax(dim=-1)


def shape_token_rewards(
    score: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    kl_sign: float,
    clip: float | None,
) -> torch.Tensor:
    """Dense per-token stream of a sequence-level score plus a KL term.

    ``s_t = kl_sign * beta * kl_t + [t == end] * score``, then
    ``s_t = clamp(s_t, -clip, clip)``, and 0 on padding.

    ``end`` is the last masked token of the row (the EOS token, or the last
    token of a truncated response).  Safe-RLHF (section 4.3) uses
    kl_sign=-1 for the reward stream (KL penalty) and kl_sign=+1 for the
    cost stream (KL bonus), with the same beta on both; use kl_sign=0 for
    a stream without KL.  ``clip=None`` disables the clamp.

    A row whose mask is all zero (empty response) has no token to carry the
    score: its score is dropped and the whole row is 0.

    score: [B]      sequence-level reward or cost
    kl:    [B, T]   per-token KL estimate (e.g. ``kl_estimate(old, ref)``)
    mask:  [B, T]
    returns [B, T]
    """
    if kl_sign not in (-1, 0, 1):
        raise ValueError(f"kl_sign must be -1, 0 or +1, got {kl_sign!r}")
    if clip is not None and clip <= 0:
        raise ValueError(f"clip must be positive or None, got {clip!r}")
    fmask = mask.to(kl.dtype)  # [B, T]
    stream = kl_sign * beta * kl * fmask  # [B, T]
    end = last_token_index(mask)  # [B]
    has_tokens = end >= 0  # [B]
    rows = torch.arange(kl.shape[0], device=kl.device)[has_tokens]  # [B']
    stream = stream.clone()
    stream[rows, end[has_tokens]] += score.to(kl.dtype)[has_tokens]
    if clip is not None:
        stream = stream.clamp(-clip, clip)
    return stream * fmask


@torch.no_grad()
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens.

    Reverse recursion over t = T-1 .. 0 with rewards and values masked::

        delta_t = r_t + gamma * V_{t+1} - V_t        (V beyond the last real token = 0)
        A_t     = delta_t + gamma * lam * A_{t+1}    (A on padding = 0)
        G_t     = A_t + V_t                          (returns, critic target)

    Outputs are detached and 0 on padding.  No whitening (safe-rlhf uses none).

    rewards: [B, T]  shaped per-token stream (``shape_token_rewards``)
    values:  [B, T]  old critic values
    mask:    [B, T]
    returns (advantages [B, T], returns [B, T])
    """
    fmask = mask.to(rewards.dtype)  # [B, T]
    rewards = rewards.detach() * fmask  # [B, T]
    values = values.detach().to(rewards.dtype) * fmask  # [B, T]
    T = rewards.shape[-1]
    next_value = torch.zeros_like(rewards[:, 0])  # [B]
    next_adv = torch.zeros_like(rewards[:, 0])  # [B]
    advantages = torch.zeros_like(rewards)  # [B, T]
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # [B]
        adv = (delta + gamma * lam * next_adv) * fmask[:, t]  # [B]
        advantages[:, t] = adv
        next_value, next_adv = values[:, t], adv
    returns = (advantages + values) * fmask  # [B, T]
    return advantages, returns


def combined_advantage(
    adv_r: torch.Tensor, adv_c: torch.Tensor, lam: float, normalize: bool = True
) -> torch.Tensor:
    """Lagrangian advantage ``(A_r - lam * A_c) / (1 + lam)``.

    With normalize=False: ``A_r - lam * A_c``.  The 1/(1+lam) form keeps the
    advantage scale (and the effective KL weight) independent of lam.
    lam=0 gives the reward-only advantage.

    adv_r, adv_c: [B, T]; lam: float >= 0 (a 0-dim tensor is accepted)
    returns [B, T]
    """
    lam = float(lam)
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    adv = adv_r - lam * adv_c
    return adv / (1.0 + lam) if normalize else adv


# --------------------------------------------------------------------------- #
# losses
# --------------------------------------------------------------------------- #
def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    reduction: str = "seq",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss.

    ``ratio_t = exp(logp_t - old_logp_t)``
    ``L = - reduce( min(ratio_t * A_t, clip(ratio_t, 1-eps, 1+eps) * A_t) )``

    reduce is ``masked_seq_mean`` ("seq", safe-rlhf) or ``masked_mean``
    ("token").  Stats are detached 0-dim tensors, token-level masked means:

    * clipfrac:   fraction of tokens with ``|ratio - 1| > eps``
    * approx_kl:  k3 estimate of KL(old || new): ``(ratio - 1) - log ratio``
    * ratio_mean: mean ratio

    logp:     [B, T]  current policy log-probs (with grad)
    old_logp: [B, T]  rollout-time log-probs
    adv:      [B, T]  advantages (e.g. ``combined_advantage``)
    mask:     [B, T]
    returns (loss [], stats)
    """
    old_logp = old_logp.detach()
    adv = adv.detach()
    log_ratio = logp - old_logp  # [B, T]
    ratio = torch.exp(log_ratio)  # [B, T]
    surr = ratio * adv  # [B, T]
    surr_clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv  # [B, T]
    loss = -masked_reduce(torch.minimum(surr, surr_clipped), mask, reduction)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean(((ratio - 1.0).abs() > clip_eps).to(ratio.dtype), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float | None,
    reduction: str = "seq",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped critic loss.

    ``V_clip = clip(V, V_old - c, V_old + c)``
    ``L = 0.5 * reduce( max((V - G)^2, (V_clip - G)^2) )``

    ``clip_range=None`` gives the plain ``0.5 * reduce((V - G)^2)``.
    Stats: ``vf_clipfrac`` = token fraction where the clipped term is the
    strictly larger one (detached 0-dim tensor).

    values:     [B, T]  current critic values (with grad)
    old_values: [B, T]  rollout-time values
    returns:    [B, T]  GAE returns
    mask:       [B, T]
    returns (loss [], stats)
    """
    old_values = old_values.detach()
    returns = returns.detach()
    err = (values - returns) ** 2  # [B, T]
    if clip_range is None:
        err_clipped = err
    else:
        v_clip = old_values + (values - old_values).clamp(-clip_range, clip_range)  # [B, T]
        err_clipped = (v_clip - returns) ** 2  # [B, T]
    loss = 0.5 * masked_reduce(torch.maximum(err, err_clipped), mask, reduction)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((err_clipped > err).to(err.dtype), mask)}
    return loss, stats
