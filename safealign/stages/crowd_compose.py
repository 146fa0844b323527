"""`safealign crowd compose`: the high-level policy that composes crowd skills for a new task.

Per prompt x the policy draws u ~ N(W bow(x) + b, diag sigma^2) (models/skills.HighLevelPolicy), maps it into the
crowd's skill space, z = mu_prior + sigma_prior * 3 * tanh(u), and the frozen skill LM answers at z. Training:
REINFORCE on the task reward only, with the baseline of the advantage registry (``--estimator rloo``: each
answer's reward minus the mean of the other ``group_size - 1`` draws for the same prompt), plus
``u_l2 * ||mean u||^2``. The LM never changes, so the policy can only choose among safe skills: it cannot
buy task reward with harm unless a skill the crowd spans is harmful.

Output: ``high_level.safetensors`` + ``high_level.json``, metrics, report (task reward and oracle harm before
= the prior mean z, and after = the policy's mean z, on the evaluation prompts; each annotator's skill alone
for reference), plots.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from safealign.algorithms import advantages as ADV
from safealign.algorithms import skills as S
from safealign.config import CrowdComposeConfig, to_dict
from safealign.data.prompts import prompt_text, read_prompts
from safealign.data.readers import read_rows
from safealign.errors import BadInput
from safealign.models.skills import ZPREFIX_CONFIG, HighLevelPolicy, load_zprefix
from safealign.runtime import checkpoint as ckpt
from safealign.runtime import plots, report
from safealign.runtime.io import atomic_write_json, check_output_dir, staged_model_dir
from safealign.runtime.metrics import MetricsLog
from safealign.runtime.seeds import EVAL_STEP_OFFSET, seed_sampling
from safealign.stages.crowd_skills import SKILLS_FILE, sample_skill
from safealign.stages.trainer import DataOrder, make_optimizer, open_run_dir, resume_point

POLICY_WEIGHTS, POLICY_CONFIG, BOW_DIM = "high_level.safetensors", "high_level.json", 256


def read_task(path: str) -> dict[str, dict]:
    """Task reward file -> {prompt text: row}. Each row: prompt, values (a number per aspect), optional harm_bonus."""
    rows = read_rows(path, "train")
    out = {}
    for i, r in enumerate(rows, start=1):
        vals = r.get("values")
        if not isinstance(r.get("prompt"), str) or not isinstance(vals, list) or not vals or \
                not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            raise BadInput(f"row {i}: a task row needs 'prompt' (text) and 'values' (a list of numbers, one per aspect)", where=path,
                           fix="use the task.jsonl that `safealign data synth --crowd` writes, or rows in its format")
        out[prompt_text(r["prompt"])] = r
    return out


def check_covered(task: dict, prompts: list, source: str, task_path: str) -> None:
    missing = [prompt_text(p) for p in prompts if prompt_text(p) not in task]
    if missing:
        raise BadInput(f"{len(missing)} prompt(s) of {source} have no task reward row in {task_path}, e.g. {missing[0]!r}",
                       where=task_path, fix="give a task reward file that covers every training and evaluation prompt")


def read_skills(path: str) -> dict:
    p = Path(path)
    if not (p / SKILLS_FILE).is_file() or not (p / ZPREFIX_CONFIG).is_file() or not (p / "config.json").is_file():
        raise BadInput("not the output of `safealign crowd skills` (needs config.json, z_prefix.json and skills.json)", where=str(p),
                       fix="pass --skills DIR with the output directory of `safealign crowd skills`")
    return json.loads((p / SKILLS_FILE).read_text())


def rewards(task: dict, prompts: list, answers: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(task reward [N], oracle unsafe [N] as 0/1) of answers."""
    from safealign.data.crowd_world import task_reward
    from safealign.data.synth import oracle

    r = [task_reward(task[prompt_text(p)], a) for p, a in zip(prompts, answers)]
    c = [float(oracle(prompt_text(p), a).unsafe) for p, a in zip(prompts, answers)]
    return torch.tensor(r), torch.tensor(c)


def evaluate_z(lm, zp, tok, task: dict, prompts: list, z: torch.Tensor, cfg, template: str) -> dict:
    """Task reward and oracle harm rate of the skill(s) at z ([D] or [N, D]) on ``prompts``."""
    answers = sample_skill(lm, zp, tok, prompts, z, template, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                           seed=cfg.seed, step=EVAL_STEP_OFFSET)
    r, c = rewards(task, prompts, answers)
    return {"task_reward": round(float(r.mean()), 4), "harm_rate": round(float(c.mean()), 4)}


def run(cfg: CrowdComposeConfig) -> dict:
    from safealign.data.templates import effective_template
    from safealign.models.loading import load_causal_lm, load_tokenizer
    from safealign.runtime.dist import make_accelerator

    t0 = time.perf_counter()
    out = check_output_dir(cfg.output_dir, cfg.resume)
    last, _ = resume_point(cfg, out)
    skills = read_skills(cfg.skills)
    task = read_task(cfg.task)
    prompts, _ = read_prompts(cfg.prompts)
    eval_prompts = read_prompts(cfg.eval_prompts)[0] if cfg.eval_prompts else prompts
    if cfg.eval_size:
        eval_prompts = eval_prompts[: cfg.eval_size]
    check_covered(task, prompts, cfg.prompts, cfg.task)
    check_covered(task, eval_prompts, cfg.eval_prompts or cfg.prompts, cfg.task)
    tok = load_tokenizer(cfg.skills)
    lm = load_causal_lm(cfg.skills, tok, dtype="fp32").eval()
    for q in lm.parameters():
        q.requires_grad_(False)
    zp = load_zprefix(cfg.skills)
    template = effective_template("default", tok)
    mu = torch.tensor(skills["prior"]["mu"], dtype=torch.float32)
    sigma = torch.tensor(skills["prior"]["sigma"], dtype=torch.float32)
    feats = S.bow_features([prompt_text(p) for p in prompts], BOW_DIM)
    eval_feats = S.bow_features([prompt_text(p) for p in eval_prompts], BOW_DIM)
    torch.manual_seed(cfg.seed)
    policy = HighLevelPolicy(BOW_DIM, int(mu.numel()), cfg.init_std)
    acc = make_accelerator(dtype="fp32", report_to=cfg.report_to, project_dir=str(out))
    optimizer = make_optimizer([{"params": list(policy.parameters()), "lr": cfg.lr, "weight_decay": 0.0}])
    policy, optimizer = acc.prepare(policy, optimizer)
    cfg_dict = to_dict(cfg)
    open_run_dir(acc, cfg, out, "crowd-compose", cfg_dict=cfg_dict, prompts=prompts, inherit_from=[cfg.skills], data_fingerprint=None,
                 extra={"skills": cfg.skills, "task": cfg.task})
    log = MetricsLog(out / "metrics.jsonl", acc)
    start = 0
    if last is not None:
        start = ckpt.load_checkpoint(acc, last)["step"]
    log.truncate_after(start)
    squash = lambda u: S.squash_to_prior(u, mu, sigma, cfg.squash_scale)  # noqa: E731
    order = DataOrder(len(prompts), cfg.seed)
    net = acc.unwrap_model(policy)
    for step in range(start, cfg.max_steps):
        idx = order.take(step * cfg.batch_size, cfg.batch_size)
        row = reinforce_step(net, optimizer, acc, lm, zp, tok, task, [prompts[i] for i in idx], feats[idx], squash, template, cfg, step)
        if (step + 1) % cfg.log_steps == 0 or step + 1 == cfg.max_steps:
            log.log(step + 1, row)
        if cfg.save_steps and (step + 1) % cfg.save_steps == 0 and step + 1 < cfg.max_steps:
            ckpt.save_checkpoint(acc, out, step + 1, {"config": cfg_dict}, keep=cfg.keep_checkpoints)
    with torch.no_grad():
        z_after = squash(net(eval_feats))                                     # [N, D]: the policy's mean action per prompt
    before = evaluate_z(lm, zp, tok, task, eval_prompts, mu, cfg, template)
    after = evaluate_z(lm, zp, tok, task, eval_prompts, z_after, cfg, template)
    alone = {a: evaluate_z(lm, zp, tok, task, eval_prompts, torch.tensor(v["z"]), cfg, template) for a, v in sorted(skills["annotators"].items())}
    zmean = z_after.mean(0)
    dist = {a: round(float((zmean - torch.tensor(v["z"])).norm()), 4) for a, v in sorted(skills["annotators"].items())}
    save_policy(out, net, skills, int(mu.numel()), cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    plots.curves(rows, ["train/task_reward", "train/harm_rate"], out / "plots" / "reward.png", "crowd compose: task reward and oracle harm",
                 ylabel="per answer")
    plots.curves(rows, [k for k in rows[-1] if k.startswith("z/")] if rows else [], out / "plots" / "z.png", "crowd compose: mean z of the batch",
                 ylabel="z")
    summary = {"stage": "crowd-compose", "output_dir": str(out),
               "headline": f"crowd compose: task reward {before['task_reward']:.3f} -> {after['task_reward']:.3f}, "
                           f"oracle harm {before['harm_rate']:.3f} -> {after['harm_rate']:.3f} on {len(eval_prompts)} prompts",
               "before_prior_mean_z": before, "after": after, "skills_alone": alone, "mean_z_after": [round(float(x), 4) for x in zmean],
               "distance_to_annotator_z": dist, "steps": cfg.max_steps, "resumed_from": start or None,
               "seconds": round(time.perf_counter() - t0, 2)}
    report.write(out, summary, title="safealign crowd compose",
                 intro="High-level policy over the skills' latent space, trained on the task reward only (REINFORCE with the "
                       f"{cfg.estimator} baseline, ||u||^2 weight {cfg.u_l2}); the skill LM is frozen. Harm is the world oracle's.")
    return summary


def reinforce_step(net, optimizer, acc, lm, zp, tok, task, prompts: list, feats: torch.Tensor, squash, template: str,
                   cfg: CrowdComposeConfig, step: int) -> dict:
    """One update of the high-level policy: G sampled z per prompt (contiguous groups), the frozen skill LM
    answers at each z, the task reward's group baseline (``cfg.estimator``) weighs the Gaussian log-probs,
    plus ``cfg.u_l2`` x ||mean u||^2. Returns the step's metrics row."""
    G = cfg.group_size
    batch = [p for p in prompts for _ in range(G)]
    mean_u = net(feats)                                                       # [B, D]
    mean = mean_u.repeat_interleave(G, dim=0)                                 # [B*G, D]
    seed_sampling(cfg.seed, step, salt=7)
    u = (mean + net.log_std.exp() * torch.randn_like(mean)).detach()          # [B*G, D]
    answers = sample_skill(lm, zp, tok, batch, squash(u), template, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                           seed=cfg.seed, step=step)
    r, c = rewards(task, batch, answers)
    adv, _ = ADV.estimate(cfg.estimator, r[:, None], torch.ones(len(batch), 1), group_size=G)
    logp = S.gaussian_log_prob(u, mean, net.log_std)                          # [B*G]
    reg = (mean_u ** 2).sum(-1).mean()
    loss = -(adv[:, 0] * logp).mean() + cfg.u_l2 * reg
    optimizer.zero_grad(set_to_none=True)
    acc.backward(loss)
    optimizer.step()
    with torch.no_grad():
        zbar = squash(net(feats)).mean(0)
    row = {"train/task_reward": float(r.mean()), "train/harm_rate": float(c.mean()), "train/loss": float(loss.detach()),
           "train/u_norm": float(reg.detach().sqrt()), "train/u_std": float(net.log_std.exp().mean().detach())}
    row.update({f"z/{k}": float(v) for k, v in enumerate(zbar)})
    return row


def save_policy(out: Path, net, skills: dict, z_dim: int, cfg: CrowdComposeConfig) -> None:
    """The high-level policy as safetensors + its JSON (formula included), installed atomically."""
    from safetensors.torch import save_file

    with staged_model_dir(out, tmp_name=".tmp-policy") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(tmp / POLICY_WEIGHTS))
        atomic_write_json(tmp / POLICY_CONFIG, {"format": "safealign-high-level-v1", "bow_dim": BOW_DIM, "z_dim": z_dim,
                                                "squash_scale": cfg.squash_scale, "prior": skills["prior"], "skills": cfg.skills,
                                                "formula": "z = prior.mu + prior.sigma * squash_scale * tanh(mean.weight @ bow(prompt) + mean.bias)"})
