"""The training-loop skeleton shared by train-rm, train-cost and sft.

A stage supplies the model, the encoded examples, a collate function and a loss; this module
owns what every stage must do the same way: deterministic data order (a function of seed and
step, so a resumed run sees exactly the batches it would have seen), gradient accumulation,
LR schedule, logging, atomic checkpoints and ``--resume``.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from safealign.errors import BadInput
from safealign.runtime import checkpoint as ckpt
from safealign.runtime.metrics import MetricsLog


@dataclass
class LoopResult:
    step: int
    total_steps: int
    resumed_from: int | None
    seconds: float
    examples_per_second: float
    last_train: dict = field(default_factory=dict)
    evals: list[dict] = field(default_factory=list)


def default_lr(cfg, tiny_lr: float = 1e-3, pretrained_lr: float = 2e-5) -> float:
    return cfg.lr if cfg.lr is not None else (tiny_lr if cfg.model == "tiny" else pretrained_lr)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with betas (0.9, 0.95) (Safe RLHF); no decay on biases and norm weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.95))


def make_scheduler(optimizer, name: str, warmup_ratio: float, total_steps: int):
    from transformers import get_scheduler

    kind = {"constant": "constant_with_warmup"}.get(name, name)
    return get_scheduler(kind, optimizer, num_warmup_steps=int(warmup_ratio * total_steps), num_training_steps=total_steps)


def total_steps_for(cfg, n_examples: int, world: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    per_step = cfg.batch_size * cfg.grad_accum * world
    return max(1, math.ceil(cfg.epochs * n_examples / per_step))


@dataclass
class Prepared:
    """What :func:`prepare_training` hands back: everything already wrapped by accelerate."""

    acc: Any
    model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    total_steps: int
    lr: float


def prepare_training(cfg, model: torch.nn.Module, n_examples: int, out: Path, *, deepspeed: str | None = None) -> Prepared:
    """The accelerator, AdamW and LR schedule of a supervised stage, prepared together (the schedule is
    registered for checkpointing so ``--resume`` restores it)."""
    from safealign.runtime.dist import make_accelerator

    acc = make_accelerator(dtype=cfg.dtype, grad_accum=cfg.grad_accum, deepspeed=deepspeed, report_to=cfg.report_to,
                           project_dir=str(out), batch_size=cfg.batch_size)
    total = total_steps_for(cfg, n_examples, acc.num_processes)
    lr = default_lr(cfg)
    optimizer = make_optimizer(model, lr, cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg.lr_scheduler, cfg.warmup_ratio, total)
    model, optimizer = acc.prepare(model, optimizer)
    acc.register_for_checkpointing(scheduler)
    return Prepared(acc, model, optimizer, scheduler, total, lr)


def open_run_dir(acc, cfg, out: Path, stage: str, *, cfg_dict: dict, prompts: list[str], inherit_from: list, data_fingerprint: str | None,
                 extra: dict) -> None:
    """The first writes of a run (config.yaml, prompt_hashes.txt, manifest.json on the main process) and
    the experiment trackers. Call it only once every input has been validated."""
    from safealign.runtime.io import atomic_write_json, manifest, write_config, write_prompt_hashes

    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.clean_partial(out)
        write_config(out / "config.yaml", cfg_dict)
        write_prompt_hashes(out, prompts, inherit_from=inherit_from)
        atomic_write_json(out / "manifest.json", manifest(stage, seed=cfg.seed, data_fingerprint=data_fingerprint,
                                                          extra={**extra, "world_size": acc.num_processes}))
    if cfg.report_to != "none":
        acc.init_trackers(stage, config={k: v for k, v in cfg_dict.items() if isinstance(v, (int, float, str, bool))})


def save_collectively(acc, module: torch.nn.Module, tok, out: Path, write: Callable[[Path, dict], dict], tmp_name: str = ".tmp-model") -> dict:
    """Save a trained model into ``out`` atomically. Collective: every process calls it (under ZeRO-3
    the state dict is gathered from all of them); ``write(tmp, state)`` runs on the main process only,
    writes the model files into the staging directory and returns what it saved besides the model."""
    from safealign.runtime.io import staged_model_dir

    acc.wait_for_everyone()
    state = acc.get_state_dict(module)  # gathers ZeRO-3 shards
    saved: dict = {}
    if acc.is_main_process:
        with staged_model_dir(out, tmp_name=tmp_name) as tmp:
            saved.update(write(tmp, state) or {})
            tok.save_pretrained(tmp)
        saved["model"] = str(out)
    acc.wait_for_everyone()
    return saved


def strip_prefix(state: dict, prefix: str) -> dict:
    """The entries of a wrapper's state dict that belong to its ``prefix`` sub-module, renamed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


class DataOrder:
    """Example indices as a pure function of (seed, position): epoch e is a seeded permutation."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._cache = n, seed, {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            self._cache = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._cache[epoch]

    def take(self, start: int, count: int) -> list[int]:
        return [int(self._perm(p // self.n)[p % self.n]) for p in range(start, start + count)]


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def check_resume_compatible(saved: dict, current: dict, keys: tuple[str, ...], path: Path) -> None:
    diff = [k for k in keys if saved.get(k) != current.get(k)]
    if diff:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in diff)
        raise BadInput(f"cannot resume: the checkpoint was made with different settings ({detail})", where=str(path),
                       fix="resume with the original settings, or start a new --output-dir")


RESUME_KEYS = ("data", "model", "seed", "batch_size", "grad_accum", "max_steps", "epochs", "lora_r", "max_length")


def train_loop(*, acc, cfg, model: torch.nn.Module, optimizer, scheduler, examples: list, collate: Callable[[list], dict],
               loss_fn: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]], out: Path, total_steps: int,
               evaluate: Callable[[int], dict] | None = None, on_checkpoint_state: Callable[[], dict] | None = None,
               cfg_dict: dict | None = None, unit: str = "pairs") -> LoopResult:
    """Run optimizer steps ``[start, total_steps)``; returns where it stopped and throughput. The caller has
    opened ``out`` with :func:`open_run_dir` (which also removes half-written checkpoints)."""
    world, rank = acc.num_processes, acc.process_index
    log = MetricsLog(out / "metrics.jsonl", acc)
    order = DataOrder(len(examples), cfg.seed)
    start, resumed_from = 0, None
    if cfg.resume:
        last = ckpt.latest_checkpoint(out)
        if last is not None:
            import json

            saved = json.loads((last / "state.json").read_text())
            check_resume_compatible(saved.get("config", {}), cfg_dict or {}, RESUME_KEYS, last)
            state = ckpt.load_checkpoint(acc, last)
            start = resumed_from = state["step"]
            log.truncate_after(start)
            acc.print(f"resumed from {last} (step {start}/{total_steps})")
    if start == 0:
        log.truncate_after(0)  # a run killed before its first checkpoint starts again from nothing
    micro = cfg.batch_size
    per_step = micro * cfg.grad_accum * world
    steps_per_epoch = max(1, len(examples) // per_step)
    eval_every = cfg.eval_steps or steps_per_epoch
    evals: list[dict] = []
    last_train: dict = {}
    from safealign.runtime.progress import progress

    bar = progress(total_steps, out.name, initial=start, enabled=acc.is_local_main_process)
    t0, seen = time.perf_counter(), 0
    window: dict[str, list[float]] = {}
    model.train()
    for step in range(start, total_steps):
        for k in range(cfg.grad_accum):
            pos = (step * cfg.grad_accum + k) * micro * world + rank * micro
            batch = collate([examples[i] for i in order.take(pos, micro)])
            with acc.accumulate(model):
                loss, stats = loss_fn(model, batch)
                acc.backward(loss)
                if acc.sync_gradients and cfg.max_grad_norm:
                    acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for key, v in {"loss": loss.detach(), **stats}.items():
                window.setdefault(key, []).append(float(v))
        scheduler.step()
        seen += per_step
        bar.update(1)
        done = step + 1
        if done % cfg.log_steps == 0 or done == total_steps:
            means = {k: float(np.mean(v)) for k, v in window.items()}
            keys = sorted(means)
            synced = acc.reduce(torch.tensor([means[k] for k in keys], device=acc.device), reduction="mean").tolist()
            row = {f"train/{k}": v for k, v in zip(keys, synced)}
            row.update({"lr": scheduler.get_last_lr()[0], "epoch": done * per_step / len(examples),
                        f"{unit}_per_second": seen / max(time.perf_counter() - t0, 1e-9)})
            last_train = log.log(done, row)
            bar.set_postfix(loss=f"{row['train/loss']:.4f}")
            window = {}
        if evaluate is not None and (done % eval_every == 0 or done == total_steps):
            ev = evaluate(done)
            evals.append(ev)
            log.log(done, ev)
            model.train()
        if cfg.save_steps and done % cfg.save_steps == 0 and done < total_steps:
            extra = on_checkpoint_state() if on_checkpoint_state else {}
            ckpt.save_checkpoint(acc, out, done, {"config": cfg_dict or {}, **extra}, keep=cfg.keep_checkpoints)
    bar.close()
    seconds = time.perf_counter() - t0
    return LoopResult(total_steps, total_steps, resumed_from, seconds, seen / max(seconds, 1e-9), last_train, evals)
