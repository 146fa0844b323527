"""`safealign sft`: supervised fine-tuning of a starting policy on prompt/response data.

Data: rows with ``prompt`` and ``response`` (rename with ``--column prompt=X --column
response=Y``), or preference data (PKU-SafeRLHF, prompt/chosen/rejected pairs, hh-rlhf) of which
the response named by ``--preference-response`` is the target: ``better`` (the more helpful one:
``better_response_id``, or ``chosen``) or ``safer`` (``safer_response_id``).

Loss: next-token cross-entropy on the response tokens and the EOS only; the prompt (template
included) is masked with -100 (Safe RLHF SFT). Each sequence is ``prompt + response + EOS`` as the
data layer encodes it, so the EOS the policy learns is the one the score models read.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from safealign.config import SFTConfig, to_dict
from safealign.data.encode import encode, split_by_prompt
from safealign.data.readers import read_data
from safealign.data.records import MAPPABLE, detect_format, fingerprint, rows_to_pairs
from safealign.data.templates import effective_template, format_prompt, format_response
from safealign.errors import BadInput
from safealign.models.export import live_outputs, reload_check
from safealign.models.generation import pad
from safealign.models.score import attention_inputs
from safealign.runtime import plots, report
from safealign.runtime.io import check_output_dir
from safealign.stages.trainer import (open_run_dir, peak_memory_mb, prepare_training, resume_point, run_tokenizer, save_collectively, train_loop,
                                      trainable)

IGNORE = -100
SFT_KEYS = ("prompt", "response")


@dataclass
class SFTExample:
    prompt: list[str]     # dialogue turns (user, assistant, ..., user)
    response: str
    row: int = 0


@dataclass
class EncodedSFT:
    ids: list[int]        # prompt + response + [eos]
    prompt_len: int       # tokens masked out of the loss


# --------------------------------------------------------------------------------------------
# Data


def _prompt_turns(value, where: str) -> list[str]:
    if isinstance(value, str) and value.strip():
        return [value]
    if isinstance(value, list) and value and len(value) % 2 == 1 and all(isinstance(t, str) and t.strip() for t in value):
        return list(value)
    raise ValueError(f"{where} must be a non-empty string (or an odd-length list of dialogue turns), got {value!r}")


def rows_to_examples(rows: list[dict], *, source: str, fmt: str, columns: dict[str, str], invalid_rows: str,
                     preference_response: str, max_samples: int = 0) -> tuple[list[SFTExample], dict]:
    """Validate rows and convert them to (prompt turns, target response). Raises BadInput."""
    unknown = sorted(set(columns) - set(MAPPABLE) - set(SFT_KEYS))
    if unknown:
        raise BadInput(f"unknown --column key(s) {', '.join(unknown)}", fix=f"use keys among prompt, response (or {', '.join(MAPPABLE)} for preference data)")
    if not rows:
        raise BadInput("the data has no rows", where=source)
    present = set().union(*(r.keys() for r in rows[:50]))
    pcol, rcol = columns.get("prompt", "prompt"), columns.get("response", "response")
    if fmt == "auto":
        if rcol in present:
            fmt = "sft"
        else:
            renamed = {k: columns.get(k, k) for k in ("prompt", "chosen", "rejected", "response_0", "response_1")}
            fmt = detect_format({k for k, v in renamed.items() if v in present})
            if fmt == "unknown":
                raise BadInput(f"missing column '{rcol}' (the target response; the data has {sorted(present)})", where=source,
                               fix="rename it with --column response=YOUR_COLUMN (and --column prompt=... if needed), "
                                   "or give preference data (prompt/chosen/rejected or PKU-SafeRLHF columns)")
    if fmt != "sft":
        pref_cols = {k: v for k, v in columns.items() if k not in SFT_KEYS or k == "prompt"}
        task = "helpful" if preference_response == "better" else "safety"
        pairs, st = rows_to_pairs(rows, source=source, task=task, fmt=fmt, columns=pref_cols, invalid_rows=invalid_rows,
                                  inconsistent="keep", max_samples=max_samples)
        ex = [SFTExample(p.prompt, p.chosen, p.row) for p in pairs]
        return ex, {"format": fmt, "target": f"{preference_response} response of each pair", **st.to_dict()}
    for col, key in ((pcol, "prompt"), (rcol, "response")):
        if col not in present:
            raise BadInput(f"missing column '{col}' (needed as '{key}'; the data has {sorted(present)})", where=source,
                           fix=f"rename it with --column {key}=YOUR_COLUMN")
    out: list[SFTExample] = []
    skipped: Counter = Counter()
    for i, row in enumerate(rows, start=1):
        if max_samples and len(out) >= max_samples:
            break
        try:
            prompt = _prompt_turns(row.get(pcol), f"column '{pcol}'")
            resp = row.get(rcol)
            if not isinstance(resp, str) or not resp.strip():
                raise ValueError(f"column '{rcol}' must be a non-empty string, got {resp!r}")
        except ValueError as e:
            if invalid_rows == "skip":
                skipped["invalid"] += 1
                continue
            raise BadInput(f"row {i}: {e}", where=source,
                           fix="correct the row, or pass --invalid-rows skip to skip such rows (they are counted in the report)") from None
        out.append(SFTExample(prompt, resp, i))
    if not out:
        raise BadInput(f"no usable rows left after filtering (skipped: {dict(skipped) or 'none'})", where=source)
    return out, {"format": "sft", "rows": len(rows), "kept": len(out), "skipped": dict(skipped)}


def load_examples(cfg: SFTConfig) -> tuple[list[SFTExample], list[SFTExample], dict]:
    kw = dict(fmt=cfg.data_format, columns=cfg.columns, invalid_rows=cfg.invalid_rows, preference_response=cfg.preference_response)
    examples, st = rows_to_examples(read_data(cfg, cfg.data), source=cfg.data, max_samples=cfg.max_samples, **kw)
    stats = {"train_source": st}
    if cfg.eval_data:
        evals, est = rows_to_examples(read_data(cfg, cfg.eval_data), source=cfg.eval_data, **kw)
        stats["eval_source"] = est
        return examples, evals, stats
    train, evals = split_by_prompt(examples, cfg.eval_split, cfg.seed)  # held-out prompts: all their rows
    if not train:
        raise BadInput(f"--eval-split {cfg.eval_split} leaves no training data ({len(examples)} rows)", where=cfg.data)
    return train, evals, stats


def encode_examples(tok, examples: list[SFTExample], template: str, max_length: int) -> tuple[list[EncodedSFT], Counter]:
    template = effective_template(template, tok)
    out, counts = [], Counter()
    for e in examples:
        enc = encode(tok, format_prompt(e.prompt, template, tok), format_response(e.response, template), max_length)
        counts["truncated"] += int(enc.truncated)
        out.append(EncodedSFT(enc.ids, enc.prompt_len))
    return out, counts


def tokenizer_corpus(examples: list[SFTExample], template: str) -> list[str]:
    return [t for e in examples for t in (format_prompt(e.prompt, template), format_response(e.response, template))]


# --------------------------------------------------------------------------------------------
# Loss


def collate(batch: list[EncodedSFT], pad_id: int) -> dict:
    """ids/mask [B, L] right-padded; labels [B, L] = ids on response + EOS, -100 on prompt and padding."""
    ids, mask = pad([e.ids for e in batch], pad_id)
    labels = ids.clone()
    for i, e in enumerate(batch):
        labels[i, : e.prompt_len] = IGNORE
    labels[mask == 0] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token NLL.   logits [B, L, V], labels [B, L] -> (nll [B, L-1], correct [B, L-1], mask [B, L-1])

    Position t predicts token t+1; positions whose target is -100 have mask 0 (nll 0).
    """
    target = labels[:, 1:]                                   # [B, L-1]
    mask = target != IGNORE                                  # [B, L-1]
    logits = logits[:, :-1].float()                          # [B, L-1, V]
    safe = target.masked_fill(~mask, 0)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), safe, reduction="none") * mask  # [B, L-1]
    correct = (logits.argmax(-1) == target) & mask           # [B, L-1]
    return nll, correct, mask


def sft_loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """Mean NLL over the micro-batch's response tokens (+ EOS); token accuracy as a stat."""
    dev = next(model.parameters()).device
    logits = model(input_ids=batch["input_ids"].to(dev), **attention_inputs(batch["attention_mask"].to(dev))).logits
    nll, correct, mask = token_nll(logits, batch["labels"].to(dev))
    n = mask.sum().clamp(min=1)
    return nll.sum() / n, {"token_accuracy": (correct.sum() / n).detach()}


@torch.no_grad()
def lm_eval(acc, model, examples: list[EncodedSFT], pad_id: int, batch_size: int) -> dict:
    """Token-weighted eval loss, token accuracy and perplexity over all processes."""
    model.eval()
    shard = examples[acc.process_index::acc.num_processes]
    n_local, n_max = len(shard), -(-len(examples) // acc.num_processes)
    shard = shard + shard[:1] * (n_max - n_local)   # equal work per process; the padding has weight 0
    sums = torch.zeros(3, device=acc.device)         # nll, correct, tokens
    dev = acc.device
    for i in range(0, n_max, batch_size):
        part = shard[i:i + batch_size]
        b = collate(part, pad_id)
        logits = model(input_ids=b["input_ids"].to(dev), **attention_inputs(b["attention_mask"].to(dev))).logits
        nll, correct, mask = token_nll(logits, b["labels"].to(dev))
        w = (torch.arange(i, i + len(part), device=dev) < n_local).float()[:, None]   # [B, 1]
        sums += torch.stack([(nll * w).sum(), (correct * w).sum(), (mask * w).sum()])
    sums = acc.reduce(sums, reduction="sum")
    loss = float(sums[0] / sums[2].clamp(min=1))
    return {"eval/loss": loss, "eval/token_accuracy": float(sums[1] / sums[2].clamp(min=1)),
            "eval/perplexity": float(torch.exp(torch.tensor(min(loss, 50.0)))), "eval/tokens": int(sums[2])}


# --------------------------------------------------------------------------------------------
# The stage


def run(cfg: SFTConfig) -> dict:
    from safealign.models.loading import load_causal_lm
    from safealign.runtime.dist import finish

    t_start = time.perf_counter()
    out = check_output_dir(cfg.output_dir, cfg.resume)
    resume_from, _ = resume_point(cfg, out)
    d = _data(cfg, out)
    model = load_causal_lm(cfg.model, d.tok, dtype="fp32", seed=cfg.seed, tiny=_tiny(cfg), revision=cfg.revision)
    resized = _embeddings_resized(cfg.model, model)
    prep = prepare_training(cfg, trainable(model, cfg, "CAUSAL_LM"), len(d.train_ex), out, deepspeed=cfg.deepspeed)
    acc, model, pad_id = prep.acc, prep.model, d.tok.pad_token_id

    # From here on the output directory is written.
    cfg_dict = to_dict(cfg)
    open_run_dir(acc, cfg, out, "sft", cfg_dict=cfg_dict, prompts=[e.prompt for e in d.train_rows + d.eval_rows],
                 inherit_from=[cfg.model if cfg.model != "tiny" else None], data_fingerprint=fingerprint(d.train_rows),
                 extra={"train_examples": len(d.train_ex), "eval_examples": len(d.eval_ex)}, tok=d.tok)
    result = train_loop(acc=acc, cfg=cfg, model=model, optimizer=prep.optimizer, scheduler=prep.scheduler, examples=d.train_ex,
                        collate=lambda b: collate(b, pad_id), loss_fn=sft_loss, out=out, total_steps=prep.total_steps,
                        resume_from=resume_from, cfg_dict=cfg_dict, unit="examples",
                        evaluate=(lambda step: lm_eval(acc, model, d.eval_ex, pad_id, cfg.batch_size * 2)) if d.eval_ex else None)
    probe_ex = (d.eval_ex or d.train_ex)[:8]
    probe = collate(probe_ex, pad_id)
    model.eval()
    live = live_outputs(model, "causal", probe["input_ids"], probe["attention_mask"])  # collective: under ZeRO-3 every process takes part
    final, merged = _save_policy(acc, model, d.tok, out, cfg, resized)
    summary: dict = {}
    if acc.is_main_process:
        reload = reload_check(out, "causal", live, probe["input_ids"], probe["attention_mask"], prompt=probe_ex[0].ids[:probe_ex[0].prompt_len], tok=d.tok)
        check = generation_check(_generating_copy(acc, merged, out), d.tok, d.eval_rows or d.train_rows, d.train_rows, cfg)
        summary = _summary(cfg, d, out, acc, prep.lr, result, check, reload, final, time.perf_counter() - t_start)
        _plots(out)
        report.write(out, summary, title="safealign sft",
                     intro="Loss: next-token cross-entropy on response tokens + EOS (prompt masked). "
                           "Perplexity = exp(eval loss per response token).")
    finish(acc)
    return summary


@dataclass
class _Data:
    """What sft trains and evaluates on, tokenised (everything validated before the run directory is written)."""

    tok: object
    train_rows: list[SFTExample]
    eval_rows: list[SFTExample]
    train_ex: list[EncodedSFT]
    eval_ex: list[EncodedSFT]
    counts: Counter
    stats: dict


def _data(cfg: SFTConfig, out: Path) -> _Data:
    train_rows, eval_rows, stats = load_examples(cfg)
    tok = run_tokenizer(cfg, out, lambda: tokenizer_corpus(train_rows, cfg.template))
    train_ex, train_counts = encode_examples(tok, train_rows, cfg.template, cfg.max_length)
    eval_ex, eval_counts = encode_examples(tok, eval_rows, cfg.template, cfg.max_length)
    return _Data(tok, train_rows, eval_rows, train_ex, eval_ex, Counter(train_counts) + Counter(eval_counts), stats)


def _generating_copy(acc, merged, out: Path):
    """The in-memory model equal to the saved one, to sample the generation check from; under ZeRO-3
    (the in-memory weights are sharded) the saved copy, loaded."""
    plugin = acc.state.deepspeed_plugin
    if plugin is None or plugin.zero_stage != 3:
        return merged
    from transformers import AutoModelForCausalLM

    from safealign.models.loading import local_load

    with local_load():
        return AutoModelForCausalLM.from_pretrained(str(out)).to(acc.device)


def _summary(cfg: SFTConfig, d: _Data, out: Path, acc, lr: float, result, check: dict, reload: dict, saved: dict, total_seconds: float) -> dict:
    s = {
        "stage": "sft", "model": cfg.model, "output_dir": str(out), "steps": result.total_steps,
        "resumed_from_step": result.resumed_from, "world_size": acc.num_processes, "lr": lr,
        "data": {**d.stats, "train_examples": len(d.train_ex), "eval_examples": len(d.eval_ex),
                 "truncated_examples": d.counts["truncated"],
                 "response_tokens_train": sum(len(e.ids) - e.prompt_len for e in d.train_ex)},
        "train": {k: v for k, v in result.last_train.items() if k != "step"},
        "eval": result.evals[-1] if result.evals else {},
        "generation_check": check,
        "throughput": {"examples_per_second": result.examples_per_second, "seconds": result.seconds,
                       "peak_memory_mb": peak_memory_mb(), "total_seconds": total_seconds},
        "reload_check": reload, "saved": saved,
    }
    s["headline"] = _headline(s)
    return s


def _tiny(cfg: SFTConfig) -> dict:
    return dict(hidden=cfg.tiny_hidden, layers=cfg.tiny_layers, heads=cfg.tiny_heads, max_positions=max(cfg.max_length, 64) + cfg.check_max_new_tokens)


def _headline(s: dict) -> str:
    parts = [f"sft: {s['steps']} steps"]
    if s["train"].get("train/loss") is not None:
        parts.append(f"train loss {s['train']['train/loss']:.3f}")
    if s["eval"]:
        parts.append(f"eval loss {s['eval']['eval/loss']:.3f} (ppl {s['eval']['eval/perplexity']:.2f}, token acc {100 * s['eval']['eval/token_accuracy']:.1f}%)")
    o = (s.get("generation_check") or {}).get("oracle")
    if o:
        parts.append(f"oracle on {o['n']} held-out prompts: helpfulness {o['helpfulness_mean']:.2f}, unsafe {100 * o['harm_rate']:.1f}%")
    return "; ".join(parts)


def _embeddings_resized(name: str, model) -> bool:
    """True when the tokenizer gained tokens (e.g. a <pad>) and the embeddings were resized."""
    if name == "tiny":
        return False
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name).vocab_size != model.get_input_embeddings().weight.shape[0]
    except (OSError, ValueError):
        return False


def _save_policy(acc, model, tok, out: Path, cfg, resized: bool = False) -> tuple[dict, torch.nn.Module | None]:
    """Save the HF causal LM (merged when LoRA; the adapter under adapter/) + tokenizer, atomically.

    When the tokenizer gained tokens, the adapter also stores the resized embedding and output
    layers, and it loads on the base model after ``base.resize_token_embeddings(len(tokenizer))``
    (the tokenizer is saved beside the adapter). Returns (paths, the in-memory model equal to the
    saved one, on the main process).
    """
    from safealign.models.export import write_model
    from safealign.models.loading import load_causal_lm

    merged = None

    def write(tmp: Path, state: dict) -> dict:
        nonlocal merged
        saved, merged = write_model(tmp, acc.unwrap_model(model), tok, state, lora=bool(cfg.lora_r), save_embedding_layers=resized,
                                    base_loader=lambda: load_causal_lm(cfg.model, tok, dtype="fp32", seed=cfg.seed, tiny=_tiny(cfg), revision=cfg.revision),
                                    save_base=cfg.model == "tiny")
        if cfg.lora_r:
            if resized:
                saved["adapter_note"] = (f"the tokenizer gained tokens ({len(tok)} in all): load the adapter on the base after "
                                         "base.resize_token_embeddings(len(tokenizer)), or use the merged model")
        return saved

    return save_collectively(acc, model, tok, out, write), merged


@torch.no_grad()
def generation_check(model, tok, prompts_from: list[SFTExample], train_rows: list[SFTExample], cfg) -> dict:
    """Sample one response (temperature 1, seeded) for a few held-out prompts; oracle scores on world prompts."""
    from safealign.models.generation import decode_responses, encode_prompts, sample
    from safealign.runtime.seeds import seed_sampling
    from safealign.stages.evaluate import all_world_prompts, oracle_metrics

    if not cfg.check_prompts or model is None:
        return {}
    seen, prompts = set(), []
    for e in prompts_from:
        if len(e.prompt) == 1 and e.prompt[0] not in seen:
            seen.add(e.prompt[0])
            prompts.append(e.prompt[0])
        if len(prompts) >= cfg.check_prompts:
            break
    if not prompts:
        return {}
    model.eval()
    ids = encode_prompts(tok, prompts, cfg.template)
    texts, eos = [], []
    for b, i in enumerate(range(0, len(ids), 32)):
        seed_sampling(cfg.seed, b)
        ro = sample(model, tok, ids[i:i + 32], max_new_tokens=cfg.check_max_new_tokens, temperature=1.0)
        texts += decode_responses(tok, ro)
        eos += ro.eos_hit.tolist()
    out: dict = {"prompts": len(prompts), "held_out": prompts_from is not train_rows, "temperature": 1.0,
                 "max_new_tokens": cfg.check_max_new_tokens, "eos_rate": sum(eos) / len(eos),
                 "examples": [{"prompt": p, "response": r} for p, r in zip(prompts[:4], texts[:4])]}
    if all_world_prompts(prompts):
        o = oracle_metrics(prompts, texts)
        o.pop("by_category")
        out["oracle"] = o
        single = [e for e in train_rows if len(e.prompt) == 1]
        ref = oracle_metrics([e.prompt[0] for e in single], [e.response for e in single])
        out["oracle_training_responses"] = {k: ref[k] for k in ("n", "helpfulness_mean", "harm_rate", "harm_rate_harmful_prompts",
                                                                "refusal_rate_harmful_prompts")}
    return out


def _plots(out: Path) -> None:
    from safealign.runtime.metrics import read_metrics

    rows = read_metrics(out / "metrics.jsonl")
    plots.curves(rows, ["train/loss", "eval/loss"], out / "plots" / "loss.png", "SFT loss (response tokens)")
    plots.curves(rows, ["train/token_accuracy", "eval/token_accuracy"], out / "plots" / "token_accuracy.png", "next-token accuracy")
