"""train-rm and train-cost: a score model trained on preference pairs.

``task="helpful"``: reward model, Bradley-Terry on (more helpful, less helpful).
``task="safety"``:  cost model, Safe RLHF cost loss on (safer, less safe) + per-response sign terms.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from safealign.algorithms import preference as L
from safealign.config import CostConfig, PreferenceConfig, to_dict
from safealign.data.encode import EncodedPair, encode_pairs, split_by_prompt, tokenizer_corpus
from safealign.data.readers import read_data
from safealign.data.records import fingerprint, rows_to_pairs
from safealign.errors import BadInput
from safealign.models.generation import pad
from safealign.models.export import live_outputs, reload_check
from safealign.models.loading import load_score_model
from safealign.models.score import TokenScorer
from safealign.runtime import plots, report
from safealign.runtime.io import check_output_dir
from safealign.stages.trainer import (open_run_dir, peak_memory_mb, prepare_training, resume_point, run_tokenizer, save_collectively, strip_prefix,
                                      train_loop, trainable)


def load_pairs(cfg: PreferenceConfig, task: str):
    """(train pairs, eval pairs, stats) with every validation done before anything is written."""
    inconsistent = getattr(cfg, "inconsistent", "keep")
    kw = dict(task=task, fmt=cfg.data_format, columns=cfg.columns, invalid_rows=cfg.invalid_rows, inconsistent=inconsistent)
    pairs, stats = rows_to_pairs(read_data(cfg, cfg.data), source=cfg.data, max_samples=cfg.max_samples, **kw)
    data_stats = {"train_source": stats.to_dict()}
    if cfg.eval_data:
        eval_pairs, estats = rows_to_pairs(read_data(cfg, cfg.eval_data), source=cfg.eval_data, **kw)
        data_stats["eval_source"] = estats.to_dict()
        train_pairs = pairs
    else:
        train_pairs, eval_pairs = split_by_prompt(pairs, cfg.eval_split, cfg.seed)
        if not train_pairs:
            raise BadInput(f"--eval-split {cfg.eval_split} leaves no training data ({len(pairs)} pairs)", where=cfg.data)
    return train_pairs, eval_pairs, data_stats


def collate(batch: list[EncodedPair], pad_id: int) -> dict:
    """Chosen and rejected stacked into one forward: ids [2B, L] (first B chosen)."""
    ids, mask = pad([e.chosen for e in batch] + [e.rejected for e in batch], pad_id)
    return {"input_ids": ids, "attention_mask": mask, **collate_signs(batch)}


def collate_shared(batch: list[EncodedPair], pad_id: int) -> dict:
    """As :func:`collate`, with the common start of chosen and rejected run once (TokenScorer's prefix
    forward): prefix_ids [B, Lp] (right-padded: the prefix forward then needs no mask), input_ids [2B, L]
    the two continuations (first B chosen).
    For hh-style data, where both responses follow the same dialogue, that is the whole prompt."""
    keep = [e.diverge for e in batch]                                 # >= 1 (see shares_prefix), < len of each side
    prefix_ids, prefix_mask = pad([e.chosen[:k] for e, k in zip(batch, keep)], pad_id)
    ids, mask = pad([e.chosen[k:] for e, k in zip(batch, keep)] + [e.rejected[k:] for e, k in zip(batch, keep)], pad_id)
    out = collate_signs(batch)
    out.update(input_ids=ids, attention_mask=mask, prefix_ids=prefix_ids, prefix_mask=prefix_mask)
    return out


def shares_prefix(batch: list[EncodedPair]) -> bool:
    return all(e.diverge >= 1 for e in batch)


def collate_signs(batch: list[EncodedPair]) -> dict:
    return {"chosen_sign": torch.tensor([e.chosen_sign for e in batch], dtype=torch.float),
            "rejected_sign": torch.tensor([e.rejected_sign for e in batch], dtype=torch.float),
            "diverge": torch.tensor([e.diverge for e in batch])}


def train_collate(cfg, pad_id: int):
    """The training batches: the shared-prefix form for the sequence loss (the token-wise loss reads
    scores of the shared part too; gradient checkpointing drops the key/value cache it needs)."""
    shared = cfg.loss_type == "sequence" and not cfg.gradient_checkpointing

    def fn(batch):
        return collate_shared(batch, pad_id) if shared and shares_prefix(batch) else collate(batch, pad_id)

    return fn


def batch_lengths(cfg, examples: list[EncodedPair]) -> list:
    """What a pair adds to its batch's padded size, for length grouping: (shared prefix, longer
    continuation) in the shared-prefix form of :func:`train_collate`, else the longer side."""
    if cfg.loss_type == "sequence" and not cfg.gradient_checkpointing:
        return [(e.diverge, pair_length(e) - e.diverge) if e.diverge >= 1 else (0, pair_length(e)) for e in examples]
    return [pair_length(e) for e in examples]


def pair_length(e: EncodedPair) -> int:
    """Padded length of a pair in a batch (chosen and rejected share one forward)."""
    return max(len(e.chosen), len(e.rejected))


def pair_loss(cfg, task: str):
    """loss_fn(model, batch) -> (loss, stats) for the configured task and loss type."""
    sign_weight = getattr(cfg, "sign_weight", 1.0)

    def fn(model, batch):
        dev = batch["input_ids"].device
        prefix = {k: batch[k] for k in ("prefix_ids", "prefix_mask") if k in batch}
        scores, end, idx = model(batch["input_ids"], batch["attention_mask"], **prefix)   # [2B, L], [2B], [2B]
        B = end.shape[0] // 2
        c_end, r_end = end[:B], end[B:]
        cs, rs = batch["chosen_sign"].to(dev), batch["rejected_sign"].to(dev)
        if cfg.loss_type == "sequence":
            if task == "helpful":
                loss, acc = L.bradley_terry_loss(c_end, r_end, cfg.regularization)
                return loss, {"accuracy": acc}
            # chosen = safer: lower cost; rejected = less safe: higher cost
            loss, st = L.cost_loss(c_end, r_end, cs, rs, sign_weight, cfg.regularization)
            return loss, {"accuracy": st["accuracy"], "sign_accuracy": st["sign_accuracy"]}
        b, w, mask = L.token_wise_terms(scores[:B], scores[B:], idx[:B], idx[B:], batch["diverge"].to(dev))
        if task == "helpful":
            loss, acc = L.token_wise_bt_loss(b, w, mask, c_end, r_end, cfg.regularization)
            return loss, {"accuracy": acc}
        loss, st = L.token_wise_cost_loss(b, w, mask, cs, rs, c_end, r_end, sign_weight, cfg.regularization)
        return loss, {"accuracy": st["accuracy"], "sign_accuracy": st["sign_accuracy"]}

    return fn


@torch.no_grad()
def score_pairs(acc, scorer, examples: list[EncodedPair], pad_id: int, batch_size: int) -> dict[str, torch.Tensor]:
    """End scores of chosen/rejected for every example, gathered from all processes (in order)."""
    scorer.eval()
    chosen, rejected, cs, rs = [], [], [], []
    shard = examples[acc.process_index::acc.num_processes]
    n_local = len(shard)
    n_max = -(-len(examples) // acc.num_processes)
    shard = shard + shard[:1] * (n_max - n_local)  # equal work on every process; padding dropped below
    for i in range(0, max(n_max, 1), batch_size):
        part = shard[i:i + batch_size]
        if not part:
            break
        b = collate_shared(part, pad_id) if shares_prefix(part) else collate(part, pad_id)
        prefix = {k: b[k].to(acc.device) for k in ("prefix_ids", "prefix_mask") if k in b}
        _, end, _ = scorer(b["input_ids"].to(acc.device), b["attention_mask"].to(acc.device), **prefix)
        k = len(part)
        chosen.append(end[:k]), rejected.append(end[k:]), cs.append(b["chosen_sign"]), rs.append(b["rejected_sign"])
    local = torch.stack([torch.cat(chosen).float(), torch.cat(rejected).float(), torch.cat(cs).to(acc.device), torch.cat(rs).to(acc.device)], dim=1)
    valid = torch.zeros(local.shape[0], 1, device=acc.device)
    valid[:n_local] = 1
    allrows = acc.gather(torch.cat([local, valid], dim=1))
    allrows = allrows[allrows[:, 4] > 0]
    return {"chosen": allrows[:, 0].cpu(), "rejected": allrows[:, 1].cpu(), "chosen_sign": allrows[:, 2].cpu(), "rejected_sign": allrows[:, 3].cpu()}


def eval_metrics(task: str, s: dict[str, torch.Tensor], bins: int = 10) -> tuple[dict, dict]:
    """(metrics, extras for plots) from gathered eval scores."""
    c, r = s["chosen"], s["rejected"]
    both = torch.cat([c, r])
    name = "reward" if task == "helpful" else "cost"
    m = {"eval/accuracy": float((c > r).float().mean()) if task == "helpful" else float((r > c).float().mean()),
         f"eval/{name}_mean": float(both.mean()), f"eval/{name}_std": float(both.std()) if len(both) > 1 else 0.0,
         "eval/pairs": len(c)}
    extras: dict = {}
    if task == "safety":
        sign = torch.cat([s["chosen_sign"], s["rejected_sign"]])
        known = sign != 0
        if known.any():
            m["eval/sign_accuracy"] = float(((sign * both)[known] > 0).float().mean())
            prob, label = torch.sigmoid(both[known]), (sign[known] > 0).long()
            ece, rows = L.expected_calibration_error(prob, label, bins)
            m["eval/ece"] = ece
            m["eval/unsafe_rate_labelled"] = float(label.float().mean())
            for name, flag in (("safe", 0), ("unsafe", 1)):
                if (label == flag).any():
                    m[f"eval/cost_mean_labelled_{name}"] = float(both[known][label == flag].mean())
            extras["reliability"] = rows
            extras["by_label"] = {"labelled unsafe": both[known][label == 1].tolist(), "labelled safe": both[known][label == 0].tolist()}
    return m, extras


def run(cfg: PreferenceConfig, task: str) -> dict:
    stage = "train-rm" if task == "helpful" else "train-cost"
    out = check_output_dir(cfg.output_dir, cfg.resume)
    resume_from, _ = resume_point(cfg, out)
    train_pairs, eval_pairs, data_stats = load_pairs(cfg, task)
    if task == "safety" and cfg.sign_weight > 0 and not any(p.chosen_unsafe is not None for p in train_pairs):
        data_stats["mode"] = "ranking-only (no per-response safety labels in the data)"
    tok = run_tokenizer(cfg, out, lambda: tokenizer_corpus(train_pairs, cfg.template))
    train_ex, train_counts = encode_pairs(tok, train_pairs, cfg.template, cfg.max_length)
    eval_ex, eval_counts = encode_pairs(tok, eval_pairs, cfg.template, cfg.max_length)
    if not train_ex:
        raise BadInput("no training pairs left after tokenisation", where=cfg.data)
    tiny = dict(hidden=cfg.tiny_hidden, layers=cfg.tiny_layers, heads=cfg.tiny_heads, max_positions=max(cfg.max_length, 64))

    def load_base():
        return load_score_model(cfg.model, tok, dtype="fp32", seed=cfg.seed, tiny=tiny, score_type="reward" if task == "helpful" else "cost",
                                head="new", revision=cfg.revision)

    from safealign.runtime.dist import finish

    prep = prepare_training(cfg, TokenScorer(trainable(load_base(), cfg, "SEQ_CLS")), len(train_ex), out, deepspeed=cfg.deepspeed)
    acc, scorer, optimizer, scheduler, total, lr = prep.acc, prep.model, prep.optimizer, prep.scheduler, prep.total_steps, prep.lr

    # From here on the output directory is written.
    cfg_dict = to_dict(cfg)
    open_run_dir(acc, cfg, out, stage, cfg_dict=cfg_dict, prompts=[p.prompt for p in train_pairs + eval_pairs],
                 inherit_from=[cfg.model if cfg.model != "tiny" else None], data_fingerprint=fingerprint(train_pairs),
                 extra={"train_pairs": len(train_ex), "eval_pairs": len(eval_ex)}, tok=tok)
    bins = getattr(cfg, "calibration_bins", 10)
    last_extras: dict = {}
    eval_by_length = sorted(eval_ex, key=pair_length)  # batches of similar length: less padding to score

    def evaluate(step: int) -> dict:
        if not eval_ex:
            return {}
        scores = score_pairs(acc, scorer, eval_by_length, tok.pad_token_id, cfg.batch_size * 2)
        metrics, extras = eval_metrics(task, scores, bins)
        last_extras.update(extras, scores=scores)
        return metrics

    result = train_loop(acc=acc, cfg=cfg, model=scorer, optimizer=optimizer, scheduler=scheduler, examples=train_ex,
                        collate=train_collate(cfg, tok.pad_token_id), loss_fn=pair_loss(cfg, task), out=out, total_steps=total,
                        resume_from=resume_from, evaluate=evaluate if eval_ex else None, cfg_dict=cfg_dict,
                        lengths=batch_lengths(cfg, train_ex) if cfg.group_by_length else None)
    probe = collate((eval_ex or train_ex)[:16], tok.pad_token_id)
    scorer.eval()
    live = live_outputs(scorer, "score", probe["input_ids"], probe["attention_mask"])  # collective: under ZeRO-3 every process takes part
    final = _save_score_model(acc, scorer, tok, out, cfg, base_loader=load_base)
    if acc.is_main_process:
        reload = reload_check(out, "score", live, probe["input_ids"], probe["attention_mask"])
        counts = Counter(train_counts) + Counter(eval_counts)
        summary = {
            "stage": stage, "task": task, "model": cfg.model, "output_dir": str(out), "steps": result.total_steps,
            "resumed_from_step": result.resumed_from, "world_size": acc.num_processes, "distributed": str(acc.distributed_type).split(".")[-1], "lr": lr,
            "data": {**data_stats, "train_pairs": len(train_ex), "eval_pairs": len(eval_ex), "truncated_pairs": counts["truncated_pairs"],
                     "dropped_identical_after_truncation": counts["identical_after_truncation"]},
            "train": {k: v for k, v in result.last_train.items() if k != "step"},
            "eval": result.evals[-1] if result.evals else {},
            "throughput": {"pairs_per_second": result.examples_per_second, "seconds": result.seconds, "peak_memory_mb": peak_memory_mb()},
            "reload_check": reload, "saved": final,
        }
        _plots(out, task, last_extras)
        report.write(out, summary, title=f"safealign {stage}")
    finish(acc)
    return summary if acc.is_main_process else {}


def _save_score_model(acc, scorer, tok, out: Path, cfg, base_loader) -> dict:
    """Save the HF model (merged when LoRA; the adapter under adapter/, a tiny base under base/) + tokenizer, atomically."""
    from safealign.models.export import write_model

    def write(tmp: Path, state: dict) -> dict:
        return write_model(tmp, acc.unwrap_model(scorer).model, tok, strip_prefix(state, "model."), lora=bool(cfg.lora_r),
                           base_loader=base_loader, save_base=cfg.model == "tiny")[0]

    return save_collectively(acc, scorer, tok, out, write)


def _plots(out: Path, task: str, extras: dict) -> None:
    from safealign.runtime.metrics import read_metrics

    rows = read_metrics(out / "metrics.jsonl")
    plots.curves(rows, ["train/loss"], out / "plots" / "loss.png", "training loss")
    plots.curves(rows, [k for k in ("train/accuracy", "train/sign_accuracy", "eval/accuracy", "eval/sign_accuracy") if any(k in r for r in rows)],
                 out / "plots" / "accuracy.png", "accuracy")
    s = extras.get("scores")
    if s is not None:
        names = ("more helpful", "less helpful") if task == "helpful" else ("safer", "less safe")
        plots.histogram({names[0]: s["chosen"].tolist(), names[1]: s["rejected"].tolist()}, out / "plots" / "scores_by_preference.png",
                        f"eval {'reward' if task == 'helpful' else 'cost'} by preference", vlines={"zero (cost > 0: unsafe)": 0.0} if task == "safety" else None,
                        xlabel="reward" if task == "helpful" else "cost", ylabel="responses")
    if extras.get("by_label"):
        plots.histogram(extras["by_label"], out / "plots" / "cost_by_label.png", "eval cost by safety label", vlines={"zero (cost > 0: unsafe)": 0.0}, xlabel="cost", ylabel="responses")
    if extras.get("reliability"):
        plots.reliability(extras["reliability"], out / "plots" / "reliability.png", "calibration of P(unsafe)")


def run_reward(cfg) -> dict:
    return run(cfg, "helpful")


def run_cost(cfg: CostConfig) -> dict:
    return run(cfg, "safety")
