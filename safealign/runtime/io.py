"""Atomic file writes, output-directory rules, manifests.

Everything a later step trusts (checkpoints, the final model, reports) is written to a temporary
name and renamed into place, so a killed run never leaves a half-written file that looks complete.
Files get the permissions the user's umask gives a plain ``open()`` (mkstemp and safetensors make
0600 files), and a write that fails because of the disk (full, quota, read-only, permissions) is
bad input naming the path and the cause (:func:`writing`), not a traceback.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from safealign.errors import BadInput


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(path: str | Path) -> None:
    """Give ``path`` (a file, or a directory and everything under it) the permissions ``open()`` and
    ``mkdir()`` would have given it under the user's umask."""
    mask = _umask()
    p = Path(path)
    if p.is_symlink() or not p.exists():
        return
    if not p.is_dir():
        os.chmod(p, 0o666 & ~mask)
        return
    for root, _, files in os.walk(p):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            f = os.path.join(root, name)
            if not os.path.islink(f):
                os.chmod(f, 0o666 & ~mask)


# errno -> what the user reads; every one of these is fixed outside safealign (exit 2, not a bug)
DISK_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system",
               errno.EACCES: "permission denied", errno.EPERM: "operation not permitted", errno.EFBIG: "file too large"}


def disk_fault(exc: BaseException) -> str | None:
    """The user-fixable cause of a failed write, or None for anything else. An OSError carries its
    errno; safetensors' writer raises its own error type with "(os error 28)" in the text, and
    torch.save's zip writer only says "unexpected pos" (it loses the errno) when the disk fills."""
    if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
        return DISK_ERRNOS[exc.errno]
    text = str(exc)
    for code, cause in DISK_ERRNOS.items():
        if f"os error {code})" in text or os.strerror(code) in text:
            return cause
    if "unexpected pos" in text or "PytorchStreamWriter failed writing" in text:
        return "the write failed (no space left on device?)"
    return None


def _free_bytes(path: str | Path) -> int:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return 1 << 62


@contextmanager
def writing(what: str, where: str | Path, cleanup: str | Path | None = None):
    """Run a write; a disk fault becomes BadInput "<path>: <cause> while writing <what>". Whatever
    the error, ``cleanup`` (the write's temporary directory) is removed first."""
    try:
        yield
    except Exception as e:
        cause = disk_fault(e)
        if cause and cause.startswith("the write failed") and _free_bytes(cleanup or where) < 16 * 2**20:
            cause = DISK_ERRNOS[errno.ENOSPC]  # torch.save's lost errno: the disk is (nearly) full right now
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
        if cause is None:
            raise
        full = cause.startswith(("no space", "disk quota", "the write failed"))
        fix = ("free space on that disk (or choose another --output-dir on a disk with room) and run the command again; "
               "a training stage continues from its last checkpoint with --resume") if full else \
            "make that directory writable, or choose another --output-dir"
        raise BadInput(f"{cause} while writing {what}", where=str(where), fix=fix) from None


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files
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


def describe_run_dir(p: Path) -> str | None:
    """What a safealign output directory holds, from its report/manifest (None if it is not one)."""
    for name in ("report.json", "manifest.json"):
        try:
            stage = json.loads((p / name).read_text()).get("stage")
        except (OSError, ValueError, AttributeError):
            continue
        if stage:
            done = "finished" if (p / "report.json").is_file() else "unfinished (no report.json)"
            return f"the output of a {done} `safealign {stage}`"
    return None


def check_output_dir(path: str | Path, resume: bool, *, resumable: bool = True) -> Path:
    """Refuse to overwrite a previous run, or a directory that cannot be written (before anything
    is written). Creates nothing. ``resumable``: the command has --resume; one without it writes its
    directory with :func:`whole_output_dir` (a staging directory a killed run left is not content)."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise BadInput("output path exists and is not a directory", where=str(p), fix="choose a directory for --output-dir")
    if p.is_dir() and any(resumable or not _stale_partial(e) for e in p.iterdir()) and not resume:
        held = describe_run_dir(p)
        what = f"output directory is not empty: it holds {held}" if held else "output directory is not empty"
        fix = ("pass --resume to continue that run, or choose a new --output-dir" if resumable else
               "choose a new (or empty) --output-dir: this command writes a fresh directory every time"
               + (" (each safety test is its own record; its report and release/ describe that test only)" if held and "safety-test" in held else ""))
        raise BadInput(what, where=str(p), fix=fix)
    check_writable(p)
    return p


def check_writable(p: Path) -> None:
    """Refuse an output directory that could not be created or written: the nearest existing
    ancestor must be a writable directory on a writable file system."""
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise BadInput(f"cannot create the output directory: {probe} is a file, not a directory", where=str(p),
                       fix="choose another --output-dir")
    if hasattr(os, "statvfs") and os.statvfs(probe).f_flag & os.ST_RDONLY:
        raise BadInput(f"the output directory is on a read-only file system ({probe})", where=str(p), fix="choose another --output-dir")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise BadInput(f"the output directory is not writable: permission denied on {probe}", where=str(p),
                       fix="choose another --output-dir, or make that directory writable")


def check_safetensors(path: str | Path) -> None:
    """Refuse a truncated or corrupt .safetensors file (the header and the file size must agree)
    before a loader meets it half-way."""
    path = Path(path)
    size = path.stat().st_size
    fix = "the file was cut short (a full disk or an interrupted copy?): save or copy it again"
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or n > size - 8:
            raise BadInput(f"truncated or not a safetensors file ({size} bytes, too short for its header)", where=str(path), fix=fix)
        try:
            header = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, AttributeError):
            raise BadInput("corrupt safetensors header", where=str(path), fix=fix) from None
    if 8 + n + end != size:
        raise BadInput(f"truncated or corrupt: its header describes {8 + n + end} bytes, the file has {size}", where=str(path), fix=fix)


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
    target = Path(final) if final is not None else Path(run_dir)
    with writing("the model" if final is None else f"{target.name}/", target, cleanup=tmp):
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        yield tmp
        apply_umask(tmp)  # safetensors writes 0600 files
        install_dir(tmp, target)


_PARTIAL = re.compile(r"^\.(?:.+\.)?partial-(\d+)$")
LAST_WRITTEN = ("world.json", "report.json")     # what says a directory is complete: installed last


def _stale_partial(entry: Path) -> bool:
    """A staging directory of :func:`whole_output_dir` whose process is gone (killed mid-write); one
    named with this process's pid is a dead run's too (the pid was reused: this run has not made its own yet)."""
    m = _PARTIAL.match(entry.name)
    if not m or not entry.is_dir():
        return False
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return int(m.group(1)) == os.getpid()


@contextmanager
def whole_output_dir(out: str | Path, what: str = "the output directory"):
    """The output directory of a command without --resume (eval, score-eval, data split, data synth,
    safety-test), written whole or not at all. Yields a staging directory to write into: a hidden sibling
    ``.<name>.partial-<pid>``, renamed to ``out`` once every write has succeeded, or, when ``out``
    already exists (the empty directory :func:`check_output_dir` accepted: maybe a mount point, a
    symlink, or a directory whose mode and group were set up for the run), ``out/.partial-<pid>``,
    whose entries move in with the completion markers (``LAST_WRITTEN``) last. On any failure (a
    full disk: BadInput naming ``out``; anything else, Ctrl-C included: re-raised) the staging
    directory is removed, with the parent directories this created, and ``out`` is as it was. A
    staging directory a killed run left behind is removed by the next run (and ignored by
    check_output_dir)."""
    out = Path(os.path.realpath(Path(out).expanduser()))
    inside = out.is_dir()
    tmp = out / f".partial-{os.getpid()}" if inside else out.parent / f".{out.name}.partial-{os.getpid()}"
    made = [] if inside else [d for d in [out.parent, *out.parent.parents] if not d.exists()]   # deepest first
    try:
        with writing(what, out, cleanup=tmp):
            prefix = ".partial-" if inside else f".{out.name}.partial-"
            for stale in [e for e in (tmp.parent.iterdir() if tmp.parent.is_dir() else ()) if e.name.startswith(prefix) and _stale_partial(e)]:
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
            yield tmp
            if not inside:
                os.replace(tmp, out)
            else:
                for entry in sorted(tmp.iterdir(), key=lambda e: LAST_WRITTEN.index(e.name) + 1 if e.name in LAST_WRITTEN else 0):
                    os.replace(entry, out / entry.name)
                tmp.rmdir()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in made:
            try:
                d.rmdir()
            except OSError:
                break
        raise


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
    hashes |= read_prompt_hashes(out)  # a resumed run keeps what its model has already seen: the record only grows
    for src in inherit_from:
        if src:
            hashes |= read_prompt_hashes(src)
    atomic_write_text(Path(out) / PROMPT_HASHES, "".join(h + "\n" for h in sorted(hashes)))
    return len(hashes)
