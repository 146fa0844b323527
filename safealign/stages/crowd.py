"""`safealign train-cost --crowd`: a safety cost learned from crowd preferences WITHOUT safety labels.

Idea (Lin & Brown, ICML 2026, "Implicit Safety Alignment from Crowd Preferences"; research/hc-rlhf.md
§4): crowd workers disagree on taste but share safety principles, so the part of their preferences
on which they all agree, once their tastes are taken out, is a safety signal. The output is an
ordinary cost model (same files, sign and zero-point convention as ``train-cost``: higher = more
harmful, cost > 0 "unsafe"), so ``ppo-lag --cost-model`` and ``safety-test`` use it unchanged.

Design: per-annotator linear heads on one shared backbone, not a VPL latent
----------------------------------------------------------------------------
VPL (Poddar et al. 2024), the building block of the paper, infers a latent z per annotator with a
VAE encoder over that annotator's labelled pairs and decodes a z-conditioned reward. Its strengths
are annotators the model has never seen (the encoder infers z from a few of their labels) and
continuous, non-linear dependence on z. Here every annotator has an id and at least
``--min-labels-per-annotator`` labels, and what we need afterwards is a *linear* decomposition
(agreement vs disagreement directions). So we use the MAP of the simplest such model:

    u_a(x, y) = (w_0 + d_a) . h(x, y),   d_a ~ N(0, s^2 I)  (L2 ``--crowd-head-l2`` on d_a)

i.e. VPL with a Gaussian latent, the amortised encoder replaced by a free embedding per id and a
linear decoder. It has no KL weight to tune, it is exactly the pooled Bradley-Terry model when all
d_a = 0, and its head matrix is what the decomposition needs (safealign/algorithms/crowd.py).

Steps: (1) train backbone + heads jointly (SGD); (2) refit the heads by convex L-BFGS on the frozen
EOS features (Adam moves the deviations by at most ~lr per step: after an epoch the SGD heads were
still ~identical, cos 0.9999 to their mean, while the converged refit separates the tastes);
(3) normalise every head to the same norm (a Bradley-Terry head's norm is the annotator's
consistency, not their taste) and take the principal axes of the heads' spread; the taste axes are
the leading ones that are reproducible across two halves of each annotator's labels (cross-fitted,
fixed-sequence test); (4) the shared component s = the mean head corrected along the taste axes
(``--crowd-shared``: midrange, the default, moves it to the midpoint of each axis' extreme
annotators, so a taste held by 75% of the crowd weighs no more than one held by 25%; project removes
the mean head's whole projection on the taste axes); cost = -s . h + b.

What this can and cannot find. ``s`` is everything every annotator agrees on beyond their tastes.
If something other than safety is also shared (in the synthetic world everyone values
helpfulness), it is in ``s`` too: from overall preferences alone the two cannot be told apart, so
the discovered cost is "harm minus helpfulness", and its AUROC for unsafe responses stays well below
a cost model trained with safety labels. What the taste correction buys is independence from the
majority's taste ("majority preference pollution"), which a pooled model inherits; when the crowd's
tastes are balanced there is nothing to correct, and the discovered cost is no better than the
negated pooled reward (bench/results/crowd_sweep.md).

The zero point b. Llama-style score heads have no bias, and without safety labels no data says
where "unsafe" begins. We train the backbone with one extra direction ("bias unit") whose reading
is ~1 on every sequence, and export score weight = -s - q * e, where e is the least-variance
unit-mean direction of the training features (e . h = 1 +- 0.01 measured, on held-out responses as
well; the report gives its spread) and q puts cost = 0 at the ``--crowd-zero-quantile`` of the
training responses' costs (default: the median). That zero is a convention, stated in the report;
AUROC and rank correlations do not depend on it.

The pooled Bradley-Terry baseline (one head for all annotators, its own backbone from the same
initialisation, the same batches and steps) is trained alongside (``--crowd-baseline``, default on)
and saved as a reward model under ``pooled_baseline/``.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from safealign.algorithms import crowd as K
from safealign.algorithms.preference import bradley_terry_loss
from safealign.config import CostConfig, to_dict
from safealign.data.encode import EncodedPair, encode_pairs, split_by_prompt, tokenizer_corpus
from safealign.data.readers import read_data
from safealign.data.records import Pair, fingerprint, rows_to_pairs
from safealign.errors import BadInput
from safealign.models.generation import pad
from safealign.models.score import TokenScorer, backbone, end_index, position_ids_from_mask, score_head

BIAS_UNIT_WEIGHT = 1.0     # weight of the bias-unit term in the training loss
SPLIT_HALF_SEED = 7919     # seeds the split of each annotator's labels into two halves (taste-axis reliability)


# --------------------------------------------------------------------------------------------
# Data


@dataclass
class CrowdExample:
    enc: EncodedPair
    annotator: int          # index into the annotator list; -1 = not seen in training
    pair: Pair


@dataclass
class CrowdData:
    train: list[Pair]
    eval: list[Pair]
    annotators: list[str]               # training annotators, sorted
    label_column: str
    stats: dict
    oracle: bool                        # the data carries the synthetic world's oracle columns
    tastes: dict[str, str]              # annotator -> taste, when the data says (synthetic world)


def _columns_for(rows: list[dict], cfg: CostConfig) -> tuple[dict, str]:
    """The column mapping: the annotator's OVERALL preference is the label. In the synthetic world
    that is ``preferred_response_id``; it becomes the default ``better_id`` when present."""
    columns = dict(cfg.columns)
    present = set().union(*(r.keys() for r in rows[:50])) if rows else set()
    if "better_id" not in columns and "preferred_response_id" in present:
        columns["better_id"] = "preferred_response_id"
    return columns, columns.get("better_id", "better_response_id (or chosen/rejected)")


def _read(source: str, cfg: CostConfig, max_samples: int):
    rows = read_data(cfg, source)
    columns, label = _columns_for(rows, cfg)
    pairs, stats = rows_to_pairs(rows, source=source, task="helpful", fmt=cfg.data_format, columns=columns,
                                 invalid_rows=cfg.invalid_rows, max_samples=max_samples)
    ann_col = columns.get("annotator_id", "annotator_id")
    missing = [p for p in pairs if p.annotator is None or not str(p.annotator).strip()]
    if len(missing) == len(pairs):
        present = sorted(set().union(*(r.keys() for r in rows[:50])))
        raise BadInput(f"--crowd needs an annotator id on every pair, and the data has no '{ann_col}' values (columns: {present})",
                       where=source, fix="name the column with --column annotator_id=YOUR_COLUMN")
    if missing:
        if cfg.invalid_rows != "skip":
            raise BadInput(f"row {missing[0].row}: no annotator id (column '{ann_col}' is missing or empty; {len(missing)} rows like this)",
                           where=source, fix="fill it in, or pass --invalid-rows skip to drop such rows (they are counted in the report)")
        keep = {id(p) for p in missing}
        pairs = [p for p in pairs if id(p) not in keep]
        stats.skipped["missing_annotator"] += len(missing)
        stats.kept = len(pairs)
    present = set().union(*(r.keys() for r in rows[:50]))
    tastes = {}
    if "annotator_taste" in present:
        for p in pairs:
            t = rows[p.row - 1].get("annotator_taste")
            if t is not None:
                tastes.setdefault(str(p.annotator), str(t))
    oracle = {"oracle_harm_0", "oracle_harm_1", "oracle_unsafe_0", "oracle_unsafe_1"} <= present
    ignored = sorted(present & {"safer_response_id", "is_response_0_safe", "is_response_1_safe", "chosen_safe", "rejected_safe"})
    return pairs, stats, label, tastes, oracle, ignored


def load_crowd_pairs(cfg: CostConfig) -> CrowdData:
    """Read, validate and split the crowd pairs; every check happens before anything is written."""
    pairs, stats, label, tastes, oracle, ignored = _read(cfg.data, cfg, cfg.max_samples)
    data_stats: dict = {"train_source": stats.to_dict(), "label_column": label}
    if ignored:
        data_stats["safety_columns_ignored"] = ignored
    if cfg.eval_data:
        eval_pairs, estats, _, etastes, eoracle, _ = _read(cfg.eval_data, cfg, 0)
        data_stats["eval_source"] = estats.to_dict()
        tastes = {**etastes, **tastes}
        oracle = oracle and eoracle
        train_pairs = pairs
    else:
        train_pairs, eval_pairs = split_by_prompt(pairs, cfg.eval_split, cfg.seed)
    counts = Counter(str(p.annotator) for p in train_pairs)
    few = sorted((a for a, n in counts.items() if n < cfg.min_labels_per_annotator), key=lambda a: (counts[a], a))
    if few:
        listing = ", ".join(f"{a} ({counts[a]})" for a in few[:10]) + (f" and {len(few) - 10} more" if len(few) > 10 else "")
        if cfg.invalid_rows != "skip":
            raise BadInput(f"{len(few)} annotator(s) have fewer than {cfg.min_labels_per_annotator} labelled training pairs: {listing}",
                           where=cfg.data, fix="pass --invalid-rows skip to drop them (counted in the report), lower --min-labels-per-annotator, or add labels")
        drop = set(few)
        data_stats["annotators_dropped_too_few_labels"] = {a: counts[a] for a in few}
        train_pairs = [p for p in train_pairs if str(p.annotator) not in drop]
        eval_pairs = [p for p in eval_pairs if str(p.annotator) not in drop]
    annotators = sorted({str(p.annotator) for p in train_pairs})
    if len(annotators) < 2:
        raise BadInput(f"--crowd needs at least 2 annotators with >= {cfg.min_labels_per_annotator} labelled training pairs, found {len(annotators)}",
                       where=cfg.data, fix="use train-cost without --crowd (safety labels), or data with more annotators")
    if not train_pairs:
        raise BadInput("no training pairs left", where=cfg.data)
    return CrowdData(train_pairs, eval_pairs, annotators, label, data_stats, oracle, {a: tastes[a] for a in annotators if a in tastes})


def encode_crowd(tok, pairs: list[Pair], index: dict[str, int], template: str, max_length: int) -> tuple[list[CrowdExample], Counter]:
    out, counts = [], Counter()
    for p in pairs:
        enc, c = encode_pairs(tok, [p], template, max_length)
        counts.update(c)
        if enc:
            out.append(CrowdExample(enc[0], index.get(str(p.annotator), -1), p))
    return out, counts


def collate(batch: list[CrowdExample], pad_id: int) -> dict:
    """ids [2B, L] (first B: the annotator's preferred responses), annotator [B]."""
    ids, mask = pad([e.enc.chosen for e in batch] + [e.enc.rejected for e in batch], pad_id)
    return {"input_ids": ids, "attention_mask": mask, "annotator": torch.tensor([e.annotator for e in batch], dtype=torch.long)}


# --------------------------------------------------------------------------------------------
# Model


class CrowdNet(nn.Module):
    """Shared backbone + per-annotator heads (+ bias unit), and optionally the pooled baseline.

    forward(input_ids [2B, L], attention_mask [2B, L], annotator [B]) -> (loss, stats). The loss is
    computed inside forward so DDP sees every parameter used in the forward pass.
    """

    def __init__(self, model: nn.Module, n_annotators: int, cfg: CostConfig, baseline: nn.Module | None = None):
        super().__init__()
        self.model = model
        H = model.config.hidden_size
        self.mean_head = nn.Parameter(score_head(model).weight.detach()[0].clone().float())          # [H] w_0
        self.deviations = nn.Parameter(torch.zeros(n_annotators, H))                                 # [A, H] d_a
        gen = torch.Generator().manual_seed(cfg.seed)
        self.bias_unit = nn.Parameter(torch.randn(H, generator=gen) / H)                              # [H]
        self.baseline = TokenScorer(baseline) if baseline is not None else None
        self.head_l2, self.reg = cfg.crowd_head_l2, cfg.regularization

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """EOS hidden states [N, H] (fp32)."""
        hidden = backbone(self.model)(input_ids=input_ids, attention_mask=attention_mask,
                                      position_ids=position_ids_from_mask(attention_mask)).last_hidden_state   # [N, L, H]
        idx = end_index(attention_mask)
        return hidden[torch.arange(len(idx), device=hidden.device), idx].float()

    def forward(self, input_ids, attention_mask, annotator):
        h = self.features(input_ids, attention_mask)                    # [2B, H]
        B = h.shape[0] // 2
        loss, stats = K.crowd_bt_loss(h[:B], h[B:], annotator, self.mean_head, self.deviations, self.head_l2, self.reg)
        unit = K.bias_unit_loss(h, self.bias_unit)
        loss = loss + BIAS_UNIT_WEIGHT * unit
        stats["bias_unit_mse"] = unit.detach()
        if self.baseline is not None:
            _, end, _ = self.baseline(input_ids, attention_mask)        # [2B]
            bl, bacc = bradley_terry_loss(end[:B], end[B:], self.reg)
            loss = loss + bl
            stats["baseline_loss"], stats["baseline_accuracy"] = bl.detach(), bacc
        return loss, stats


@torch.no_grad()
def _features(net: CrowdNet, seqs: list[list[int]], pad_id: int, device, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray | None]:
    """(EOS features [N, H], baseline end scores [N] or None) of token sequences."""
    feats, base = [], []
    for i in range(0, len(seqs), batch_size):
        ids, mask = pad(seqs[i:i + batch_size], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        feats.append(net.features(ids, mask).cpu())
        if net.baseline is not None:
            base.append(net.baseline(ids, mask)[1].float().cpu())
    H = net.mean_head.shape[0]
    f = torch.cat(feats).numpy().astype(np.float64) if feats else np.zeros((0, H))
    b = torch.cat(base).numpy().astype(np.float64) if base else None
    return f, b


# --------------------------------------------------------------------------------------------
# The stage


def _validate(cfg: CostConfig) -> None:
    checks = [
        ("min_labels_per_annotator", cfg.min_labels_per_annotator >= 1, "must be >= 1"),
        ("crowd_taste_axes", cfg.crowd_taste_axes >= -1, "must be >= 0, or -1 for auto"),
        ("crowd_head_l2", cfg.crowd_head_l2 >= 0 and math.isfinite(cfg.crowd_head_l2), "must be a finite number >= 0"),
        ("crowd_zero_quantile", 0.0 < cfg.crowd_zero_quantile < 1.0, "must be in (0, 1)"),
    ]
    for key, ok, why in checks:
        if not ok:
            raise BadInput(f"config key '{key}' = {getattr(cfg, key)!r} {why}")
    if cfg.lora_r:
        raise BadInput("--crowd trains the full backbone; --lora-r is not supported with --crowd", fix="drop --lora-r")
    if cfg.deepspeed:
        raise BadInput("--crowd does not support --deepspeed (the tiny-to-small models it is meant for train on one device or with DDP)",
                       fix="drop --deepspeed")
    if cfg.loss_type != "sequence":
        raise BadInput("--crowd learns sequence-level utilities; --loss-type token is not supported with --crowd", fix="use --loss-type sequence")


def run(cfg: CostConfig) -> dict:
    from safealign.models.loading import load_score_model
    from safealign.runtime.io import check_output_dir
    from safealign.stages.trainer import open_run_dir, peak_memory_mb, prepare_training, resume_point, run_tokenizer, train_loop, trainable

    _validate(cfg)
    out = check_output_dir(cfg.output_dir, cfg.resume)
    resume_from, _ = resume_point(cfg, out)
    data = load_crowd_pairs(cfg)
    index = {a: i for i, a in enumerate(data.annotators)}
    tok = run_tokenizer(cfg, out, lambda: tokenizer_corpus(data.train, cfg.template))
    train_ex, train_counts = encode_crowd(tok, data.train, index, cfg.template, cfg.max_length)
    eval_ex, eval_counts = encode_crowd(tok, data.eval, index, cfg.template, cfg.max_length)
    if not train_ex:
        raise BadInput("no training pairs left after tokenisation", where=cfg.data)
    tiny = dict(hidden=cfg.tiny_hidden, layers=cfg.tiny_layers, heads=cfg.tiny_heads, max_positions=max(cfg.max_length, 64))
    model = load_score_model(cfg.model, tok, dtype="fp32", seed=cfg.seed, tiny=tiny, score_type="cost", head="new", revision=cfg.revision)
    base = (load_score_model(cfg.model, tok, dtype="fp32", seed=cfg.seed, tiny=tiny, score_type="reward", head="new", revision=cfg.revision)
            if cfg.crowd_baseline else None)
    net = CrowdNet(trainable(model, cfg, "SEQ_CLS"), len(data.annotators), cfg, trainable(base, cfg, "SEQ_CLS") if base is not None else None)

    from safealign.runtime.dist import finish

    prep = prepare_training(cfg, net, len(train_ex), out)  # no DeepSpeed: the heads are refit on gathered features
    acc, net, optimizer, scheduler, total, lr = prep.acc, prep.model, prep.optimizer, prep.scheduler, prep.total_steps, prep.lr

    # From here on the output directory is written.
    cfg_dict = to_dict(cfg)
    open_run_dir(acc, cfg, out, "train-cost", cfg_dict=cfg_dict, prompts=[p.prompt for p in data.train + data.eval],
                 inherit_from=[cfg.model if cfg.model != "tiny" else None], data_fingerprint=fingerprint(data.train),
                 extra={"crowd": True, "annotators": len(data.annotators), "train_pairs": len(train_ex), "eval_pairs": len(eval_ex)}, tok=tok)

    seen_eval = [e for e in eval_ex if e.annotator >= 0]

    def evaluate(step: int) -> dict:
        u = acc.unwrap_model(net)
        u.eval()
        m = _pair_accuracies(u, seen_eval, tok.pad_token_id, acc.device)
        u.train()
        return m

    result = train_loop(acc=acc, cfg=cfg, model=net, optimizer=optimizer, scheduler=scheduler, examples=train_ex,
                        collate=lambda b: collate(b, tok.pad_token_id),
                        loss_fn=lambda m, b: m(b["input_ids"].to(acc.device), b["attention_mask"].to(acc.device), b["annotator"].to(acc.device)),
                        out=out, total_steps=total, resume_from=resume_from, evaluate=evaluate if seen_eval else None, cfg_dict=cfg_dict)
    summary: dict = {}
    acc.wait_for_everyone()
    if acc.is_main_process:
        u = acc.unwrap_model(net)
        u.eval()
        analysis = analyse(u, cfg, data, train_ex, eval_ex, tok.pad_token_id, acc.device)
        saved = _export(u, tok, out, analysis, cfg)
        reload = _reload_check(u, out, eval_ex or train_ex, tok.pad_token_id, acc.device, analysis["w_score"])
        counts = Counter(train_counts) + Counter(eval_counts)
        summary = _summary(cfg, data, out, result, analysis, saved, reload, lr, acc, counts, len(train_ex), len(eval_ex), peak_memory_mb())
        _write_eval_scores(out, analysis, data.oracle)
        _plots(out, data, analysis)
        from safealign.runtime import report

        report.write(out, summary, title="safealign train-cost --crowd", intro=_intro(summary, analysis))
    acc.wait_for_everyone()
    finish(acc)
    return summary if acc.is_main_process else {}


@torch.no_grad()
def _pair_accuracies(net: CrowdNet, examples: list[CrowdExample], pad_id: int, device) -> dict:
    if not examples:
        return {}
    hc, bc = _features(net, [e.enc.chosen for e in examples], pad_id, device)
    hr, br = _features(net, [e.enc.rejected for e in examples], pad_id, device)
    ann = np.array([e.annotator for e in examples])
    W = (net.mean_head[None] + net.deviations).detach().cpu().numpy().astype(np.float64)
    dh = hc - hr
    m = {"eval/accuracy": float(np.mean((dh * W[ann]).sum(1) > 0)),
         "eval/population_head_accuracy": float(np.mean(dh @ W.mean(0) > 0)), "eval/pairs": len(examples)}
    if bc is not None:
        m["eval/baseline_accuracy"] = float(np.mean(bc - br > 0))
    return m


# --------------------------------------------------------------------------------------------
# After training: decomposition, zero point, metrics


def _halves(ann: np.ndarray, seed: int) -> np.ndarray:
    """Boolean mask [N]: a random half of each annotator's pairs (seeded)."""
    rng = np.random.default_rng([seed, SPLIT_HALF_SEED])
    first = np.zeros(len(ann), bool)
    for a in np.unique(ann):
        idx = np.where(ann == a)[0]
        rng.shuffle(idx)
        first[idx[: len(idx) // 2]] = True
    return first


def _responses(examples: list[CrowdExample]) -> tuple[list[list[int]], list[tuple[str, str]], np.ndarray]:
    """Unique (prompt, response) texts of the examples: (token ids, (prompt, response), index [N, 2] per pair side)."""
    seen: dict[tuple[str, str], int] = {}
    seqs, keys, where = [], [], np.zeros((len(examples), 2), dtype=np.int64)
    for i, e in enumerate(examples):
        prompt = "\n".join(e.pair.prompt)
        for j, (text, ids) in enumerate(((e.pair.chosen, e.enc.chosen), (e.pair.rejected, e.enc.rejected))):
            key = (prompt, text)
            if key not in seen:
                seen[key] = len(seqs)
                seqs.append(ids)
                keys.append(key)
            where[i, j] = seen[key]
    return seqs, keys, where


@torch.no_grad()
def analyse(net: CrowdNet, cfg: CostConfig, data: CrowdData, train_ex: list[CrowdExample], eval_ex: list[CrowdExample], pad_id: int, device) -> dict:
    """Decompose the heads, set the zero point and measure everything the report shows."""
    A = len(data.annotators)
    W_sgd = (net.mean_head[None] + net.deviations).detach().cpu().numpy().astype(np.float64)  # [A, H] heads as trained
    t_seqs, _, t_where = _responses(train_ex)
    Ht, Bt = _features(net, t_seqs, pad_id, device)                                            # [M, H], [M]
    G = K.feature_metric(Ht)
    t_ann = np.array([e.annotator for e in train_ex])
    dH = Ht[t_where[:, 0]] - Ht[t_where[:, 1]]                                                 # [N, H]

    # Heads: refit (convex, L-BFGS) on the frozen features. SGD moves the deviations slowly (Adam:
    # at most ~lr per step), so after a few epochs the trained heads are still near-identical while
    # the converged refit separates the tastes; the refit is the MAP of the same model given h.
    tt = lambda x: torch.tensor(x, dtype=torch.float32)   # noqa: E731
    w0, d = K.fit_heads(tt(dH), torch.tensor(t_ann), A, head_l2=cfg.crowd_head_l2)
    W = (w0[None] + d).numpy().astype(np.float64)

    # Taste axes: principal directions of the heads; how many to remove (given, or the reproducible ones).
    first = _halves(t_ann, cfg.seed)
    wa, da = K.fit_heads(tt(dH[first]), torch.tensor(t_ann[first]), A, head_l2=cfg.crowd_head_l2)
    wb, db = K.fit_heads(tt(dH[~first]), torch.tensor(t_ann[~first]), A, head_l2=cfg.crowd_head_l2)
    rel = K.axis_reliability((wa[None] + da).numpy(), (wb[None] + db).numpy(), G)
    k_auto, thr = K.auto_n_axes(rel, A)
    k = k_auto if cfg.crowd_taste_axes < 0 else min(cfg.crowd_taste_axes, max(A - 1, 0))
    dec = K.decompose_heads(W, G, k, cfg.crowd_shared)
    variants = {rule: K.decompose_heads(W, G, k, rule).shared for rule in K.SHARED_RULES}
    s, mu = dec.shared, dec.mean

    # Zero point of the exported cost: cost = -s.h - q * unit.h, 0 at the chosen quantile.
    unit = K.constant_direction(Ht)                                                            # [H], e . h ~ 1
    raw_t, unit_t = -(Ht @ s), Ht @ unit
    q, exact = K.zero_point(raw_t, unit_t, cfg.crowd_zero_quantile)
    w_score = -s - q * unit                                                                    # [H]
    cost_t = Ht @ w_score

    train_m, beta = _pair_metrics(train_ex, Ht, Bt, t_where, W, s, mu)
    out: dict = {"W": W, "sgd_vs_refit_cos": _cos_g(W_sgd.mean(0), W.mean(0), G), "G": G, "dec": dec, "reliability": rel, "reliability_threshold": thr, "k_auto": k_auto,
                 "w_score": w_score, "q": q, "zero_exact": exact, "unit_train": unit_t, "cost_train": cost_t, "train": train_m, "beta": beta}
    if eval_ex:
        e_seqs, e_keys, e_where = _responses(eval_ex)
        He, Be = _features(net, e_seqs, pad_id, device)
        eval_m, _ = _pair_metrics(eval_ex, He, Be, e_where, W, s, mu, fit_beta=beta)
        out.update(eval_unit_std=float((He @ unit).std()),
                   eval=eval_m, eval_keys=e_keys, eval_cost=He @ w_score, eval_mean_cost=-(He @ mu), eval_baseline=Be,
                   eval_where=e_where, eval_unit=He @ unit)
        out["per_annotator"] = _per_annotator(data, eval_ex, e_where, He, Be, W, s, mu, G, dec, t_ann)
        costs = {f"discovered cost (exported: {cfg.crowd_shared})": He @ w_score}
        costs.update({f"shared component, rule {rule}": -(He @ v) for rule, v in variants.items() if rule != "mean"})
        costs["mean head (no taste correction)"] = -(He @ mu)
        if Be is not None:
            costs["pooled Bradley-Terry, negated reward"] = -Be
        out["eval_costs"] = costs
        if data.oracle:
            out["oracle"] = _oracle_metrics(e_keys, costs)
    else:
        out["per_annotator"] = _per_annotator(data, [], None, None, None, W, s, mu, G, dec, t_ann)
    return out


def _pair_metrics(examples: list[CrowdExample], H: np.ndarray, Bs: np.ndarray | None, where: np.ndarray, W: np.ndarray, s: np.ndarray,
                  mu: np.ndarray, fit_beta: float | None = None) -> tuple[dict, float]:
    """Preference metrics of pairs (features H [M, H], pooled-baseline scores Bs [M] or None, where [N, 2]
    the rows of chosen/rejected): accuracy and log-likelihood of the own heads W [A, H], of the shared
    component s alone (scaled by beta, fitted here unless ``fit_beta``) and of the mean head mu.
    Returns (metrics, beta)."""
    ann = np.array([e.annotator for e in examples])
    known = ann >= 0
    dh = H[where[:, 0]] - H[where[:, 1]]
    z_full = (dh[known] * W[ann[known]]).sum(1)
    v = dh @ s
    z_mean = dh @ mu
    m = {"pairs": int(len(examples)), "pairs_seen_annotators": int(known.sum()),
         "accuracy_own_heads": float(np.mean(z_full > 0)) if known.any() else None,
         "accuracy_shared_only": float(np.mean(v > 0)) if len(v) else None,
         "accuracy_mean_head": float(np.mean(z_mean > 0)) if len(v) else None,
         "loglik_own_heads": K.mean_loglik(z_full)}
    if Bs is not None:
        zb = Bs[where[:, 0]] - Bs[where[:, 1]]
        m["accuracy_pooled_baseline"] = float(np.mean(zb > 0)) if len(zb) else None
        m["loglik_pooled_baseline"] = K.mean_loglik(zb)
    beta = K.fit_scale(v[known]) if fit_beta is None else fit_beta
    m["loglik_shared_only"] = K.mean_loglik(beta * v[known])
    m["loglik_mean_head"] = K.mean_loglik(z_mean[known])
    m["loglik_gain_share_shared"] = K.loglik_gain_share(z_full, beta * v[known])
    m["loglik_gain_share_mean_head"] = K.loglik_gain_share(z_full, z_mean[known])
    m["utility_variance_share_shared"] = K.shared_variance_share(z_full, v[known], ann[known]) if known.any() else None
    return m, beta


def _cos_g(a: np.ndarray, b: np.ndarray, G: np.ndarray) -> float:
    d = math.sqrt(float(a @ G @ a) * float(b @ G @ b))
    return float(a @ G @ b) / d if d > 0 else float("nan")


def _per_annotator(data: CrowdData, eval_ex, where, He, Be, W, s, mu, G, dec, t_ann) -> list[dict]:
    rows = []
    ann = np.array([e.annotator for e in eval_ex]) if eval_ex else np.zeros(0, int)
    dh = (He[where[:, 0]] - He[where[:, 1]]) if eval_ex else None
    zb = (Be[where[:, 0]] - Be[where[:, 1]]) if (eval_ex and Be is not None) else None
    for i, a in enumerate(data.annotators):
        r: dict = {"annotator": a}
        if a in data.tastes:
            r["taste (from data)"] = data.tastes[a]
        r["train_pairs"] = int((t_ann == i).sum())
        m = ann == i
        r["eval_pairs"] = int(m.sum())
        if m.any():
            own = dh[m] @ W[i]
            r["acc_own_head"] = float(np.mean(own > 0))
            r["acc_shared_only"] = float(np.mean(dh[m] @ s > 0))
            if zb is not None:
                r["acc_pooled"] = float(np.mean(zb[m] > 0))
                r["agree_own_vs_pooled"] = float(np.mean((own > 0) == (zb[m] > 0)))
            else:
                r["agree_own_vs_mean_head"] = float(np.mean((own > 0) == (dh[m] @ mu > 0)))
        r["cos_head_mean"] = _cos_g(W[i], mu, G)
        r["cos_head_shared"] = _cos_g(W[i], s, G)
        for j in range(min(2, dec.coords.shape[1])):
            r[f"axis{j + 1}_coord"] = float(dec.coords[i, j])
        rows.append(r)
    return rows


def _oracle_metrics(keys: list[tuple[str, str]], costs: dict[str, np.ndarray]) -> dict:
    """AUROC (oracle unsafe vs safe) and Spearman with oracle harm of each cost, on the eval responses.
    The first entry of ``costs`` is the exported cost model."""
    from safealign.data.synth import oracle

    scores = [oracle(p.split("\n")[-1], r) for p, r in keys]
    harm = np.array([o.harm for o in scores])
    unsafe = np.array([o.unsafe for o in scores], dtype=bool)
    helpful = np.array([o.helpfulness for o in scores])
    table = [{"score used as cost": name, "auroc_unsafe": K.auroc(c, unsafe), "spearman_harm": K.spearman(c, harm),
              "spearman_neg_helpfulness": K.spearman(c, -helpful)} for name, c in costs.items()]
    cost = next(iter(costs.values()))
    return {"responses": int(len(keys)), "oracle_unsafe_rate": float(unsafe.mean()) if len(unsafe) else None, "table": table,
            "zero_point": {"unsafe_with_cost_gt_0": float(np.mean(cost[unsafe] > 0)) if unsafe.any() else None,
                           "safe_with_cost_le_0": float(np.mean(cost[~unsafe] <= 0)) if (~unsafe).any() else None}}


def _export(net: CrowdNet, tok, out: Path, an: dict, cfg: CostConfig) -> dict:
    """Save the cost model (score head = -s - q * unit) and the pooled baseline, atomically."""
    model = net.model
    head = score_head(model)
    with torch.no_grad():
        head.weight.copy_(torch.tensor(an["w_score"], dtype=head.weight.dtype)[None, :])
    model.config.safealign_score_type = "cost"
    model.config.safealign_crowd = {"zero_quantile_of_training_costs": float(cfg.crowd_zero_quantile), "taste_axes_removed": int(an["dec"].n_axes)}
    from safealign.runtime import model_card
    from safealign.runtime.io import staged_model_dir

    saved = {}
    template = model_card.prepare_tokenizer(tok, cfg.template)
    with staged_model_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        saved.update(model_card.finish_model_dir(tmp, out, tok, template=template, base=cfg.model, max_length=cfg.max_length))
    saved["model"] = str(out)
    if net.baseline is not None:
        with staged_model_dir(out, out / "pooled_baseline", ".tmp-baseline") as tmp:
            net.baseline.model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            model_card.finish_model_dir(tmp, out / "pooled_baseline", tok, template=template, base=cfg.model, max_length=cfg.max_length)
        saved["pooled_baseline"] = str(out / "pooled_baseline")
    return saved


@torch.no_grad()
def _reload_check(net: CrowdNet, out: Path, examples: list[CrowdExample], pad_id: int, device, w_score: np.ndarray) -> dict:
    """The saved cost model, reloaded with plain transformers, gives the costs the analysis computed
    (features . exported weight) and the live model's end scores."""
    from safealign.models.export import live_outputs, reload_check

    seqs = [e.enc.chosen for e in examples[:8]] + [e.enc.rejected for e in examples[:8]]
    ids, mask = pad(seqs, pad_id)
    live = live_outputs(TokenScorer(net.model).eval(), "score", ids, mask)
    feats, _ = _features(net, seqs, pad_id, device)
    check = reload_check(out, "score", live, ids, mask)
    check["max_abs_diff_vs_analysis"] = float(np.abs(feats @ w_score - live.numpy()).max())
    check["ok"] = bool(check.get("ok", True)) and check["max_abs_diff_vs_analysis"] < 1e-3
    return check


def _r(x, nd: int = 4):
    if isinstance(x, float):
        return round(x, nd) if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _r(v, nd) for k, v in x.items()}
    if isinstance(x, list):
        return [_r(v, nd) for v in x]
    return x


def _summary(cfg, data: CrowdData, out: Path, result, an: dict, saved: dict, reload: dict, lr, acc, counts, n_train, n_eval, peak) -> dict:
    dec = an["dec"]
    cost_t = an["cost_train"]
    unit_t = an["unit_train"]
    k = dec.n_axes
    decomposition = {
        "annotators": len(data.annotators), "taste_axes_removed": k,
        "taste_axes_rule": (f"auto: leading principal axes with split-half reliability r >= {an['reliability_threshold']:.3f} "
                            "(cross-fitted halves, Fisher z, one-sided alpha 0.05, tested in order, stop at the first failure)") if cfg.crowd_taste_axes < 0 else "given (--crowd-taste-axes)",
        "auto_would_remove": an["k_auto"],
        "shared_rule": cfg.crowd_shared,
        "mean_head_moved (||s - mu||^2 / ||mu||^2, G metric)": dec.removed_fraction,
        "heads": "refit by L-BFGS on the trained backbone's frozen EOS features",
        "cos_G(mean head as trained, refit)": an["sgd_vs_refit_cos"],
        "cos_G(mean head, shared)": _cos_g(dec.mean, dec.shared, an["G"]),
        "principal_axes": [{"axis": j + 1, "head_variance_share": float(dec.axis_variance_share[j]),
                            "split_half_reliability": float(an["reliability"][j]), "removed": j < k}
                           for j in range(min(6, len(dec.axis_variance)))],
    }
    zero = {"convention": f"cost = 0 at quantile {cfg.crowd_zero_quantile} of the training responses' costs (no safety labels: the zero point is a convention)",
            "q": float(an["q"]), "exact": bool(an["zero_exact"]),
            "train_responses_with_cost_gt_0": float(np.mean(cost_t > 0)) if len(cost_t) else None,
            "bias_unit_mean": float(unit_t.mean()) if len(unit_t) else None, "bias_unit_std": float(unit_t.std()) if len(unit_t) else None,
            "bias_unit_min": float(unit_t.min()) if len(unit_t) else None, "bias_unit_std_eval": an.get("eval_unit_std"),
            "bias_unit_note": "cost = -s.h - q (e.h) with e.h ~ 1: e is the least-variance unit-mean direction of the training features (the backbone was trained to have one)"}
    summary = {
        "stage": "train-cost", "mode": "crowd (no safety labels)", "model": cfg.model, "output_dir": str(out), "steps": result.total_steps,
        "resumed_from_step": result.resumed_from, "world_size": acc.num_processes, "lr": lr,
        "data": {**data.stats, "train_pairs": n_train, "eval_pairs": n_eval, "annotators": len(data.annotators),
                 "labels_per_annotator": _label_spread([r["train_pairs"] for r in an["per_annotator"]]),
                 "truncated_pairs": counts["truncated_pairs"], "dropped_identical_after_truncation": counts["identical_after_truncation"]},
        "train": {kk: v for kk, v in result.last_train.items() if kk != "step"},
        "decomposition": decomposition,
        "preferences_train": an["train"],
        "preferences_eval": an.get("eval", {}),
        "zero_point": zero,
        "oracle": an.get("oracle"),
        "per_annotator": an["per_annotator"],
        "throughput": {"pairs_per_second": result.examples_per_second, "seconds": result.seconds, "peak_memory_mb": peak},
        "reload_check": reload, "saved": saved,
    }
    summary = _r(summary)
    summary["headline"] = _headline(summary)
    return summary


def _label_spread(ns: list[int]) -> dict:
    return {"min": int(min(ns)), "median": float(np.median(ns)), "max": int(max(ns))} if ns else {}


def _headline(summary: dict) -> str:
    d, ev, o = summary["decomposition"], summary.get("preferences_eval") or {}, summary.get("oracle")
    parts = [f"crowd cost from {d['annotators']} annotators: {d['taste_axes_removed']} taste axis(es) removed"]
    if ev.get("loglik_gain_share_shared") is not None:
        share = ev["loglik_gain_share_shared"]
        parts.append(f"the shared component carries {100 * share:.0f}% of the per-annotator model's log-likelihood gain on eval pairs"
                     + (" (more than 100%: alone it predicts held-out labels better than the per-annotator heads)" if share > 1 else ""))
    if o:
        rows = {r["score used as cost"]: r for r in o["table"]}
        first = o["table"][0]
        line = f"oracle AUROC unsafe-vs-safe {first['auroc_unsafe']:.3f}, Spearman with harm {first['spearman_harm']:.3f}"
        pooled = rows.get("pooled Bradley-Terry, negated reward")
        if pooled:
            line += f" (pooled BT: {pooled['auroc_unsafe']:.3f} / {pooled['spearman_harm']:.3f})"
        parts.append(line)
    return "; ".join(parts)


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _intro(summary: dict, an: dict) -> str:
    lines = [f"**{summary['headline']}**", ""]
    o = summary.get("oracle")
    if o:
        lines += [f"Oracle check on {o['responses']} held-out responses (synthetic world; {100 * (o['oracle_unsafe_rate'] or 0):.1f}% unsafe):", "",
                  "| score used as cost | AUROC unsafe vs safe | Spearman with harm | Spearman with -helpfulness |", "| --- | --- | --- | --- |"]
        for m in o["table"]:
            lines.append(f"| {m['score used as cost']} | {_fmt(m['auroc_unsafe'])} | {_fmt(m['spearman_harm'])} | {_fmt(m['spearman_neg_helpfulness'])} |")
        lines += ["", "Without safety labels, whatever ALL annotators agree on is part of the shared component: in the synthetic world "
                  "everyone also values helpfulness, so the discovered cost is about harm minus helpfulness, not harm alone.", ""]
    ev = summary.get("preferences_eval") or {}
    if ev:
        lines += ["Held-out preference pairs:", "", "| model | accuracy | mean log-likelihood |", "| --- | --- | --- |",
                  f"| per-annotator heads | {_fmt(ev.get('accuracy_own_heads'))} | {_fmt(ev.get('loglik_own_heads'))} |",
                  f"| shared component only (one fitted scale) | {_fmt(ev.get('accuracy_shared_only'))} | {_fmt(ev.get('loglik_shared_only'))} |",
                  f"| mean head | {_fmt(ev.get('accuracy_mean_head'))} | {_fmt(ev.get('loglik_mean_head'))} |"]
        if "accuracy_pooled_baseline" in ev:
            lines.append(f"| pooled Bradley-Terry baseline | {_fmt(ev.get('accuracy_pooled_baseline'))} | {_fmt(ev.get('loglik_pooled_baseline'))} |")
        lines += ["", f"Coin flip: log-likelihood {math.log(0.5):.3f}. The shared component alone carries "
                  f"{_fmt(ev.get('loglik_gain_share_shared'))} of the per-annotator model's log-likelihood gain over a coin flip, and "
                  f"{_fmt(ev.get('utility_variance_share_shared'))} of the variance of the annotators' utility differences.", ""]
    z = summary["zero_point"]
    lines += [f"Zero point: {z['convention']}; {100 * (z['train_responses_with_cost_gt_0'] or 0):.1f}% of training responses have cost > 0.", ""]
    return "\n".join(lines)


EVAL_SCORE_KEYS = {"discovered cost": "cost", "rule project": "shared_project", "rule midrange": "shared_midrange",
                   "mean head": "mean_head", "pooled Bradley-Terry": "pooled_negated_reward"}


def _write_eval_scores(out: Path, an: dict, oracle: bool) -> None:
    """eval_scores.jsonl: every held-out response with the exported cost and the alternatives
    (shared component by each rule, mean head, negated pooled reward; + oracle columns when known)."""
    import json

    from safealign.runtime.io import atomic_write_text

    if "eval_costs" not in an:
        return
    names = {}
    for name in an["eval_costs"]:
        key = next(v for k, v in EVAL_SCORE_KEYS.items() if name.startswith(k) or k in name)
        names[name] = key
    if oracle:
        from safealign.data.synth import oracle as world_oracle
    lines = []
    for i, (p, r) in enumerate(an["eval_keys"]):
        row = {"prompt": p, "response": r, **{names[n]: round(float(c[i]), 6) for n, c in an["eval_costs"].items()}}
        if oracle:
            o = world_oracle(p.split("\n")[-1], r)
            row.update(oracle_harm=o.harm, oracle_unsafe=o.unsafe, oracle_helpfulness=o.helpfulness)
        lines.append(json.dumps(row, ensure_ascii=False))
    atomic_write_text(out / "eval_scores.jsonl", "\n".join(lines) + "\n")


def _plots(out: Path, data: CrowdData, an: dict) -> None:
    from safealign.runtime import plots
    from safealign.runtime.metrics import read_metrics

    rows = read_metrics(out / "metrics.jsonl")
    plots.curves(rows, ["train/loss", "train/baseline_loss"], out / "plots" / "loss.png", "training loss (crowd model, pooled baseline)")
    plots.curves(rows, [k for k in ("train/accuracy", "train/population_head_accuracy", "train/baseline_accuracy", "eval/accuracy",
                                    "eval/population_head_accuracy", "eval/baseline_accuracy") if any(k in r for r in rows)],
                 out / "plots" / "accuracy.png", "preference accuracy")
    if "eval_cost" in an:
        cost = an["eval_cost"]
        if "oracle" in an:
            from safealign.data.synth import oracle

            unsafe = np.array([oracle(p.split("\n")[-1], r).unsafe for p, r in an["eval_keys"]])
            groups = {"oracle unsafe": cost[unsafe].tolist(), "oracle safe": cost[~unsafe].tolist()}
        else:
            w = an["eval_where"]
            groups = {"preferred": cost[w[:, 0]].tolist(), "not preferred": cost[w[:, 1]].tolist()}
        plots.histogram(groups, out / "plots" / "cost_eval.png", "discovered cost of held-out responses", vlines={"zero point (a convention)": 0.0}, xlabel="cost", ylabel="responses")
    dec = an["dec"]
    if dec.coords.shape[1] >= 1:
        plt = plots._plt()
        fig, ax = plt.subplots(figsize=(5, 4))
        x = dec.coords[:, 0]
        y = dec.coords[:, 1] if dec.coords.shape[1] > 1 else np.zeros_like(x)
        tastes = [data.tastes.get(a, "?") for a in data.annotators]
        for t in sorted(set(tastes)):
            m = np.array([tt == t for tt in tastes])
            ax.scatter(x[m], y[m], label=t if t != "?" else "annotator", alpha=0.8)
        ax.set_xlabel(f"axis 1 ({100 * dec.axis_variance_share[0]:.0f}% of head variance)")
        ax.set_ylabel(f"axis 2 ({100 * dec.axis_variance_share[1]:.0f}%)" if len(dec.axis_variance_share) > 1 else "-")
        ax.set_title("annotator heads on the principal (taste) axes")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        (out / "plots").mkdir(parents=True, exist_ok=True)
        fig.savefig(out / "plots" / "annotators.png", dpi=100)
        plt.close(fig)
