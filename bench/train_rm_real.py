"""train-rm on real data: safealign against trl's RewardTrainer (its defaults, and tuned) on the
hh-rlhf harmless-base pairs of ../shared/data (the first 1,800 pairs train, the other 512 evaluate).

    flock /tmp/safealign-cpu.lock .venv/bin/python bench/train_rm_real.py [--epochs 2] [--repeats 3] [--out bench/results/train_rm_real.md]

Every configuration trains the same tiny Llama seq-cls model (hidden 64, 2 layers, saved once and
loaded by each) with the same locally trained tokenizer, on the same texts (safealign's data layer
formats each dialogue once: prompt = every turn before the last assistant turn, chosen/rejected =
that turn), batch 16 pairs, lr 1e-3, the same number of epochs, max_length 512 for everyone, 2 CPU
threads, each configuration in its own process. pairs/s = pairs trained / seconds of the training
loop (model load, tokenisation and evaluation excluded for everyone). Held-out accuracy: fraction of
the 512 eval pairs whose chosen (less harmful) response scores higher, on all 512 for everyone
(trl's max_length filter drops over-long pairs from its own eval set; we score every eval pair with
the trained trl model ourselves, truncated as safealign truncates, so the accuracies are comparable).

- safealign: `safealign train-rm` as it runs by default: length-grouped batches (--group-by-length)
  and the shared start of chosen and rejected (the dialogue) run once per pair (TokenScorer's prefix
  forward); over-long pairs are truncated (prompt from the left first), never dropped.
- safealign no-grouping: the same with --no-group-by-length (what grouping buys).
- safealign bf16 (only with --kinds): the same with --dtype bf16 (autocast, as trl's defaults).
- trl defaults: `RewardConfig` defaults (bf16=True, gradient_checkpointing=True), use_cpu=True.
- trl tuned: bf16=False, gradient_checkpointing=False (feasibility.md §2a: 2-3x faster on CPU).
  trl drops every pair with a side over max_length (RewardTrainer's filter): counted.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import publish

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("SAFEALIGN_NO_PROGRESS", "1")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
N_TRAIN = 1800
BATCH, LR, MAX_LEN = 16, 1e-3, 512
KINDS = ("safealign", "safealign no-grouping", "trl defaults", "trl tuned")
OPTIONAL = ("safealign bf16",)   # --kinds only: safealign --dtype bf16 (autocast), the precision of trl's defaults


def prepare(tmp: Path) -> dict:
    """Split the file, format the texts once, train the tokenizer, save the base model."""
    from safealign.data.encode import encode_pairs, tokenizer_corpus
    from safealign.data.records import rows_to_pairs
    from safealign.data.templates import effective_template, format_prompt, format_response
    from safealign.models.loading import load_causal_lm, load_tokenizer

    rows = [json.loads(line) for line in gzip.decompress(DATA.read_bytes()).decode().splitlines() if line.strip()]
    train_rows, eval_rows = rows[:N_TRAIN], rows[N_TRAIN:]
    for name, part in (("train", train_rows), ("eval", eval_rows)):
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    train_pairs, _ = rows_to_pairs(train_rows, task="helpful", fmt="hh", source="train", invalid_rows="skip")
    eval_pairs, _ = rows_to_pairs(eval_rows, task="helpful", fmt="hh", source="eval", invalid_rows="skip")
    tok = load_tokenizer("tiny", train_texts=tokenizer_corpus(train_pairs, "default"))
    load_causal_lm("tiny", tok, tiny={"max_positions": 1024}).save_pretrained(tmp / "base")
    tok.save_pretrained(tmp / "base")
    template = effective_template("default", tok)

    def texts(pairs):
        return [{"prompt": format_prompt(p.prompt, template, tok), "chosen": format_response(p.chosen, template),
                 "rejected": format_response(p.rejected, template)} for p in pairs]

    (tmp / "train_texts.json").write_text(json.dumps(texts(train_pairs)))
    lengths = [max(len(e.chosen), len(e.rejected)) for e in encode_pairs(tok, train_pairs, "default", 10**6)[0]]
    return {"train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs), "lengths": lengths}


def eval_accuracy(scorer_fn, tmp: Path) -> float:
    """Held-out accuracy of a trained score model on all eval pairs (safealign's encoding, max_length 512)."""
    import torch

    from safealign.data.encode import encode_pairs
    from safealign.data.records import rows_to_pairs
    from safealign.models.generation import pad
    from safealign.models.loading import load_tokenizer

    tok = load_tokenizer(str(tmp / "base"))
    rows = [json.loads(line) for line in (tmp / "eval.jsonl").read_text().splitlines()]
    ex, _ = encode_pairs(tok, rows_to_pairs(rows, task="helpful", fmt="hh", source="eval", invalid_rows="skip")[0], "default", MAX_LEN)
    right = 0
    with torch.no_grad():
        for i in range(0, len(ex), 32):
            part = ex[i:i + 32]
            ids, mask = pad([e.chosen for e in part] + [e.rejected for e in part], tok.pad_token_id)
            end = scorer_fn(ids, mask)
            right += int((end[:len(part)] > end[len(part):]).sum())
    return right / len(ex)


def worker(kind: str, tmp: Path, epochs: float) -> dict:
    import resource

    import torch

    torch.set_num_threads(2)
    base = str(tmp / "base")
    if kind.startswith("safealign"):
        from safealign.config import RewardConfig, build_config
        from safealign.stages.preference import run_reward

        out = Path(tempfile.mkdtemp(dir=tmp, prefix=kind.replace(" ", "-") + "-")) / "run"   # a new directory every round
        cfg = build_config(RewardConfig, None, {"model": base, "data": str(tmp / "train.jsonl"), "eval_data": str(tmp / "eval.jsonl"),
                                                "output_dir": str(out), "epochs": epochs, "batch_size": BATCH, "lr": LR, "max_length": MAX_LEN,
                                                "log_steps": 1000, "save_steps": 0, "dtype": "bf16" if kind == "safealign bf16" else "fp32",
                                                "invalid_rows": "skip", "group_by_length": kind != "safealign no-grouping"})
        s = run_reward(cfg)
        return {"kind": kind, "pairs_per_second": s["throughput"]["pairs_per_second"], "seconds": s["throughput"]["seconds"],
                "accuracy": s["eval"]["eval/accuracy"], "trained_pairs": s["data"]["train_pairs"], "dropped": 0,
                "truncated": s["data"]["truncated_pairs"], "steps": s["steps"],
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    from datasets import Dataset
    from trl import RewardConfig as TRLConfig, RewardTrainer

    from safealign.models.loading import load_score_model, load_tokenizer

    tok = load_tokenizer(base)
    pairs = json.loads((tmp / "train_texts.json").read_text())
    model = load_score_model(base, tok, dtype="fp32", head="new")
    extra = {} if kind == "trl defaults" else {"bf16": False, "gradient_checkpointing": False}
    args = TRLConfig(output_dir=tempfile.mkdtemp(dir=tmp, prefix=kind.replace(" ", "-") + "-"), per_device_train_batch_size=BATCH, num_train_epochs=epochs, max_length=MAX_LEN,
                     use_cpu=True, report_to="none", save_strategy="no", learning_rate=LR, logging_steps=1000, disable_tqdm=True, seed=42, **extra)
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tok)
    kept = len(trainer.train_dataset)
    t0 = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - t0
    model = trainer.model.eval()

    def score(ids, mask):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(args.bf16)):
            return model(input_ids=ids, attention_mask=mask).logits[:, 0].float()

    return {"kind": kind, "pairs_per_second": kept * epochs / seconds, "seconds": seconds, "accuracy": eval_accuracy(score, tmp),
            "trained_pairs": kept, "dropped": len(pairs) - kept, "truncated": 0, "steps": out.global_step,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "train_rm_real.md")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of: {', '.join(KINDS + OPTIONAL)}")
    ap.add_argument("--repeats", type=int, default=1, help="rounds of every configuration (interleaved); each keeps its fastest run")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print("RESULT " + json.dumps(worker(a.worker[0], Path(a.worker[1]), a.epochs)))
        return
    unknown = [k for k in a.kinds.split(",") if k not in KINDS + OPTIONAL]
    if unknown:
        raise SystemExit(f"unknown --kinds {unknown}: choose from {', '.join(KINDS + OPTIONAL)}")
    if not DATA.is_file():
        raise SystemExit(f"{DATA} is missing (the real hh-rlhf sample of ../shared/data): nothing to measure")
    tmp = Path(tempfile.mkdtemp(prefix="rm-real-"))
    info = prepare(tmp)
    runs: dict[str, list[dict]] = {}
    for _ in range(a.repeats):   # rounds, so that a slow spell of the machine costs every configuration alike
        for kind in a.kinds.split(","):
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            res = subprocess.run([sys.executable, __file__, "--epochs", str(a.epochs), "--worker", kind, str(tmp)], capture_output=True, text=True, env=env)
            line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
            if res.returncode or not line:
                print(res.stdout[-2000:], res.stderr[-4000:])
                raise SystemExit(f"{kind} failed")
            runs.setdefault(kind, []).append(json.loads(line[-1][len("RESULT "):]))
            print(runs[kind][-1], flush=True)
    rows = []
    for kind, rs in runs.items():
        best = max(rs, key=lambda r: r["pairs_per_second"])
        rows.append({**best, "each": [r["pairs_per_second"] for r in rs]})
    L = sorted(info["lengths"])
    for r in rows:   # the stage's report counts train and eval pairs together: the table counts the train pairs
        if r["kind"].startswith("safealign"):
            r["truncated"] = sum(x > MAX_LEN for x in L)
    by = {r["kind"]: r for r in rows}
    q = lambda f: L[min(len(L) - 1, int(f * len(L)))]
    lines = ["# train-rm on real data: safealign vs trl RewardTrainer (hh-rlhf harmless-base)", "",
             f"Command: `flock /tmp/safealign-cpu.lock .venv/bin/python bench/train_rm_real.py {' '.join(sys.argv[1:])}`", "",
             f"Data: `../shared/data/hh-rlhf/harmless-base/test.jsonl.gz`, first {N_TRAIN} pairs train ({info['train_pairs']} after parsing), "
             f"the other {info['eval_pairs']} evaluate. Tiny Llama seq-cls (hidden 64, 2 layers) from one saved base, tokenizer trained on the train "
             f"texts; tokens per pair (longer side, + EOS): median {q(0.5)}, p90 {q(0.9)}, max {L[-1]}; {sum(x > MAX_LEN for x in L)} train pairs "
             f"over max_length {MAX_LEN}. Batch {BATCH} pairs, lr {LR:g}, {a.epochs:g} epochs, 2 CPU threads, each configuration in its own process; "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs. Timing: the training loop only; "
             f"{a.repeats} round(s) of every configuration, interleaved, each row its fastest run (every run's pairs/s in the last column).", "",
             "| configuration | pairs/s | training s | steps | train pairs used | dropped | truncated | held-out accuracy | peak RSS (MB) | pairs/s of each run |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['kind']} | {r['pairs_per_second']:.0f} | {r['seconds']:.1f} | {r['steps']} | {r['trained_pairs']} | {r['dropped']} | {r['truncated']} | "
              f"{r['accuracy']:.3f} | {r['peak_rss_mb']:.0f} | {', '.join(f'{x:.0f}' for x in r['each'])} |" for r in rows]
    if "safealign" in by:
        s = by["safealign"]
        lines += ["", "Ratios (safealign pairs/s over the other's, same run): " + ", ".join(
            f"{k} {s['pairs_per_second'] / r['pairs_per_second']:.2f}x" for k, r in by.items() if k != "safealign") + "."]
        if a.repeats > 1:
            med = lambda r: sorted(r["each"])[len(r["each"]) // 2]  # noqa: E731
            lines += ["", "The same from every configuration's median run: " + ", ".join(
                f"{k} {med(s) / med(r):.2f}x" for k, r in by.items() if k != "safealign") + "."]
    n_eval = info["eval_pairs"]
    lines += ["", f"Held-out accuracy on {n_eval} pairs has a 95% binomial half-width of about "
              f"{1.96 * (0.25 / n_eval) ** 0.5:.3f}: accuracy differences of that size between the rows above are noise, not a ranking."]
    lines += ["", "Accuracy is on all eval pairs for every row (trl models scored by this script with safealign's encoding, max_length "
              f"{MAX_LEN}, over-long pairs truncated). trl's `max_length` filter drops a pair from training when either side is longer; "
              "safealign truncates it (the report's truncated_pairs) and trains on it."]
    publish(lines, a.out)


if __name__ == "__main__":
    main()
