"""Preference losses of the reward and cost models (Safe RLHF, Dai et al. 2023, §3 / eq. 5-6).

Conventions: ``r_*`` are reward end scores (higher = more helpful); ``c_*`` are cost end scores
(higher = more harmful, c > 0 unsafe, c < 0 safe). ``cost_sign`` is +1 for a response labelled
unsafe, -1 for safe, 0 when the label is unknown (its sign term then drops out).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(better: torch.Tensor, worse: torch.Tensor, reg: float = 0.0):
    """Sequence-wise Bradley-Terry loss.

    better, worse: [B] end scores of the preferred / dispreferred response.
    L = mean_i[-log sigmoid(better_i - worse_i)] + reg * mean([better; worse]^2)
    Returns (loss, accuracy) with accuracy = mean(better > worse).
    """
    loss = -F.logsigmoid(better - worse).mean()
    if reg:
        loss = loss + reg * torch.cat([better, worse]).square().mean()
    return loss, (better > worse).float().mean()


def cost_loss(safer: torch.Tensor, unsafer: torch.Tensor, safer_sign: torch.Tensor, unsafer_sign: torch.Tensor,
              sign_weight: float = 1.0, reg: float = 0.0):
    """Safe RLHF cost-model loss, sequence-wise.

    safer, unsafer:            [B] cost end scores of the less / more harmful response
    safer_sign, unsafer_sign:  [B] in {+1 (unsafe), -1 (safe), 0 (unknown)}
    L = mean_i[ -log sig(c_unsafer - c_safer)
                - w * ( log sig(s_safer * c_safer) + log sig(s_unsafer * c_unsafer) ) ] + reg * mean(c^2)
    where a term with sign 0 contributes nothing. Returns (loss, stats) with the ranking accuracy
    mean(c_unsafer > c_safer) and the sign accuracy over responses whose label is known.
    """
    rank = -F.logsigmoid(unsafer - safer)
    sign = -(F.logsigmoid(safer_sign * safer) * safer_sign.abs() + F.logsigmoid(unsafer_sign * unsafer) * unsafer_sign.abs())
    loss = (rank + sign_weight * sign).mean()
    if reg:
        loss = loss + reg * torch.cat([safer, unsafer]).square().mean()
    known = torch.cat([safer_sign, unsafer_sign]).abs()
    correct = (torch.cat([safer_sign * safer, unsafer_sign * unsafer]) > 0).float() * known
    stats = {"accuracy": (unsafer > safer).float().mean(),
             "sign_accuracy": correct.sum() / known.sum().clamp(min=1), "sign_count": known.sum()}
    return loss, stats


def _span_scores(scores: torch.Tensor, start: torch.Tensor, stop: torch.Tensor, own_end: torch.Tensor):
    """Per-token scores on [start, stop] with positions past a sequence's own EOS reading its EOS score.

    scores [B, L]; start, stop, own_end [B]  ->  (span [B, L], mask [B, L])
    """
    L = scores.shape[1]
    pos = torch.arange(L, device=scores.device)[None, :]                       # [1, L]
    mask = (pos >= start[:, None]) & (pos <= stop[:, None])                    # [B, L]
    idx = torch.minimum(pos.expand_as(scores), own_end[:, None])               # [B, L]
    return scores.gather(1, idx), mask.float()


def token_wise_terms(better_scores: torch.Tensor, worse_scores: torch.Tensor, better_end: torch.Tensor,
                     worse_end: torch.Tensor, diverge: torch.Tensor):
    """Aligned per-token scores for the token-wise losses (Safe RLHF's ``token-wise`` option).

    better_scores, worse_scores [B, L] (padded to one length); *_end [B] EOS positions;
    diverge [B] first position where the two token sequences differ.
    Returns (b [B, L], w [B, L], mask [B, L]) over t in [diverge, max(end_b, end_w)]; beyond its
    own EOS a sequence contributes its EOS score (safe-rlhf reads padding scores there).
    """
    stop = torch.maximum(better_end, worse_end)
    b, mask = _span_scores(better_scores, diverge, stop, better_end)
    w, _ = _span_scores(worse_scores, diverge, stop, worse_end)
    return b, w, mask


def token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-pair mean over masked tokens, then batch mean.   x, mask [B, L] -> scalar"""
    return ((x * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


def token_wise_bt_loss(b: torch.Tensor, w: torch.Tensor, mask: torch.Tensor, b_end: torch.Tensor, w_end: torch.Tensor, reg: float = 0.0):
    """L = mean_i mean_{t in span_i} -log sig(b_t - w_t) + reg * mean(end scores^2); accuracy on end scores."""
    loss = token_mean(-F.logsigmoid(b - w), mask)
    if reg:
        loss = loss + reg * torch.cat([b_end, w_end]).square().mean()
    return loss, (b_end > w_end).float().mean()


def token_wise_cost_loss(safer: torch.Tensor, unsafer: torch.Tensor, mask: torch.Tensor, safer_sign: torch.Tensor,
                         unsafer_sign: torch.Tensor, safer_end: torch.Tensor, unsafer_end: torch.Tensor,
                         sign_weight: float = 1.0, reg: float = 0.0):
    """The cost loss with each of its three terms averaged over the span's tokens (safer/unsafer [B, L])."""
    s_s, s_u = safer_sign[:, None], unsafer_sign[:, None]
    per_token = -F.logsigmoid(unsafer - safer) - sign_weight * (
        F.logsigmoid(s_s * safer) * s_s.abs() + F.logsigmoid(s_u * unsafer) * s_u.abs())
    loss = token_mean(per_token, mask)
    if reg:
        loss = loss + reg * torch.cat([safer_end, unsafer_end]).square().mean()
    _, stats = cost_loss(safer_end, unsafer_end, safer_sign, unsafer_sign)
    return loss, stats


def expected_calibration_error(prob: torch.Tensor, label: torch.Tensor, bins: int = 10):
    """ECE of predicted P(unsafe) against 0/1 labels with equal-width bins.

    prob, label: [N]. Returns (ece, rows) with rows = [(bin_lo, bin_hi, count, mean_prob, frac_unsafe)].
    """
    edges = torch.linspace(0, 1, bins + 1)
    ece, rows, n = 0.0, [], max(len(prob), 1)
    for i in range(bins):
        lo, hi = edges[i].item(), edges[i + 1].item()
        in_bin = (prob >= lo) & ((prob < hi) if i < bins - 1 else (prob <= hi))
        k = int(in_bin.sum())
        if k:
            conf, acc = prob[in_bin].mean().item(), label[in_bin].float().mean().item()
            ece += k / n * abs(conf - acc)
            rows.append((lo, hi, k, conf, acc))
        else:
            rows.append((lo, hi, 0, float("nan"), float("nan")))
    return ece, rows
