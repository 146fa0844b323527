"""Start-up time of the CLI: `safealign --help`, every `COMMAND --help`, and a `safety-test
--costs-file` re-decision (no model), each a fresh process, with the imports that cost the most.

Targets: every --help under 1 s, the --costs-file decision under 2 s; and that decision imports no
torch/transformers/trl/peft/accelerate/deepspeed/datasets (listed in the table). Run under the lock (timings of a shared machine mean nothing):

    flock /tmp/safealign-cpu.lock .venv/bin/python bench/startup.py --out bench/results/startup.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import publish

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 1.0
DECISION_TARGET_S = 2.0
HEAVY = ("torch", "transformers", "trl", "peft", "accelerate", "deepspeed", "datasets", "scipy.stats")


def commands() -> list[list[str]]:
    """Every command path of the app (["train-rm"], ["data", "split"], ...)."""
    import typer.main

    from safealign.cli import app

    def walk(cmd, prefix):
        subs = getattr(cmd, "commands", None)
        if not subs:
            return [prefix]
        found = [prefix]
        for name in sorted(subs):
            found += walk(subs[name], prefix + [name])
        return found

    return walk(typer.main.get_command(app), [])


def env() -> dict:
    e = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "100"}
    e.pop("PYTHONWARNINGS", None)
    return e


def time_once(args: list[str], cwd: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "safealign", *args], env=env(), cwd=cwd, capture_output=True, text=True)
    return time.perf_counter() - t0, res.returncode


def costs_file(d: Path) -> Path:
    import random

    rng = random.Random(0)
    rows = [{"prompt": f"prompt {i}?", "response": "an answer.", "cost": rng.gauss(-1.0, 1.0), "prompt_index": i, "sample_index": 0}
            for i in range(300)]
    p = d / "costs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def heaviest_imports(args: list[str], top: int = 8) -> list[tuple[str, float]]:
    """(module, cumulative seconds) of the slowest top-level imports of one run (python -X importtime)."""
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "safealign", *args], env=env(), capture_output=True, text=True)
    rows = []
    for line in res.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m and len(m.group(3)) <= 1:  # top-level imports only (their cumulative time includes their children)
            rows.append((m.group(4), int(m.group(2)) / 1e6))
    return sorted(rows, key=lambda r: -r[1])[:top]


def heavy_imported(args: list[str]) -> list[str]:
    """The HEAVY modules one run of the CLI imported (a fresh interpreter that reports sys.modules at exit)."""
    script = ("import sys, runpy, atexit, json\n"
              f"atexit.register(lambda: print('HEAVY', json.dumps([m for m in {HEAVY!r} if m in sys.modules]), file=sys.stderr))\n"
              "sys.argv = ['safealign', *sys.argv[1:]]\nrunpy.run_module('safealign', run_name='__main__')\n")
    res = subprocess.run([sys.executable, "-c", script, *args], env=env(), capture_output=True, text=True)
    line = [x for x in res.stderr.splitlines() if x.startswith("HEAVY")]
    return json.loads(line[-1][len("HEAVY"):]) if line else ["?"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5, help="runs per command (the median is reported)")
    ap.add_argument("--out", type=Path, help="write the table here (markdown)")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cases = [(" ".join(["safealign", *c, "--help"]), [*c, "--help"]) for c in commands()]
        costs = costs_file(tmp)
        cases.append(("safealign safety-test --costs-file ... (re-decision, no model)",
                      ["safety-test", "--costs-file", str(costs), "--registry", str(tmp / "reg.jsonl"), "--allow-retest", "--output-dir"]))
        for label, args in cases:
            times = []
            for i in range(a.reps):
                run_args = args + [str(tmp / f"st-{len(rows)}-{i}")] if args[-1] == "--output-dir" else args
                t, code = time_once(run_args, tmp)
                if code not in (0, 3):
                    raise SystemExit(f"{label}: exit {code}")
                times.append(t)
            rows.append((label, statistics.median(times), max(times)))
            print(f"{label}: median {rows[-1][1]:.2f} s, max {rows[-1][2]:.2f} s", flush=True)
        imports = heaviest_imports(["train-rm", "--help"])
        imports_st = heaviest_imports(cases[-1][1] + [str(tmp / "st-imports")])
        heavy_st = heavy_imported(cases[-1][1] + [str(tmp / "st-heavy")])
    lines = ["# CLI start-up time", "",
             f"`{' '.join(['python', 'bench/startup.py', *sys.argv[1:]])}`; each command a fresh process, {a.reps} runs, "
             f"median and max wall time; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}. "
             f"Targets: every `--help` under {TARGET_S:.0f} s; the `--costs-file` decision under {DECISION_TARGET_S:.0f} s.", "",
             "The verdict is on the median: the max shows what load from other jobs adds.", "",
             "| command | median (s) | max (s) | target (s) | median under target |", "| --- | --- | --- | --- | --- |"]
    for label, med, mx in rows:
        target = DECISION_TARGET_S if "--costs-file" in label else TARGET_S
        lines.append(f"| `{label}` | {med:.2f} | {mx:.2f} | {target:.0f} | {'yes' if med < target else 'no'} |")
    lines += ["", f"Heavy modules imported by the `--costs-file` decision (of {', '.join(HEAVY)}): "
              f"{', '.join(heavy_st) if heavy_st else 'none'}."]
    for title, imp in (("`safealign train-rm --help`", imports), ("`safety-test --costs-file`", imports_st)):
        lines += ["", f"Slowest top-level imports of {title} (`python -X importtime`, cumulative):", "",
                  "| module | seconds |", "| --- | --- |"] + [f"| {m} | {s:.3f} |" for m, s in imp]
    publish(lines, a.out)


if __name__ == "__main__":
    main()
