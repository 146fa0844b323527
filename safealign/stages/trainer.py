"""The training-loop skeleton shared by train-rm, train-cost and sft.

A stage supplies the model, the encoded examples, a collate function and a loss; this module
owns what every stage must do the same way: deterministic data order (a function of seed and
step, so a resumed run sees exactly the batches it would have seen), gradient accumulation,
LR schedule, logging, atomic checkpoints and ``--resume``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from safealign.errors import BadInput, RunFinished
from safealign.runtime import checkpoint as ckpt
from safealign.runtime.io import writing
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


TINY_PARAMS = 10_000_000     # below this a model is trained at a from-scratch tiny model's learning rate


def default_lr(given: float | None, model: torch.nn.Module, lora: bool, full: float) -> float:
    """The learning rate when none is given: 1e-3 for models under 10M parameters, 1e-4 with LoRA,
    else ``full`` (the stage's rate for fine-tuning a pretrained model)."""
    from safealign.models.loading import count_params

    if given is not None:
        return given
    return 1e-3 if count_params(model) < TINY_PARAMS else 1e-4 if lora else full


def param_groups(named_params, lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups of one learning rate: weight decay on matrices, none on biases and norm weights."""
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay}, {"params": no_decay, "lr": lr, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(groups: list[dict]) -> torch.optim.Optimizer:
    """AdamW with betas (0.9, 0.95) (Safe RLHF) over :func:`param_groups` groups, with torch's fused
    kernel where every parameter's device and dtype have one (CPU and CUDA, floating point). On CPU
    the default implementation loops over the tensors in Python: 0.22 s per step for the 65M trainable
    parameters of a 20M PPO-Lagrangian learner (actor + two critics) against 0.03 s fused
    (bench/results/optimizer_step.md). The arithmetic is AdamW's either way; only the rounding order
    differs."""
    try:
        return torch.optim.AdamW(groups, betas=(0.9, 0.95), fused=True)
    except (RuntimeError, ValueError):    # a device or dtype without the fused kernel
        return torch.optim.AdamW(groups, betas=(0.9, 0.95))


def make_scheduler(optimizer, name: str, warmup_ratio: float, total_steps: int):
    from transformers import get_scheduler

    kind = {"constant": "constant_with_warmup"}.get(name, name)
    return get_scheduler(kind, optimizer, num_warmup_steps=int(warmup_ratio * total_steps), num_training_steps=total_steps)


def total_steps_for(cfg, n_examples: int, per_step: int) -> int:
    """--max-steps, or enough steps of ``per_step`` examples for --epochs passes over ``n_examples``."""
    if cfg.max_steps > 0:
        return cfg.max_steps
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

    reset_peak_memory()
    acc = make_accelerator(dtype=cfg.dtype, grad_accum=cfg.grad_accum, deepspeed=deepspeed, report_to=cfg.report_to,
                           project_dir=str(out), batch_size=cfg.batch_size)
    total = total_steps_for(cfg, n_examples, cfg.batch_size * cfg.grad_accum * acc.num_processes)
    lr = default_lr(cfg.lr, model, bool(cfg.lora_r), full=2e-5)
    optimizer = make_optimizer(param_groups(model.named_parameters(), lr, cfg.weight_decay))
    scheduler = make_scheduler(optimizer, cfg.lr_scheduler, cfg.warmup_ratio, total)
    model, optimizer = acc.prepare(model, optimizer)
    acc.register_for_checkpointing(scheduler)
    return Prepared(acc, model, optimizer, scheduler, total, lr)


def saved_tokenizer_dir(out: Path) -> Path:
    return Path(out) / "checkpoints" / "tokenizer"


def run_tokenizer(cfg, out: Path, corpus: Callable[[], list[str]]):
    """The tokenizer of a supervised stage: ``cfg.model``'s, or for ``--model tiny`` one trained on the
    run's texts (``corpus()``, called only then). A resumed run reuses the one it saved
    (:func:`open_run_dir` with ``tok``): a tokenizer trained again could number the tokens otherwise."""
    from safealign.models.loading import load_tokenizer

    saved = saved_tokenizer_dir(out)
    source = str(saved) if cfg.resume and saved.is_dir() else cfg.model
    return load_tokenizer(source, train_texts=corpus() if source == "tiny" else None, vocab_size=cfg.tiny_vocab, revision=cfg.revision)


def trainable(model: torch.nn.Module, cfg, task: str) -> torch.nn.Module:
    """A supervised stage's model as it trains: LoRA adapters with ``--lora-r`` (peft ``task`` type:
    CAUSAL_LM or SEQ_CLS), activation checkpointing with ``--gradient-checkpointing``."""
    from safealign.models.loading import apply_lora

    if getattr(cfg, "lora_r", 0):
        model = apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_targets, task=task)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable()   # non-reentrant: LoRA's gradients need no input embeddings that require grad
    return model


def open_run_dir(acc, cfg, out: Path, stage: str, *, cfg_dict: dict, prompts: list[str], inherit_from: list, data_fingerprint: str | None,
                 extra: dict, tok=None) -> None:
    """The first writes of a run (config.yaml, prompt_hashes.txt, manifest.json and, given ``tok``, the
    tokenizer :func:`run_tokenizer` reloads on --resume, on the main process) and the experiment
    trackers. Call it only once every input has been validated (and, with --resume,
    :func:`resume_point` has accepted the run): a resume whose data or process count changed is
    refused here, before the first byte is written."""
    from safealign.runtime.io import atomic_write_json, manifest, write_config, write_prompt_hashes

    if cfg.resume:
        check_resumed_inputs(acc, out, data_fingerprint)
    if acc.is_main_process:
        with writing("the run directory", out):
            out.mkdir(parents=True, exist_ok=True)
            ckpt.clean_partial(out)
            write_config(out / "config.yaml", cfg_dict)
            write_prompt_hashes(out, prompts, inherit_from=inherit_from)
            atomic_write_json(out / "manifest.json", manifest(stage, seed=cfg.seed, data_fingerprint=data_fingerprint,
                                                              extra={**extra, "world_size": acc.num_processes}))
            if tok is not None and not saved_tokenizer_dir(out).is_dir():
                from safealign.models.loading import save_tokenizer

                save_tokenizer(tok, saved_tokenizer_dir(out))
    if cfg.report_to != "none":
        acc.init_trackers(stage, config={k: v for k, v in cfg_dict.items() if isinstance(v, (int, float, str, bool))})


def save_collectively(acc, module: torch.nn.Module, tok, out: Path, write: Callable[[Path, dict], dict], tmp_name: str = ".tmp-model") -> dict:
    """Save a trained model into ``out`` atomically. Collective: every process calls it (under ZeRO-3
    the state dict is gathered from all of them); ``write(tmp, state)`` runs on the main process only,
    writes the model files into the staging directory and returns what it saved besides the model
    (an ``adapter`` entry relative to the model directory). The prompt format (chat template +
    safealign.json) and portable adapter configs are added here (runtime/model_card.py), so every
    stage's model carries them."""
    from safealign.runtime import model_card
    from safealign.runtime.io import staged_model_dir

    acc.wait_for_everyone()
    state = acc.get_state_dict(module)  # gathers ZeRO-3 shards
    saved: dict = {}
    if acc.is_main_process:
        run = model_card.run_config(out)  # the run's resolved config, written by open_run_dir: template, base model
        with staged_model_dir(out, tmp_name=tmp_name) as tmp:
            template = model_card.prepare_tokenizer(tok, run.get("template", "default"))
            saved.update(write(tmp, state) or {})
            tok.save_pretrained(tmp)
            saved.update(model_card.finish_model_dir(tmp, out, tok, template=template, base=run.get("model"), max_length=run.get("max_length")))
        if saved.get("adapter"):
            saved["adapter"] = str(out / saved["adapter"])
        saved["model"] = str(out)
    acc.wait_for_everyone()
    return saved


def strip_prefix(state: dict, prefix: str) -> dict:
    """The entries of a wrapper's state dict that belong to its ``prefix`` sub-module, renamed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


class DataOrder:
    """Example indices as a pure function of (seed, position): epoch e is a seeded permutation.

    With ``lengths`` (one per example: an int, or a pair of padded lengths) and ``batch`` > 1 the permutation is length-grouped
    (:func:`group_by_length`): every run of ``batch`` consecutive positions that a micro-batch takes
    holds examples of similar length, so little of it is padding. Still a pure function of (seed,
    position), so ``--resume`` sees the batches it would have seen."""

    def __init__(self, n: int, seed: int, lengths: list | None = None, batch: int = 1, window: int = 64):
        self.n, self.seed, self._cache = n, seed, {}
        self.lengths = None if lengths is None or batch <= 1 else np.asarray(lengths)
        self.batch, self.window = batch, window

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(self.n)
            if self.lengths is not None:
                # micro-batches start at multiples of `batch` of the position stream; an epoch that starts
                # mid-batch first completes the batch its predecessor began
                head = (-epoch * self.n) % self.batch
                perm = group_by_length(perm, self.lengths, self.batch, self.window, rng, head=head)
            self._cache = {epoch: perm}
        return self._cache[epoch]

    def take(self, start: int, count: int) -> list[int]:
        return [int(self._perm(p // self.n)[p % self.n]) for p in range(start, start + count)]


def group_by_length(perm: np.ndarray, lengths: np.ndarray, batch: int, window: int, rng: np.random.Generator, head: int = 0,
                    sub: int = 8) -> np.ndarray:
    """A length-grouped version of the shuffled indices ``perm``: the first ``head`` stay where they are
    (they finish a batch begun before), the rest are cut into windows of ``window * batch`` indices, each
    window sorted by length (longest first), cut into batches of ``batch``, and the batches shuffled
    (``rng``). Every index appears once; only which indices share a batch, and the batch order, change.

    ``lengths`` [n, 2] (two padded dimensions, e.g. a shared prefix and the continuations after it, a
    batch costing max(first) + k * max(second)): each window is sorted by the second column, cut into
    runs of ``sub`` batches, and each run sorted by the first column, so a batch is homogeneous in both."""
    head = min(head, len(perm))
    rest = perm[head:]
    span = window * batch

    def order(c: np.ndarray) -> np.ndarray:
        if lengths.ndim == 1:
            return c[np.argsort(-lengths[c], kind="stable")]
        c = c[np.argsort(-lengths[c, 1], kind="stable")]
        runs = np.split(c, range(sub * batch, len(c), sub * batch))
        return np.concatenate([r[np.argsort(-lengths[r, 0], kind="stable")] for r in runs])

    ordered = np.concatenate([order(c) for c in np.split(rest, range(span, len(rest), span))]) if len(rest) else rest
    full = len(ordered) // batch * batch
    blocks = ordered[:full].reshape(-1, batch)[rng.permutation(full // batch)] if full else ordered[:0].reshape(0, batch)
    return np.concatenate([perm[:head], blocks.reshape(-1), ordered[full:]])


def reset_peak_memory() -> None:
    """Start a new high-water mark, so that a stage run in a process that ran others before it (the
    demo, tests) reports its own peak: CUDA's peak statistics, and on Linux the peak RSS (VmHWM)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mb() -> float:
    """Max GPU memory allocated, or the peak resident set size of this process (since the last
    :func:`reset_peak_memory`), in MiB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --------------------------------------------------------------------------------------------
# --resume: honoured or refused, never silently ignored


def resume_may_change(cfg) -> set[str]:
    """Config fields a resumed run may change (declared next to each field: ``opt(..., resume="may-change")``);
    they change where and how often things are written, not what is trained."""
    return {f.name for f in dataclasses.fields(cfg) if f.metadata.get("resume") == "may-change"}


def check_resume_compatible(saved: dict, cfg, path: Path) -> None:
    """Refuse a resume whose settings differ from the run's in any field but :func:`resume_may_change`'s.
    A field the saved config lacks (added to safealign since) counts as its default."""
    free, diff = resume_may_change(cfg), []
    for f in dataclasses.fields(cfg):
        if f.name in free:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        now = getattr(cfg, f.name)
        before = saved.get(f.name, default)
        if before != now:
            diff.append(f"{f.name}: {before!r} -> {now!r}")
    if diff:
        raise BadInput(f"cannot resume: the run was made with different settings ({', '.join(diff)})", where=str(path),
                       fix="resume with the original settings (only " + ", ".join(sorted(free)) + " may change), or start a new --output-dir")


def resume_point(cfg, out: Path) -> tuple[Path | None, dict]:
    """Where ``--resume`` continues: (latest complete checkpoint or None, its state.json). Every check
    that can refuse the resume runs here, before the stage writes anything: the settings must be the
    run's (:func:`check_resume_compatible`), a finished run is not trained again (:class:`RunFinished`),
    and the checkpoint must be complete and free of pickles (checkpoint.verify_checkpoint)."""
    if not cfg.resume:
        return None, {}
    out = Path(out)
    last = ckpt.latest_checkpoint(out)
    if last is not None:
        try:
            recorded, where = json.loads((last / "state.json").read_text()).get("config") or {}, last
        except (OSError, ValueError, AttributeError):
            raise BadInput("state.json of the checkpoint is unreadable", where=str(last), fix="delete that checkpoint to resume from an earlier one") from None
    else:
        recorded, where = _recorded_config(out), out / "config.yaml"
    if recorded:
        check_resume_compatible(recorded, cfg, where)
    if (out / "report.json").is_file():
        raise RunFinished(f"{out}: this run already finished (its report.json is there), so --resume has nothing to do; "
                          "nothing was trained or written. To train again, choose a new --output-dir.")
    return last, (ckpt.verify_checkpoint(last) if last is not None else {})


def _recorded_config(out: Path) -> dict:
    import yaml

    f = out / "config.yaml"
    if not f.is_file():
        return {}
    try:
        data = yaml.safe_load(f.read_text())
    except (OSError, yaml.YAMLError):
        raise BadInput("the run's config.yaml is unreadable", where=str(f), fix="restore it, or start a new --output-dir") from None
    return data if isinstance(data, dict) else {}


def check_resumed_inputs(acc, out: Path, data_fingerprint: str | None) -> None:
    """With --resume: the training data (its fingerprint in manifest.json) and the number of processes
    (the checkpoint's) must be those of the run. Nothing is written."""
    try:
        before = json.loads((Path(out) / "manifest.json").read_text()).get("data_fingerprint")
    except (OSError, ValueError, AttributeError):
        before = None
    if before and data_fingerprint and before != data_fingerprint:
        raise BadInput(f"cannot resume: the training data changed since the run started (fingerprint {before[:12]}... -> {data_fingerprint[:12]}...)",
                       where=str(Path(out) / "manifest.json"), fix="resume with the data the run was started with, or start a new --output-dir")
    last = ckpt.latest_checkpoint(out)
    if last is not None:
        ckpt.check_world_size(json.loads((last / "state.json").read_text()), acc.num_processes, last)


def train_loop(*, acc, cfg, model: torch.nn.Module, optimizer, scheduler, examples: list, collate: Callable[[list], dict],
               loss_fn: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]], out: Path, total_steps: int,
               resume_from: Path | None, evaluate: Callable[[int], dict] | None = None,
               on_checkpoint_state: Callable[[], dict] | None = None, cfg_dict: dict | None = None, unit: str = "pairs",
               lengths: list[int] | None = None) -> LoopResult:
    """Run optimizer steps ``[start, total_steps)``; returns where it stopped and throughput (of training:
    evaluation and checkpoint time excluded). The caller has opened ``out`` with :func:`open_run_dir`
    (which also removes half-written checkpoints); ``resume_from`` is :func:`resume_point`'s checkpoint
    (None: start at step 0). ``lengths`` (one per example): batch examples of similar length
    together (:class:`DataOrder`)."""
    world, rank = acc.num_processes, acc.process_index
    log = MetricsLog(out / "metrics.jsonl", acc)
    # grouped per global micro-step (every process's micro-batch together): N processes then train on the
    # batches one process with N x batch_size would
    order = DataOrder(len(examples), cfg.seed, lengths=lengths, batch=cfg.batch_size * acc.num_processes)
    start, resumed_from = 0, None
    if resume_from is not None:
        state = ckpt.load_checkpoint(acc, resume_from)
        start = resumed_from = state["step"]
        log.truncate_after(start)
        acc.print(f"resumed from {resume_from} (step {start}/{total_steps})")
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
    t0, seen, paused = time.perf_counter(), 0, 0.0   # paused: seconds of evaluation and checkpoints
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
                        f"{unit}_per_second": seen / max(time.perf_counter() - t0 - paused, 1e-9)})
            last_train = log.log(done, row)
            bar.set_postfix(loss=f"{row['train/loss']:.4f}")
            window = {}
        t_pause = time.perf_counter()
        if evaluate is not None and (done % eval_every == 0 or done == total_steps):
            ev = evaluate(done)
            evals.append(ev)
            log.log(done, ev)
            model.train()
        if cfg.save_steps and done % cfg.save_steps == 0 and done < total_steps:
            extra = on_checkpoint_state() if on_checkpoint_state else {}
            ckpt.save_checkpoint(acc, out, done, {"config": cfg_dict or {}, **extra}, keep=cfg.keep_checkpoints)
        paused += time.perf_counter() - t_pause
    bar.close()
    seconds = time.perf_counter() - t0 - paused
    return LoopResult(total_steps, total_steps, resumed_from, seconds, seen / max(seconds, 1e-9), last_train, evals)
