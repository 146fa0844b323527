"""Seconds per RL update next to the peers: safealign `ppo-lag` (reward + cost critics) against trl's
last PPO trainer (`trl.experimental.ppo`, trl 1.12.0: one critic, no cost) and against safealign
`--algorithm ppo` (one critic) and safealign `ppo-lag --shared-critic` (reward and cost value heads on
one critic backbone), on the same models, prompts, batch and response length; optionally
safealign `grpo-lag` against trl 1.16 `GRPOTrainer` with reward_funcs=[reward model, cost model]
and reward_weights [1, -lambda] set by a dual-ascent callback (--grpo).

    flock /tmp/safealign-cpu.lock .venv/bin/python bench/ppo_vs_peers.py [--sizes tiny,20m] [--steps 5] [--grpo] \
        [--dtype bf16] [--out bench/results/ppo_vs_peers.md]

Each configuration runs in its own process (peak RSS is its own): seconds per update split into
generate / score / train (median over the updates after the first), and peak RSS.

- safealign: the `safealign ppo-lag` CLI; the split is its metrics.jsonl (time/generate, time/score,
  time/train).
- trl PPO: `trl.experimental.ppo.PPOTrainer` with policy, reference, reward and value models loaded
  from the same files (the value model from the reward model, as safealign's critics), fp32 (or
  bf16=True with --dtype bf16: mixed precision, as safealign's --dtype bf16), no gradient checkpointing, the same number of PPO epochs and minibatches, stop at EOS. Its train()
  has no timers: the split is taken by wrapping its module-level `batch_generation` (generate) and
  `forward` (the first call with gradients enabled starts the training phase) and an `on_step_end`
  callback.
- The trl 1.12.0 wheel (the last release with PPO; trl 1.16, safealign's dependency, has none) is not
  installed: it is unpacked into `.bench/trl-1.12.0/` (`pip download trl==1.12.0 --no-deps`, then
  unzip) and put first on PYTHONPATH of the trl PPO process only, over the same transformers /
  accelerate as safealign (research/feasibility.md §3). `--trl-ppo DIR` uses another unpacked copy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from common import publish

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "SAFEALIGN_NO_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
SIZES = {"tiny": dict(hidden=64, layers=2, heads=4), "20m": dict(hidden=512, layers=8, heads=8)}
LR = 1e-5


def trl_ppo_dir(given: Path | None) -> Path:
    """An unpacked trl 1.12.0 (made on first use)."""
    d = given or REPO / ".bench" / "trl-1.12.0"
    if (d / "trl" / "experimental" / "ppo" / "ppo_trainer.py").is_file():
        return d
    if given:
        raise SystemExit(f"{d} has no trl/experimental/ppo: unpack the trl 1.12.0 wheel there")
    wheels = d.parent / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "trl==1.12.0", "--no-deps", "-q", "-d", str(wheels)], check=True)
    with zipfile.ZipFile(next(wheels.glob("trl-1.12.0-*.whl"))) as z:
        z.extractall(d)
    return d


def prompts_of(data: Path, n: int) -> list[str]:
    return [json.loads(line)["prompt"] for line in data.read_text().splitlines()[:n]]


# ---------------------------------------------------------------------------------------------
# safealign


def safealign_run(paths: dict, out: Path, algorithm: str, a, *extra) -> dict:
    cmd = [sys.executable, "-m", "safealign", "ppo-lag", "--algorithm", algorithm, "--model", paths["policy"], "--reward-model", paths["rm"],
           "--data", paths["data"], "--output-dir", out, "--max-steps", a.steps, "--batch-size", a.batch_size,
           "--max-new-tokens", a.max_new_tokens, "--ppo-epochs", a.ppo_epochs, "--minibatches", 1, "--save-steps", 0, "--eval-split", 0,
           "--temperature", 1.0, "--lr", LR, "--seed", 0, "--dtype", a.dtype]
    if algorithm in ("ppo-lag", "grpo-lag"):
        cmd += ["--cost-model", paths["cm"]]
    if algorithm.startswith("grpo"):
        cmd += ["--group-size", a.group_size]
    cmd += list(extra)
    res = subprocess.run([str(c) for c in cmd], env=ENV, cwd=REPO, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"safealign {algorithm} failed:\n{res.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/step" in r]
    rows = rows[1:] or rows
    med = lambda k: statistics.median(r[k] for r in rows)  # noqa: E731
    return {"generate": med("time/generate"), "score": med("time/score"), "train": med("time/train"), "step": med("time/step"),
            "peak_rss_mb": report["throughput"]["peak_memory_mb"]}


# ---------------------------------------------------------------------------------------------
# trl (each in its own process: --worker)


class PhaseClock:
    """Per-update phase times of a trl trainer whose train() has no timers of its own."""

    def __init__(self):
        self.rows, self.gen0 = [], None
        self.gen1 = self.train0 = None
        self.last = time.perf_counter()

    def wrap_generation(self, fn):
        def wrapped(*args, **kw):
            self.gen0 = time.perf_counter()
            out = fn(*args, **kw)
            self.gen1, self.train0 = time.perf_counter(), None
            return out
        return wrapped

    def wrap_forward(self, fn):
        import torch

        def wrapped(*args, **kw):
            if self.train0 is None and self.gen1 is not None and torch.is_grad_enabled():
                self.train0 = time.perf_counter()
            return fn(*args, **kw)
        return wrapped

    def step_end(self):
        now = time.perf_counter()
        if self.gen1 is not None and self.train0 is not None:
            self.rows.append({"generate": self.gen1 - self.gen0, "score": self.train0 - self.gen1, "train": now - self.train0, "step": now - self.last})
        self.last, self.gen1 = now, None


def trl_ppo_worker(paths: dict, a) -> dict:
    import resource

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    import trl
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as T

    assert trl.__version__ == "1.12.0", trl.__version__
    torch.set_num_threads(2)
    clock = PhaseClock()
    T.batch_generation = clock.wrap_generation(T.batch_generation)
    T.forward = clock.wrap_forward(T.forward)
    tok = AutoTokenizer.from_pretrained(paths["policy"], padding_side="left")
    prompts = prompts_of(Path(paths["data"]), a.batch_size * a.steps)
    ds = Dataset.from_list([{"input_ids": tok(f"BEGINNING OF CONVERSATION: USER: {p} ASSISTANT:")["input_ids"]} for p in prompts])
    policy = AutoModelForCausalLM.from_pretrained(paths["policy"])
    ref = AutoModelForCausalLM.from_pretrained(paths["policy"])
    reward = AutoModelForSequenceClassification.from_pretrained(paths["rm"], num_labels=1)
    value = AutoModelForSequenceClassification.from_pretrained(paths["rm"], num_labels=1)
    args = PPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=a.batch_size, num_mini_batches=1, num_ppo_epochs=a.ppo_epochs,
                     total_episodes=a.batch_size * a.steps, local_rollout_forward_batch_size=a.batch_size, response_length=a.max_new_tokens,
                     temperature=1.0, stop_token="eos", learning_rate=LR, bf16=a.dtype == "bf16", gradient_checkpointing=False, use_cpu=True,
                     report_to="none", save_strategy="no", num_sample_generations=0, logging_steps=1000, seed=0, disable_tqdm=True)

    class Clock(TrainerCallback):
        def on_step_end(self, *args, **kw):
            clock.step_end()

    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward, value_model=value,
                         train_dataset=ds, eval_dataset=ds.select(range(a.batch_size)), callbacks=[Clock()])
    clock.last = time.perf_counter()
    trainer.train()
    rows = clock.rows[1:] or clock.rows
    res = {k: statistics.median(r[k] for r in rows) for k in ("generate", "score", "train", "step")}
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["updates"] = len(clock.rows)
    return res


def trl_grpo_worker(paths: dict, a) -> dict:
    """trl 1.16 GRPOTrainer, reward_funcs = [reward model, cost model], weights [1, -lambda] from a dual-ascent callback."""
    import resource

    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer import grpo_trainer as G

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(paths["policy"], padding_side="left")
    prompts = prompts_of(Path(paths["data"]), a.batch_size * a.steps)
    ds = Dataset.from_list([{"prompt": f"BEGINNING OF CONVERSATION: USER: {p} ASSISTANT:"} for p in prompts])
    rm = AutoModelForSequenceClassification.from_pretrained(paths["rm"], num_labels=1)
    cm = AutoModelForSequenceClassification.from_pretrained(paths["cm"], num_labels=1)
    args = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=a.batch_size * a.group_size, num_generations=a.group_size,
                      max_completion_length=a.max_new_tokens, temperature=1.0, learning_rate=LR, bf16=a.dtype == "bf16", gradient_checkpointing=False,
                      use_cpu=True, report_to="none", save_strategy="no", logging_steps=1, max_steps=a.steps, seed=0, beta=0.0,
                      reward_weights=[1.0, -1.0], disable_tqdm=True, num_iterations=a.ppo_epochs)
    times: list[float] = []
    clock = {"t": None}

    class Dual(TrainerCallback):
        lam = 1.0

        def on_step_begin(self, *args, **kw):
            clock["t"] = time.perf_counter()

        def on_step_end(self, *args, **kw):
            times.append(time.perf_counter() - clock["t"])

        def on_log(self, args, state, control, logs=None, **kw):
            jc = (logs or {}).get(f"rewards/{Path(paths['cm']).name}/mean")      # trl names a model's reward by its path's last part
            if jc is not None:
                self.lam = max(0.0, self.lam + 0.1 * jc)
                trainer.reward_weights = torch.tensor([1.0, -self.lam])

    trainer = GRPOTrainer(model=paths["policy"], reward_funcs=[rm, cm], reward_processing_classes=[tok, tok], args=args, train_dataset=ds,
                          processing_class=tok, callbacks=[Dual()])
    trainer.train()
    rows = times[1:] or times
    return {"step": statistics.median(rows), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "updates": len(times)}


def run_trl(kind: str, paths: dict, a, trl_dir: Path | None) -> dict:
    env = dict(ENV)
    if kind == "ppo":
        env["PYTHONPATH"] = f"{trl_dir}{os.pathsep}{REPO}"
    cmd = [sys.executable, __file__, "--worker", kind, json.dumps({k: str(v) for k, v in paths.items()}), "--steps", str(a.steps),
           "--batch-size", str(a.batch_size), "--max-new-tokens", str(a.max_new_tokens), "--ppo-epochs", str(a.ppo_epochs),
           "--group-size", str(a.group_size), "--dtype", a.dtype]
    res = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
    if res.returncode or not line:
        raise SystemExit(f"trl {kind} failed:\n{res.stdout[-1500:]}\n{res.stderr[-4000:]}")
    return json.loads(line[-1][len("RESULT "):])


# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="tiny,20m")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--ppo-epochs", type=int, default=1)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                    help="precision of every configuration: safealign --dtype, trl's bf16 flag (mixed precision on both sides)")
    ap.add_argument("--grpo", action="store_true", help="also grpo-lag vs trl GRPOTrainer")
    ap.add_argument("--trl-ppo", type=Path, default=None, help="an unpacked trl 1.12.0 (default: .bench/trl-1.12.0, made on first use)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        fn = {"ppo": trl_ppo_worker, "grpo": trl_grpo_worker}[a.worker[0]]
        print("RESULT " + json.dumps(fn(json.loads(a.worker[1]), a)))
        return
    trl_dir = trl_ppo_dir(a.trl_ppo)
    from ppo_speed import build

    import torch

    lines = ["# RL update time: safealign vs trl", "",
             f"Command: `flock /tmp/safealign-cpu.lock .venv/bin/python bench/ppo_vs_peers.py {' '.join(sys.argv[1:])}`", "",
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads; {a.dtype}; batch {a.batch_size} prompts, "
             f"{a.max_new_tokens} new tokens (T=1), {a.ppo_epochs} PPO epoch(s) x 1 minibatch; {a.steps} updates per run, median of updates 2..{a.steps}; "
             "each configuration a fresh process. Random-init Llamas (speed does not depend on what the weights say): policy, reference, "
             "reward and cost models of one size; the critics start from the reward model (safealign's default; trl's value model likewise).", ""]
    with tempfile.TemporaryDirectory() as tmp:
        for size in a.sizes.split(","):
            paths = build(Path(tmp) / size, vocab=1024, **SIZES[size])
            rows = {}
            rows["safealign ppo-lag (reward + cost critics)"] = safealign_run(paths, Path(tmp) / f"{size}-lag", "ppo-lag", a)
            rows["safealign ppo-lag --shared-critic (reward + cost heads on one critic)"] = safealign_run(
                paths, Path(tmp) / f"{size}-lag-shared", "ppo-lag", a, "--shared-critic")
            rows["safealign --algorithm ppo (one critic)"] = safealign_run(paths, Path(tmp) / f"{size}-ppo", "ppo", a)
            rows["trl 1.12 experimental PPOTrainer (one critic)"] = run_trl("ppo", paths, a, trl_dir)
            if a.grpo:
                rows[f"safealign grpo-lag (G={a.group_size}, no critic)"] = safealign_run(paths, Path(tmp) / f"{size}-grpo", "grpo-lag", a)
                rows[f"safealign grpo-lag --kl-coeff 0 (G={a.group_size}, no reference: trl's beta=0)"] = safealign_run(
                    paths, Path(tmp) / f"{size}-grpo-kl0", "grpo-lag", a, "--kl-coeff", 0)
                rows[f"trl 1.16 GRPOTrainer [rm, cm] x [1, -lambda] (G={a.group_size})"] = run_trl("grpo", paths, a, trl_dir)
            for k, v in rows.items():
                print(size, k, v, flush=True)
            lag, trl_ppo = rows["safealign ppo-lag (reward + cost critics)"], rows["trl 1.12 experimental PPOTrainer (one critic)"]
            lines += [f"## {size}: Llama hidden {SIZES[size]['hidden']} x {SIZES[size]['layers']} layers, {paths['params'] / 1e6:.2f}M parameters per role", "",
                      "| configuration | s/update (generate + score + train) | generate | score | train | wall s/update | peak RSS (MB) | vs trl PPO |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- |"]
            for r in rows.values():
                if "generate" in r:
                    r["phases"] = r["generate"] + r["score"] + r["train"]
            for k, r in rows.items():
                f = lambda key: f"{r[key]:.3f}" if key in r else "-"  # noqa: E731
                ratio = f"{r['phases'] / trl_ppo['phases']:.2f}x" if "phases" in r else "-"
                lines.append(f"| {k} | {f('phases')} | {f('generate')} | {f('score')} | {f('train')} | {f('step')} | {r['peak_rss_mb']:.0f} | {ratio} |")
            if a.grpo:
                g, t = rows[f"safealign grpo-lag (G={a.group_size}, no critic)"], rows[f"trl 1.16 GRPOTrainer [rm, cm] x [1, -lambda] (G={a.group_size})"]
                g0 = rows[f"safealign grpo-lag --kl-coeff 0 (G={a.group_size}, no reference: trl's beta=0)"]
                lines += ["", f"grpo-lag vs trl GRPOTrainer: {g['step'] / t['step']:.2f}x the wall time per update with safealign's KL 0.01 "
                          f"(a reference forward trl does not make), **{g0['step'] / t['step']:.2f}x** with --kl-coeff 0 (the same work as trl's "
                          f"beta=0: no reference) ({a.batch_size} prompts x {a.group_size}; trl's GRPO has no phase split here: wall time from "
                          "on_step_begin to on_step_end)."]
            shared = rows["safealign ppo-lag --shared-critic (reward + cost heads on one critic)"]
            lines += ["", f"safealign ppo-lag / trl PPO time per update (generate + score + train): **{lag['phases'] / trl_ppo['phases']:.2f}x** "
                      f"(target <= 0.5x), with --shared-critic **{shared['phases'] / trl_ppo['phases']:.2f}x**; wall time per update: "
                      f"{lag['step'] / trl_ppo['step']:.2f}x and {shared['step'] / trl_ppo['step']:.2f}x.", ""]
    publish(lines, a.out)


if __name__ == "__main__":
    main()
