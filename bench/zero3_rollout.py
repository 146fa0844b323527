"""Generation under DeepSpeed ZeRO-3, 2 processes on CPU: sampling from the sharded actor (every
decoding step all-gathers every layer, the processes in lock-step) against sampling from the actor
gathered once per rollout (`--zero3-gather`, the default), in `safealign ppo-lag` itself.

    flock /tmp/safealign-cpu.lock .venv/bin/python bench/zero3_rollout.py [--hidden 256 --layers 4] [--out bench/results/zero3_rollout.md]

Each configuration is one `accelerate launch --config_file recipes/accelerate/zero3.yaml` run of
ppo-lag (--deepspeed recipes/deepspeed/zero3.json, fp32 on CPU); generate tok/s = response tokens of
both processes / time/generate (median of the steps after the first), peak RSS of rank 0 from the
report. The memory cost of the gathered copy is the actor's parameters x 4 bytes (fp32), per
process, while sampling (`safealign plan` adds it to the ZeRO-3 rows' rollout phase).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import publish

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "SAFEALIGN_NO_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO),
       "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(REPO / ".torch_extensions")}


def run(paths: dict, out: Path, gather: bool, a) -> dict:
    cmd = [BIN / "accelerate", "launch", "--config_file", REPO / "recipes" / "accelerate" / "zero3.yaml", "-m", "safealign", "ppo-lag",
           "--deepspeed", REPO / "recipes" / "deepspeed" / "zero3.json", "--model", paths["policy"], "--reward-model", paths["rm"],
           "--cost-model", paths["cm"], "--data", paths["data"], "--output-dir", out, "--max-steps", a.steps, "--batch-size", a.batch_size,
           "--max-new-tokens", a.max_new_tokens, "--save-steps", 0, "--eval-split", 0, "--seed", 0, "--zero3-gather" if gather else "--no-zero3-gather"]
    res = subprocess.run([str(c) for c in cmd], env=ENV, cwd=REPO, capture_output=True, text=True)
    if res.returncode or not (out / "report.json").is_file():
        raise SystemExit(f"ppo-lag under ZeRO-3 failed (gather={gather}):\n{res.stderr[-4000:]}")
    report = json.loads((out / "report.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/step" in r]
    rows = rows[1:] or rows
    gen = statistics.median(r["time/generate"] for r in rows)
    tokens = statistics.median(r["response_length"] for r in rows) * a.batch_size * report["world_size"]
    return {"generate_s": gen, "tok_s": tokens / gen, "step_s": statistics.median(r["time/step"] for r in rows),
            "score_s": statistics.median(r["time/score"] for r in rows), "train_s": statistics.median(r["time/train"] for r in rows),
            "peak_rss_mb": report["throughput"]["peak_memory_mb"], "world": report["world_size"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per process")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    from ppo_speed import build

    with tempfile.TemporaryDirectory() as tmp:
        paths = build(Path(tmp) / "m", a.hidden, a.layers, a.heads, 1024)
        rows = {g: run(paths, Path(tmp) / f"z3-{int(g)}", g, a) for g in (False, True)}
    before, after = rows[False], rows[True]
    copy_mb = paths["params"] * 4 / 2**20
    lines = ["# ZeRO-3 rollouts: sharded actor vs the actor gathered once per rollout", "",
             f"Command: `flock /tmp/safealign-cpu.lock .venv/bin/python bench/zero3_rollout.py {' '.join(sys.argv[1:])}`".replace(' `', '`'), "",
             f"`safealign ppo-lag` under `accelerate launch --config_file recipes/accelerate/zero3.yaml` ({before['world']} processes, gloo, CPU, "
             f"fp32), Llama hidden {a.hidden} x {a.layers} layers ({paths['params'] / 1e6:.1f}M parameters per role), {a.batch_size} prompts per "
             f"process, {a.max_new_tokens} new tokens; median of steps 2..{a.steps}.", "",
             "| rollout | generate s/step | generate tok/s (both processes) | score s | train s | s/update | peak RSS rank 0 (MB) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in (("sharded: all-gather every layer at every decoding step (--no-zero3-gather)", before),
                    ("gathered once per rollout (--zero3-gather, default)", after)):
        lines.append(f"| {name} | {r['generate_s']:.3f} | {r['tok_s']:.0f} | {r['score_s']:.3f} | {r['train_s']:.3f} | {r['step_s']:.3f} "
                     f"| {r['peak_rss_mb']:.0f} |")
    lines += ["", f"Generate speed-up: **{after['tok_s'] / before['tok_s']:.2f}x**. Memory cost: one unsharded copy of the actor per process "
              f"while sampling, {copy_mb:.1f} MB here (parameters x 4 bytes fp32; x 2 in bf16), on top of its 1/{before['world']} shard; "
              f"measured peak RSS difference {after['peak_rss_mb'] - before['peak_rss_mb']:+.0f} MB (rank 0's high-water mark over the whole run, "
              "which the copy does not set at this size: the difference is noise). `safealign plan` adds the copy to the rollout phase of its "
              "ZeRO-3 rows.", "",
              "s/update is the median of whole-step times, not the sum of the phase medians: with few measured steps on a shared 2-core "
              "machine they need not add up. The gather changes generate only; score and train run the same code in both rows (and the "
              "same samples: tests/test_distributed.py checks that a gathered and a sharded run give the same metrics and weights)."]
    publish(lines, a.out)


if __name__ == "__main__":
    main()
