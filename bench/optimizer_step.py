"""Seconds per AdamW step on CPU: torch's default (a Python loop over the tensors), foreach, and fused,
over the trainable parameters of a 20M PPO-Lagrangian learner (the actor and two critics of
bench/ppo_speed.py's 20M Llama config), with random gradients.

    .venv/bin/python bench/optimizer_step.py [--out bench/results/optimizer_step.md]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

from common import publish

import torch


def learner_params(hidden: int, layers: int, vocab: int, inter: int) -> list[torch.nn.Parameter]:
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    c = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                    intermediate_size=inter, num_labels=1, pad_token_id=0)
    models = [LlamaForCausalLM(c), LlamaForSequenceClassification(c), LlamaForSequenceClassification(c)]
    return [p for m in models for p in m.parameters()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    params = learner_params(512, 8, 1024, 1024)   # bench/ppo_vs_peers.py's 20m: vocab 1024, intermediate 2 x hidden
    n = sum(p.numel() for p in params)
    rows = []
    for name, kw in (("default (for-loop)", {}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, **kw)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()                          # state allocated
        times = []
        for _ in range(a.steps):
            t = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t)
        rows.append((name, statistics.median(times)))
        del opt
    base = rows[0][1]
    lines = ["# AdamW step time on CPU", "",
             f"Command: `.venv/bin/python bench/optimizer_step.py --out bench/results/optimizer_step.md`", "",
             f"{platform.machine()}, {a.threads} torch threads, torch {torch.__version__}; the trainable parameters of a 20M "
             f"PPO-Lagrangian learner (actor + reward critic + cost critic, Llama hidden 512 x 8 layers): {n / 1e6:.1f}M fp32 "
             f"parameters, random gradients, median of {a.steps} steps.", "",
             "| implementation | s/step | vs default |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {s:.3f} | {s / base:.2f}x |" for name, s in rows]
    lines += ["", "safealign's `make_optimizer` uses the fused kernel wherever every parameter's device and dtype have one."]
    publish(lines, a.out)


if __name__ == "__main__":
    main()
