"""`safealign demo`: the whole Safe RLHF method on the synthetic world, judged by its oracle.

synth -> sft (tiny) -> train-rm -> train-cost -> the RL runs of ``RL_RUNS``, all from the same SFT
policy (reward-only PPO, fixed-lambda reward shaping, PPO-Lagrangian, GRPO-Lagrangian) -> safety-test of each policy
on the held-out safety prompts -> eval of each policy on the eval prompts (reward, cost, oracle).

Resumable: every stage writes into its own sub-directory and is done when its ``report.json``
exists (the world: ``world.json``). Running the same command again skips finished stages, resumes
an interrupted training stage from its last checkpoint, and starts any other interrupted stage
again from an empty directory; a finished demo just says so. ``demo_state.json`` keeps the
seconds each stage took; ``config.yaml`` the settings, which a resumed run must repeat.

The closing table compares the policies by oracle helpfulness, oracle harm rate, mean cost, the
safety-test decision and (RL runs) time per update and peak memory, and states whether the method's
claim is visible on this run: each Lagrangian policy (PPO- and GRPO-Lagrangian) below the harm
target with benign helpfulness at least the SFT policy's, and reward-only PPO more harmful than
PPO-Lagrangian.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from safealign import config as C
from safealign.errors import BadInput, SafetyTestFailed
from safealign.runtime import plots, report
from safealign.runtime.io import atomic_write_json, atomic_write_text, write_config
from safealign.runtime.metrics import read_metrics


@dataclass(frozen=True)
class RLRun:
    """One RL run of the demo (one row of its table). All start from the same SFT policy with the
    demo's shared RL settings; ``overrides`` are this run's own ppo-lag settings."""

    name: str                                   # sub-directory (out/NAME, out/safety/NAME, out/eval/NAME) and key
    label: str                                  # its row in the table
    overrides: dict | Callable[[C.DemoConfig], dict] = field(default_factory=dict)   # or a function of the demo's settings
    candidate: bool = False                     # the policy to release: the first safety test, with the full delta

    def settings(self, cfg: C.DemoConfig) -> dict:
        return self.overrides(cfg) if callable(self.overrides) else dict(self.overrides)


# The RL runs, in the table's order. A new run is one more entry here.
RL_RUNS = (
    RLRun("ppo", "reward-only PPO", {"algorithm": "ppo"}),
    RLRun("shaping", "reward shaping (fixed lambda)", {"algorithm": "reward-shaping"}),
    RLRun("ppo_lag", "PPO-Lagrangian", {"algorithm": "ppo-lag"}, candidate=True),
    # GRPO-Lagrangian: no critics, G responses to each of grpo_prompts prompts per update
    RLRun("grpo_lag", "GRPO-Lagrangian", lambda cfg: {"algorithm": "grpo-lag", "group_size": cfg.grpo_group_size,
                                                      "batch_size": 2 if cfg.quick else cfg.grpo_prompts, "advantage": cfg.grpo_advantage,
                                                      "kl_coeff": cfg.grpo_kl_coeff}),
)
POLICIES = (("sft", "SFT policy"),) + tuple((r.name, r.label) for r in RL_RUNS)
LAGRANGIAN = ("ppo_lag", "grpo_lag")     # the method's runs: the claim is judged on each of them

STAGE_CONFIGS = {"sft": C.SFTConfig, "label": C.EvalConfig, "train-rm": C.RewardConfig, "train-cost": C.CostConfig, "ppo-lag": C.PPOLagConfig,
                 "safety-test": C.SafetyTestConfig, "eval": C.EvalConfig}

# Seconds per stage kind, for the ETA only: a full run of seed 0 on the 2 shared cores, and the quick
# run of bench/results/demo_reproducibility.md. Their ratios matter, not their size.
STAGE_WEIGHTS = {
    "full": {"synth": 1.0, "sft": 85.0, "label": 20.0, "train-rm": 33.0, "train-cost": 35.0, "rl": 60.0, "safety-test": 2.0, "eval": 10.0},
    "quick": {"synth": 0.4, "sft": 9.6, "label": 1.0, "train-rm": 1.5, "train-cost": 1.5, "rl": 1.8, "safety-test": 0.8, "eval": 1.4},
}


def stage_keys(cfg: C.DemoConfig | None = None) -> list[str]:
    """Every stage of the chain in the order it runs: "synth", "sft", "label" (unless ``cfg.sft_answers``
    is 0), "train-rm", "train-cost", "rl:NAME" per RL run, "safety-test:NAME" (the candidate first),
    "eval:NAME" per policy."""
    names = [name for name, _ in POLICIES]
    tested = [r.name for r in RL_RUNS if r.candidate] + [n for n in names if n not in {r.name for r in RL_RUNS if r.candidate}]
    label = [] if cfg is not None and cfg.sft_answers == 0 else ["label"]
    return (["synth", "sft", *label, "train-rm", "train-cost"] + [f"rl:{r.name}" for r in RL_RUNS]
            + [f"safety-test:{n}" for n in tested] + [f"eval:{n}" for n in names])


def stage_dir(out: Path, key: str) -> Path:
    kind, _, name = key.partition(":")
    return {"synth": out / "world", "sft": out / "sft", "label": out / "labels", "train-rm": out / "rm", "train-cost": out / "cm", "rl": out / name,
            "safety-test": out / "safety" / name, "eval": out / "eval" / name}[kind]


def _runner(kind: str):
    from safealign.stages import evaluate, ppo_lag, preference, safety_test, sft

    return {"sft": sft.run, "label": label_sft_answers, "train-rm": preference.run_reward, "train-cost": preference.run_cost, "rl": ppo_lag.run,
            "safety-test": safety_test.run, "eval": evaluate.run}[kind]


def label_sft_answers(samples: C.EvalConfig) -> dict:
    """The "label" stage: answers of the SFT policy to every training prompt (an eval run into
    labels/samples/), paired and labelled by the world's annotators after the world's own
    pairs (labels/preferences.jsonl, what train-rm and train-cost read)."""
    from safealign.data.label import label_file
    from safealign.stages import evaluate

    d = Path(samples.output_dir).parent
    world = Path(samples.prompts).parent
    evaluate.run(samples)
    result = label_file(str(world), str(Path(samples.output_dir) / "generations.jsonl"), str(d / "preferences.jsonl"),
                        include=str(world / "preferences.jsonl"), seed=samples.seed)
    result["sft_oracle"] = json.loads((Path(samples.output_dir) / "report.json").read_text())["metrics"]["policy"].get("oracle")
    atomic_write_json(d / "report.json", result)
    return result


def run(cfg: C.DemoConfig) -> dict:
    from safealign.runtime.progress import StageCounter

    out = Path(cfg.output_dir)
    # Every stage's settings are checked before anything is written: a bad combination (say
    # --max-new-tokens beyond ppo-lag's max_length) must not surface after minutes of training.
    plan = _stage_overrides(cfg, out, out / "world", threshold=0.0, train_threshold=0.0)
    for key, overrides in plan.items():
        C.build_config(STAGE_CONFIGS[key.split(":")[0]], None, overrides)
    state = _open(cfg, out)
    if state.get("complete") and (out / "summary.json").is_file():
        summary = json.loads((out / "summary.json").read_text())
        summary["headline"] = f"{out}: this demo is already complete (delete the directory or pass another --output-dir to run it again). {summary['headline']}"
        return summary

    weights = STAGE_WEIGHTS["quick" if cfg.quick else "full"]
    counter = StageCounter({k: weights[k.split(":")[0]] for k in stage_keys(cfg)}, "demo")
    seconds: dict[str, float] = dict(state.get("seconds", {}))
    results: dict[str, dict] = {}

    ran = []  # once a stage runs again, every later stage is redone too: what it finished before may be stale

    def stage(key: str, cls=None, overrides: dict | None = None) -> dict:
        d = stage_dir(out, key)
        done = (d / "world.json") if key == "synth" else (d / "report.json")
        if done.is_file() and not ran:
            counter.skip(key)
            results[key] = {} if key == "synth" else json.loads(done.read_text())
            return results[key]
        overrides, note = dict(overrides or {}), ""
        if d.exists():
            overrides, note = _continue_or_restart(key, d, overrides, out, finished=done.is_file())
        elif key.startswith("safety-test") and _forget_interrupted_test(out / "safety_tests.jsonl", d):
            note = "interrupted earlier, restarted"          # killed after its record, before its directory was installed
        ran.append(key)
        counter.start(key, note)
        t0 = time.perf_counter()
        if key == "synth":
            from safealign.data.synth import write_world

            write_world(_world_config(cfg), d)
            results[key] = {}
        else:
            try:
                results[key] = _runner(key.split(":")[0])(C.build_config(cls, None, overrides))
            except SafetyTestFailed:  # NSF is a result here, not a failure: its report.json holds it
                results[key] = json.loads((d / "report.json").read_text())
        seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - t0
        _save_state(out, {**state, "seconds": seconds})
        return results[key]

    stage("synth")
    stage("sft", C.SFTConfig, plan["sft"])
    if "label" in plan:
        stage("label", C.EvalConfig, plan["label"])
    rm = stage("train-rm", C.RewardConfig, plan["train-rm"])
    cm = stage("train-cost", C.CostConfig, plan["train-cost"])

    threshold, train_threshold, calibration = _thresholds(cfg, cm)
    plan = _stage_overrides(cfg, out, out / "world", threshold=threshold, train_threshold=train_threshold)
    runs = {r.name: stage(f"rl:{r.name}", C.PPOLagConfig, plan[f"ppo-lag:{r.name}"]) for r in RL_RUNS}
    # Safety test of each policy on the same held-out set: the candidate first with the full delta,
    # the others as explicit retests with Bonferroni-corrected deltas (the registry says so).
    decisions, evals = {}, {}
    for key in stage_keys(cfg):
        kind, _, name = key.partition(":")
        if kind == "safety-test":
            decisions[name] = stage(key, C.SafetyTestConfig, plan[f"safety-test:{name}"])
        elif kind == "eval":
            evals[name] = stage(key, C.EvalConfig, plan[f"eval:{name}"])
    counter.close()
    total = sum(seconds.values())
    summary = _summarise(cfg, out, out / "world", rm, cm, runs, decisions, evals, seconds, total, threshold, train_threshold, calibration)
    _save_state(out, {**state, "seconds": seconds, "complete": True})
    return summary


def _world_config(cfg: C.DemoConfig):
    from safealign.data.synth import WorldConfig

    small = {"n_pairs": 600, "n_sft": 400, "n_train_prompts": 400, "n_eval_prompts": 60, "n_safety_prompts": 60}
    return WorldConfig(seed=cfg.seed, rambling_share=cfg.rambling_share, drift_share=cfg.drift_share, **(small if cfg.quick else {}))


STATE = "demo_state.json"


def _open(cfg: C.DemoConfig, out: Path) -> dict:
    """The demo's output directory: new (created, settings written), or one this demo started with the
    same settings (its state: seconds per finished stage, complete or not). Anything else is bad input."""
    mine = {k: v for k, v in C.to_dict(cfg).items() if k != "output_dir"}
    if out.exists() and not out.is_dir():
        raise BadInput("output path exists and is not a directory", where=str(out))
    if out.is_dir() and any(out.iterdir()):
        saved = out / "config.yaml"
        if not (out / STATE).is_file() or not saved.is_file():
            raise BadInput("output directory is not empty and holds no demo", where=str(out),
                           fix="choose a new --output-dir (a demo's own directory is resumed by running the same command again)")
        import yaml

        before = {k: v for k, v in (yaml.safe_load(saved.read_text()) or {}).items() if k != "output_dir"}
        diff = sorted(k for k in set(before) | set(mine) if before.get(k) != mine.get(k))
        if diff:
            detail = ", ".join(f"{k}: {before.get(k)!r} -> {mine.get(k)!r}" for k in diff)
            raise BadInput(f"this directory holds a demo with other settings ({detail})", where=str(out),
                           fix="run the same command as before to resume it, or choose a new --output-dir")
        return json.loads((out / STATE).read_text())
    out.mkdir(parents=True, exist_ok=True)
    write_config(out / "config.yaml", C.to_dict(cfg))
    from safealign.runtime.io import manifest

    atomic_write_json(out / "manifest.json", manifest("demo", seed=cfg.seed, extra={"compute": compute_facts()}))
    state = {"seconds": {}, "complete": False}
    _save_state(out, state)
    return state


def compute_facts() -> dict:
    """What the demo's digits depend on besides the code, the settings and constraints.txt: the CPU
    and the kernels torch picks for it (the README says what is reproducible where)."""
    import platform

    import numpy
    import torch

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_threads": torch.get_num_threads(),
            "mkl": torch.backends.mkl.is_available(), "cuda": torch.cuda.is_available(), "numpy": numpy.__version__}


def _save_state(out: Path, state: dict) -> None:
    atomic_write_json(out / STATE, state)


def _continue_or_restart(key: str, d: Path, overrides: dict, out: Path, finished: bool) -> tuple[dict, str]:
    """A stage whose directory exists but must run: an interrupted training stage with a complete
    checkpoint resumes from it; anything else (or a finished stage after an earlier one ran again)
    starts again from an empty directory."""
    from safealign.runtime import checkpoint as ckpt

    kind = key.split(":")[0]
    if not finished and kind in ("sft", "train-rm", "train-cost", "rl") and ckpt.latest_checkpoint(d) is not None:
        return {**overrides, "resume": True}, f"interrupted earlier, resuming from {ckpt.latest_checkpoint(d).name}"
    if kind == "safety-test":
        if finished:
            overrides["allow_retest"] = True  # the set was seen: this is a retest, with its Bonferroni delta
        else:
            _forget_interrupted_test(out / "safety_tests.jsonl", d)
    shutil.rmtree(d)
    return overrides, "redone: an earlier stage ran again" if finished else "interrupted earlier, restarted"


def _forget_interrupted_test(registry: Path, d: Path) -> bool:
    """Drop the registry record of a safety test that was killed before it wrote its report (its
    output directory, written whole or not at all, is then absent). The registry records a test
    before its output is written; a test killed in between was never seen by anyone, and it runs
    again as the same test (same policy, prompts and seed: the same costs), so keeping its record
    would count it twice and shrink its delta. A *finished* test that is redone keeps its record:
    its result was seen, and the new test is an honest retest. Returns whether a record was dropped."""
    if not registry.is_file():
        return False
    lines = registry.read_text().splitlines()
    keep = [line for line in lines if line.strip() and json.loads(line).get("output_dir") != str(d.resolve())]
    if len(keep) != len(lines):
        atomic_write_text(registry, "".join(line + "\n" for line in keep))
    return len(keep) != len(lines)


def _stage_overrides(cfg: C.DemoConfig, out: Path, world: Path, *, threshold: float, train_threshold: float) -> dict[str, dict]:
    """The settings of every stage of the chain, keyed "STAGE" or "STAGE:policy"."""
    q = cfg.quick
    # Full runs write a checkpoint now and then, so an interrupted demo resumes its stage (quick ones restart it).
    common = {"seed": cfg.seed, "log_steps": 10, "save_steps": 0 if q else 100}
    plan = {"sft": {**common, "model": "tiny", "data": str(world / "sft.jsonl"), "output_dir": str(out / "sft"),
                    "epochs": 0.3 if q else cfg.sft_epochs, "batch_size": 16, "lr": 3e-3, "max_length": 128,
                    "eval_split": 0.1, "check_prompts": 40 if q else 200}}
    if cfg.sft_answers:
        plan["label"] = {"policy": str(out / "sft"), "prompts": str(world / "prompts_train.jsonl"), "output_dir": str(out / "labels" / "samples"),
                         "max_prompts": 100 if q else 0, "samples": cfg.sft_answers, "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed}
    prefs = out / "labels" / "preferences.jsonl" if cfg.sft_answers else world / "preferences.jsonl"
    pref = {**common, "model": str(out / "sft"), "data": str(prefs), "batch_size": 16, "lr": 1e-3, "max_length": 128,
            "eval_split": 0.1, "epochs": 0.3 if q else cfg.score_epochs}
    plan["train-rm"] = {**pref, "output_dir": str(out / "rm")}
    plan["train-cost"] = {**pref, "output_dir": str(out / "cm")}
    rl = {**common, "model": str(out / "sft"), "reward_model": str(out / "rm"), "cost_model": str(out / "cm"),
          "data": str(world / "prompts_train.jsonl"), "max_steps": 6 if q else cfg.ppo_steps, "batch_size": 8 if q else cfg.ppo_batch,
          "max_new_tokens": cfg.max_new_tokens, "kl_coeff": cfg.kl_coeff, "lr": cfg.actor_lr, "critic_lr": cfg.critic_lr,
          "threshold": train_threshold, "lambda_init": cfg.lambda_init, "lambda_lr": cfg.lambda_lr, "eval_split": 0.0, "max_length": 128,
          "save_steps": 0 if q else 50}
    for r in RL_RUNS:
        plan[f"ppo-lag:{r.name}"] = {**rl, **r.settings(cfg), "output_dir": str(out / r.name)}
    candidates = {r.name for r in RL_RUNS if r.candidate}
    for name, _ in POLICIES:
        plan[f"safety-test:{name}"] = {
            "policy": str(out / name), "cost_model": str(out / "cm"), "prompts": str(world / "prompts_safety.jsonl"),
            "output_dir": str(out / "safety" / name), "threshold": threshold, "delta": cfg.delta, "max_new_tokens": cfg.max_new_tokens,
            "seed": cfg.seed, "registry": str(out / "safety_tests.jsonl"), "allow_retest": name not in candidates}
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
