"""ppo-lag: the RL stage (PPO-Lagrangian and its relatives) on accelerate, readable top to bottom.

One step of ``run`` (research/safe-rlhf.md §4) is::

    1. rollout   each process samples G responses to each prompt of its own shard
                 (left-padded prompts, response-only right-padded masks up to the first EOS)
    2. score     old log-probs (actor), values (critics), reference log-probs,
                 reward R and cost C (frozen score models: end score at EOS)
    3. lambda    the episode costs join a window; J_c (its mean over every process, or the HC-RLHF
                 pessimistic bound mean + k*std) moves log-lambda by gradient ascent on J_c - threshold
    4. shape     per-token streams: r_t = -beta*kl_t + [t=end] R,  c_t = +beta*kl_t + [t=end] C, clipped
                 (no KL term when the KL is a loss term, as in GRPO)
    5. advantage per stream by the algorithm's estimator (GAE on a critic, or group-relative within
                 the G responses to a prompt); A = (A_r - lambda*A_c) / (1 + lambda)
    6. update    epochs x minibatches of the algorithm's policy loss (+ KL loss, + clipped value losses,
                 + PTX)

``--algorithm`` picks an entry of ``safealign.rl.algorithms`` (ppo-lag, ppo, reward-shaping,
grpo-lag, grpo): which critics exist, which estimator, how the cost enters, where the KL goes.
The pieces live in ``safealign.rl`` (roles, experience, constraint, objective, update, save,
setup) and the formulas in ``safealign.algorithms``; this file is the loop.

Responses that hit --max-new-tokens without EOS are scored as generated with an EOS appended for
the score models (so the end score is read at an EOS, as in training) and counted (eos_rate);
--no-eos-penalty X replaces their reward by X instead.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from safealign.algorithms import rl as RL
from safealign.config import PPOLagConfig
from safealign.rl.experience import Experience, evaluate, rollout, score_experience
from safealign.rl.objective import advantages, combine, shape_streams
from safealign.rl.roles import Learner, on_device
from safealign.rl.save import live_policy_logits, save_policy, verify_policy
from safealign.rl.setup import RLRun, eval_every, open_run, prepare, save_state
from safealign.rl.update import policy_update, values_from_first_forward
from safealign.runtime.seeds import seed_sampling


def run(cfg: PPOLagConfig) -> dict:
    from safealign.runtime.dist import finish
    from safealign.stages.trainer import DataOrder, peak_memory_mb

    r = prepare(cfg)                 # every input validated and loaded; nothing written yet
    start, log = open_run(r)         # from here on the output directory is written
    acc, algo, B, world, rank = r.acc, r.algo, cfg.batch_size, r.acc.num_processes, r.acc.process_index
    order = DataOrder(len(r.train_ids), cfg.seed)
    ptx_for = ptx_batches(r)
    kl_in_reward, kl_kind = cfg.kl_in_reward(), cfg.kl_kind()
    bar = progress(r, start)
    last, exp = {}, None
    t_run = time.perf_counter()
    for step in range(start, r.total):
        t0 = time.perf_counter()
        # ---- 1. rollout: G responses to each prompt of this process's shard -----------------
        idx = order.take(step * B * world + rank * B, B)
        seed_sampling(cfg.seed, step, rank)
        exp = rollout(acc, r.learner_u, r.tok, [r.train_prompts[i] for i in idx], [r.train_ids[i] for i in idx], cfg, r.synced, r.group_size,
                      engine=r.learner)
        t1 = time.perf_counter()

        # ---- 2. score: old log-probs/values, reference log-probs, reward, cost ---------------
        deferred = values_from_first_forward(cfg, r.learner_u.critics) and exp.sampled_logp is not None
        with on_device(r.frozen, acc.device, cfg.offload_frozen):
            score_experience(acc, r.learner, r.learner_u, r.reference, r.reward, r.cost, exp, cfg, chunk=r.responses // cfg.minibatches,
                             critics=not deferred)
        t2 = time.perf_counter()

        # ---- 3. the multiplier: J_c over the cost window of every process ---------------------
        lam, pg_cost, lag_stats = r.constraint.update(acc, exp.cost, step)

        # ---- 4. shape: per-token reward (and cost) streams, with the KL when it is in the reward -
        kl = (RL.kl_estimate(exp.old_logp, exp.ref_logp, kl_kind) * exp.mask if exp.ref_logp is not None
              else torch.zeros_like(exp.old_logp))                                                   # [B, T]; 0 without a reference
        streams = shape_streams(exp, kl, lam, pg_cost, algo, cfg, kl_in_reward)

        # ---- 5. advantages per stream, then the Lagrangian advantage ---------------------------
        def to_advantage(old_values: dict, exp=exp, streams=streams, lam=lam):
            exp.old_values.update(old_values)
            adv, returns = advantages(streams, exp, algo, cfg, r.group_size)
            return combine(adv, lam, cfg), returns                                                  # [B, T], {critic: [B, T]}

        # the critics' old values come from the update's first forward when `deferred` (rl.update)
        advantage, returns = (None, None) if deferred else to_advantage({})

        # ---- 6. update: epochs x minibatches (x gradient-accumulation micro-batches) -----------
        train_stats, advantage, returns = policy_update(acc, r.learner, r.optimizer, r.params, exp, advantage, returns, cfg, step, ptx_for,
                                                        policy_loss=algo.policy_loss, kl_loss=0.0 if kl_in_reward else cfg.kl_coeff,
                                                        kl_kind=kl_kind, finish=to_advantage)
        r.scheduler.step()
        t3 = time.perf_counter()

        # ---- metrics (averaged over processes; lambda is the same everywhere), eval, checkpoint -
        done = step + 1
        row = step_metrics(r, exp, kl, streams, advantage, train_stats, (t0, t1, t2, t3))
        row.update({"lambda": lam, "lr": r.scheduler.get_last_lr()[0], "prompts_seen": done * B * world, **lag_stats})
        if r.critic_lr is not None:
            row["critic_lr"] = r.scheduler.get_last_lr()[-1]
        if r.eval_ids and done % eval_every(r) == 0 and done < r.total:
            row.update(evaluate(acc, r.learner_u, r.tok, r.reward, r.cost, r.eval_prompts, r.eval_ids, cfg, r.frozen, r.synced, r.learner))
        last = log.log(done, row)
        bar.set_postfix(reward=f"{row['reward']:.3f}", **({"cost": f"{row['cost']:.3f}"} if "cost" in row else {}), lam=f"{lam:.3f}")
        bar.update(1)
        if cfg.save_steps and done % cfg.save_steps == 0 and done < r.total:
            save_state(r, done)
    bar.close()
    seconds = time.perf_counter() - t_run
    train_peak_mb = peak_memory_mb()  # high-water mark of the training loop (saving loads extra copies)

    summary = conclude(r, log, exp, last, start, seconds, train_peak_mb)
    finish(acc)
    return summary


# =============================================================================================
# Around the loop
# =============================================================================================


def conclude(r: RLRun, log, exp, last: dict, start: int, seconds: float, train_peak_mb: float) -> dict:
    """After the loop: the final evaluation, the saved policy, its reload check, the summary, plots and
    report (the summary on the main process, {} elsewhere)."""
    acc, cfg, algo = r.acc, r.cfg, r.algo
    if r.eval_ids:
        final_eval = evaluate(acc, r.learner_u, r.tok, r.reward, r.cost, r.eval_prompts, r.eval_ids, cfg, r.frozen, r.synced, r.learner)
        last = {**last, **final_eval}
        log.log(r.total, final_eval)
    in_sync = ranks_in_sync(acc, r.learner_u, r.constraint.value, weights=not r.zero3)
    live = live_policy_logits(r.learner_u, exp, r.zero3) if exp is not None and acc.is_main_process else None
    saved = save_policy(acc, r.learner, r.tok, r.out, cfg)
    summary: dict = {}
    if acc.is_main_process:
        from safealign.runtime import report
        from safealign.runtime.metrics import read_metrics

        rows = [x for x in read_metrics(r.out / "metrics.jsonl") if "time/step" in x]
        reload = verify_policy(r.out, live, r.tok, exp) if exp is not None else {"checked": False, "why": "no step ran in this process"}
        summary = make_summary(r, rows, last, start, reload, saved, seconds, train_peak_mb)
        summary["ranks_in_sync"] = in_sync
        make_plots(r.out, rows, cfg)
        report.write(r.out, summary, title=f"safealign ppo-lag --algorithm {cfg.algorithm}", intro=algo.summary)
    return summary


def ptx_batches(r: RLRun):
    """ptx_for(update) -> the PTX micro-batch of this process for the update-th micro-batch of the run
    (deterministic), or None without PTX data."""
    from safealign.stages.trainer import DataOrder

    if not r.ptx:
        return lambda update: None
    from safealign.stages.sft import collate as sft_collate

    order = DataOrder(len(r.ptx), r.cfg.seed + 1)
    micro = r.responses // (r.cfg.minibatches * r.cfg.grad_accum)
    world, rank = r.acc.num_processes, r.acc.process_index

    def ptx_for(update: int) -> dict:
        batch = sft_collate([r.ptx[i] for i in order.take(update * micro * world + rank * micro, micro)], r.tok.pad_token_id)
        return {k: v.to(r.acc.device) for k, v in batch.items()}

    return ptx_for


def progress(r: RLRun, start: int):
    """The run's progress (runtime.progress: a bar on a terminal, plain lines in a pipe), main process only."""
    from safealign.runtime.progress import progress as make

    return make(r.total, r.out.name, initial=start, enabled=r.acc.is_local_main_process)


def step_metrics(r: RLRun, exp: Experience, kl: torch.Tensor, streams: dict, advantage: torch.Tensor, train_stats: dict, times) -> dict:
    """One metrics row, averaged over processes."""
    acc = r.acc
    t0, t1, t2, t3 = times
    m = exp.mask.float()
    lengths = m.sum(dim=1)                                                                  # [B]
    local = {
        "reward": exp.reward.mean(), "reward_with_kl": streams["reward"].sum(dim=1).mean(),
        **({"kl": kl.sum(dim=1).mean()} if exp.ref_logp is not None else {}), "entropy": RL.masked_mean(exp.entropy, m),
        "response_length": lengths.mean(), "eos_rate": exp.eos_hit.float().mean(),
        "advantage_mean": RL.masked_mean(advantage, m),
        **{f"{name}_value_mean": RL.masked_mean(v, m) for name, v in exp.old_values.items()},
        **{f"train/{k}": v for k, v in train_stats.items()},
        "time/generate": t1 - t0, "time/score": t2 - t1, "time/train": t3 - t2, "time/step": t3 - t0,
    }
    if exp.cost is not None:
        local.update({"cost": exp.cost.mean(), "unsafe_rate": (exp.cost > 0).float().mean()})
    if "cost" in streams:
        local["cost_with_kl"] = streams["cost"].sum(dim=1).mean()
    if r.group_size > 1:  # how much the G responses to one prompt differ (GRPO learns nothing from a group of equals)
        g = exp.reward.reshape(-1, r.group_size)
        local["group/reward_std"] = g.std(dim=1).mean()
        local["group/identical_rewards"] = (g.max(dim=1).values == g.min(dim=1).values).float().mean()
    keys = sorted(local)
    vals = acc.reduce(torch.tensor([float(local[k]) for k in keys], dtype=torch.float64, device=acc.device), reduction="mean").tolist()
    row = dict(zip(keys, vals))
    row["response_length_max"] = float(acc.gather(lengths.max().reshape(1).to(acc.device)).max())
    return row


@torch.no_grad()
def ranks_in_sync(acc, learner_u: Learner, lam_value: float, weights: bool = True) -> bool:
    """Every process must end with the same trainable weights (not checked under ZeRO-3, where each
    holds a shard) and lambda; a silent divergence (unsynchronised gradients, different data) is an
    error, not a result."""
    if acc.num_processes == 1:
        return True
    checksum = sum(float(p.double().sum()) for p in learner_u.parameters() if p.requires_grad) if weights else 0.0
    local = torch.tensor([checksum, lam_value], dtype=torch.float64, device=acc.device)
    every = acc.gather(local[None]).cpu()                                   # [world, 2]
    ok = bool(torch.allclose(every, every[:1].expand_as(every), rtol=1e-6, atol=1e-8))
    if not ok:
        raise RuntimeError(f"processes disagree on the trained weights or lambda: {every.tolist()}")
    return ok


def _mean_of(rows: list[dict], key: str) -> float | None:
    vals = [x[key] for x in rows if x.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def make_summary(r: RLRun, rows: list[dict], last: dict, start: int, reload: dict, saved: dict, seconds: float, peak_mb: float) -> dict:
    cfg, algo, ref = r.cfg, r.algo, r.cfg.uses_reference()
    lam_hist = [x["lambda"] for x in rows if "lambda" in x]
    j_c = last.get("J_c")
    constraint = None
    if j_c is not None:
        constraint = {"quantity": "HC-RLHF pessimistic bound mean + k*std" if cfg.constraint == "hc" else "window mean of episode costs",
                      "J_c": j_c, "J_c_mean": last.get("J_c_mean"), "threshold": cfg.threshold, "satisfied": j_c <= cfg.threshold,
                      "note": "training-time estimate on training prompts; run `safealign safety-test` on held-out prompts for a guarantee"}
    summary = {
        "stage": "ppo-lag", "algorithm": cfg.algorithm, "constraint_type": cfg.constraint, "output_dir": str(r.out),
        "model": cfg.model, "steps": r.total, "resumed_from_step": start or None, "world_size": r.acc.num_processes,
        "mode": f"LoRA r={cfg.lora_r}" if cfg.lora_r else "full fine-tuning", "lr": r.lr, "critic_lr": r.critic_lr,
        "algorithm_spec": {"roles": [x for x in algo.roles if x != "reference" or ref], "advantage": cfg.advantage_name(),
                           "policy_loss": algo.policy_loss, "cost": algo.cost,
                           "kl": ("in the reward" if cfg.kl_in_reward() else "as a loss term") if ref else "none (--kl-coeff 0)",
                           "kl_estimator": cfg.kl_kind() if ref else None,
                           "responses_per_prompt": r.group_size},
        "lambda": {"init": cfg.lambda_init, "final": lam_hist[-1] if lam_hist else None, "max_seen": max(lam_hist) if lam_hist else None,
                   "method": cfg.lambda_method if algo.lagrangian else algo.cost},
        "constraint": constraint,
        "final": {k: last.get(k) for k in ("reward", "cost", "unsafe_rate", "lambda", "J_c", "kl", "entropy", "response_length", "eos_rate")
                  if last.get(k) is not None},
        "eval": {k: v for k, v in last.items() if k.startswith("eval/")},
        "no_eos_policy": f"reward replaced by {cfg.no_eos_penalty}" if cfg.no_eos_penalty is not None else "scored with an EOS appended",
        "time_per_step_s": {k: _mean_of(rows, f"time/{k}") for k in ("generate", "score", "train", "step")},
        "throughput": {"seconds": seconds, "peak_memory_mb": peak_mb, "peak_memory_note": "high-water mark at the end of training: max GPU memory allocated, or peak RSS on CPU"},
        "data": r.data_stats, "roles": r.role_notes, "reload_check": reload, "saved": saved,
    }
    cost_txt = f", cost {last['cost']:.3f}" if last.get("cost") is not None else ""
    jc_txt = f" (J_c {j_c:.3f} vs threshold {cfg.threshold:g})" if j_c is not None and algo.lagrangian else ""
    lam_txt = f", lambda {lam_hist[-1]:.3f}" if algo.lagrangian and lam_hist else ""
    tag = "" if cfg.algorithm == "ppo-lag" else f" [{cfg.algorithm}]"
    summary["headline"] = f"ppo-lag{tag}: {r.total} steps, reward {last.get('reward', float('nan')):.3f}{cost_txt}{jc_txt}{lam_txt}"
    return summary


def make_plots(out: Path, rows: list[dict], cfg) -> None:
    from safealign.runtime import plots

    d = out / "plots"
    plots.curves(rows, ["lambda"], d / "lambda.png", "Lagrange multiplier")
    plots.curves(rows, [k for k in ("J_c", "J_c_mean", "cost") if any(k in x for x in rows)], d / "cost_vs_threshold.png",
                 "episode cost vs threshold", hlines={"threshold": cfg.threshold})
    plots.curves(rows, ["reward", "reward_with_kl"], d / "reward.png", "reward")
    plots.curves(rows, ["kl", "entropy"], d / "kl_entropy.png", "KL to reference (sum per response) and entropy")
    plots.curves(rows, ["time/generate", "time/score", "time/train"], d / "time.png", "seconds per step")
