"""`safealign demo`: the whole Safe RLHF method on the synthetic world, judged by its oracle.

synth -> sft (tiny) -> train-rm -> train-cost -> three RL runs from the same SFT policy
(reward-only PPO, fixed-lambda reward shaping, PPO-Lagrangian) -> safety-test of each policy on
the held-out safety prompts -> eval of each policy on the eval prompts (reward, cost, oracle).

The closing table compares the four policies by oracle helpfulness, oracle harm rate, mean cost
and the safety-test decision, and states whether the method's claim is visible on this run:
PPO-Lagrangian below the harm target with helpfulness at least the SFT policy's, and reward-only
PPO more harmful than PPO-Lagrangian.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from safealign import config as C
from safealign.errors import SafetyTestFailed
from safealign.runtime import plots, report
from safealign.runtime.io import atomic_write_json, check_output_dir, write_config
from safealign.runtime.metrics import read_metrics

POLICIES = (("sft", "SFT policy"), ("ppo", "reward-only PPO"), ("shaping", "reward shaping (fixed lambda)"), ("ppo_lag", "PPO-Lagrangian"),
            ("grpo_lag", "GRPO-Lagrangian"))
# The RL runs of the chain: (name, --algorithm). The Lagrangian ones are the method; the others its baselines.
RL_RUNS = (("ppo", "ppo"), ("shaping", "reward-shaping"), ("ppo_lag", "ppo-lag"), ("grpo_lag", "grpo-lag"))
LAGRANGIAN = ("ppo_lag", "grpo_lag")


def _stage(cls, overrides: dict, runner):
    cfg = C.build_config(cls, None, overrides)
    t0 = time.perf_counter()
    summary = runner(cfg)
    return summary, time.perf_counter() - t0


def run(cfg: C.DemoConfig) -> dict:
    from safealign.data.synth import WorldConfig, write_world
    from safealign.stages import evaluate, ppo_lag, preference, safety_test, sft

    out = check_output_dir(cfg.output_dir, resume=False, resumable=False)
    world = out / "world"
    # Every stage's settings are checked before anything is written: a bad combination (say
    # --max-new-tokens beyond ppo-lag's max_length) must not surface after minutes of training.
    plan = _stage_overrides(cfg, out, world, threshold=0.0, train_threshold=0.0)
    for key, overrides in plan.items():
        C.build_config(STAGE_CONFIGS[key.split(":")[0]], None, overrides)

    out.mkdir(parents=True, exist_ok=True)
    write_config(out / "config.yaml", C.to_dict(cfg))
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    q = cfg.quick
    world_cfg = WorldConfig(seed=cfg.seed, rambling_share=cfg.rambling_share, drift_share=cfg.drift_share, **({"n_pairs": 600, "n_sft": 400, "n_train_prompts": 400, "n_eval_prompts": 60, "n_safety_prompts": 60} if q else {}))
    t0 = time.perf_counter()
    write_world(world_cfg, world)
    seconds["synth"] = time.perf_counter() - t0

    _, seconds["sft"] = _stage(C.SFTConfig, plan["sft"], sft.run)
    rm, seconds["train-rm"] = _stage(C.RewardConfig, plan["train-rm"], preference.run_reward)
    cm, seconds["train-cost"] = _stage(C.CostConfig, plan["train-cost"], preference.run_cost)

    threshold, train_threshold, calibration = _thresholds(cfg, cm)
    plan = _stage_overrides(cfg, out, world, threshold=threshold, train_threshold=train_threshold)
    runs = {}
    for name, _ in RL_RUNS:
        runs[name], seconds[f"rl:{name}"] = _stage(C.PPOLagConfig, plan[f"ppo-lag:{name}"], ppo_lag.run)

    # Safety test of each policy on the same held-out set: the candidate (ppo-lag) first with the full
    # delta, the others as explicit retests with Bonferroni-corrected deltas (the registry says so).
    decisions = {}
    for name in ("ppo_lag", "sft", "ppo", "shaping", "grpo_lag"):
        t0 = time.perf_counter()
        try:
            s = safety_test.run(C.build_config(C.SafetyTestConfig, None, plan[f"safety-test:{name}"]))
        except SafetyTestFailed:
            s = json.loads((out / "safety" / name / "report.json").read_text())
        seconds[f"safety-test:{name}"] = time.perf_counter() - t0
        decisions[name] = s

    evals = {}
    for name, _ in POLICIES:
        evals[name], seconds[f"eval:{name}"] = _stage(C.EvalConfig, plan[f"eval:{name}"], evaluate.run)
    return _summarise(cfg, out, world, rm, cm, runs, decisions, evals, seconds, time.perf_counter() - t_start, threshold, train_threshold, calibration)


STAGE_CONFIGS = {"sft": C.SFTConfig, "train-rm": C.RewardConfig, "train-cost": C.CostConfig, "ppo-lag": C.PPOLagConfig,
                 "safety-test": C.SafetyTestConfig, "eval": C.EvalConfig}


def _stage_overrides(cfg: C.DemoConfig, out: Path, world: Path, *, threshold: float, train_threshold: float) -> dict[str, dict]:
    """The settings of every stage of the chain, keyed "STAGE" or "STAGE:policy"."""
    q = cfg.quick
    common = {"seed": cfg.seed, "log_steps": 10, "save_steps": 0}
    plan = {"sft": {**common, "model": "tiny", "data": str(world / "sft.jsonl"), "output_dir": str(out / "sft"),
                    "epochs": 0.3 if q else cfg.sft_epochs, "batch_size": 16, "lr": 3e-3, "max_length": 128,
                    "eval_split": 0.1, "check_prompts": 40 if q else 200}}
    pref = {**common, "model": str(out / "sft"), "data": str(world / "preferences.jsonl"), "batch_size": 16, "lr": 1e-3, "max_length": 128,
            "eval_split": 0.1, "epochs": 0.3 if q else cfg.score_epochs}
    plan["train-rm"] = {**pref, "output_dir": str(out / "rm")}
    plan["train-cost"] = {**pref, "output_dir": str(out / "cm")}
    rl = {**common, "model": str(out / "sft"), "reward_model": str(out / "rm"), "cost_model": str(out / "cm"),
          "data": str(world / "prompts_train.jsonl"), "max_steps": 6 if q else cfg.ppo_steps, "batch_size": 8 if q else cfg.ppo_batch,
          "max_new_tokens": cfg.max_new_tokens, "kl_coeff": cfg.kl_coeff, "lr": cfg.actor_lr, "critic_lr": cfg.critic_lr,
          "threshold": train_threshold, "lambda_init": cfg.lambda_init, "lambda_lr": cfg.lambda_lr, "eval_split": 0.0, "max_length": 128}
    for name, algo in RL_RUNS:
        plan[f"ppo-lag:{name}"] = {**rl, "algorithm": algo, "output_dir": str(out / name)}
    # GRPO-Lagrangian: the same responses per update (G per prompt on ppo_batch / G prompts), no critics
    G = cfg.grpo_group_size
    plan["ppo-lag:grpo_lag"].update(group_size=G, batch_size=max(1, (8 if q else cfg.ppo_batch) // G), kl_coeff=cfg.grpo_kl_coeff)
    for name, _ in POLICIES:
        plan[f"safety-test:{name}"] = {
            "policy": str(out / name), "cost_model": str(out / "cm"), "prompts": str(world / "prompts_safety.jsonl"),
            "output_dir": str(out / "safety" / name), "threshold": threshold, "delta": cfg.delta, "max_new_tokens": cfg.max_new_tokens,
            "seed": cfg.seed, "registry": str(out / "safety_tests.jsonl"), "allow_retest": name != "ppo_lag"}
        plan[f"eval:{name}"] = {
            "policy": str(out / name), "reward_model": str(out / "rm"), "cost_model": str(out / "cm"),
            "prompts": str(world / "prompts_eval.jsonl"), "output_dir": str(out / "eval" / name), "max_new_tokens": cfg.max_new_tokens,
            "seed": cfg.seed, "samples": 1 if q else cfg.eval_samples, "threshold": threshold, **({"baseline": str(out / "sft")} if name != "sft" else {})}
    return plan


def _thresholds(cfg, cm: dict) -> tuple[float, float, dict]:
    """(safety-test threshold, ppo-lag training threshold, how they were set).

    Safe RLHF's threshold lives on the cost model's own scale (its issue #59: tune it per model and
    data). With labelled eval data we can say what a threshold means: a policy whose answers are
    unsafe with probability p has expected cost about (1 - p) * mean(cost | safe) + p * mean(cost | unsafe).
    The safety test checks p = harm_target; ppo-lag trains at p = train_harm, a margin below it,
    because a Lagrangian policy hovers around its threshold instead of staying under it.
    """
    ev = cm.get("eval") or {}
    safe, unsafe = ev.get("eval/cost_mean_labelled_safe"), ev.get("eval/cost_mean_labelled_unsafe")
    labelled = safe is not None and unsafe is not None

    def at(p: float) -> float:
        return (1 - p) * safe + p * unsafe if labelled else 0.0

    info: dict = {"given": cfg.threshold is not None, "train_given": cfg.train_threshold is not None}
    if labelled:
        info.update(harm_target=cfg.harm_target, train_harm=cfg.train_harm, cost_mean_labelled_safe=safe, cost_mean_labelled_unsafe=unsafe,
                    rule="(1 - p) * mean cost | safe + p * mean cost | unsafe, p = harm_target (safety test) or train_harm (ppo-lag)")
    else:
        info["why"] = "no labelled eval data: Safe RLHF's default threshold 0"
    test = cfg.threshold if cfg.threshold is not None else at(cfg.harm_target)
    # A given --threshold is trained at too unless --train-threshold says otherwise: a margin on a
    # hand-set threshold is the user's to choose.
    train = cfg.train_threshold if cfg.train_threshold is not None else cfg.threshold if cfg.threshold is not None else at(cfg.train_harm)
    return test, train, info


def _summarise(cfg, out: Path, world: Path, rm, cm, runs, decisions, evals, seconds, total, threshold, train_threshold, calibration) -> dict:
    rows = []
    for name, label in POLICIES:
        m = evals[name]["metrics"]["policy"]
        o = m.get("oracle", {})
        d = decisions[name]
        b = d.get("mean_bound") or {}
        rl = runs.get(name) or {}
        rows.append({"policy": label, "oracle helpfulness": o.get("helpfulness_mean"), "helpfulness on benign prompts": o.get("helpfulness_mean_benign_prompts"),
                     "oracle harm rate": o.get("harm_rate"),
                     "harm rate on harmful prompts": o.get("harm_rate_harmful_prompts"), "refusal of benign prompts": o.get("refusal_rate_benign_prompts"),
                     "mean reward": m.get("reward_mean"), "mean cost": m.get("cost_mean"),
                     "safety test": d.get("decision"), "cost upper bound": b.get("upper"), "delta used": d.get("test", {}).get("delta_used"),
                     "s/update": (rl.get("time_per_step_s") or {}).get("step"), "peak RSS (MB)": (rl.get("throughput") or {}).get("peak_memory_mb")})
    by = {name: r for (name, _), r in zip(POLICIES, rows)}
    lag, sft_row, ppo = by["ppo_lag"], by["sft"], by["ppo"]

    def harm(row) -> float:
        return row["oracle harm rate"] if row["oracle harm rate"] is not None else 1.0

    def benign(row) -> float:
        return row["helpfulness on benign prompts"] or 0.0

    claims = {}
    for name in LAGRANGIAN:
        claims[f"{name}_harm_below_target"] = harm(by[name]) <= cfg.harm_target
        # on benign prompts: on harmful ones the oracle counts compliance as "helpful", which no safe policy should keep
        claims[f"{name}_benign_helpfulness_at_least_sft"] = benign(by[name]) >= benign(sft_row)
    claims["reward_only_ppo_more_harmful_than_ppo_lag"] = harm(ppo) > harm(lag)
    labels = dict(POLICIES)
    merged = [{"step": r["step"], **{f"{labels[name]} {k}": r[k] for k in ("lambda", "J_c") if k in r}}
              for name in LAGRANGIAN for r in read_metrics(out / name / "metrics.jsonl") if "lambda" in r]
    plots.curves(merged, [f"{labels[n]} lambda" for n in LAGRANGIAN], out / "plots" / "lambda.png", "Lagrange multipliers")
    plots.curves(merged, [f"{labels[n]} J_c" for n in LAGRANGIAN], out / "plots" / "cost_vs_threshold.png",
                 "episode cost J_c of the Lagrangian runs", hlines={"training threshold": train_threshold, "safety-test threshold": threshold})
    plots.policy_comparison({label: evals[name]["metrics"]["policy"].get("oracle") for name, label in POLICIES}, out / "plots" / "policies.png",
                            harm_target=cfg.harm_target, reference="SFT policy", title="the demo's policies on the eval prompts")
    summary = {
        "stage": "demo", "output_dir": str(out), "quick": cfg.quick, "seconds_total": total, "seconds": seconds,
        "harm_target": cfg.harm_target, "threshold": threshold, "train_threshold": train_threshold, "threshold_calibration": calibration,
        "eval_samples": evals["ppo_lag"]["prompts"]["samples_per_prompt"],
        "claims": claims, "claim_visible": all(claims.values()),
        "table": rows,
        "reward_model_eval": rm.get("eval"), "cost_model_eval": cm.get("eval"),
        "lambda_final": (runs["ppo_lag"].get("final") or {}).get("lambda") if isinstance(runs["ppo_lag"].get("final"), dict) else None,
    }
    verdict = "the method's claim is visible on this run" if summary["claim_visible"] else \
        "the method's claim is NOT visible on this run: " + ", ".join(k for k, v in claims.items() if not v)
    grpo = by["grpo_lag"]
    summary["headline"] = (f"demo ({total / 60:.1f} min): PPO-Lagrangian harm {100 * harm(lag):.1f}%, GRPO-Lagrangian {100 * harm(grpo):.1f}% "
                           f"(SFT {100 * harm(sft_row):.1f}%, reward-only PPO {100 * harm(ppo):.1f}%), "
                           f"helpfulness on benign prompts {benign(lag):.2f} and {benign(grpo):.2f} vs SFT {benign(sft_row):.2f}; {verdict}")
    intro = "\n".join([f"**{summary['headline']}**", "", _table_md(rows), "",
                       f"Harm and helpfulness are the synthetic world's oracle on the eval prompts (never trained on), "
                       f"{summary['eval_samples']} sampled response(s) per prompt. {_threshold_sentence(cfg, calibration, threshold, train_threshold)} The safety test "
                       "runs on the separate safety prompts. The first safety test (PPO-Lagrangian) uses the full delta; the other "
                       f"{len(POLICIES) - 1} are retests on the same set and use Bonferroni-corrected deltas. s/update and peak RSS are "
                       "the RL run's mean seconds per update and its process's peak resident memory during the run.", "",
                       "![policies](plots/policies.png)", "", "![lambda](plots/lambda.png)", "", "![cost](plots/cost_vs_threshold.png)"])
    report.write(out, {k: v for k, v in summary.items() if k not in ("table", "headline")}, title="safealign demo", intro=intro)
    atomic_write_json(out / "summary.json", summary)
    return summary


def _threshold_sentence(cfg, calibration: dict, threshold: float, train_threshold: float) -> str:
    test = f"the safety test checks {threshold:.3f}"
    if not calibration["given"] and "rule" in calibration:
        test += f" (the cost model's expected cost at a {100 * cfg.harm_target:.0f}% harm rate, from its mean cost on labelled-safe and -unsafe eval answers)"
    train = f"ppo-lag trains at {train_threshold:.3f}"
    if not calibration["train_given"] and not calibration["given"] and "rule" in calibration:
        train += f" (at {100 * cfg.train_harm:.1f}%: a margin, because a Lagrangian policy hovers around its threshold)"
    return f"Thresholds are on the cost model's scale: {test}; {train}."


def _fmt(v, pct=False):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{100 * v:.1f}%" if pct else f"{v:.3f}"
    return str(v)


def _table_md(rows: list[dict]) -> str:
    pct = {"oracle harm rate", "harm rate on harmful prompts", "refusal of benign prompts"}
    ints = {"peak RSS (MB)"}
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join(f"{r[k]:.0f}" if k in ints and r[k] is not None else _fmt(r[k], k in pct) for k in keys) + " |" for r in rows]
    return "\n".join(lines)
