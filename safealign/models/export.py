"""Saving a trained model, and checking the saved files with plain transformers: one mechanism for
every stage (sft, train-rm/train-cost, crowd, ppo-lag).

* :func:`write_model` writes the model into a staging directory: full weights as safetensors, or
  with LoRA the adapter under ``adapter/`` (with the tokenizer beside it) plus a merged copy at the
  top, merged from the *saved* adapter onto a freshly loaded base, so the adapter on disk is what the
  merged model was made from and the live model is left as it is.
* :func:`reload_check` reloads the installed directory with ``AutoModelForCausalLM`` or
  ``AutoModelForSequenceClassification`` and compares its outputs with the live model's on a probe
  batch (DESIGN.md: saved models load with plain transformers and give the same scores there).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from safealign.models.loading import local_load
from safealign.models.score import position_ids_from_mask

RELOAD_CHECK_MAX_BYTES = 1_000_000_000     # above this the reload check is skipped (it loads a second copy)
TOLERANCE = {"causal": 1e-3, "score": 1e-4}  # max |saved - live| on the probe: logits (causal LM), end scores (score model)


def write_model(tmp: Path, model, tok, state: dict | None, *, lora: bool, base_loader: Callable[[], torch.nn.Module] | None = None,
                adapter: str | None = None, save_embedding_layers: bool = False, save_base: bool = False) -> tuple[dict, torch.nn.Module]:
    """Write ``model`` (a transformers model, or a peft model when ``lora``) into ``tmp``.

    ``state``: the full state dict gathered from every process (ZeRO-3), or None for the model's own.
    LoRA: ``adapter`` names the adapter to save (several can live on one base); ``base_loader()``
    loads the base the adapter was trained on (same vocabulary); ``save_base`` also writes that base to
    ``tmp/base`` (for a base that exists nowhere else, ``--model tiny``: the adapter then points at it,
    runtime/model_card.py). Returns (what was saved besides the model files, the in-memory model equal
    to the saved top-level weights)."""
    if not lora:
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        return {}, model
    from peft import PeftModel

    kw = {"selected_adapters": [adapter]} if adapter else {}
    model.save_pretrained(tmp / "adapter", state_dict=state, save_embedding_layers=save_embedding_layers, safe_serialization=True, **kw)
    tok.save_pretrained(tmp / "adapter")
    with local_load():
        base = base_loader()
    if save_base:
        base.save_pretrained(tmp / "base", safe_serialization=True)
        tok.save_pretrained(tmp / "base")
    merged = PeftModel.from_pretrained(base, str(tmp / "adapter")).merge_and_unload().eval()
    merged.save_pretrained(tmp, safe_serialization=True)
    return {"adapter": "adapter"}, merged


@torch.no_grad()
def live_outputs(model, kind: str, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """What the reload check compares, from the live model: the logits [B, L, V] of a causal LM
    (positions counted over attended tokens, as generate() does), or the end scores [B] of a
    ``TokenScorer`` (what safealign reads as the reward/cost). Collective under ZeRO-3."""
    dev = next(model.parameters()).device
    ids, mask = ids.to(dev), mask.to(dev)
    if kind == "score":
        return model(ids, mask)[1].float().cpu()
    return model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits.float().cpu()


@torch.no_grad()
def reload_check(out: Path, kind: str, live: torch.Tensor | None, ids: torch.Tensor, mask: torch.Tensor, *,
                 prompt: list[int] | None = None, tok=None) -> dict:
    """Reload ``out`` with plain transformers and compare with ``live`` (from :func:`live_outputs` on the
    same ids/mask). ``kind``: "causal" (also checks that it generates from ``prompt``) or "score"."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if sum(f.stat().st_size for f in Path(out).glob("*.safetensors")) > RELOAD_CHECK_MAX_BYTES:
        return {"checked": False, "why": f"weights above {RELOAD_CHECK_MAX_BYTES / 1e9:.0f} GB: reload check skipped to save time"}
    cls = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    with local_load():
        plain = cls.from_pretrained(str(out), dtype=torch.float32).eval()
    res: dict = {"checked": True, "sequences": int(ids.shape[0])}
    ok = True
    if live is not None:  # None: the live model could not be evaluated here (ZeRO-3 shards); the generation check remains
        if kind == "causal":
            ref = live_outputs(plain, kind, ids, mask)
            diff = float((ref - live)[mask.bool()].abs().max())
        else:  # the pooled logit a plain user gets: transformers reads it at the last non-pad token (our EOS)
            ref = plain(input_ids=ids, attention_mask=mask).logits.squeeze(-1).float()
            diff = float((ref - live).abs().max())
        res["max_abs_diff"] = diff
        ok = diff < TOLERANCE[kind]
    if kind == "causal" and prompt is not None:
        gen = plain.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                             synced_gpus=False)   # one process, plain model: transformers' default (True under a ZeRO-3 run) would wait for the others
        res["generated_tokens"] = int(gen.shape[1] - len(prompt))
        res["generates"] = res["generated_tokens"] > 0
        ok = ok and res["generates"]
    res["ok"] = ok
    return res
