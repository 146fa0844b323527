"""Sampling responses from a policy, and scoring texts with a reward/cost model.

Shared by ppo-lag (rollouts), safety-test and eval. Prompts are left-padded for generation;
response tensors are response-only and right-padded, with a mask that covers the tokens up to
and including the first EOS (a response that hit max_new_tokens has no EOS: ``eos_hit`` False).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from safealign.data.encode import encode
from safealign.data.templates import effective_template, format_prompt, format_response


@dataclass
class Rollout:
    prompt_ids: torch.Tensor       # [B, P] left-padded prompts
    prompt_mask: torch.Tensor      # [B, P]
    response_ids: torch.Tensor     # [B, T] right-padded with pad_token_id after the first EOS
    response_mask: torch.Tensor    # [B, T] 1 on generated tokens up to and including the first EOS
    eos_hit: torch.Tensor          # [B] bool: the response ended with EOS
    logp: torch.Tensor | None = None       # [B, T] log-prob of each sampled token under the sampling model's raw logits (with_logprobs)
    entropy: torch.Tensor | None = None    # [B, T] entropy of those logits (with_logprobs)

    @property
    def sequences(self) -> torch.Tensor:          # [B, P + T]
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:     # [B, P + T]
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)


def pad(seqs: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token lists to one length -> (ids [B, L], mask [B, L])."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "right":
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        else:
            ids[i, L - len(s):] = torch.tensor(s)
            mask[i, L - len(s):] = 1
    return ids, mask


def encode_prompts(tok, prompts: list, template: str, max_prompt_tokens: int = 0) -> list[list[int]]:
    """Token ids of formatted prompts (left-truncated to max_prompt_tokens when > 0)."""
    template = effective_template(template, tok)
    out = []
    for p in prompts:
        ids = tok(format_prompt(p, template, tok), add_special_tokens=True)["input_ids"]
        if ids and ids[-1] == tok.eos_token_id:
            ids = ids[:-1]
        out.append(ids[-max_prompt_tokens:] if max_prompt_tokens else ids)
    return out


def response_mask_from_ids(response_ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask up to and including the first EOS.   response_ids [B, T] -> (mask [B, T], eos_hit [B])"""
    is_eos = response_ids == eos_id                                           # [B, T]
    eos_hit = is_eos.any(dim=1)                                               # [B]
    first = torch.where(eos_hit, is_eos.float().argmax(dim=1), torch.full_like(eos_hit, response_ids.shape[1] - 1, dtype=torch.long))
    pos = torch.arange(response_ids.shape[1], device=response_ids.device)[None, :]
    return (pos <= first[:, None]).long(), eos_hit


@torch.no_grad()
def sample(model, tok, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float = 1.0,
           top_p: float = 1.0, synced_gpus: bool = False, with_logprobs: bool = False) -> Rollout:
    """Sample one response per prompt (seed the global torch RNG beforehand for reproducibility).

    ``with_logprobs``: also the log-prob and entropy of every sampled token under the model's raw
    logits (before temperature and top-p), from the decoding steps themselves: what a forward pass
    of the model over prompt + response would give (up to float rounding), without that pass."""
    device = next(model.parameters()).device
    ids, mask = pad(prompt_ids, tok.pad_token_id, side="left")
    ids, mask = ids.to(device), mask.to(device)
    greedy = temperature <= 0
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=not greedy,
                         temperature=None if greedy else temperature, top_p=None if greedy else top_p, top_k=None if greedy else 0,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, synced_gpus=synced_gpus,
                         output_logits=with_logprobs, return_dict_in_generate=with_logprobs)
    seqs = out.sequences if with_logprobs else out
    response = seqs[:, ids.shape[1]:]
    logp = entropy = None
    if response.shape[1] == 0:
        response = torch.full((ids.shape[0], 1), tok.eos_token_id, device=device)
    elif with_logprobs:
        from safealign.algorithms import rl as RL

        logits = torch.stack(out.logits, dim=1)                                 # [B, T, V] raw logits of each decoding step
        logp, entropy = RL.logprobs_from_logits(logits, response), RL.entropy_from_logits(logits)
        del logits
    rmask, eos_hit = response_mask_from_ids(response, tok.eos_token_id)
    response = torch.where(rmask.bool(), response, torch.full_like(response, tok.pad_token_id))
    return Rollout(ids, mask, response, rmask, eos_hit, logp, entropy)


def decode_responses(tok, rollout: Rollout) -> list[str]:
    texts = []
    for ids, m, hit in zip(rollout.response_ids, rollout.response_mask, rollout.eos_hit):
        n = int(m.sum()) - int(bool(hit))  # drop the EOS itself
        texts.append(tok.decode(ids[:n].tolist(), skip_special_tokens=True).strip())
    return texts


@torch.no_grad()
def score_texts(scorer, tok, prompts: list, responses: list[str], *, template: str, max_length: int = 512,
                batch_size: int = 32) -> torch.Tensor:
    """End scores [N] of (prompt, response) texts under a TokenScorer, each sequence ending in EOS."""
    device = next(scorer.parameters()).device
    template = effective_template(template, tok)
    scores = []
    for i in range(0, len(responses), batch_size):
        seqs = [encode(tok, format_prompt(p, template, tok), format_response(r, template) if r.strip() else "", max_length).ids
                for p, r in zip(prompts[i:i + batch_size], responses[i:i + batch_size])]
        ids, mask = pad(seqs, tok.pad_token_id)
        _, end, _ = scorer(ids.to(device), mask.to(device))
        scores.append(end.float().cpu())
    return torch.cat(scores) if scores else torch.zeros(0)


def load_policy(path: str, dtype: str = "auto", device: str | None = None):
    """(model, tokenizer) of a saved policy for inference, in eval mode."""
    from safealign.models.loading import load_causal_lm, load_tokenizer

    tok = load_tokenizer(path)
    model = load_causal_lm(path, tok, dtype=dtype).eval()
    if device:
        model.to(device)
    return model, tok


def load_scorer(path: str, dtype: str = "auto", device: str | None = None):
    """(TokenScorer, tokenizer) of a saved reward/cost model for inference, in eval mode."""
    from safealign.models.loading import load_score_model, load_tokenizer
    from safealign.models.score import TokenScorer

    tok = load_tokenizer(path)
    scorer = TokenScorer(load_score_model(path, tok, dtype=dtype, head="trained")).eval()
    if device:
        scorer.to(device)
    return scorer, tok
