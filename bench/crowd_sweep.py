"""Safety cost from crowd preferences (`train-cost --crowd`) on the synthetic world, judged by its oracle.

Part 1, the sweep. For each world (knobs: number of annotators, share of each taste, how strongly
tastes conflict, label noise) the preference file is split by prompt (90% train / 10% held out),
then two tiny models are trained on the train part (same steps, lr, seed):

* ``train-cost --crowd`` on the annotators' OVERALL preferences (``preferred_response_id``), no
  safety labels; it also trains the pooled Bradley-Terry baseline on the same labels;
* ``train-cost`` (explicit) on the safety labels (``safer_response_id``, ``is_response_*_safe``):
  the upper reference.

Every score is measured on the same held-out responses (prompts never trained on): AUROC of oracle
unsafe vs safe and Spearman with oracle harm, for the discovered cost (exported model), the shared
component under the other rules, the mean head, the negated pooled reward and the explicit cost.

Part 2 (``--ppo``): on chosen worlds, sft -> train-rm (helpfulness) -> explicit and crowd cost
models (from the SFT policy) -> reward-only PPO, ppo-lag with the explicit cost, ppo-lag with the
discovered cost (threshold 0 each: each model's own zero point) -> eval on the world's eval prompts
(oracle harm rate, helpfulness).

    .venv/bin/python bench/crowd_sweep.py                       # sweep, writes bench/results/crowd_sweep.md
    .venv/bin/python bench/crowd_sweep.py --ppo reference,verbose-majority
    .venv/bin/python bench/crowd_sweep.py --only ppo --ppo reference

Runs use one thread per process (OMP_NUM_THREADS=1) and --jobs processes at once: on 2 shared CPU
cores this is several times faster than 2 threads per process.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SAFEALIGN = str(REPO / ".venv" / "bin" / "safealign")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "SAFEALIGN_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}

# rambling_share 0: the worlds of generator v1, on which bench/results/crowd_sweep.md was measured
# (the rambling styles came later, for the demo's reward model; set rambling_share here to sweep with them).
REF = {"n_annotators": 12, "taste_shares": {"balanced": 0.5, "concise": 0.25, "verbose": 0.25}, "taste_conflict": 1.0, "label_temperature": 0.5,
       "rambling_share": 0.0, "drift_share": 0.0}
WORLDS: list[tuple[str, dict]] = [
    ("reference", {}),
    ("no-taste", {"taste_conflict": 0.0}),
    ("strong-symmetric", {"taste_conflict": 3.0}),
    ("verbose-majority", {"taste_conflict": 3.0, "taste_shares": {"concise": 0.25, "verbose": 0.75}}),
    ("concise-majority", {"taste_conflict": 3.0, "taste_shares": {"concise": 0.75, "verbose": 0.25}}),
    ("verbose-majority, 4 annotators", {"n_annotators": 4, "taste_conflict": 3.0, "taste_shares": {"concise": 0.25, "verbose": 0.75}}),
    ("verbose-majority, 48 annotators", {"n_annotators": 48, "taste_conflict": 3.0, "taste_shares": {"concise": 0.25, "verbose": 0.75}}),
    ("verbose-majority, noisy labels", {"label_temperature": 1.5, "taste_conflict": 3.0, "taste_shares": {"concise": 0.25, "verbose": 0.75}}),
]
SCORE_ORDER = [("cost", "discovered"), ("shared_project", "project rule"), ("mean_head", "mean head"),
               ("pooled_negated_reward", "pooled BT"), ("explicit", "explicit train-cost"), ("ceiling", "exact shared utility")]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def sh(args: list, log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ safealign " + " ".join(map(str, args)) + "\n")
        f.flush()
        r = subprocess.run([SAFEALIGN, *map(str, args)], env=ENV, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    if r.returncode != 0:
        raise RuntimeError(f"safealign {' '.join(map(str, args))} failed ({r.returncode}); see {log}")
    return time.perf_counter() - t0


def make_world(name: str, knobs: dict, work: Path, n_pairs: int, seed: int) -> Path:
    """The world's files plus train.jsonl / heldout.jsonl: its preference rows split by prompt."""
    from safealign.data.synth import WorldConfig, read_jsonl, write_world

    d = work / slug(name) / "world"
    if not (d / "heldout.jsonl").exists():
        write_world(WorldConfig(seed=seed, n_pairs=n_pairs, **{**REF, **knobs}), d)
        rows = read_jsonl(d / "preferences.jsonl")
        prompts = sorted({r["prompt"] for r in rows})
        random.Random(seed).shuffle(prompts)
        held = set(prompts[: len(prompts) // 10])
        for fname, part in (("train.jsonl", [r for r in rows if r["prompt"] not in held]), ("heldout.jsonl", [r for r in rows if r["prompt"] in held])):
            (d / fname).write_text("".join(json.dumps(r) + "\n" for r in part))
    return d


_SCORE_LOCK = threading.Lock()   # in-process scoring: one at a time (transformers' lazy imports are not thread-safe)


def score_dir(model_dir: Path, prompts: list[str], responses: list[str]) -> list[float]:
    import torch

    from safealign.models.generation import load_scorer, score_texts

    with _SCORE_LOCK:
        torch.set_num_threads(1)
        scorer, tok = load_scorer(str(model_dir))
        with torch.no_grad():
            return score_texts(scorer, tok, prompts, responses, template="default").tolist()


def measure(crowd_dir: Path, explicit_dir: Path, keys=tuple(k for k, _ in SCORE_ORDER)) -> dict:
    """Oracle AUROC / Spearman of every score on the crowd run's held-out responses."""
    from safealign.algorithms.crowd import auroc, spearman

    rows = [json.loads(x) for x in (crowd_dir / "eval_scores.jsonl").read_text().splitlines()]
    expl = score_dir(explicit_dir, [r["prompt"] for r in rows], [r["response"] for r in rows])
    for r, c in zip(rows, expl):
        r["explicit"] = c
        r["ceiling"] = r["oracle_harm"] - r["oracle_helpfulness"]   # -(the world's shared utility: helpfulness - harm)
    unsafe = [bool(r["oracle_unsafe"]) for r in rows]
    harm = [r["oracle_harm"] for r in rows]
    rep = json.loads((crowd_dir / "report.json").read_text())
    out = {"responses": len(rows), "unsafe_rate": sum(unsafe) / len(unsafe),
           "taste_axes": rep["decomposition"]["taste_axes_removed"],
           "axis1_reliability": rep["decomposition"]["principal_axes"][0]["split_half_reliability"] if rep["decomposition"]["principal_axes"] else None,
           "ll_share_shared": rep["preferences_eval"].get("loglik_gain_share_shared"),
           "acc_own": rep["preferences_eval"].get("accuracy_own_heads"), "acc_pooled": rep["preferences_eval"].get("accuracy_pooled_baseline")}
    for key in keys:
        xs = [r[key] for r in rows]
        out[key] = {"auroc": auroc(xs, unsafe), "spearman": spearman(xs, harm)}
    return out


def train_args(data: Path, heldout: Path, out: Path, model: str, steps_epochs: float, seed: int) -> list:
    return ["--model", model, "--data", data, "--eval-data", heldout, "--output-dir", out, "--epochs", steps_epochs, "--batch-size", 16,
            "--lr", "2e-3", "--max-length", 128, "--save-steps", 0, "--log-steps", 50, "--seed", seed]


def sweep_one(name: str, knobs: dict, work: Path, args, seed: int) -> dict:
    """One world, one training seed (the world itself is always generated with --seed)."""
    w = make_world(name, knobs, work, args.pairs, args.seed)
    base = work / slug(name)
    log = base / "log.txt"
    t = {}
    crowd, expl = base / f"crowd_s{seed}", base / f"explicit_s{seed}"
    if not (crowd / "eval_scores.jsonl").exists():
        t["crowd"] = sh(["train-cost", "--crowd", *train_args(w / "train.jsonl", w / "heldout.jsonl", crowd, "tiny", args.epochs, seed)], log)
    if not (expl / "report.json").exists():
        t["explicit"] = sh(["train-cost", *train_args(w / "train.jsonl", w / "heldout.jsonl", expl, "tiny", args.epochs, seed)], log)
    m = measure(crowd, expl)
    m.update(world=name, seed=seed, knobs={**REF, **knobs}, seconds=t)
    (base / f"result_s{seed}.json").write_text(json.dumps(m, indent=1))
    print(f"[sweep] {name} seed {seed}: discovered {m['cost']['auroc']:.3f}, pooled {m['pooled_negated_reward']['auroc']:.3f}, "
          f"explicit {m['explicit']['auroc']:.3f}", flush=True)
    return m


# --------------------------------------------------------------------------------------------
# Part 2: ppo-lag with each cost model


def calibrate(crowd_dir: Path, explicit_dir: Path, target: float) -> dict:
    """Threshold of each cost model for a target harm rate p, by the demo's rule on the held-out
    responses: (1 - p) * mean(cost | oracle safe) + p * mean(cost | oracle unsafe). It uses the
    oracle's labels, which a user of --crowd would not have: it puts both cost models on the same
    footing for the comparison, nothing more."""
    rows = [json.loads(x) for x in (crowd_dir / "eval_scores.jsonl").read_text().splitlines()]
    expl = score_dir(explicit_dir, [r["prompt"] for r in rows], [r["response"] for r in rows])
    out = {}
    for key, vals in (("cost", [r["cost"] for r in rows]), ("explicit", expl)):
        safe = [v for v, r in zip(vals, rows) if not r["oracle_unsafe"]]
        unsafe = [v for v, r in zip(vals, rows) if r["oracle_unsafe"]]
        out[key] = round((1 - target) * sum(safe) / len(safe) + target * sum(unsafe) / len(unsafe), 4)
    return out


def cfg_algo(label: str) -> bool:
    return label.startswith("ppo-lag")


def ppo_one(name: str, knobs: dict, work: Path, args) -> dict:
    w = make_world(name, knobs, work, args.pairs, args.seed)
    base = work / slug(name) / "ppo"
    base.mkdir(parents=True, exist_ok=True)
    log = base / "log.txt"
    sft, rm, cm, crowd = base / "sft", base / "rm", base / "cm_explicit", base / "cm_crowd"
    if not (sft / "config.json").exists():
        sh(["sft", "--model", "tiny", "--data", w / "sft.jsonl", "--output-dir", sft, "--epochs", 3, "--batch-size", 16, "--lr", "3e-3",
            "--max-length", 128, "--eval-split", 0.1, "--check-prompts", 0, "--save-steps", 0, "--log-steps", 50, "--seed", args.seed], log)
    jobs = []
    if not (rm / "report.json").exists():
        jobs.append(["train-rm", *train_args(w / "train.jsonl", w / "heldout.jsonl", rm, str(sft), args.epochs, args.seed)])
    if not (cm / "report.json").exists():
        jobs.append(["train-cost", *train_args(w / "train.jsonl", w / "heldout.jsonl", cm, str(sft), args.epochs, args.seed)])
    if not (crowd / "report.json").exists():
        jobs.append(["train-cost", "--crowd", "--no-crowd-baseline", *train_args(w / "train.jsonl", w / "heldout.jsonl", crowd, str(sft), args.epochs, args.seed)])
    with ThreadPoolExecutor(max_workers=args.jobs) as ex:
        list(ex.map(lambda a: sh(a, log), jobs))
    rl = ["--model", sft, "--reward-model", rm, "--data", w / "prompts_train.jsonl", "--max-steps", args.ppo_steps, "--batch-size", args.ppo_batch,
          "--max-new-tokens", 24, "--kl-coeff", 0.02, "--lr", "1e-4", "--critic-lr", "1e-3", "--lambda-init", 1.0,
          "--lambda-lr", 0.1, "--eval-split", 0, "--max-length", 128, "--save-steps", 0, "--log-steps", 10, "--seed", args.seed]
    thresholds = calibrate(crowd, cm, args.harm_target)
    runs = {"reward-only PPO": ["--algorithm", "ppo"],
            "ppo-lag, explicit cost, threshold 0": ["--algorithm", "ppo-lag", "--cost-model", cm],
            "ppo-lag, discovered cost, threshold 0": ["--algorithm", "ppo-lag", "--cost-model", crowd],
            "ppo-lag, explicit cost, calibrated threshold": ["--algorithm", "ppo-lag", "--cost-model", cm, "--threshold", thresholds["explicit"]],
            "ppo-lag, discovered cost, calibrated threshold": ["--algorithm", "ppo-lag", "--cost-model", crowd, "--threshold", thresholds["cost"]]}
    jobs = [(label, ["ppo-lag", *rl, *extra, "--output-dir", base / slug(label)]) for label, extra in runs.items()
            if not (base / slug(label) / "config.json").exists()]
    with ThreadPoolExecutor(max_workers=args.jobs) as ex:
        list(ex.map(lambda j: sh(j[1], log), jobs))
    policies = {"SFT policy": sft, **{label: base / slug(label) for label in runs}}
    jobs = [["eval", "--policy", p, "--prompts", w / "prompts_eval.jsonl", "--reward-model", rm, "--cost-model", cm, "--output-dir", base / "eval" / slug(label),
             "--max-new-tokens", 24, "--seed", args.seed] for label, p in policies.items() if not (base / "eval" / slug(label) / "report.json").exists()]
    with ThreadPoolExecutor(max_workers=args.jobs) as ex:
        list(ex.map(lambda a: sh(a, log), jobs))
    table = []
    for label in policies:
        e = json.loads((base / "eval" / slug(label) / "report.json").read_text())["metrics"]["policy"]
        o = e.get("oracle", {})
        row = {"policy": label, "oracle harm rate": o.get("harm_rate"), "harm rate, harmful prompts": o.get("harm_rate_harmful_prompts"),
               "oracle helpfulness": o.get("helpfulness_mean"), "helpfulness, benign prompts": o.get("helpfulness_mean_benign_prompts"),
               "refusal, benign prompts": o.get("refusal_rate_benign_prompts"), "explicit cost mean": e.get("cost_mean")}
        if label != "SFT policy":
            final = json.loads((base / slug(label) / "report.json").read_text())
            row["lambda (final)"] = (final.get("lambda") or {}).get("final") if cfg_algo(label) else None
            row["J_c (train, final)"] = (final.get("constraint") or {}).get("J_c")
        table.append(row)
    res = {"world": name, "knobs": {**REF, **knobs}, "table": table, "thresholds": thresholds,
           "cost_models": measure(crowd, cm, keys=("cost", "explicit")),
           "settings": {"ppo_steps": args.ppo_steps, "ppo_batch": args.ppo_batch, "harm_target": args.harm_target}}
    (base / "result.json").write_text(json.dumps(res, indent=1))
    return res


# --------------------------------------------------------------------------------------------
# Report


def _f(x, pct=False) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{100 * x:.1f}%" if pct else f"{x:.3f}"
    return str(x)


def knob_text(k: dict) -> str:
    shares = "/".join(f"{t[0]}{int(round(100 * v))}" for t, v in k["taste_shares"].items())
    return f"A={k['n_annotators']}, {shares}, conflict {k['taste_conflict']:g}, T={k['label_temperature']:g}"


def _ms(xs: list[float]) -> str:
    import statistics

    return f"{statistics.mean(xs):.3f}" + (f" ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else "")


def sweep_md(results: list[list[dict]], args) -> list[str]:
    seeds = [m["seed"] for m in results[0]]
    lines = ["## Sweep: AUROC (oracle unsafe vs safe) and Spearman (with oracle harm) on held-out responses", "",
             f"{args.pairs} preference pairs per world (world seed {args.seed}; 90% train, the prompts of the other 10% held out), tiny Llama "
             f"(hidden 64, 2 layers) from scratch, {args.epochs:g} epoch, batch 16, lr 2e-3; training seeds {', '.join(map(str, seeds))}: "
             "mean ± sd over seeds. Tastes: b = balanced, c = concise (prefers short answers), v = verbose; conflict = weight of the length taste; "
             "T = Bradley-Terry label temperature (label noise). About 18% of the held-out responses are unsafe.", "",
             "| world | knobs | taste axes found | discovered | project rule | mean head | pooled BT | explicit train-cost | exact shared utility | discovered − pooled |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for ms in results:
        m0 = ms[0]
        cells = [_ms([m[k]["auroc"] for m in ms]) for k, _ in SCORE_ORDER]
        gap = _ms([m["cost"]["auroc"] - m["pooled_negated_reward"]["auroc"] for m in ms])
        axes = "/".join(str(m["taste_axes"]) for m in ms)
        lines.append(f"| {m0['world']} | {knob_text(m0['knobs'])} | {axes} | " + " | ".join(cells) + f" | {gap} |")
    lines += ["", "AUROC above; Spearman with oracle harm below (same columns).", "",
              "| world | discovered | project rule | mean head | pooled BT | explicit train-cost | exact shared utility |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for ms in results:
        lines.append(f"| {ms[0]['world']} | " + " | ".join(_ms([m[k]["spearman"] for m in ms]) for k, _ in SCORE_ORDER) + " |")
    lines += ["", "discovered = the exported cost model (`--crowd-shared midrange`, the default); project rule = the shared component with the "
              "whole taste-axis projection removed (`--crowd-shared project`); mean head = the mean of the annotators' (normalised) heads, no "
              "taste correction; pooled BT = one Bradley-Terry head for all annotators (its own backbone, same data and steps), negated; "
              "explicit = `train-cost` with the safety labels (the upper reference); exact shared utility = -(oracle helpfulness - oracle harm), "
              "the utility every annotator of the world shares besides their taste: the best a perfect crowd model can recover. "
              "Taste axes found: per seed.", ""]
    gap = {ms[0]["world"]: [m["cost"]["auroc"] - m["pooled_negated_reward"]["auroc"] for m in ms] for ms in results}

    def g(name: str) -> str:
        return _ms(gap[name]) if name in gap else "-"

    vm = [n for n in gap if n.startswith("verbose-majority")]
    ceil = _ms([m["ceiling"]["auroc"] for ms in results for m in ms])
    lines += ["**Reading.** The discovered cost is ahead of the pooled baseline only where the majority's taste favours harmful answers "
              f"(verbose majorities; compliance answers are long), and not by the same margin everywhere (AUROC gain: {'; '.join(f'{n} {g(n)}' for n in vm)}; "
              "an sd as large as the mean means one seed of three was behind). Where tastes are balanced "
              f"(reference {g('reference')}, strong-symmetric {g('strong-symmetric')}) or absent (no-taste {g('no-taste')}) there is no majority "
              f"bias to remove and it is no better than pooled; where the majority's taste happens to favour safe answers (concise-majority "
              f"{g('concise-majority')}) it is worse, because removing the taste removes a bias that helped. It stays far below the explicit cost "
              f"model (AUROC 1.000) and near or below the exact shared utility ({ceil}): what the crowd agrees on is helpfulness minus harm, "
              "since everyone values helpfulness too, and overall preferences alone cannot separate the two. The project rule is unstable when "
              "two taste axes are removed (strong-symmetric): it also strips the part of the shared utility that correlates with the tastes.", ""]
    return lines


def ppo_md(res: dict) -> list[str]:
    s = res["settings"]
    lines = [f"## ppo-lag with the discovered cost: world '{res['world']}' ({knob_text(res['knobs'])})", "",
             f"SFT (tiny, 3 epochs) -> reward model (helpfulness labels, `better_response_id`) and both cost models trained from the SFT policy "
             f"(1 epoch, lr 2e-3) -> {s['ppo_steps']} PPO updates of {s['ppo_batch']} prompts each (kl 0.02, actor lr 1e-4, lambda_init 1, lambda_lr 0.1) "
             "with the threshold at 0 (each cost model's own zero point: the explicit model's learned boundary, the discovered model's median convention) "
             "or calibrated (below) -> eval on the world's 200 eval prompts (one sample each, oracle-scored; one seed, so +-3.5% is noise). "
             "`explicit cost mean` is the explicit cost model's mean on each policy's answers.", ""]
    keys = list(dict.fromkeys(k for r in res["table"] for k in r))
    pct = {"oracle harm rate", "harm rate, harmful prompts", "refusal, benign prompts"}
    lines += ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join(_f(r.get(k), k in pct) for k in keys) + " |" for r in res["table"]]
    by = {r["policy"]: r for r in res["table"]}
    sft, rw = by["SFT policy"], by["reward-only PPO"]
    d0, dc = by["ppo-lag, discovered cost, threshold 0"], by["ppo-lag, discovered cost, calibrated threshold"]
    ec = by["ppo-lag, explicit cost, calibrated threshold"]
    lines += ["", f"**Reading.** With the discovered cost, ppo-lag ends at {_f(d0['oracle harm rate'], True)} / {_f(dc['oracle harm rate'], True)} "
                  f"oracle harm (threshold 0 / calibrated), against {_f(rw['oracle harm rate'], True)} for reward-only PPO, "
                  f"{_f(ec['oracle harm rate'], True)} with the explicit cost (calibrated) and {_f(sft['oracle harm rate'], True)} for the SFT policy, "
                  f"and with less helpfulness ({_f(d0['oracle helpfulness'])} / {_f(dc['oracle helpfulness'])} vs {_f(ec['oracle helpfulness'])}). "
                  "The constraint hardly binds: the policy lowers the discovered cost while becoming more harmful (J_c mostly below the "
                  "threshold, lambda decays to ~0.1; the runs' metrics.jsonl), because the discovered cost is largely 'less helpful', which the "
                  "reward model pushes down as well, and its AUROC for unsafe answers (below) leaves room to exploit."]
    c, t = res["cost_models"], res["thresholds"]
    lines += ["", f"Cost models used (trained from the SFT policy), on the {c['responses']} held-out responses: discovered AUROC "
                  f"{c['cost']['auroc']:.3f} / Spearman {c['cost']['spearman']:.3f}, explicit {c['explicit']['auroc']:.3f} / {c['explicit']['spearman']:.3f}. "
                  f"Calibrated thresholds (harm target {100 * s['harm_target']:.0f}%, rule (1 - p) mean(cost | oracle safe) + p mean(cost | oracle unsafe) "
                  f"on the held-out responses, which uses oracle labels the crowd setting would not have): discovered {t['cost']:.3f}, explicit {t['explicit']:.3f}."]
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "safealign-crowd-bench"), help="working directory (reused: finished runs are not repeated)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "crowd_sweep.md"))
    ap.add_argument("--only", choices=("sweep", "ppo", "all"), default="all")
    ap.add_argument("--worlds", default="", help="comma-separated world names for the sweep (default: all)")
    ap.add_argument("--ppo", default="", help="comma-separated world names for the ppo-lag comparison (default: none)")
    ap.add_argument("--pairs", type=int, default=4000)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--ppo-steps", type=int, default=120)
    ap.add_argument("--ppo-batch", type=int, default=32)
    ap.add_argument("--harm-target", type=float, default=0.10, help="harm rate the calibrated ppo-lag thresholds aim at")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="seed of the worlds and of the ppo-lag pipeline")
    ap.add_argument("--train-seeds", default="0,1,2", help="training seeds of the sweep's models (comma-separated)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    by_name = dict(WORLDS)
    lines = ["# train-cost --crowd on the synthetic world: discovered cost vs pooled Bradley-Terry vs explicit cost model", "",
             f"Command: `.venv/bin/python bench/crowd_sweep.py {' '.join(sys.argv[1:])}`".rstrip() + " (2 shared CPU cores, one thread per process).", ""]
    if args.only in ("sweep", "all"):
        names = [n for n in (args.worlds.split(",") if args.worlds else by_name) if n]
        seeds = [int(x) for x in args.train_seeds.split(",")]
        tasks = [(n, sd) for n in names for sd in seeds]
        with ThreadPoolExecutor(max_workers=args.jobs) as ex:
            flat = list(ex.map(lambda t: sweep_one(t[0], by_name[t[0]], work, args, t[1]), tasks))
        results = [[m for (n, _), m in zip(tasks, flat) if n == name] for name in names]
        lines += sweep_md(results, args)
    if args.only in ("ppo", "all") and args.ppo:
        for n in args.ppo.split(","):
            lines += ppo_md(ppo_one(n, by_name[n], work, args))
    lines.append(f"Wall time: {(time.perf_counter() - t0) / 60:.1f} min.")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
