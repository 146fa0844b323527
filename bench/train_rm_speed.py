"""Pairs/second and peak memory of `safealign train-rm` against trl's RewardTrainer on the same
tiny model and data (each configuration in its own process so peak RSS is its own).

    .venv/bin/python bench/train_rm_speed.py [--pairs 512] [--steps 32] [--out bench/results/train_rm_speed.md]

Both train the same tiny Llama seq-cls model (hidden 64, 2 layers) from the same tokenizer on the
same synthetic-world preference pairs, batch 16 pairs, for the same number of optimizer steps.
Timing covers the training loop only (no model load / tokenisation), first steps included for both.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_data(tmp: Path, n: int) -> tuple[Path, list[dict]]:
    from safealign.data.synth import WorldConfig, write_world

    write_world(WorldConfig(seed=0, n_pairs=n, n_sft=10, n_train_prompts=600, n_eval_prompts=10, n_safety_prompts=10), tmp / "world")
    rows = [json.loads(l) for l in (tmp / "world" / "preferences.jsonl").read_text().splitlines()]
    pairs = [{"prompt": f"BEGINNING OF CONVERSATION: USER: {r['prompt']} ASSISTANT:",
              "chosen": " " + r[f"response_{r['better_response_id']}"], "rejected": " " + r[f"response_{1 - r['better_response_id']}"]} for r in rows]
    return tmp / "world" / "preferences.jsonl", pairs


def worker(kind: str, data: str, steps: int, tok_dir: str) -> dict:
    import resource

    import torch

    torch.set_num_threads(2)
    from safealign.models.loading import load_score_model, load_tokenizer

    tok = load_tokenizer(tok_dir)
    if kind.startswith("safealign"):
        from safealign.config import RewardConfig, build_config
        from safealign.stages.preference import run_reward

        out = tempfile.mkdtemp() + "/rm"
        cfg = build_config(RewardConfig, None, {"model": tok_dir, "data": data, "output_dir": out, "max_steps": steps, "batch_size": 16,
                                                "eval_split": 0.0, "lr": 1e-3, "log_steps": steps, "save_steps": 0,
                                                "dtype": "bf16" if "bf16" in kind else "fp32"})
        os.environ["SAFEALIGN_NO_PROGRESS"] = "1"
        summary = run_reward(cfg)
        pps = summary["throughput"]["pairs_per_second"]
    else:
        from datasets import Dataset
        from trl import RewardConfig as TRLConfig, RewardTrainer

        pairs = json.loads(Path(data + ".pairs.json").read_text())
        model = load_score_model(tok_dir, tok, dtype="fp32", head="new")
        extra = {} if kind == "trl-defaults" else {"bf16": False, "gradient_checkpointing": False}
        args = TRLConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=16, max_steps=steps, max_length=512, use_cpu=True,
                         report_to="none", save_strategy="no", learning_rate=1e-3, logging_steps=steps, disable_tqdm=True, **extra)
        trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tok)
        t0 = time.perf_counter()
        trainer.train()
        pps = steps * 16 / (time.perf_counter() - t0)
    return {"kind": kind, "pairs_per_second": pps, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--out", default="bench/results/train_rm_speed.md")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker[0], a.worker[1], a.steps, a.worker[2])))
        return
    tmp = Path(tempfile.mkdtemp())
    data, pairs = make_data(tmp, a.pairs)
    Path(str(data) + ".pairs.json").write_text(json.dumps(pairs))
    from safealign.data.encode import tokenizer_corpus
    from safealign.data.records import Pair
    from safealign.models.loading import load_causal_lm, load_tokenizer

    tok = load_tokenizer("tiny", train_texts=tokenizer_corpus([Pair([p["prompt"]], p["chosen"], p["rejected"]) for p in pairs], "raw"))
    load_causal_lm("tiny", tok).save_pretrained(tmp / "base")
    tok.save_pretrained(tmp / "base")
    rows = []
    for kind in ("safealign fp32", "safealign bf16", "trl-defaults", "trl fp32 no-ckpt"):
        res = subprocess.run([sys.executable, __file__, "--steps", str(a.steps), "--worker", kind, str(data), str(tmp / "base")],
                             capture_output=True, text=True)
        if res.returncode:
            print(res.stderr[-3000:])
            raise SystemExit(f"{kind} failed")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(rows[-1])
    lines = ["# train-rm throughput: safealign vs trl RewardTrainer", "",
             f"Tiny Llama seq-cls (hidden 64, 2 layers), {a.pairs} synthetic-world pairs, batch 16 pairs, {a.steps} optimizer steps, "
             "2 CPU threads, training loop only. Command: `.venv/bin/python bench/train_rm_speed.py`.", "",
             "| configuration | pairs/s | peak RSS (MB) |", "| --- | --- | --- |"]
    lines += [f"| {r['kind']} | {r['pairs_per_second']:.0f} | {r['peak_rss_mb']:.0f} |" for r in rows]
    lines += ["", "trl-defaults = `RewardConfig` defaults (bf16=True, gradient_checkpointing=True) with use_cpu=True."]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
