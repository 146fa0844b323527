"""Shared fixtures: real data from ../shared/data (skipped when absent), a small synthetic
world, and tiny saved models (policy, reward model, cost model) built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("SAFEALIGN_NO_PROGRESS", "1")

REPO = Path(__file__).resolve().parents[1]

try:  # tiny models on 2 shared cores run several times faster single-threaded (no oversubscription)
    import torch

    torch.set_num_threads(1)
except ImportError:
    pass
SHARED = Path(os.environ.get("SAFEALIGN_SHARED_DATA", REPO.parent / "shared" / "data"))


def reset_accelerate() -> None:
    """Let several in-process runs each build their own Accelerator."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def run_cli(*args: str) -> int:
    """Run the CLI in this process (fast: imports are shared) and return its exit code."""
    from safealign.cli import main

    try:
        return main([str(a) for a in args])
    finally:
        reset_accelerate()


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared data not found at {SHARED} (CI has it beside the clone; set SAFEALIGN_SHARED_DATA)")
    return SHARED


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    """A small synthetic world (seeded): preferences, SFT corpus, disjoint prompt sets."""
    from safealign.data.synth import WorldConfig, write_world

    out = tmp_path_factory.mktemp("world")
    # drift_share 0 (generator v2's preference data): the tiny tokenizer trained on these texts keeps the
    # words the marker world of test_ppo_lag.py is built from as single tokens
    write_world(WorldConfig(seed=1, n_train_prompts=300, n_safety_prompts=60, n_eval_prompts=40, n_pairs=400, n_sft=400, drift_share=0.0), out)
    return out


@pytest.fixture(scope="session")
def tiny_policy(world, tmp_path_factory) -> Path:
    """A tiny causal LM (untrained) with a tokenizer trained on the world's texts, saved to disk."""
    import json

    from safealign.models.loading import load_causal_lm, load_tokenizer

    texts = []
    for line in (world / "sft.jsonl").read_text().splitlines() + (world / "preferences.jsonl").read_text().splitlines():
        row = json.loads(line)
        texts += [f"BEGINNING OF CONVERSATION: USER: {row['prompt']} ASSISTANT:"] + [" " + row[k] for k in ("response", "response_0", "response_1") if k in row]
    tok = load_tokenizer("tiny", train_texts=texts, vocab_size=512)
    model = load_causal_lm("tiny", tok, seed=0, tiny={"max_positions": 256})
    out = tmp_path_factory.mktemp("policy")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_rm(world, tiny_policy, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rm") / "rm"
    assert run_cli("train-rm", "--model", tiny_policy, "--data", world / "preferences.jsonl", "--output-dir", out,
                   "--max-steps", "30", "--batch-size", "16", "--eval-split", "0.1", "--lr", "2e-3") == 0
    return out


@pytest.fixture(scope="session")
def tiny_cm(world, tiny_policy, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cm") / "cm"
    assert run_cli("train-cost", "--model", tiny_policy, "--data", world / "preferences.jsonl", "--output-dir", out,
                   "--max-steps", "30", "--batch-size", "16", "--eval-split", "0.1", "--lr", "2e-3") == 0
    return out
