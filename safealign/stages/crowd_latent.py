"""`safealign crowd latent`: the VPL latent preference model (Poddar et al. 2024) on crowd pairs.

Each training example is one labelled pair of annotator a plus a *context set* of a's other labelled
pairs: the encoder maps the context set to q(z | context) = N(mu, sigma^2), a z is drawn, and the
z-conditioned decoder is trained with Bradley-Terry on ``target_pairs`` pairs of a; the loss is
``BCE + kl_weight(step) * KL(q || learned prior)`` with cyclic cosine annealing (algorithms/skills.py).
A pooled Bradley-Terry model (one reward for everyone) is trained on the same batches as the baseline.

Report: per-annotator held-out accuracy (pairs of held-out prompts) of the decoder at the annotator's
posterior mean vs the pooled model; how well z separates the annotators (nearest-centroid accuracy of
annotator identity from z of random context sets, and between/within distance ratio). Saved:
``latent.safetensors`` + ``latent.json`` (the model), ``annotators.json`` (posterior z per annotator, prior),
``pooled.safetensors`` (the pooled model), with the usual config/manifest/metrics/report/plots.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from safealign.algorithms import skills as S
from safealign.config import CrowdLatentConfig, to_dict
from safealign.data.prompts import prompt_text
from safealign.data.records import fingerprint
from safealign.models.skills import VPL, PooledBT, pair_features
from safealign.runtime import plots, report
from safealign.runtime.io import atomic_write_json, check_output_dir, staged_model_dir
from safealign.stages.crowd import load_crowd_pairs
from safealign.stages.trainer import open_run_dir, prepare_training, resume_point, train_loop

LATENT_WEIGHTS, LATENT_CONFIG, POOLED_WEIGHTS, ANNOTATORS = "latent.safetensors", "latent.json", "pooled.safetensors", "annotators.json"


class LatentNet(nn.Module):
    """The VPL model and the pooled baseline, trained side by side on the same batches."""

    def __init__(self, features: int, hidden: int, z_dim: int):
        super().__init__()
        self.vpl = VPL(features, hidden, z_dim)
        self.pooled = PooledBT(features, hidden)


class PairBank:
    """Features of every pair, indexed by annotator: chosen/rejected [N, F] (the annotator's label)."""

    def __init__(self, pairs: list, dim: int):
        prompts = [prompt_text(p.prompt if len(p.prompt) > 1 else p.prompt[0]) for p in pairs]
        self.chosen = pair_features(prompts, [p.chosen for p in pairs], dim)
        self.rejected = pair_features(prompts, [p.rejected for p in pairs], dim)
        self.annotator = [str(p.annotator) for p in pairs]
        self.by_annotator: dict[str, list[int]] = defaultdict(list)
        for i, a in enumerate(self.annotator):
            self.by_annotator[a].append(i)

    def context(self, rng: np.random.Generator, annotator: str, n: int) -> np.ndarray:
        idx = self.by_annotator[annotator]
        return rng.choice(idx, size=n, replace=len(idx) < n)


def make_collate(bank: PairBank, cfg: CrowdLatentConfig):
    def collate(batch: list[int]) -> dict:
        """One set per example: ctx_* [A, C, F] and tgt_* [A, T, F] of the example's annotator (the example's own
        pair first among the targets). Deterministic in the batch (seeded by its indices)."""
        rng = np.random.default_rng([cfg.seed, *batch])
        ctx, tgt = [], []
        for i in batch:
            a = bank.annotator[i]
            ctx.append(bank.context(rng, a, cfg.context_pairs))
            tgt.append(np.concatenate([[i], bank.context(rng, a, cfg.target_pairs - 1)]) if cfg.target_pairs > 1 else np.array([i]))
        c, t = torch.as_tensor(np.stack(ctx)), torch.as_tensor(np.stack(tgt))
        return {"ctx_c": bank.chosen[c], "ctx_r": bank.rejected[c], "ctx_mask": torch.ones(c.shape), "tgt_c": bank.chosen[t], "tgt_r": bank.rejected[t]}
    return collate


def make_loss(cfg: CrowdLatentConfig, total_steps: int):
    def loss_fn(model: LatentNet, batch: dict) -> tuple[torch.Tensor, dict]:
        """BCE(decoder at z ~ q) + kl_weight * KL(q || prior), plus the pooled model's BCE on the same targets."""
        net = model.module if hasattr(model, "module") else model
        vpl = net.vpl
        dev = vpl.prior_mu.device
        b = {k: v.to(dev) for k, v in batch.items()}
        mu, logvar = vpl.posterior(b["ctx_c"], b["ctx_r"], b["ctx_mask"])                 # [A, D]
        z = S.reparameterize(mu, logvar, torch.randn_like(mu))
        r_c, r_r = vpl.reward(b["tgt_c"], z), vpl.reward(b["tgt_r"], z)                    # [A, T]
        ones = torch.ones_like(r_c)
        bce = S.bt_loss(r_c, r_r, ones)
        kl = S.gaussian_kl(mu, logvar, vpl.prior_mu, vpl.prior_logvar).mean()
        w = S.cyclic_kl_weight(int(vpl.calls) // max(cfg.grad_accum, 1), total_steps, cfg.kl_cycles, cfg.kl_weight)
        vpl.calls += 1
        p_c, p_r = net.pooled(b["tgt_c"]), net.pooled(b["tgt_r"])
        pooled = S.bt_loss(p_c, p_r, ones)
        return bce + w * kl + pooled, {"bce": bce.detach(), "kl": kl.detach(), "kl_weight": torch.tensor(w),
                                       "pooled_bce": pooled.detach(), "accuracy": (r_c > r_r).float().mean().detach()}
    return loss_fn


@torch.no_grad()
def annotator_posteriors(vpl: VPL, bank: PairBank) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Posterior (mu, sigma) [D] of each annotator given all its training pairs."""
    out = {}
    for a, idx in sorted(bank.by_annotator.items()):
        i = torch.tensor(idx)
        mu, logvar = vpl.posterior(bank.chosen[i][None], bank.rejected[i][None], torch.ones(1, len(idx)))
        out[a] = (mu[0], torch.exp(0.5 * logvar[0]))
    return out


@torch.no_grad()
def heldout_accuracy(net: LatentNet, z: dict, bank: PairBank) -> dict[str, dict]:
    """Per annotator: fraction of held-out pairs whose label the decoder at the annotator's z (and the pooled model) gets right."""
    out = {}
    for a, idx in sorted(bank.by_annotator.items()):
        if a not in z:
            continue
        i = torch.tensor(idx)
        zz = z[a][0][None]
        vpl = (net.vpl.reward(bank.chosen[i][None], zz) > net.vpl.reward(bank.rejected[i][None], zz)).float().mean()
        pooled = (net.pooled(bank.chosen[i]) > net.pooled(bank.rejected[i])).float().mean()
        out[a] = {"pairs": len(idx), "vpl_accuracy": round(float(vpl), 4), "pooled_accuracy": round(float(pooled), 4)}
    return out


@torch.no_grad()
def z_separation(vpl: VPL, bank: PairBank, context: int, draws: int, seed: int) -> tuple[dict, dict]:
    """z of ``draws`` random context sets per annotator -> nearest-centroid identity accuracy and the ratio of the mean
    distance between annotator centroids to the mean distance of a draw to its own centroid. Returns (summary, points)."""
    rng = np.random.default_rng([seed, 99])
    pts = {}
    for a in sorted(bank.by_annotator):
        c = torch.as_tensor(np.stack([bank.context(rng, a, context) for _ in range(draws)]))
        mu, _ = vpl.posterior(bank.chosen[c], bank.rejected[c], torch.ones(c.shape))
        pts[a] = mu
    names = list(pts)
    cents = torch.stack([pts[a].mean(0) for a in names])                                   # [N_a, D]
    hits, within = 0, []
    for k, a in enumerate(names):
        d = torch.cdist(pts[a], cents)                                                      # [draws, N_a]
        hits += int((d.argmin(1) == k).sum())
        within.append(float(d[:, k].mean()))
    between = float(torch.pdist(cents).mean()) if len(names) > 1 else 0.0
    w = float(np.mean(within))
    return ({"identity_accuracy": round(hits / (draws * len(names)), 4), "between_centroid_distance": round(between, 4),
             "within_distance": round(w, 4), "separation_ratio": round(between / max(w, 1e-9), 3)},
            {a: p.tolist() for a, p in pts.items()})


def _z_plot(points: dict, path: Path) -> Path:
    plt = plots._plt()
    fig, ax = plt.subplots(figsize=(5, 4))
    for a, pts in points.items():
        p = np.array(pts)
        ax.scatter(p[:, 0], p[:, 1] if p.shape[1] > 1 else np.zeros(len(p)), s=12, label=a, alpha=0.7)
    ax.set_xlabel("z[0]")
    ax.set_ylabel("z[1]")
    ax.set_title("posterior mean z of random context sets, by annotator")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return plots._save(fig, path)


def run(cfg: CrowdLatentConfig) -> dict:
    out = check_output_dir(cfg.output_dir, cfg.resume)
    last, _ = resume_point(cfg, out)
    data = load_crowd_pairs(cfg)                       # every input check (annotator ids, too few pairs) before any write
    torch.manual_seed(cfg.seed)
    features = cfg.bow_dim
    train_bank, eval_bank = PairBank(data.train, cfg.bow_dim), PairBank(data.eval, cfg.bow_dim)
    net = LatentNet(features, cfg.hidden, cfg.z_dim)
    p = prepare_training(cfg, net, len(data.train), out)
    cfg_dict = to_dict(cfg)
    open_run_dir(p.acc, cfg, out, "crowd-latent", cfg_dict=cfg_dict, prompts=[prompt_text(x.prompt[0]) for x in data.train],
                 inherit_from=[], data_fingerprint=fingerprint(data.train), extra={"annotators": data.annotators})
    loop = train_loop(acc=p.acc, cfg=cfg, model=p.model, optimizer=p.optimizer, scheduler=p.scheduler, examples=list(range(len(data.train))),
                      collate=make_collate(train_bank, cfg), loss_fn=make_loss(cfg, p.total_steps), out=out, total_steps=p.total_steps,
                      resume_from=last, cfg_dict=cfg_dict, unit="sets")
    net = p.acc.unwrap_model(p.model).eval()
    z = annotator_posteriors(net.vpl, train_bank)
    acc = heldout_accuracy(net, z, eval_bank)
    sep, points = z_separation(net.vpl, train_bank, cfg.context_pairs, cfg.separation_draws, cfg.seed)
    n_eval = sum(v["pairs"] for v in acc.values())
    overall = {k: round(sum(v[k] * v["pairs"] for v in acc.values()) / max(n_eval, 1), 4) for k in ("vpl_accuracy", "pooled_accuracy")}
    prior = {"mu": net.vpl.prior_mu.tolist(), "sigma": torch.exp(0.5 * net.vpl.prior_logvar).tolist()}
    annotators = {a: {"z": z[a][0].tolist(), "z_std": z[a][1].tolist(), "train_pairs": len(train_bank.by_annotator[a]),
                      "eval_pairs": len(eval_bank.by_annotator.get(a, []))} for a in z}
    from safetensors.torch import save_file

    with staged_model_dir(out, tmp_name=".tmp-latent") as tmp:
        save_file({k: v.contiguous() for k, v in net.vpl.state_dict().items()}, str(tmp / LATENT_WEIGHTS))
        save_file({k: v.contiguous() for k, v in net.pooled.state_dict().items()}, str(tmp / POOLED_WEIGHTS))
        atomic_write_json(tmp / LATENT_CONFIG, {"format": "safealign-vpl-v1", "bow_dim": cfg.bow_dim, "features": features, "hidden": cfg.hidden,
                                                "z_dim": cfg.z_dim, "features_are": "bow(response), algorithms.skills.bow_features"})
        atomic_write_json(tmp / ANNOTATORS, {"prior": prior, "annotators": annotators})
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    plots.curves(rows, ["train/bce", "train/pooled_bce"], out / "plots" / "loss.png", "crowd latent: Bradley-Terry loss")
    plots.curves(rows, ["train/kl"], out / "plots" / "kl.png", "crowd latent: KL(q || prior)")
    _z_plot(points, out / "plots" / "z.png")
    better = overall["vpl_accuracy"] - overall["pooled_accuracy"]
    summary = {"stage": "crowd-latent", "output_dir": str(out),
               "headline": f"held-out accuracy: VPL {overall['vpl_accuracy']:.3f} vs pooled BT {overall['pooled_accuracy']:.3f} ({better:+.3f}); "
                           f"z identifies the annotator in {sep['identity_accuracy']:.0%} of context sets",
               "heldout": {"overall": overall, "per_annotator": acc}, "z_separation": sep, "prior": prior,
               "annotators": {a: {"z": [round(x, 3) for x in v["z"]], "train_pairs": v["train_pairs"]} for a, v in annotators.items()},
               "data": data.stats, "steps": loop.step, "resumed_from": loop.resumed_from, "seconds": round(loop.seconds, 2),
               "last_train": loop.last_train}
    report.write(out, summary, title="safealign crowd latent")
    return summary
