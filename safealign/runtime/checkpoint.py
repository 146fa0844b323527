"""Resumable checkpoints: ``checkpoints/step-NNNNNNNN/`` written to a temp dir and renamed.

A checkpoint holds the accelerate state (model, optimizers, schedulers, RNG of every process),
and ``state.json`` with the loop position and anything else the stage needs (e.g. the Lagrange
multiplier). Only directories with a complete ``state.json`` are ever loaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safealign.runtime.io import atomic_write_json

PREFIX = "step-"


def list_checkpoints(out: Path) -> list[Path]:
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(out: Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


def save_checkpoint(acc, out: Path, step: int, state: dict, keep: int = 2) -> Path:
    """Collective: every process calls it. Returns the final checkpoint path."""
    root = Path(out) / "checkpoints"
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}"
    if acc.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp), safe_serialization=True)
    acc.wait_for_everyone()
    if acc.is_main_process:
        atomic_write_json(tmp / "state.json", {"step": step, **state})
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def load_checkpoint(acc, path: Path) -> dict:
    acc.load_state(str(path))
    return json.loads((Path(path) / "state.json").read_text())


def clean_partial(out: Path) -> None:
    """Remove temp checkpoint dirs a killed run left behind (never trusted, never loaded)."""
    root = Path(out) / "checkpoints"
    if root.is_dir():
        for p in root.glob(f".tmp-{PREFIX}*"):
            shutil.rmtree(p, ignore_errors=True)
