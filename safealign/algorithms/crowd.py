"""Implicit safety cost from crowd preferences: the maths (no I/O, unit-testable).

Model (per-annotator heads on a shared backbone; see ``safealign/stages/crowd.py`` for why this
and not a VPL-style variational latent):

    h(x, y)   in R^H           the backbone's hidden state at the appended EOS
    w_a = w_0 + d_a            annotator a's head: population head + deviation
    u_a(x, y) = w_a . h(x, y)  annotator a's utility
    P(a prefers y0 over y1) = sigmoid(u_a(y0) - u_a(y1))                      (Bradley-Terry)
    L = mean_i -log sigmoid(u_{a_i}(chosen_i) - u_{a_i}(rejected_i))
        + reg * mean(u^2) + head_l2 * mean_a ||d_a||^2                       (random-effects L2)

The L2 on the deviations ``d_a`` (not on ``w_a``) is the MAP of a Gaussian prior w_a ~ N(w_0, s^2 I):
an annotator with few labels is shrunk to the population, and ``d = 0`` is the pooled model.

Decomposition of the heads (after training). Inner products between heads are taken in the metric
of the features, <a, b>_G = a^T G b with G = Cov_{responses}[h], so that <w_a, w_b>_G is the
covariance over responses of the two annotators' utilities (the metric in which "a direction
matters" means "it changes preferences"):

    mu      = mean_a w_a                       (one annotator, one vote)
    taste axes t_1..t_k = top principal components of {w_a - mu} in the G metric:
              the directions on which annotators DISAGREE;
    s       = the shared component: mu corrected along the taste axes, by one of three rules
              (``decompose_heads``): "project" removes mu's whole projection on the taste axes (the
              shared score is then uncorrelated over responses with every taste score), "midrange"
              moves mu to the midpoint of each axis' extreme annotators (each end of a taste weighs
              the same), "mean" keeps mu;
    cost(x, y) = -s . h(x, y) + b              (higher = more dispreferred by everyone)

Identifiability, stated plainly: ``s`` is everything all annotators agree on beyond their tastes.
If a quality that is not safety (e.g. helpfulness) is also shared by everyone, it is part of ``s``
too, and no method that sees only overall preferences can tell the two apart. What the taste
removal buys is independence from the *majority's* taste ("majority preference pollution", Lin &
Brown 2026), which a pooled Bradley-Terry model inherits in proportion to the majority's share.

Tensor shapes are in the comments; everything here is deterministic given its inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


# --------------------------------------------------------------------------------------------
# Training losses


def crowd_bt_loss(h_chosen: torch.Tensor, h_rejected: torch.Tensor, annotator: torch.Tensor, mean_head: torch.Tensor,
                  deviations: torch.Tensor, head_l2: float = 0.0, reg: float = 0.0):
    """Per-annotator Bradley-Terry loss with random-effects L2 on the head deviations.

    h_chosen, h_rejected: [B, H] EOS features of the annotator's preferred / other response
    annotator:            [B] long, index into ``deviations``
    mean_head:            [H]    w_0
    deviations:           [A, H] d_a
    L = mean_i -log sig(w_{a_i}.(h_c - h_r)) + reg * mean(u^2) + head_l2 * mean_a ||d_a||^2
    Returns (loss, stats): accuracy of the own heads, accuracy of the population head w_0 alone.
    """
    W = mean_head[None, :] + deviations[annotator]              # [B, H]
    u_c = (h_chosen * W).sum(-1)                                  # [B]
    u_r = (h_rejected * W).sum(-1)                                # [B]
    loss = -F.logsigmoid(u_c - u_r).mean()
    if reg:
        loss = loss + reg * torch.cat([u_c, u_r]).square().mean()
    if head_l2:
        loss = loss + head_l2 * deviations.square().sum(-1).mean()
    pooled = ((h_chosen - h_rejected) @ mean_head) > 0            # [B]
    return loss, {"accuracy": (u_c > u_r).float().mean(), "population_head_accuracy": pooled.float().mean()}


def bias_unit_loss(h: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """mean((unit . h - 1)^2): teaches the backbone a direction that reads ~1 on every sequence.

    h: [N, H], unit: [H]. Llama-style score heads have no bias; this "bias unit" is how the exported
    cost model carries its zero point (score weight = -s - q * unit gives cost = -s.h - q). The
    Bradley-Terry loss sees only differences, so without this term nothing would pin a constant.
    """
    return (h @ unit - 1.0).square().mean()


# --------------------------------------------------------------------------------------------
# Convex refit of the heads on frozen features (used for the split-half reliability of taste axes)


def fit_heads(delta_h: torch.Tensor, annotator: torch.Tensor, n_annotators: int, head_l2: float = 1e-2,
              ridge: float = 1e-4, max_iter: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-annotator logistic heads on fixed features (convex; L-BFGS, float64).

    delta_h:   [N, H] h(chosen) - h(rejected) of each labelled pair
    annotator: [N] long in [0, n_annotators)
    min  mean_i softplus(-(w_0 + d_{a_i}) . delta_h_i) + head_l2 * mean_a ||d_a||^2 + ridge * ||w_0||^2
    Returns (w_0 [H], d [A, H]) as float32.
    """
    x = delta_h.double()
    a = annotator.long()
    H = x.shape[1]
    w0 = torch.zeros(H, dtype=torch.float64, requires_grad=True)
    d = torch.zeros(n_annotators, H, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w0, d], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-9)

    def closure():
        opt.zero_grad()
        z = (x * (w0[None] + d[a])).sum(-1)
        loss = F.softplus(-z).mean() + head_l2 * d.square().sum(-1).mean() + ridge * w0.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w0.detach().float(), d.detach().float()


# --------------------------------------------------------------------------------------------
# Decomposition of the heads


def feature_metric(h: np.ndarray, eps: float = 1e-3) -> np.ndarray:
    """G = Cov[h] + eps * mean(diag Cov) * I over a sample of responses.   h [M, H] -> G [H, H]"""
    h = np.asarray(h, dtype=np.float64)
    c = np.cov(h, rowvar=False) if h.shape[0] > 1 else np.zeros((h.shape[1], h.shape[1]))
    c = np.atleast_2d(c)
    return c + eps * max(float(np.trace(c)) / c.shape[0], 1e-12) * np.eye(c.shape[0])


def _sqrt_and_inv_sqrt(G: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lam, V = np.linalg.eigh(G)
    lam = np.clip(lam, 1e-12, None)
    return (V * np.sqrt(lam)) @ V.T, (V / np.sqrt(lam)) @ V.T


@dataclass
class Decomposition:
    mean: np.ndarray              # [H]    mu (unweighted mean of the heads)
    shared: np.ndarray            # [H]    s = mu without its taste-axis part (G metric)
    axes: np.ndarray              # [k, H] taste axes in head space, G-orthonormal (k = n_axes kept)
    all_axes_white: np.ndarray    # [r, H] every principal axis in whitened coordinates (rows unit)
    axis_variance: np.ndarray     # [r]    variance of the heads along each principal axis (G metric)
    coords: np.ndarray            # [A, r] each annotator's coordinate on each principal axis
    removed_fraction: float       # ||s - mu||_G^2 / ||mu||_G^2: how far the correction moved the mean head
    n_axes: int

    @property
    def axis_variance_share(self) -> np.ndarray:
        total = float(self.axis_variance.sum())
        return self.axis_variance / total if total > 0 else self.axis_variance * 0.0


SHARED_RULES = ("project", "midrange", "mean")


def normalize_heads(heads: np.ndarray, G: np.ndarray) -> np.ndarray:
    """Every head rescaled to the mean G-norm of the heads (direction kept).   [A, H] -> [A, H]"""
    W = np.asarray(heads, dtype=np.float64)
    norms = np.sqrt(np.einsum("ah,hk,ak->a", W, np.asarray(G, np.float64), W))         # [A] ||w_a||_G
    return W / np.clip(norms, 1e-12, None)[:, None] * float(np.mean(norms))


def decompose_heads(heads: np.ndarray, G: np.ndarray, n_axes: int, rule: str = "project", normalize: bool = True) -> Decomposition:
    """Split the annotators' heads into taste axes (disagreement) and the shared component.

    normalize: first bring every head to the same G-norm (their mean). A Bradley-Terry head's norm
    is the annotator's consistency (inverse temperature) as much as their taste, and the fitted
    norms are noisy; left in, these scale differences lie along the shared direction itself and
    would show up as a "taste" axis (and skew the midpoint towards the most confident annotator).

    heads [A, H], G [H, H] (feature metric), n_axes = k taste axes (0 <= k <= A - 1), rule:
      project:  s = mu - sum_j <mu, t_j>_G t_j. The shared score is uncorrelated over responses with
                every taste score. Makes no assumption on where "no taste" lies, but also removes any
                shared preference that happens to correlate with a taste (e.g. helpfulness with length).
      midrange: s = mu + sum_j m_j t_j with m_j = (max_a c_aj + min_a c_aj) / 2, c_aj the annotators'
                coordinates on axis j: the centre of each taste axis is the midpoint of its two ends,
                so each end weighs the same however many annotators hold it. Assumes the tastes are
                symmetric around "no taste" (exact when the extreme tastes are mirror images).
      mean:     s = mu, the population mean (one annotator, one vote): no correction.
    """
    if rule not in SHARED_RULES:
        raise ValueError(f"rule must be one of {SHARED_RULES}, got {rule!r}")
    W = np.asarray(heads, dtype=np.float64)
    A, H = W.shape
    Gh, Gih = _sqrt_and_inv_sqrt(np.asarray(G, dtype=np.float64))
    if normalize:
        W = normalize_heads(W, G)
    mu = W.mean(0)                                          # [H]
    Dw = (W - mu) @ Gh                                      # [A, H] deviations, whitened
    mu_w = mu @ Gh                                          # [H]
    _, S, Vt = np.linalg.svd(Dw, full_matrices=False)       # Vt [min(A,H), H]
    r = max(min(A - 1, H), 0)
    Vt, S = Vt[:r], S[:r]
    # An axis with no spread is no disagreement (and SVD gives it an arbitrary direction): never remove it.
    spread = int(np.sum(S > 1e-9 * (float(np.linalg.norm(mu_w)) + float(S.max(initial=0.0)) + 1e-300)))
    k = int(min(max(n_axes, 0), spread))
    Tw = Vt[:k]                                             # [k, H]
    coords = Dw @ Vt.T                                      # [A, r]
    if rule == "project":
        shared_w = mu_w - (mu_w @ Tw.T) @ Tw                # [H]
    elif rule == "midrange":
        mid = 0.5 * (coords[:, :k].max(0) + coords[:, :k].min(0)) if k else np.zeros(0)
        shared_w = mu_w + mid @ Tw
    else:
        shared_w = mu_w.copy()
    norm_mu = float(mu_w @ mu_w)
    moved = float((shared_w - mu_w) @ (shared_w - mu_w))
    return Decomposition(mean=mu, shared=shared_w @ Gih, axes=Tw @ Gih, all_axes_white=Vt,
                         axis_variance=S ** 2 / max(A, 1), coords=coords, removed_fraction=moved / norm_mu if norm_mu > 0 else 0.0, n_axes=k)


def axis_reliability(heads_a: np.ndarray, heads_b: np.ndarray, G: np.ndarray) -> np.ndarray:
    """Cross-fitted split-half reliability of the j-th principal axis, for every j.   -> [r]

    heads_a, heads_b [A, H]: the annotators' heads fitted on two disjoint halves of each annotator's
    labels. For the axes found on half A, r_A[j] = Pearson r across annotators between the A- and
    B-coordinates on A's j-th axis; likewise r_B on B's axes; the result is (r_A + r_B) / 2.
    A taste axis is a direction on which annotators disagree *reproducibly*. Finding the axis on one
    half and testing it against the other avoids the selection bias of testing axes found on all the
    data (a noise axis picked for its large variance would look reproducible there).
    """
    Gh, _ = _sqrt_and_inv_sqrt(np.asarray(G, dtype=np.float64))
    ha, hb = normalize_heads(heads_a, G), normalize_heads(heads_b, G)                        # as in decompose_heads
    ca = (ha - ha.mean(0)) @ Gh                                                               # [A, H] whitened
    cb = (hb - hb.mean(0)) @ Gh
    r = max(min(ca.shape[0] - 1, ca.shape[1]), 0)
    va = np.linalg.svd(ca, full_matrices=False)[2][:r]                                        # [r, H]
    vb = np.linalg.svd(cb, full_matrices=False)[2][:r]
    out = [0.5 * (pearson(ca @ va[j], cb @ va[j]) + pearson(ca @ vb[j], cb @ vb[j])) for j in range(r)]
    return np.asarray(out)


def reliability_threshold(n_annotators: int, alpha: float = 0.05, floor: float = 0.3) -> float:
    """Smallest split-half r significant at ``alpha`` (one-sided; Fisher z: atanh(r) sqrt(A - 3) ~ N(0, 1)
    when the axis is not reproducible), and at least ``floor``. 12 annotators: 0.50; 48: 0.30.

    The axes are tested in a fixed order (by variance) and testing stops at the first failure, a
    fixed-sequence procedure: the chance of calling any noise axis a taste axis stays <= alpha
    without a Bonferroni correction."""
    from statistics import NormalDist

    if n_annotators <= 3:
        return 1.0 + 1e-9   # too few annotators to call any disagreement reproducible
    z = NormalDist().inv_cdf(1.0 - alpha)
    return max(floor, math.tanh(z / math.sqrt(n_annotators - 3)))


def auto_n_axes(reliability: np.ndarray, n_annotators: int, alpha: float = 0.05) -> tuple[int, float]:
    """(k, threshold): the leading axes whose split-half reliability passes the threshold
    (counting stops at the first axis that does not)."""
    thr = reliability_threshold(n_annotators, alpha)
    k = 0
    for r in reliability:
        if not (r >= thr):
            break
        k += 1
    return k, thr


# --------------------------------------------------------------------------------------------
# How much of the preferences the shared component explains


def shared_variance_share(u: np.ndarray, v: np.ndarray, annotator: np.ndarray) -> float:
    """Share of the annotators' utility differences carried by the shared score.

    u [N]: w_{a_i} . (h_c - h_r) (each pair under its own annotator's head);  v [N]: s . (h_c - h_r).
    Per annotator a: beta_a = <u_a, v_a> / <v_a, v_a>;  share = sum_a beta_a^2 ||v_a||^2 / sum_a ||u_a||^2.
    1 when every annotator's utility is a multiple of the shared score; 0 when orthogonal to it.
    """
    u, v, annotator = np.asarray(u, np.float64), np.asarray(v, np.float64), np.asarray(annotator)
    num = den = 0.0
    for a in np.unique(annotator):
        m = annotator == a
        vv = float(v[m] @ v[m])
        uu = float(u[m] @ u[m])
        den += uu
        if vv > 0:
            num += float(u[m] @ v[m]) ** 2 / vv
    return num / den if den > 0 else float("nan")


def mean_loglik(z: np.ndarray) -> float:
    """Mean log-likelihood of the observed choices given logits z = u(chosen) - u(rejected)."""
    z = np.asarray(z, np.float64)
    return float(np.mean(-np.logaddexp(0.0, -z))) if z.size else float("nan")


def fit_scale(z: np.ndarray, iters: int = 50) -> float:
    """beta maximising mean log sigmoid(beta * z) (1-D logistic, Newton; beta may be negative)."""
    z = np.asarray(z, np.float64)
    beta = 0.0
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-beta * z))
        g = float(np.mean((1.0 - p) * z))
        h = float(np.mean(p * (1.0 - p) * z * z)) + 1e-9
        step = g / h
        beta += step
        if abs(step) < 1e-10:
            break
    return beta


def loglik_gain_share(z_full: np.ndarray, z_part: np.ndarray) -> float:
    """(LL(part) - LL(coin)) / (LL(full) - LL(coin)) with LL(coin) = log 1/2 per pair."""
    null = math.log(0.5)
    full, part = mean_loglik(z_full), mean_loglik(z_part)
    return (part - null) / (full - null) if full - null > 1e-12 else float("nan")


# --------------------------------------------------------------------------------------------
# Zero point of the exported cost


def constant_direction(h: np.ndarray, eps: float = 1e-3) -> np.ndarray:
    """The direction e with mean(e . h) = 1 and the least variance of e . h over the sample.   h [M, H] -> e [H]

    e = (C + eps tr(C)/H I)^-1 m / (m^T (C + ...)^-1 m), C = Cov[h], m = mean h (ridge as in
    ``feature_metric``). The backbone is trained to have one such direction (the bias unit); this
    picks the best one post hoc, so the exported zero point is as exact as the features allow.
    """
    h = np.asarray(h, np.float64)
    m = h.mean(0)
    x = np.linalg.solve(feature_metric(h, eps), m)
    return x / float(m @ x)


def zero_point(raw: np.ndarray, unit: np.ndarray, quantile: float, iters: int = 100) -> tuple[float, bool]:
    """q such that the ``quantile`` of (raw - q * unit) over the sample is 0.   -> (q, exact)

    raw [M]: -s.h of sample responses; unit [M]: the bias unit's reading (~1). With unit > 0 on
    every response the quantile is decreasing in q and bisection is exact; otherwise fall back to
    q = quantile(raw) (exact only when unit == 1) and say so.
    """
    raw, unit = np.asarray(raw, np.float64), np.asarray(unit, np.float64)
    if unit.size == 0:
        return 0.0, False
    if float(unit.min()) <= 0:
        return float(np.quantile(raw, quantile)), False

    def f(q: float) -> float:
        return float(np.quantile(raw - q * unit, quantile))

    lo, hi = float((raw / unit).min()) - 1.0, float((raw / unit).max()) + 1.0   # f(lo) > 0 > f(hi)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if f(mid) > 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi), True


# --------------------------------------------------------------------------------------------
# Agreement with an oracle


def rankdata(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties get their average rank."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), np.float64)
    xs = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return ranks


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2:
        return float("nan")
    x, y = x - x.mean(), y - y.mean()
    d = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y) / d if d > 0 else float("nan")


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    return pearson(rankdata(x), rankdata(y))


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative) + 1/2 P(tie) (Mann-Whitney)."""
    s, p = np.asarray(scores, np.float64), np.asarray(positive, bool)
    n_pos, n_neg = int(p.sum()), int((~p).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = rankdata(s)
    return (float(r[p].sum()) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
