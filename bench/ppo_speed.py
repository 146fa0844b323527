"""ppo-lag speed and memory benchmark.

Measures, on one machine, for a Llama of a chosen size (random weights; speed and memory do not
depend on what the weights say):

1. seconds per PPO update split into generate / score / train (metrics.jsonl of a real
   `safealign ppo-lag` run, first step dropped as warm-up), against the raw ``generate()``
   throughput of the same actor with the same batch and length;
2. peak memory of full fine-tuning (six models: actor, reference, reward, cost, two critics)
   against --lora-r (one base with actor + critic adapters, reference = adapters off, plus the
   reward and cost models), each in a fresh process. On CPU the figure is the peak RSS minus the
   RSS of a process that has imported the same libraries and loaded nothing; on a GPU it is
   ``torch.cuda.max_memory_allocated``.

    .venv/bin/python bench/ppo_speed.py                 # speed: h512 x 8 (20M), memory: h768 x 12 (65M)
    .venv/bin/python bench/ppo_speed.py --hidden 256 --layers 4 --mem-hidden 0   # quick, speed only

Timings on a shared machine are noisy: each phase is reported as the median over the steps after
the first, and the raw generate() figure is taken right before the PPO run it is compared with.

The numbers are printed as a markdown table (and written to --out when given).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import publish

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "SAFEALIGN_NO_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false"}

BASELINE = """
import resource, torch, transformers, peft, accelerate, safealign.stages.ppo_lag
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def build(root: Path, hidden: int, layers: int, heads: int, vocab: int) -> dict:
    """A synthetic world, a tokenizer trained on it, and policy / reward / cost models of one size."""
    root.mkdir(parents=True, exist_ok=True)
    from safealign.data.synth import WorldConfig, write_world
    from safealign.models.loading import load_causal_lm, load_score_model, load_tokenizer

    world = root / "world"
    write_world(WorldConfig(seed=0, n_train_prompts=400, n_safety_prompts=20, n_eval_prompts=20, n_pairs=200, n_sft=400), world)
    texts = []
    for line in (world / "sft.jsonl").read_text().splitlines():
        row = json.loads(line)
        texts += [f"BEGINNING OF CONVERSATION: USER: {row['prompt']} ASSISTANT:", " " + row["response"]]
    tok = load_tokenizer("tiny", train_texts=texts, vocab_size=vocab)
    tiny = {"hidden": hidden, "layers": layers, "heads": heads, "max_positions": 512}
    paths = {"policy": root / "policy", "rm": root / "rm", "cm": root / "cm", "data": world / "prompts_train.jsonl"}
    policy = load_causal_lm("tiny", tok, seed=0, tiny=tiny)
    policy.save_pretrained(paths["policy"])
    tok.save_pretrained(paths["policy"])
    for i, key in enumerate(("rm", "cm")):
        load_score_model("tiny", tok, seed=i + 1, tiny=tiny, head="new").save_pretrained(paths[key])
        tok.save_pretrained(paths[key])
    paths["params"] = sum(p.numel() for p in policy.parameters())
    return paths


def raw_generate(policy: Path, data: Path, batch: int, new_tokens: int, temperature: float, repeats: int = 3) -> dict:
    """Best-of-N seconds of one ``sample()`` call (HF generate with KV cache) on `batch` prompts."""
    import torch

    from safealign.models.generation import encode_prompts, load_policy, sample

    device = "cuda" if torch.cuda.is_available() else None
    model, tok = load_policy(str(policy), dtype="fp32", device=device)
    prompts = [json.loads(line)["prompt"] for line in data.read_text().splitlines()[:batch]]
    ids = encode_prompts(tok, prompts, "default")
    best, tokens = float("inf"), 0
    for r in range(repeats + 1):
        torch.manual_seed(r)
        t0 = time.perf_counter()
        out = sample(model, tok, ids, max_new_tokens=new_tokens, temperature=temperature)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if r:  # the first call is warm-up
            best = min(best, dt)
            tokens = int(out.response_mask.sum())
    return {"seconds": best, "tokens": tokens, "tokens_per_s": tokens / best}


def ppo_run(paths: dict, out: Path, args, lora: bool, batch: int, new_tokens: int) -> dict:
    cmd = [sys.executable, "-m", "safealign", "ppo-lag", "--model", paths["policy"], "--reward-model", paths["rm"], "--cost-model", paths["cm"],
           "--data", paths["data"], "--output-dir", out, "--max-steps", args.steps, "--batch-size", batch, "--max-new-tokens", new_tokens,
           "--ppo-epochs", args.ppo_epochs, "--minibatches", args.minibatches, "--save-steps", 0, "--eval-split", 0,
           "--temperature", args.temperature]
    if lora:
        cmd += ["--lora-r", args.lora_r]
    res = subprocess.run([str(c) for c in cmd], env=ENV, cwd=REPO, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"ppo-lag failed ({'lora' if lora else 'full'}):\n{res.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/step" in r][1:] or [r for r in rows if "time/step" in r]
    med = lambda k: statistics.median(r[k] for r in rows)  # noqa: E731
    return {"generate": med("time/generate"), "score": med("time/score"), "train": med("time/train"), "step": med("time/step"),
            "tokens": statistics.median(r["response_length"] for r in rows) * batch, "peak_mb": report["throughput"]["peak_memory_mb"]}


def table(title: str, paths: dict, root: Path, args, batch: int, new_tokens: int, base_mb: float) -> list[str]:
    lines = [f"## {title}", "",
             f"Llama, {paths['params'] / 1e6:.1f}M parameters per role; batch {batch} prompts, {new_tokens} new tokens, T={args.temperature}, "
             f"{args.ppo_epochs} PPO epoch(s) x {args.minibatches} minibatch(es); median of steps 2..{args.steps}.", "",
             "| mode | s/update | generate | score | train | PPO generate tok/s | raw generate() tok/s | peak memory MB (above baseline) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, lora in (("full fine-tuning (6 models)", False), (f"LoRA r={args.lora_r} (1 base + RM + CM)", True)):
        gen = raw_generate(paths["policy"], paths["data"], batch, new_tokens, args.temperature)
        r = ppo_run(paths, root / f"{title[:5]}-{int(lora)}", args, lora, batch, new_tokens)
        above = f" ({r['peak_mb'] - base_mb:.0f})" if base_mb else ""
        lines.append(f"| {name} | {r['step']:.3f} | {r['generate']:.3f} | {r['score']:.3f} | {r['train']:.3f} | "
                     f"{r['tokens'] / r['generate']:.0f} | {gen['tokens_per_s']:.0f} | {r['peak_mb']:.0f}{above} |")
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512, help="speed table: hidden size")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--mem-hidden", type=int, default=768, help="memory table: hidden size (0 skips the table)")
    ap.add_argument("--mem-layers", type=int, default=12)
    ap.add_argument("--mem-batch-size", type=int, default=4)
    ap.add_argument("--mem-new-tokens", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--ppo-epochs", type=int, default=1)
    ap.add_argument("--minibatches", type=int, default=1)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = ap.parse_args()
    os.environ.update({k: v for k, v in ENV.items() if k not in os.environ})
    import torch

    cuda = torch.cuda.is_available()
    base_mb = 0.0 if cuda else float(subprocess.run([sys.executable, "-c", BASELINE], env=ENV, cwd=REPO, capture_output=True,
                                                    text=True).stdout.split()[-1])
    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads, {os.cpu_count()} cores"
    lines = [f"# ppo-lag speed and memory ({device})", ""]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = build(root / "speed", args.hidden, args.layers, args.heads, args.vocab)
        lines += table("Seconds per update", paths, root, args, args.batch_size, args.max_new_tokens, base_mb)
        if args.mem_hidden:
            paths = build(root / "memory", args.mem_hidden, args.mem_layers, max(1, args.mem_hidden // 64), args.vocab)
            lines += table("Peak memory, full fine-tuning vs LoRA", paths, root, args, args.mem_batch_size, args.mem_new_tokens, base_mb)
    if base_mb:
        lines += [f"Peak memory on CPU is the process's peak RSS at the end of training; baseline = a process with the libraries "
                  f"imported and no model: {base_mb:.0f} MB.", ""]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
