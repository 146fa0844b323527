"""metrics.jsonl (one JSON object per logged step), plus optional TensorBoard / W&B through accelerate."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _clean(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsLog:
    """Appends ``{"step": s, ...}`` lines on the main process; on resume, drops lines past the checkpoint."""

    def __init__(self, path: Path, accelerator=None):
        self.path = Path(path)
        self.acc = accelerator
        self.main = accelerator is None or accelerator.is_main_process

    def truncate_after(self, step: int) -> None:
        """Keep the rows up to ``step`` (a resumed run rewrites the rest). A row torn by a kill in
        the middle of an append is dropped; the file is replaced atomically."""
        if not self.main or not self.path.exists():
            return
        from safealign.runtime.io import atomic_write_text

        keep = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if row.get("step", 0) <= step:
                keep.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))

    def log(self, step: int, values: dict) -> dict:
        row = {"step": step, **{k: _clean(v) for k, v in values.items()}}
        if self.main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if self.acc is not None and self.acc.trackers:
            self.acc.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}, step=step)
        return row


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
