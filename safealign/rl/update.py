"""The policy update (step 6): epochs x minibatches x gradient-accumulation micro-batches over one
rollout, one backward per micro-batch through the whole Learner (actor + critics):

    loss = policy loss (the algorithm's, from algorithms.policy_losses)
         + kl_coeff * KL(pi || pi_ref)      when the KL sits in the loss (GRPO)
         + sum over critics of the clipped value loss
         + ptx_coeff * language-modelling loss on SFT data (optional)
"""

from __future__ import annotations

import torch

from safealign.algorithms import policy_losses as PL
from safealign.algorithms import rl as RL
from safealign.runtime.seeds import SALT_MINIBATCH, sample_seed


def values_from_first_forward(cfg, critics) -> bool:
    """Whether the critics' rollout values can come from the update's first forward instead of a
    forward of their own in the score phase: with one minibatch of one micro-batch the first forward
    of the update runs the critics over the whole rollout with the weights of the rollout (no
    optimizer step yet), so its values, detached, *are* the old values (dropout is off everywhere)."""
    return bool(critics) and cfg.minibatches == 1 and cfg.grad_accum == 1


def policy_update(acc, learner, optimizer, params: tuple[list, list], exp, advantage: torch.Tensor | None, returns: dict | None, cfg, step: int,
                  ptx_for, *, policy_loss: str, kl_loss: float, kl_kind: str, finish=None) -> tuple[dict, torch.Tensor, dict]:
    """cfg.ppo_epochs passes over the rollout in cfg.minibatches minibatches (each split into
    cfg.grad_accum micro-batches). ``kl_loss``: the KL-term coefficient (0 when the KL is in the
    reward). Returns (the mean of each statistic over the micro-batches, advantage, returns).

    ``finish`` (with advantage and returns None; :func:`values_from_first_forward` must hold):
    ``finish({critic: old values [B, T]}) -> (advantage, returns)``, called with the detached values
    of the first forward, which then continues as the first update (steps 4-5 of the RL step run
    between that forward and its backward: the same numbers, one forward less per critic)."""
    loss_fn = PL.get(policy_loss).fn
    B = exp.seq.shape[0]
    mb = B // cfg.minibatches
    micro = mb // cfg.grad_accum
    gen = torch.Generator().manual_seed(sample_seed(cfg.seed, step, acc.process_index, SALT_MINIBATCH))
    stats: dict[str, list[float]] = {}
    learner.train()
    for epoch in range(cfg.ppo_epochs):
        perm = torch.randperm(B, generator=gen)
        for m_i in range(cfg.minibatches):
            for k_i in range(cfg.grad_accum):
                part = perm[m_i * mb + k_i * micro: m_i * mb + (k_i + 1) * micro].to(exp.seq.device)
                update = ((step * cfg.ppo_epochs + epoch) * cfg.minibatches + m_i) * cfg.grad_accum + k_i
                ptx = ptx_for(update)
                mask = exp.mask[part]                                                                   # [b, T]
                with acc.accumulate(learner):
                    new = learner(exp.seq[part], exp.attn[part], exp.P, ptx=ptx)
                    if advantage is None:      # the first forward gives the rollout's values (one micro-batch: part = the whole rollout)
                        inverse = torch.argsort(part)
                        m = exp.mask.float()
                        advantage, returns = finish({name: new[f"values_{name}"].detach()[inverse].float() * m for name in learner_critics(learner)})
                    pg_loss, pg_stats = loss_fn(new["logp"], exp.old_logp[part], advantage[part], mask, clip_eps=cfg.clip_range_ratio)
                    loss, parts = pg_loss, {"policy_loss": pg_loss.detach(), **pg_stats}
                    if kl_loss > 0:
                        kl_term = PL.kl_penalty(new["logp"], exp.ref_logp[part], mask, kind=kl_kind)
                        loss = loss + kl_loss * kl_term
                        parts["kl_loss"] = kl_term.detach()
                    for name in returns:
                        v_loss, v_stats = RL.clipped_value_loss(new[f"values_{name}"], exp.old_values[name][part], returns[name][part],
                                                                mask, cfg.clip_range_value)
                        loss = loss + v_loss
                        parts.update({f"{name}_critic_loss": v_loss.detach(), f"{name}_vf_clipfrac": v_stats["vf_clipfrac"]})
                    if ptx is not None:
                        loss = loss + cfg.ptx_coeff * new["ptx_loss"]
                        parts["ptx_loss"] = new["ptx_loss"].detach()
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.max_grad_norm:
                        for which, group in zip(("actor", "critic"), params):
                            if not group:
                                continue
                            norm = acc.clip_grad_norm_(group, cfg.max_grad_norm)
                            if norm is not None:
                                parts[f"{which}_grad_norm"] = norm
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                for key, v in parts.items():
                    stats.setdefault(key, []).append(float(v))
    return {k: sum(v) / len(v) for k, v in stats.items()}, advantage, returns


def learner_critics(learner) -> list[str]:
    """Critic names of a (possibly DDP/DeepSpeed-wrapped) Learner."""
    return list(getattr(learner, "module", learner).critics)
