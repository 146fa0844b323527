"""Atomic file writes, output-directory rules, manifests.

Everything a later step trusts (checkpoints, the final model, reports) is written to a temporary
name and renamed into place, so a killed run never leaves a half-written file that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from safealign.errors import BadInput


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, set):
        return sorted(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def check_output_dir(path: str | Path, resume: bool) -> Path:
    """Refuse to overwrite a previous run (before anything is written). Creates nothing."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise BadInput("output path exists and is not a directory", where=str(p))
    if p.is_dir() and any(p.iterdir()) and not resume:
        raise BadInput("output directory is not empty", where=str(p),
                       fix="pass --resume to continue that run, or choose a new --output-dir")
    return p


def install_dir(tmp: Path, final: Path) -> None:
    """Move every entry of ``tmp`` into ``final`` (replacing same-named entries) and remove ``tmp``."""
    final.mkdir(parents=True, exist_ok=True)
    for entry in tmp.iterdir():
        target = final / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(entry, target)
    tmp.rmdir()


@contextmanager
def staged_model_dir(run_dir: Path, final: Path | None = None, tmp_name: str = ".tmp-model"):
    """Yield a fresh, empty staging directory ``run_dir/tmp_name``; on success move its entries into
    ``final`` (default ``run_dir``, see :func:`install_dir`). A crash leaves only the staging
    directory, which the next save replaces: a reader never sees half a model in ``final``."""
    tmp = Path(run_dir) / tmp_name
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    install_dir(tmp, Path(final) if final is not None else Path(run_dir))


def git_commit() -> str | None:
    src = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("safealign", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "deepspeed"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def manifest(stage: str, *, seed: int, data_fingerprint: str | None = None, extra: dict | None = None) -> dict:
    return {"stage": stage, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv, "seed": seed,
            "git_commit": git_commit(), "versions": package_versions(), "data_fingerprint": data_fingerprint, **(extra or {})}


def write_config(path: Path, cfg_dict: dict) -> None:
    import yaml

    atomic_write_text(path, yaml.safe_dump(cfg_dict, sort_keys=False))


PROMPT_HASHES = "prompt_hashes.txt"


def read_prompt_hashes(model_dir: str | Path) -> set[str]:
    """Hashes of every training prompt behind a model (empty when the model has no record)."""
    p = Path(model_dir) / PROMPT_HASHES
    return set(p.read_text().split()) if p.is_file() else set()


def write_prompt_hashes(out: Path, prompts, inherit_from=()) -> int:
    """Write ``prompt_hashes.txt``: hashes of this stage's training prompts (normalised text, see
    data.records.prompt_hash) plus those recorded by the models it started from, so the safety test
    can check that no held-out prompt was ever trained on. Returns the number of hashes."""
    from safealign.data.records import prompt_hash

    hashes = {prompt_hash(p if isinstance(p, str) else "\n".join(p)) for p in prompts}
    for src in inherit_from:
        if src:
            hashes |= read_prompt_hashes(src)
    atomic_write_text(Path(out) / PROMPT_HASHES, "".join(h + "\n" for h in sorted(hashes)))
    return len(hashes)
