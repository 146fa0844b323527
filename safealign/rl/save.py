"""Saving the trained policy of an RL run (the actor only: critics are training state) and checking
the saved files with plain transformers (models.export, the mechanism every stage uses)."""

from __future__ import annotations

from pathlib import Path

import torch

from safealign.models.export import live_outputs, reload_check, write_model
from safealign.rl.roles import ACTOR, Learner


def save_policy(acc, learner, tok, out: Path, cfg) -> dict:
    """The policy in HF format at the top of ``out`` (LoRA: the actor's adapter under adapter/ and a
    merged copy), installed atomically (temp dir + rename). Collective: every process calls it."""
    from safealign.models.loading import load_causal_lm
    from safealign.stages.trainer import save_collectively, strip_prefix

    def write(tmp: Path, state: dict) -> dict:
        actor = acc.unwrap_model(learner).actor
        return write_model(tmp, actor, tok, strip_prefix(state, "actor."), lora=bool(cfg.lora_r), adapter=ACTOR,
                           base_loader=lambda: load_causal_lm(cfg.model, tok, dtype="fp32", revision=cfg.revision))[0]

    return save_collectively(acc, learner, tok, out, write, tmp_name=".tmp-policy")


def policy_probe(exp, n: int = 8) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(ids [n, P+T], mask, the first prompt's tokens) of a rollout: what the reload check compares on."""
    ids, attn = exp.seq[:n].cpu(), exp.attn[:n].cpu()
    prompt = ids[0, :exp.P][attn[0, :exp.P].bool()].tolist()
    return ids, attn, prompt


@torch.no_grad()
def live_policy_logits(learner_u: Learner, exp, zero3: bool) -> torch.Tensor | None:
    """The trained actor's logits on the probe (main process; None under ZeRO-3, where it holds a shard)."""
    if zero3:
        return None
    ids, attn, _ = policy_probe(exp)
    learner_u.eval()
    return live_outputs(learner_u.policy(), "causal", ids, attn)


def verify_policy(out: Path, live: torch.Tensor | None, tok, exp) -> dict:
    """Reload the saved policy with plain AutoModelForCausalLM: it generates, and its logits equal the
    trained actor's on the probe. Main process only."""
    ids, attn, prompt = policy_probe(exp)
    return reload_check(out, "causal", live, ids, attn, prompt=prompt, tok=tok)
