"""Resumable checkpoints: ``checkpoints/step-NNNNNNNN/`` written to a temp dir and renamed.

Nothing in a checkpoint is a pickle, so resuming never runs code planted in a run directory:
tensors are safetensors, everything else JSON. One checkpoint holds::

    state.json                       loop position + what the stage adds (lambda, cost windows, data position), written last
    model_<i>.safetensors            weights of each prepared model (not under DeepSpeed)
    optimizer_<i>.{json,safetensors} each optimizer's state_dict: structure (JSON) + its tensors
    objects.{json,safetensors}       the objects registered with ``acc.register_for_checkpointing`` (LR schedules)
    rng_<rank>.{json,safetensors}    python/numpy RNG (JSON) and torch/CUDA RNG (byte tensors) of every process
    pytorch_model[_<i>]/             DeepSpeed only: the engine's own sharded checkpoint (model + optimizer partitions)

DeepSpeed writes its shards with torch.save; they are read back with ``torch.load(weights_only=True)``
and an allowlist of the few DeepSpeed classes they contain (:data:`DEEPSPEED_SAFE_GLOBALS`), and are
scanned for anything else before a resume writes a byte (:func:`verify_checkpoint`). Only
directories with a complete ``state.json`` are ever loaded; a checkpoint holding ``*.pkl`` or
``*.bin`` files (accelerate's pickle format) is refused.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from safealign.errors import BadInput
from safealign.runtime.io import apply_umask, atomic_write_json, check_safetensors, writing

PREFIX = "step-"
DS_TAG = "pytorch_model"        # accelerate's tag for the first DeepSpeed engine
PICKLE_SUFFIXES = (".pkl", ".bin", ".pickle", ".pth")


def list_checkpoints(out: Path) -> list[Path]:
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(out: Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


# --------------------------------------------------------------------------------------------
# state_dicts as JSON structure + safetensors tensors


def to_tree(obj, tensors: dict, key: str = "t"):
    """A JSON-able copy of ``obj`` (a state_dict) whose tensors move into ``tensors`` under
    unique names. Dicts with non-string keys and tuples keep their types (optimizer states are
    keyed by int)."""
    import torch

    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[to_tree(k, tensors, f"{key}.k{i}"), to_tree(v, tensors, f"{key}.{i}")] for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [to_tree(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [to_tree(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} without pickle ({key})")


def from_tree(tree, tensors: dict):
    if isinstance(tree, list):
        return [from_tree(v, tensors) for v in tree]
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__tuple__" in tree:
            return tuple(from_tree(v, tensors) for v in tree["__tuple__"])
        return {from_tree(k, tensors): from_tree(v, tensors) for k, v in tree["__dict__"]}
    return tree


def _save_tree(obj, path: Path) -> None:
    """``path``.json (structure) + ``path``.safetensors (tensors)."""
    from safetensors.torch import save_file

    tensors: dict = {}
    tree = to_tree(obj, tensors)
    save_file(tensors, str(path.with_suffix(".safetensors")))
    atomic_write_json(path.with_suffix(".json"), tree)


def _load_tree(path: Path):
    from safetensors.torch import load_file

    return from_tree(json.loads(path.with_suffix(".json").read_text()), load_file(str(path.with_suffix(".safetensors"))))


# --------------------------------------------------------------------------------------------
# RNG of this process


def _rng_state() -> tuple[dict, dict]:
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"python": [version, list(internal), gauss], "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    return meta, tensors


def _set_rng_state(meta: dict, tensors: dict) -> None:
    import numpy as np
    import torch

    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k.split(".")[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


# --------------------------------------------------------------------------------------------
# DeepSpeed's own shards, loaded without running arbitrary pickled code


def _deepspeed_safe_globals() -> list:
    """The non-tensor classes DeepSpeed 0.19 puts into its ZeRO checkpoints (found with
    ``torch.serialization.get_unsafe_globals_in_checkpoint`` on ZeRO-2/3 checkpoints of every stage)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _safe_torch_load(path, map_location=None):
    import torch

    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # pickle.UnpicklingError: a global outside the allowlist
            raise BadInput(f"refusing to load a checkpoint file that holds more than tensors and plain values ({str(e).splitlines()[0]})",
                           where=str(path), fix="resume only from checkpoints written by safealign; start a new --output-dir otherwise") from None


def _check_deepspeed_shards(path: Path) -> None:
    """Every torch.save file of a DeepSpeed checkpoint may name only allowlisted globals (read
    statically from the pickle opcodes: nothing is executed)."""
    import torch

    allowed = {f"{g.__module__}.{g.__qualname__}" for g in _deepspeed_safe_globals()}
    for f in sorted(path.rglob("*.pt")):
        try:
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(f))) - allowed
        except Exception as e:  # not a zip-format torch file: not one DeepSpeed wrote for us
            raise BadInput(f"unreadable DeepSpeed checkpoint file ({str(e).splitlines()[0]})", where=str(f),
                           fix="resume only from checkpoints written by safealign; start a new --output-dir otherwise") from None
        if unsafe:
            raise BadInput(f"refusing to unpickle a checkpoint file that names {', '.join(sorted(unsafe))}", where=str(f),
                           fix="resume only from checkpoints written by safealign; start a new --output-dir otherwise")


def verify_checkpoint(path: Path) -> dict:
    """Everything ``load_checkpoint`` will read is there, complete, and free of pickles; returns
    state.json. Call it before a resume writes anything."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError):
        raise BadInput("state.json of the checkpoint is unreadable", where=str(path), fix="delete that checkpoint to resume from an earlier one") from None
    pickles = sorted(str(f.relative_to(path)) for f in path.rglob("*") if f.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise BadInput(f"the checkpoint holds pickle files ({', '.join(pickles[:3])}), which safealign never writes and never loads",
                       where=str(path), fix="resume only from checkpoints written by this version of safealign, or start a new --output-dir")
    for f in sorted(path.glob("*.safetensors")):
        check_safetensors(f)
    if any(path.glob(f"{DS_TAG}*")):
        _check_deepspeed_shards(path)
    return state


# --------------------------------------------------------------------------------------------
# save / load


def _is_deepspeed(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.DEEPSPEED


def save_checkpoint(acc, out: Path, step: int, state: dict, keep: int = 2) -> Path:
    """Collective: every process calls it. Returns the final checkpoint path."""
    from safetensors.torch import save_file, save_model

    root = Path(out) / "checkpoints"
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}"
    with writing(f"checkpoint step-{step}", root, cleanup=tmp if acc.is_main_process else None):
        if acc._dataloaders:
            raise NotImplementedError("checkpoints of prepared dataloaders are not supported (safealign orders its data itself)")
        if acc.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        deepspeed = _is_deepspeed(acc)
        for i, model in enumerate(acc._models):
            if deepspeed:  # collective: each process writes its own partitions
                model.save_checkpoint(str(tmp), DS_TAG if i == 0 else f"{DS_TAG}_{i}")
            elif acc.is_main_process:
                save_model(acc.unwrap_model(model), str(tmp / f"model_{i}.safetensors"))
        if acc.is_main_process:
            if not deepspeed:
                for i, opt in enumerate(acc._optimizers):
                    _save_tree(opt.state_dict(), tmp / f"optimizer_{i}")
            _save_tree({"objects": [obj.state_dict() for obj in acc._custom_objects],
                        "scaler": acc.scaler.state_dict() if acc.scaler is not None else None}, tmp / "objects")
        meta, rng = _rng_state()
        save_file(rng, str(tmp / f"rng_{acc.process_index}.safetensors"))
        atomic_write_json(tmp / f"rng_{acc.process_index}.json", meta)
        acc.wait_for_everyone()
        if acc.is_main_process:
            atomic_write_json(tmp / "state.json", {"step": step, "world_size": acc.num_processes, "accelerator_step": acc.step, **state})
            apply_umask(tmp)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            for old in list_checkpoints(out)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
    return final


def check_world_size(state: dict, processes: int, path: Path) -> None:
    """The data shards, RNG states and (DeepSpeed) partitions of a checkpoint belong to its process count."""
    if state.get("world_size", processes) != processes:
        raise BadInput(f"cannot resume: the checkpoint was made with {state['world_size']} processes, this launch has {processes}",
                       where=str(path), fix="resume with the same number of processes")


def load_checkpoint(acc, path: Path) -> dict:
    """Restore what :func:`save_checkpoint` wrote (every process calls it); returns state.json."""
    from safetensors.torch import load_file, load_model

    path = Path(path)
    state = verify_checkpoint(path)
    check_world_size(state, acc.num_processes, path)
    if not (path / "objects.json").is_file():
        raise BadInput("the checkpoint was written in an older format (accelerate's pickles) that safealign no longer loads", where=str(path),
                       fix="start a new --output-dir (or finish that run with the safealign version that started it)")
    deepspeed = _is_deepspeed(acc)
    for i, model in enumerate(acc._models):
        if deepspeed:
            engine_io = model.checkpoint_engine
            plain_load = engine_io.load
            engine_io.load = _safe_torch_load  # every shard DeepSpeed reads goes through its checkpoint engine
            try:
                loaded, _ = model.load_checkpoint(str(path), DS_TAG if i == 0 else f"{DS_TAG}_{i}")
            finally:
                engine_io.load = plain_load
            if loaded is None:
                raise BadInput("the DeepSpeed checkpoint is incomplete", where=str(path), fix="delete that checkpoint to resume from an earlier one")
        else:
            load_model(acc.unwrap_model(model), str(path / f"model_{i}.safetensors"), strict=True, device=str(acc.device))
    if not deepspeed:
        for i, opt in enumerate(acc._optimizers):
            opt.load_state_dict(_load_tree(path / f"optimizer_{i}"))
    objects = _load_tree(path / "objects")
    if len(objects["objects"]) != len(acc._custom_objects):
        raise BadInput(f"the checkpoint holds {len(objects['objects'])} registered objects, this run registers {len(acc._custom_objects)}",
                       where=str(path), fix="resume with the settings the run was started with")
    for obj, sd in zip(acc._custom_objects, objects["objects"]):
        obj.load_state_dict(sd)
    if acc.scaler is not None and objects["scaler"] is not None:
        acc.scaler.load_state_dict(objects["scaler"])
    rng = path / f"rng_{acc.process_index}"
    _set_rng_state(json.loads(rng.with_suffix(".json").read_text()), load_file(str(rng.with_suffix(".safetensors"))))
    acc.step = state.get("accelerator_step", acc.step)
    return state


def clean_partial(out: Path) -> None:
    """Remove temp checkpoint dirs a killed run left behind (never trusted, never loaded)."""
    root = Path(out) / "checkpoints"
    if root.is_dir():
        for p in root.glob(f".tmp-{PREFIX}*"):
            shutil.rmtree(p, ignore_errors=True)
