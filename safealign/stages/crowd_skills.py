"""`safealign crowd skills`: the skill policy pi(y | x, z) of safe crowd skills.

A causal LM (``--model``, e.g. an `sft` policy) gets LoRA and a z -> soft-prompt prefix (models/skills.ZPrefix).
Every labelled pair (x, y_w, y_l) of annotator a is trained at a's posterior mean z_a from `crowd latent`
with the contrastive preference loss (algorithms.skills.cpl_loss): with ``--reference`` the advantages are
log-ratios to the starting LM without prefix (DPO for lambda 1), else CPL's alpha * log pi. Every
annotator's labels carry the shared safety rule, so every skill in the crowd's latent space is safe while
it pursues a different goal (Lin & Brown 2026).

Saved (plain transformers + peft load the LM): the merged LM at the top, the LoRA adapter under ``adapter/``,
``z_prefix.safetensors`` + ``z_prefix.json`` (the z -> prefix module, see models/skills.py), ``skills.json``
(each annotator's z and the prior, copied from the latent model), report with each skill's held-out
preference accuracy and, on crowd-world prompts, the oracle's kinds and harm of its sampled answers.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from safealign.algorithms import skills as S
from safealign.config import CrowdSkillsConfig, to_dict
from safealign.data.encode import encode_pair_sides
from safealign.data.prompts import prompt_text, read_prompts
from safealign.data.records import fingerprint
from safealign.data.templates import effective_template
from safealign.errors import BadInput
from safealign.models.generation import encode_prompts, pad
from safealign.models.skills import ZPrefix, load_zprefix, prefix_logits, response_logprob, sample_with_prefix, save_zprefix
from safealign.runtime import plots, report
from safealign.runtime.io import atomic_write_json, check_output_dir
from safealign.runtime.seeds import seed_sampling
from safealign.stages.crowd import load_crowd_pairs
from safealign.stages.trainer import open_run_dir, prepare_training, resume_point, save_collectively, train_loop

SKILLS_FILE = "skills.json"


@dataclass
class SkillExample:
    chosen: list[int]          # prompt + chosen + EOS
    rejected: list[int]
    prompt_len: int
    annotator: str
    ref_chosen: float = 0.0    # log pi_ref(y_w | x), filled before training
    ref_rejected: float = 0.0


class SkillNet(nn.Module):
    """The LM (with LoRA) and the z -> prefix module, trained together."""

    def __init__(self, lm: nn.Module, zprefix: ZPrefix):
        super().__init__()
        self.lm, self.zprefix = lm, zprefix


def read_latent(path: str) -> dict:
    """annotators.json of a `crowd latent` output: {"prior": {mu, sigma}, "annotators": {id: {z, ...}}}; BadInput if absent."""
    p = Path(path) / "annotators.json"
    if not p.is_file():
        raise BadInput("not the output of `safealign crowd latent` (no annotators.json)", where=str(path),
                       fix="pass --latent DIR with the output directory of `safealign crowd latent`")
    try:
        data = json.loads(p.read_text())
        data["prior"]["mu"], data["annotators"]  # noqa: B018 - the keys must be there
    except (ValueError, KeyError, TypeError):
        raise BadInput("annotators.json is unreadable", where=str(p), fix="run `safealign crowd latent` again") from None
    return data


def _encode(tok, pairs: list, template: str, max_length: int) -> list[SkillExample]:
    template = effective_template(template, tok)
    out = []
    for p in pairs:
        c, r = encode_pair_sides(tok, p, template, max_length)
        if c.ids != r.ids:                                            # one prompt cut for both: equal prompt_len
            out.append(SkillExample(c.ids, r.ids, c.prompt_len, str(p.annotator)))
    return out


def collate(batch: list[SkillExample], pad_id: int, z_of: dict[str, torch.Tensor]) -> dict:
    """ids/mask [2B, L] (first B chosen), prompt_len [2B], z [B, D], ref [2B]."""
    ids, mask = pad([e.chosen for e in batch] + [e.rejected for e in batch], pad_id)
    return {"input_ids": ids, "attention_mask": mask, "prompt_len": torch.tensor([e.prompt_len for e in batch] * 2),
            "z": torch.stack([z_of[e.annotator] for e in batch]),
            "ref": torch.tensor([e.ref_chosen for e in batch] + [e.ref_rejected for e in batch])}


def pair_logprobs(net: SkillNet, batch: dict) -> torch.Tensor:
    """Summed response log-probabilities [2B] at each pair's z (the prefix repeated for chosen and rejected)."""
    dev = next(net.parameters()).device
    prefix = net.zprefix(batch["z"].to(dev))                                   # [B, K, H]
    prefix = torch.cat([prefix, prefix], dim=0)                                # [2B, K, H]
    return response_logprob(net.lm, prefix, batch["input_ids"].to(dev), batch["attention_mask"].to(dev), batch["prompt_len"].to(dev))


def make_loss(cfg: CrowdSkillsConfig):
    def loss_fn(model, batch: dict) -> tuple[torch.Tensor, dict]:
        net = model.module if hasattr(model, "module") else model
        lp = pair_logprobs(net, batch)
        B = lp.shape[0] // 2
        ref = batch["ref"].to(lp.device) if cfg.reference else None
        loss = S.cpl_loss(lp[:B], lp[B:], cfg.beta, cfg.cpl_lambda, ref[:B] if ref is not None else None, ref[B:] if ref is not None else None)
        margin = (lp[:B] - (ref[:B] if ref is not None else 0)) - (lp[B:] - (ref[B:] if ref is not None else 0))
        return loss.mean(), {"accuracy": (margin > 0).float().mean().detach(), "margin": margin.mean().detach()}
    return loss_fn


@torch.no_grad()
def fill_reference(lm, examples: list[SkillExample], pad_id: int, batch_size: int = 64) -> None:
    """log pi_ref of every chosen and rejected answer: the starting LM, no prefix."""
    lm.eval()
    for i in range(0, len(examples), batch_size):
        part = examples[i:i + batch_size]
        ids, mask = pad([e.chosen for e in part] + [e.rejected for e in part], pad_id)
        lp = response_logprob(lm, None, ids, mask, torch.tensor([e.prompt_len for e in part] * 2))
        for j, e in enumerate(part):
            e.ref_chosen, e.ref_rejected = float(lp[j]), float(lp[len(part) + j])


@torch.no_grad()
def heldout_accuracy(net: SkillNet, examples: list[SkillExample], pad_id: int, z_of: dict, reference: bool) -> dict[str, dict]:
    """Per annotator: fraction of held-out pairs whose chosen answer gains more (log-ratio to the reference) at the annotator's z."""
    hits: Counter = Counter()
    total: Counter = Counter()
    for i in range(0, len(examples), 32):
        part = examples[i:i + 32]
        b = collate(part, pad_id, z_of)
        lp = pair_logprobs(net, b)
        ref = b["ref"] if reference else torch.zeros_like(lp)
        B = len(part)
        m = (lp[:B] - ref[:B]) - (lp[B:] - ref[B:])
        for e, ok in zip(part, (m > 0).tolist()):
            hits[e.annotator] += int(ok)
            total[e.annotator] += 1
    return {a: {"pairs": total[a], "accuracy": round(hits[a] / total[a], 4)} for a in sorted(total)}


def sample_skill(lm, zprefix, tok, prompts: list, z: torch.Tensor, template: str, *, max_new_tokens: int, temperature: float,
                 seed: int, step: int = 0) -> list[str]:
    """Answers of the skill at z ([D], or [B, D] one per prompt) to ``prompts``."""
    ids = encode_prompts(tok, prompts, template)
    zz = z.expand(len(prompts), -1) if z.dim() == 1 else z
    seed_sampling(seed, step)
    with torch.no_grad():
        gen = sample_with_prefix(lm, zprefix(zz), ids, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=max_new_tokens,
                                 temperature=temperature)
    return [tok.decode([t for t in g if t != tok.eos_token_id], skip_special_tokens=True).strip() for g in gen]


def oracle_summary(prompts: list, answers: list[str], n_users: int = 5) -> dict | None:
    """Crowd-world oracle of sampled answers: share of each kind, harm rate (None when the prompts are not crowd-world prompts)."""
    from safealign.data import crowd_world as cw
    from safealign.data.synth import is_world_prompt, parse_prompt

    texts = [prompt_text(p) for p in prompts]
    if not texts or not all(is_world_prompt(t) and not parse_prompt(t)[1] for t in texts):
        return None
    scored = [cw.crowd_oracle(p, a, n_users) for p, a in zip(texts, answers)]
    kinds = Counter(s["kind"] for s in scored)
    return {"kinds": {k: round(kinds[k] / len(scored), 3) for k in sorted(kinds)}, "harm_rate": round(sum(s["unsafe"] for s in scored) / len(scored), 3),
            "task_value": round(sum(s["task_value"] for s in scored) / len(scored), 3)}


def _eval_prompts(cfg: CrowdSkillsConfig, eval_pairs: list, train_pairs: list) -> list:
    if cfg.eval_prompts:
        prompts, _ = read_prompts(cfg.eval_prompts, max_prompts=cfg.eval_samples)
        return prompts
    seen, out = set(), []
    for p in eval_pairs + train_pairs:
        key = prompt_text(p.prompt[0] if len(p.prompt) == 1 else p.prompt)
        if key not in seen:
            seen.add(key)
            out.append(p.prompt[0] if len(p.prompt) == 1 else list(p.prompt))
        if len(out) >= cfg.eval_samples:
            break
    return out


def run(cfg: CrowdSkillsConfig) -> dict:
    from safealign.models.export import write_model
    from safealign.models.loading import apply_lora, load_causal_lm, load_tokenizer

    t0 = time.perf_counter()
    out = check_output_dir(cfg.output_dir, cfg.resume)
    last, _ = resume_point(cfg, out)
    latent = read_latent(cfg.latent)
    data = load_crowd_pairs(cfg)
    unknown = sorted(set(data.annotators) - set(latent["annotators"]))
    if unknown:
        raise BadInput(f"annotator(s) {', '.join(unknown[:10])} of the data have no latent z in {cfg.latent}", where=cfg.data,
                       fix="train `crowd latent` on the same data, or leave those annotators out")
    if cfg.model == "tiny":
        raise BadInput("crowd skills starts from a trained causal LM", fix="pass --model PATH (e.g. the output of `safealign sft`)")
    if cfg.eval_prompts:
        _eval_prompts(cfg, [], [])            # a bad prompt file is bad input before anything is written
    z_of = {a: torch.tensor(v["z"], dtype=torch.float32) for a, v in latent["annotators"].items()}
    prior_mu = torch.tensor(latent["prior"]["mu"], dtype=torch.float32)
    z_dim = int(prior_mu.numel())
    tok = load_tokenizer(cfg.model, revision=cfg.revision)
    base = load_causal_lm(cfg.model, tok, dtype="fp32", seed=cfg.seed, revision=cfg.revision)
    train_ex = _encode(tok, data.train, cfg.template, cfg.max_length)
    eval_ex = _encode(tok, data.eval, cfg.template, cfg.max_length)
    if not train_ex:
        raise BadInput("no trainable pairs (all identical after encoding)", where=cfg.data)
    fill_reference(base, train_ex + eval_ex, tok.pad_token_id)
    torch.manual_seed(cfg.seed)
    lm = apply_lora(base, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_targets, task="CAUSAL_LM") if cfg.lora_r else base
    zprefix = ZPrefix(z_dim, cfg.n_prefix, base.config.hidden_size, cfg.prefix_hidden, cfg.prefix_scale)
    net = SkillNet(lm, zprefix)
    p = prepare_training(cfg, net, len(train_ex), out)
    cfg_dict = to_dict(cfg)
    open_run_dir(p.acc, cfg, out, "crowd-skills", cfg_dict=cfg_dict, prompts=[x.prompt for x in data.train], inherit_from=[cfg.model],
                 data_fingerprint=fingerprint(data.train), extra={"annotators": data.annotators, "latent": cfg.latent})
    loop = train_loop(acc=p.acc, cfg=cfg, model=p.model, optimizer=p.optimizer, scheduler=p.scheduler, examples=train_ex,
                      collate=lambda b: collate(b, tok.pad_token_id, z_of), loss_fn=make_loss(cfg), out=out, total_steps=p.total_steps,
                      resume_from=last, cfg_dict=cfg_dict, unit="pairs")
    net = p.acc.unwrap_model(p.model).eval()
    acc_by = heldout_accuracy(net, eval_ex, tok.pad_token_id, z_of, cfg.reference) if eval_ex else {}
    prompts = _eval_prompts(cfg, data.eval, data.train)
    skills = {}
    template = effective_template(cfg.template, tok)
    for name, z in [*sorted(z_of.items()), ("prior_mean", prior_mu)]:
        answers = sample_skill(net.lm, net.zprefix, tok, prompts, z, template, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed)
        skills[name] = {"oracle": oracle_summary(prompts, answers), "samples": [[prompt_text(q), a] for q, a in list(zip(prompts, answers))[:3]]}

    def write(tmp: Path, state: dict) -> dict:
        saved, _ = write_model(tmp, net.lm, tok, state, lora=bool(cfg.lora_r), save_base=False,
                               base_loader=lambda: load_causal_lm(cfg.model, tok, dtype="fp32", seed=cfg.seed, revision=cfg.revision))
        save_zprefix(net.zprefix, tmp, {"z_of_annotator": "skills.json"})
        atomic_write_json(tmp / SKILLS_FILE, {"prior": latent["prior"], "annotators": {a: {"z": v["z"]} for a, v in latent["annotators"].items()}})
        return {"z_prefix": "z_prefix.safetensors"}

    saved = save_collectively(p.acc, net.lm, tok, out, write)
    check = prefix_reload_check(out, net, tok, train_ex[:4], z_of)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    plots.curves(rows, ["train/loss"], out / "plots" / "loss.png", "crowd skills: CPL/DPO loss")
    plots.curves(rows, ["train/accuracy"], out / "plots" / "accuracy.png", "crowd skills: pairs ranked right (training batches)")
    kinds = "; ".join(f"{a}: {max(s['oracle']['kinds'], key=s['oracle']['kinds'].get)} (harm {s['oracle']['harm_rate']:.2f})"
                      for a, s in skills.items() if s["oracle"])
    summary = {"stage": "crowd-skills", "output_dir": str(out), "model": cfg.model,
               "headline": f"crowd skills: {loop.step} steps; held-out accuracy " +
                           ", ".join(f"{a} {v['accuracy']:.3f}" for a, v in acc_by.items()) + (f"; answers: {kinds}" if kinds else ""),
               "heldout_accuracy": acc_by, "skills": skills, "reload_check": check, "saved": saved, "data": data.stats,
               "steps": loop.step, "resumed_from": loop.resumed_from, "seconds": round(time.perf_counter() - t0, 2), "last_train": loop.last_train}
    report.write(out, summary, title="safealign crowd skills",
                 intro="Loss: -log sigmoid(beta * A_w - lambda * beta * A_l), A = log pi(y | x, z_annotator) - log pi_ref(y | x) (--reference) "
                       "or log pi (CPL). Accuracy: held-out pairs whose chosen answer has the larger advantage at the annotator's z.")
    return summary


@torch.no_grad()
def prefix_reload_check(out: Path, net: SkillNet, tok, probe: list[SkillExample], z_of: dict) -> dict:
    """Reload the saved LM with plain transformers and the z -> prefix module from its files; their logits at a skill's z must
    equal the live model's."""
    from transformers import AutoModelForCausalLM

    from safealign.models.loading import local_load

    if not probe:
        return {"checked": False}
    with local_load():
        plain = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    zp = load_zprefix(out)
    b = collate(probe, tok.pad_token_id, z_of)
    ids, mask = b["input_ids"][: len(probe)], b["attention_mask"][: len(probe)]
    live = prefix_logits(net.lm, net.zprefix(b["z"]), ids, mask)
    again = prefix_logits(plain, zp(b["z"]), ids, mask)
    diff = float((live - again)[mask.bool()].abs().max())
    return {"checked": True, "max_abs_diff": diff, "ok": diff < 1e-3}
