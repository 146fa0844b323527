"""The maths of safe crowd skills (Lin & Brown 2026, on VPL, Poddar et al. 2024): pure tensor functions.

* VPL latent preference model: a posterior q(z | an annotator's labelled pairs) = N(mu, diag exp(logvar)),
  a learned diagonal Gaussian prior, a z-conditioned Bradley-Terry decoder; loss
  ``BCE + kl_weight(step) * KL(q || prior)`` with a cyclic cosine annealing of the KL weight.
* Skill policy: the contrastive preference loss (CPL; DPO when the reference terms are given and lambda 1).
* High-level policy: ``z = mu_prior + sigma_prior * 3 * tanh(u)`` (every z within 3 prior sigmas).

No I/O, no modules: every function is checked against hand-computed values in tests/test_skills.py.
"""

from __future__ import annotations

import hashlib
import math
import re

import torch
import torch.nn.functional as F

_WORD = re.compile(r"[a-z0-9]+")


def _bucket(word: str, dim: int) -> int:
    return int.from_bytes(hashlib.md5(word.encode()).digest()[:4], "little") % dim


def bow_features(texts: list[str], dim: int) -> torch.Tensor:
    """Binary hashed bag of words (lowercase word -> md5 bucket): a text feature every model here shares.

    texts: N strings -> [N, dim] float (1 where a word of the text hashes)."""
    out = torch.zeros(len(texts), dim)
    for i, t in enumerate(texts):
        for w in set(_WORD.findall(str(t).lower())):
            out[i, _bucket(w, dim)] = 1.0
    return out


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z = mu + exp(logvar / 2) * eps.   mu, logvar, eps [..., D] -> [..., D]"""
    return mu + torch.exp(0.5 * logvar) * eps


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor, prior_mu: torch.Tensor, prior_logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, e^logvar) || N(prior_mu, e^prior_logvar)) of diagonal Gaussians, summed over D.

    mu, logvar [..., D]; prior_* [D] (broadcast) -> [...]"""
    var, pvar = logvar.exp(), prior_logvar.exp()
    return 0.5 * (prior_logvar - logvar + (var + (mu - prior_mu) ** 2) / pvar - 1.0).sum(-1)


def bt_loss(r0: torch.Tensor, r1: torch.Tensor, label: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Bradley-Terry BCE: P(response 0 preferred) = sigmoid(r0 - r1); label 1 when response 0 was preferred.

    r0, r1, label (float 0/1), mask [...] -> mean over masked entries (scalar)"""
    nll = F.binary_cross_entropy_with_logits(r0 - r1, label.float(), reduction="none")
    if mask is None:
        return nll.mean()
    m = mask.float()
    return (nll * m).sum() / m.sum().clamp(min=1)


def cyclic_kl_weight(step: int, total_steps: int, cycles: int, beta: float, ramp: float = 0.5) -> float:
    """Cyclic annealing (Fu et al. 2019) of the KL weight: each of ``cycles`` equal cycles rises from 0 to
    ``beta`` along half a cosine over its first ``ramp`` fraction, then stays at ``beta``. cycles 0: beta always."""
    if cycles <= 0 or total_steps <= 0:
        return float(beta)
    period = total_steps / cycles
    t = (step % period) / period                          # position in the cycle, [0, 1)
    if t >= ramp:
        return float(beta)
    return float(beta) * 0.5 * (1.0 - math.cos(math.pi * t / ramp))


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean of ``x`` over ``dim`` where mask is 1.   x [..., C, H] (dim -2), mask [..., C] -> [..., H]"""
    m = mask.float().unsqueeze(-1)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1.0)


def cpl_loss(logp_w: torch.Tensor, logp_l: torch.Tensor, beta: float, lam: float = 1.0,
             ref_w: torch.Tensor | None = None, ref_l: torch.Tensor | None = None) -> torch.Tensor:
    """Contrastive preference loss, per pair: -log sigmoid(beta * A_w - lam * beta * A_l).

    A = log pi(y | x, z) - log pi_ref(y | x) when the reference log-probabilities are given (lam 1: DPO),
    else A = log pi(y | x, z) (CPL with the advantage alpha * log pi; lam < 1 is the conservative variant).
    logp_w, logp_l (and ref_*) [B] summed response log-probabilities -> [B]"""
    a_w = logp_w - (ref_w if ref_w is not None else 0.0)
    a_l = logp_l - (ref_l if ref_l is not None else 0.0)
    return -F.logsigmoid(beta * a_w - lam * beta * a_l)


def squash_to_prior(u: torch.Tensor, prior_mu: torch.Tensor, prior_sigma: torch.Tensor, scale: float = 3.0) -> torch.Tensor:
    """The high-level action u -> latent z = mu_prior + sigma_prior * scale * tanh(u): always within
    ``scale`` prior standard deviations, i.e. inside the skill space the crowd spans.   u [..., D] -> [..., D]"""
    return prior_mu + prior_sigma * scale * torch.tanh(u)


def gaussian_log_prob(u: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log N(u; mean, diag exp(log_std)^2), summed over D.   u, mean [..., D], log_std [D] -> [...]"""
    return (-0.5 * ((u - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
