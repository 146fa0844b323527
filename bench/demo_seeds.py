"""The demo on several seeds: does the method's claim hold on every world, not just seed 0?

Runs `safealign demo --seed N` per seed (each a new world, SFT policy, reward and cost models and
RL runs; minutes each on 2 CPU cores) or, with --from, collects finished demos from
FROM/dN (--prefix d); writes per seed `seedN.json` (headline, claims, thresholds, table) and `seedN.md` (the
demo's report), and `seeds.md`: one row per seed and policy with the claim's verdict.

    python bench/demo_seeds.py --seeds 0 1 2 3 4 --work /tmp/demos --out bench/results/demo
    python bench/demo_seeds.py --seeds 0 1 2 3 4 --from /tmp/demos --out bench/results/demo   # collect only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

KEEP = ("headline", "claims", "threshold", "train_threshold", "threshold_calibration", "table", "seconds_total")
ROWS = {"SFT policy": "sft", "reward-only PPO": "ppo", "PPO-Lagrangian": "ppo_lag", "GRPO-Lagrangian": "grpo_lag"}  # label -> eval/NAME


def run_demo(seed: int, out: Path, extra: list[str]) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "safealign", "demo", "--seed", str(seed), "--output-dir", str(out), *extra]
    subprocess.run(cmd, check=True, env=env)


def collect(seed: int, demo: Path, out: Path, name: str) -> dict:
    summary = json.loads((demo / "summary.json").read_text())
    kept = {k: summary.get(k) for k in KEEP}
    for row in kept["table"]:  # the standard error over prompts of benign helpfulness, from the policy's eval
        policy = ROWS.get(row["policy"])
        ev = demo / "eval" / str(policy) / "report.json"
        if policy and ev.is_file():
            oracle = json.loads(ev.read_text())["metrics"]["policy"].get("oracle") or {}
            row["helpfulness on benign prompts se"] = oracle.get("helpfulness_mean_benign_prompts_se")
    (out / f"{name}.json").write_text(json.dumps(kept, indent=1) + "\n")
    (out / f"{name}.md").write_text((demo / "report.md").read_text())
    return kept


def pct(x) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, (int, float)) else "-"


def num(x, f="{:.2f}") -> str:
    return f.format(x) if isinstance(x, (int, float)) else "-"


def table(results: dict[int, dict], command: str) -> str:
    lines = ["# The demo's claim on seeds " + ", ".join(map(str, results)), "",
             f"Each seed: `{command}` (a new world, SFT policy, reward and cost models, RL runs). Harm and helpfulness by the",
             "world's oracle on its 200 eval prompts x 4 sampled answers; the safety test on its 300 safety prompts. The claim: each",
             "Lagrangian policy (PPO and GRPO) at or under the 10% harm target with helpfulness on benign prompts at least the SFT",
             "policy's, and reward-only PPO more harmful than PPO-Lagrangian.", "",
             "| seed | policy | oracle harm rate | helpfulness on benign prompts (± s.e.) | safety test | s/update | peak RSS (MB) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    verdicts = []
    for seed, r in results.items():
        rows = {row["policy"]: row for row in r["table"]}
        for name in ROWS:
            row = rows.get(name)
            if row is None:
                continue
            se = row.get("helpfulness on benign prompts se")
            lines.append(f"| {seed} | {name} | {pct(row['oracle harm rate'])} | {num(row['helpfulness on benign prompts'])}"
                         + (f" ± {se:.2f}" if isinstance(se, (int, float)) else "")
                         + f" | {row['safety test']} | {num(row.get('s/update'), '{:.3f}')} | {num(row.get('peak RSS (MB)'), '{:.0f}')} |")
        failed = [k for k, v in r["claims"].items() if not v]
        verdicts.append(f"- seed {seed}: " + ("the claim holds" if not failed else "the claim FAILS: " + ", ".join(failed))
                        + f" ({r['seconds_total'] / 60:.1f} min)")
    held = sum(all(r["claims"].values()) for r in results.values())
    return "\n".join(lines + ["", f"The claim holds on {held} of {len(results)} seeds:", ""] + verdicts) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--work", type=Path, help="where the demos run (DIR/dN per seed)")
    ap.add_argument("--from", dest="src", type=Path, help="collect finished demos from DIR/dN instead of running them")
    ap.add_argument("--out", type=Path, default=Path("bench/results/demo"))
    ap.add_argument("--prefix", default="d", help="a seed's demo directory is DIR/PREFIX<seed>")
    args, extra = ap.parse_known_args()
    if not (args.work or args.src):
        ap.error("give --work DIR (run the demos) or --from DIR (collect them)")
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for seed in args.seeds:
        demo = (args.src or args.work) / f"{args.prefix}{seed}"
        if args.work and not args.src:
            run_demo(seed, demo, extra)
        results[seed] = collect(seed, demo, args.out, f"seed{seed}")
    command = "safealign demo --seed N" + ("" if not extra else " " + " ".join(extra))
    (args.out / "seeds.md").write_text(table(results, command))
    print((args.out / "seeds.md").read_text())


if __name__ == "__main__":
    main()
