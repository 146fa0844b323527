"""Score models (reward, cost, critic): a backbone + a linear head that scores every token.

The end score of a sequence is the score at its last attended token, which the data layer makes
the appended EOS. The wrapped model is a plain ``*ForSequenceClassification`` so a saved model
loads with ``AutoModelForSequenceClassification`` and its pooled logit equals our end score.
"""

from __future__ import annotations

import torch
from torch import nn


def _base(model):
    """The transformers model under a peft wrapper (LoRA layers stay active inside it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def score_head(model) -> nn.Module:
    base = _base(model)
    for name in ("score", "classifier"):
        head = getattr(base, name, None)
        if isinstance(head, nn.Module):
            return head
    raise ValueError(f"{type(base).__name__} has no 'score' head; use a decoder-only architecture (Llama, Qwen2, Mistral, GPT-2, ...)")


def backbone(model) -> nn.Module:
    base = _base(model)
    return getattr(base, base.base_model_prefix)


def end_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended token of each row.   attention_mask [B, L] -> [B]"""
    L = attention_mask.shape[1]
    positions = torch.arange(L, device=attention_mask.device).expand_as(attention_mask)
    return (positions * attention_mask.long()).argmax(dim=-1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over attended tokens only (correct for left and right padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def causal_suffices(attention_mask: torch.Tensor) -> bool:
    """True when every row is real tokens then padding (right padding, or none). Causal attention alone
    then gives every real token exactly the keys the mask would (padding comes after it), so the
    backbone may run without a mask: the kernel's causal path, and no [B, 1, L, L] mask built per
    forward. Padded positions' outputs change, and nothing reads them.   attention_mask [B, L]
    (One reduction, so one host sync per forward on an accelerator.)"""
    return bool((attention_mask[:, :1].bool() & (attention_mask[:, 1:] <= attention_mask[:, :-1]).all(-1, keepdim=True)).all())


def attention_inputs(attention_mask: torch.Tensor) -> dict:
    """The mask and positions to run a model with (every forward over padded rows takes them from here):
    none when causal attention suffices (positions 0..L-1 are then every row's own), else the mask and
    positions counted over attended tokens (as generate() counts them for left-padded prompts)."""
    if causal_suffices(attention_mask):
        return {}
    return {"attention_mask": attention_mask, "position_ids": position_ids_from_mask(attention_mask)}


class TokenScorer(nn.Module):
    """forward(input_ids [B,L], attention_mask [B,L]) -> (scores [B,L] fp32, end_scores [B], end_index [B]).

    A module (not a function) so DDP/DeepSpeed wrap it and gradients synchronise.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix_ids: torch.Tensor | None = None,
                prefix_mask: torch.Tensor | None = None):
        """With ``prefix_ids`` [B', Lp] (right- or left-padded) and its mask: ``input_ids`` [k*B', L] are continuations
        of those prefixes (row j continues prefix j % B', right-padded), each prefix run once through the
        backbone and its keys/values shared by its continuations (chosen and rejected of a pair share their
        common start). Scores, end scores and end indices are then those of the continuation tokens; the
        end scores equal a forward over prefix + continuation (causal attention: a prefix does not see
        what follows it)."""
        bb = backbone(self.model)
        if prefix_ids is None:
            hidden = bb(input_ids=input_ids, **attention_inputs(attention_mask)).last_hidden_state             # [B, L, H]
        else:
            cache = bb(input_ids=prefix_ids, use_cache=True, **attention_inputs(prefix_mask)).past_key_values   # B' prefixes
            rows = torch.arange(input_ids.shape[0], device=input_ids.device) % prefix_ids.shape[0]          # [B] continuation -> prefix
            cache.reorder_cache(rows)                                                                       # differentiable index_select
            start = prefix_mask.long().sum(-1)[rows]                                                        # [B] prefix lengths
            full_mask = torch.cat([prefix_mask[rows], attention_mask], dim=1)                               # [B, Lp + L]
            positions = (start[:, None] + attention_mask.long().cumsum(-1) - 1).clamp(min=0)                # [B, L]
            hidden = bb(input_ids=input_ids, attention_mask=full_mask, position_ids=positions, past_key_values=cache,
                        use_cache=True).last_hidden_state                                                   # [B, L, H]
        scores = score_head(self.model)(hidden).squeeze(-1).float()                                            # [B, L]
        idx = end_index(attention_mask)                                                                        # [B]
        end_scores = scores.gather(1, idx[:, None]).squeeze(1)                                                 # [B]
        return scores, end_scores, idx
