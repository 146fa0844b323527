"""The floor of a full-fine-tuning PPO update on CPU: seconds of one forward, and of one forward +
backward, of each trained role over one rollout (batch 16, prompt + 32 response tokens) on the 20M
config of bench/ppo_vs_peers.py. An update trains every trained role once per minibatch, so with two
critic models (ppo-lag) the train phase cannot be shorter than actor + 2 critics, whatever the code
around them does.

    flock /tmp/safealign-cpu.lock .venv/bin/python bench/ppo_floor.py [--out bench/results/ppo_floor.md]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

from common import publish

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from safealign.models.score import TokenScorer
    from safealign.rl.roles import causal_logits

    c = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=8, num_labels=1, pad_token_id=0, tie_word_embeddings=False)
    actor, critic = LlamaForCausalLM(c), TokenScorer(LlamaForSequenceClassification(c))
    L = a.prompt + a.new_tokens
    ids = torch.randint(1, 1024, (a.batch, L))
    mask = torch.ones_like(ids)
    roles = {"actor (log-probs of the response)": lambda: causal_logits(actor, ids, mask, keep=a.new_tokens + 1).float().logsumexp(-1).sum(),
             "critic (a value per token)": lambda: critic(ids, mask)[0].sum()}
    rows = []
    for name, f in roles.items():
        for _ in range(2):
            f().backward()
        fwd, both = [], []
        for _ in range(a.reps):
            t = time.perf_counter()
            with torch.no_grad():
                f()
            fwd.append(time.perf_counter() - t)
            t = time.perf_counter()
            f().backward()
            both.append(time.perf_counter() - t)
        rows.append((name, statistics.median(fwd), statistics.median(both)))
    n = sum(p.numel() for p in actor.parameters())
    actor_fb, critic_fb = rows[0][2], rows[1][2]
    lines = ["# The floor of a PPO update on CPU (20M config)", "",
             "Command: `flock /tmp/safealign-cpu.lock .venv/bin/python bench/ppo_floor.py --out bench/results/ppo_floor.md`", "",
             f"{platform.machine()}, 2 torch threads, torch {torch.__version__}; random-init Llama hidden 512 x 8 layers "
             f"({n / 1e6:.1f}M parameters per role), fp32, batch {a.batch} x {L} tokens ({a.prompt} prompt + {a.new_tokens} response), "
             f"median of {a.reps}; no optimizer step.", "",
             "| role | forward s (no grad) | forward + backward s |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {f:.3f} | {b:.3f} |" for name, f, b in rows]
    lines += ["", f"Train-phase floor per update (one epoch, one minibatch): actor + one critic {actor_fb + critic_fb:.2f} s (ppo, trl's PPO); "
              f"actor + two critic models {actor_fb + 2 * critic_fb:.2f} s (ppo-lag); actor + one shared critic backbone "
              f"{actor_fb + critic_fb:.2f} s (ppo-lag --shared-critic)."]
    publish(lines, a.out)


if __name__ == "__main__":
    main()
