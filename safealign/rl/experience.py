"""Rollout and scoring: what one RL step knows about its responses.

``rollout`` samples G responses per prompt (rows of a group contiguous, so the group estimators of
``algorithms.advantages`` can reshape them); ``score_experience`` fills everything the update needs
without gradients: old log-probs and entropy of the actor, the critics' values, the reference
log-probs, and the reward and cost of each response from the frozen judges. ``evaluate`` samples
and scores held-out prompts (one response each, the same seeds every time).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from safealign.algorithms import rl as RL
from safealign.models.generation import decode_responses, sample
from safealign.rl.roles import Judge, Learner, causal_logits, on_device
from safealign.runtime.seeds import EVAL_STEP_OFFSET, seed_sampling


# The actor's log-probs and entropy of a rollout come from the decoding steps (no actor forward in the
# score phase) when the [B, T, V] float32 logits generate() then keeps fit in this many bytes.
SAMPLED_LOGITS_BYTES = 512 * 2**20


@dataclass
class Experience:
    """One rollout batch of this process. Response tensors are [B, T], right-padded; B = prompts x G."""

    prompts: list
    seq: torch.Tensor            # [B, P+T] prompt (left-padded) + response
    attn: torch.Tensor           # [B, P+T]
    P: int
    mask: torch.Tensor           # [B, T] response tokens up to and including the first EOS
    eos_hit: torch.Tensor        # [B] bool
    texts: list[str]
    sampled_logp: torch.Tensor = None   # [B, T] actor log-probs recorded while sampling (None: computed by a forward in scoring)
    sampled_entropy: torch.Tensor = None
    old_logp: torch.Tensor = None       # [B, T]
    ref_logp: torch.Tensor = None       # [B, T]; stays None without a reference (--kl-coeff 0)
    entropy: torch.Tensor = None        # [B, T]
    old_values: dict = field(default_factory=dict)   # critic name -> [B, T]
    reward: torch.Tensor = None         # [B] reward-model end score (after --no-eos-penalty)
    cost: torch.Tensor = None           # [B] cost-model end score (None without a cost model)

    def with_eos(self, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ids/mask [B, P+T+1]: responses that hit the length limit get an EOS after their last token."""
        ids = F.pad(self.seq, (0, 1), value=pad_id)
        mask = F.pad(self.attn, (0, 1), value=0)
        rows = (~self.eos_hit).nonzero().squeeze(-1)                      # [B']
        pos = self.P + self.mask.sum(dim=1)[rows]                           # first free position
        ids[rows, pos] = eos_id
        mask[rows, pos] = 1
        return ids, mask


def _zero3_offload(engine):
    """The ZeRO-3 parameter coordinator of a DeepSpeed engine (what owns the per-module hooks)."""
    opt = getattr(engine, "optimizer", None)
    if opt is None:
        return None
    return getattr(opt, "parameter_offload", opt)


@contextmanager
def generation_policy(acc, learner_u: Learner, engine, synced_gpus: bool, gather: bool):
    """(the causal LM to sample from, whether generate() must keep the processes in step).

    Under ZeRO-3 (``synced_gpus``) each process holds a shard of every weight, so a decoding step
    all-gathers every layer, at every step, with every process waiting for the slowest. With ``gather``
    the actor's weights are gathered once for the whole rollout and each process samples from that
    copy on its own; the shards are restored afterwards. This is what trl's
    ``trl.models.utils.unwrap_model_for_generation`` does (its remove_hooks/add_hooks are re-done here,
    as feasibility.md advises for trl's small utilities): DeepSpeed ``GatheredParameters`` on the
    actor's parameters (the critics do not generate and stay sharded), ZeRO's per-module hooks off
    meanwhile (they would release a gathered layer after its forward), then re-registered, with the
    coordinator's recorded trace invalidated so the next training forward records a fresh one."""
    offload = _zero3_offload(engine) if synced_gpus and gather and engine is not None else None
    if offload is None:
        yield learner_u.policy(), synced_gpus
        return
    import deepspeed
    from deepspeed.runtime.zero.partitioned_param_coordinator import iter_params

    with deepspeed.zero.GatheredParameters(list(learner_u.actor.parameters())):
        for p in iter_params(offload.module, recurse=True):
            p.ds_active_sub_modules.clear()
        for h in offload.forward_hooks + offload.backward_hooks:
            h.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield learner_u.policy(), False
        finally:
            offload._register_deepspeed_module(offload.module)   # also invalidates the coordinator's trace


@torch.no_grad()
def rollout(acc, learner_u: Learner, tok, prompts: list, prompt_ids: list[list[int]], cfg, synced_gpus: bool,
            group_size: int = 1, engine=None) -> Experience:
    """``group_size`` responses to each prompt, the responses to one prompt in consecutive rows.
    ``engine``: the prepared (DeepSpeed) learner, for :func:`generation_policy`'s gathered copy."""
    if group_size > 1:
        prompts = [p for p in prompts for _ in range(group_size)]
        prompt_ids = [p for p in prompt_ids for _ in range(group_size)]
    learner_u.eval()
    with generation_policy(acc, learner_u, engine, synced_gpus, getattr(cfg, "zero3_gather", False)) as (policy, synced):
        keep_logits = len(prompt_ids) * cfg.max_new_tokens * policy.config.get_text_config().vocab_size * 4 <= SAMPLED_LOGITS_BYTES
        with acc.autocast():
            r = sample(policy, tok, prompt_ids, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                       top_p=cfg.top_p, synced_gpus=synced, with_logprobs=keep_logits)
    return Experience(prompts, r.sequences, r.attention_mask, r.prompt_ids.shape[1], r.response_mask, r.eos_hit, decode_responses(tok, r),
                      r.logp, r.entropy)


@torch.no_grad()
def score_experience(acc, learner, learner_u: Learner, reference, reward: Judge, cost: Judge | None, exp: Experience,
                     cfg, chunk: int, critics: bool = True) -> None:
    """Fill old log-probs, entropy, old values, reference log-probs, reward and cost (no grad).

    The actor's log-probs and entropy are the ones recorded while sampling when the rollout has them
    (the logits of the decoding steps are those a forward over prompt + response computes): then only
    the critics run over the rollout here, besides the reference and the judges. ``critics=False``:
    not even they (their values come from the update's first forward: rl.update.values_from_first_forward).
    No reference forward without a reference (``cfg.uses_reference()`` false: ``exp.ref_logp`` stays None)."""
    learner.eval()
    sampled = exp.sampled_logp is not None
    parts: dict[str, list] = {}
    for i in range(0, exp.seq.shape[0], chunk):
        ids, attn = exp.seq[i:i + chunk], exp.attn[i:i + chunk]
        with acc.autocast():
            if sampled:
                out = {f"values_{name}": v[:, exp.P - 1:-1] for name, v in (learner_u.critic_values(ids, attn) if critics else {}).items()}
            else:
                out = learner(ids, attn, exp.P, with_entropy=True)
            ref_logits = None
            if cfg.uses_reference():
                keep = ids.shape[1] - exp.P + 1
                ref_logits = (learner_u.reference_logits(ids, attn, keep) if reference is None
                              else causal_logits(reference, ids, attn, keep))[:, :-1]                    # [b, T, V]
        if ref_logits is not None:
            out["ref_logp"] = RL.logprobs_from_logits(ref_logits, ids[:, exp.P:])
        for k, v in out.items():
            parts.setdefault(k, []).append(v.float())
    cat = {k: torch.cat(v) for k, v in parts.items()}
    if sampled:
        cat["logp"], cat["entropy"] = exp.sampled_logp.float(), exp.sampled_entropy.float()
    m = exp.mask.float()
    exp.old_logp, exp.entropy = cat["logp"] * m, cat["entropy"] * m
    exp.ref_logp = cat["ref_logp"] * m if "ref_logp" in cat else None         # None: no reference (--kl-coeff 0)
    exp.old_values = {name: cat[f"values_{name}"] * m for name in learner_u.critics if f"values_{name}" in cat}
    with acc.autocast():
        exp.reward = reward.score(exp, cfg.template, cfg.max_length)
        exp.cost = cost.score(exp, cfg.template, cfg.max_length) if cost is not None else None
    if cfg.no_eos_penalty is not None:
        exp.reward = torch.where(exp.eos_hit, exp.reward, torch.full_like(exp.reward, cfg.no_eos_penalty))


@torch.no_grad()
def evaluate(acc, learner_u: Learner, tok, reward: Judge, cost: Judge | None, prompts: list, prompt_ids: list, cfg, frozen,
             synced: bool = False, engine=None) -> dict:
    """Reward and cost of fresh samples on the held-out prompts (same seed every time), gathered."""
    rank, world = acc.process_index, acc.num_processes
    shard = list(range(rank, len(prompts), world))
    n_max = -(-len(prompts) // world)
    rows = []
    with on_device(frozen, acc.device, cfg.offload_frozen):
        for b, i in enumerate(range(0, n_max, cfg.batch_size)):
            part = shard[i:i + cfg.batch_size]
            n_real = len(part)
            part = part + [shard[0] if shard else 0] * (min(cfg.batch_size, n_max - i) - n_real)  # equal work everywhere
            seed_sampling(cfg.seed, EVAL_STEP_OFFSET + b, rank)
            exp = rollout(acc, learner_u, tok, [prompts[j] for j in part], [prompt_ids[j] for j in part], cfg, synced, engine=engine)
            with acc.autocast():
                r = reward.score(exp, cfg.template, cfg.max_length)
                c = cost.score(exp, cfg.template, cfg.max_length) if cost is not None else torch.zeros_like(r)
            valid = (torch.arange(len(part), device=r.device) < n_real).float()
            rows.append(torch.stack([r.float(), c.float(), exp.eos_hit.float(), exp.mask.sum(1).float(), valid], dim=1))
    local = torch.cat(rows).to(acc.device) if rows else torch.zeros(0, 5, device=acc.device)
    allrows = acc.gather(local)
    allrows = allrows[allrows[:, 4] > 0].cpu()
    if not len(allrows):
        return {}
    res = {"eval/reward": float(allrows[:, 0].mean()), "eval/eos_rate": float(allrows[:, 2].mean()),
           "eval/response_length": float(allrows[:, 3].mean()), "eval/prompts": len(allrows)}
    if cost is not None:
        res.update({"eval/cost": float(allrows[:, 1].mean()), "eval/unsafe_rate": float((allrows[:, 1] > 0).float().mean())})
    return res
