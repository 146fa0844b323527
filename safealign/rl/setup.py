"""Everything an RL run needs before its first step, and what it does after its last.

:func:`prepare` validates every input, loads the prompts and the roles, and builds the accelerator,
the optimizer (one learning rate for the actor, one for the critics) and the schedule, all before
the output directory is touched (a refused run writes nothing). :func:`open_run` makes the first
writes and restores a checkpoint on ``--resume``; :func:`save_state` writes one.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safealign.config import PPOLagConfig, to_dict
from safealign.errors import BadInput
from safealign.rl.algorithms import Algorithm
from safealign.rl.constraint import Constraint

@dataclass
class RLRun:
    """One RL run: its settings, data, roles and optimisation state (see :func:`prepare`)."""

    cfg: PPOLagConfig
    algo: Algorithm
    out: Path
    cfg_dict: dict
    acc: Any
    tok: Any
    train_prompts: list
    train_ids: list
    eval_prompts: list
    eval_ids: list
    ptx: list
    data_stats: dict
    learner: Any                 # wrapped by accelerate (DDP/DeepSpeed)
    learner_u: Any               # the Learner itself
    reference: Any
    reward: Any
    cost: Any
    frozen: list
    optimizer: Any
    scheduler: Any
    params: tuple                # (actor parameters, critic parameters) for gradient clipping
    constraint: Constraint
    total: int
    lr: float
    critic_lr: float | None
    role_notes: dict
    zero3: bool
    resume_from: Path | None
    group_size: int
    extra: dict = field(default_factory=dict)

    @property
    def synced(self) -> bool:
        """generate() must keep every process stepping together (ZeRO-3 gathers each layer collectively)."""
        return self.zero3 and self.acc.num_processes > 1

    @property
    def responses(self) -> int:
        """Responses per process per step."""
        return self.cfg.batch_size * self.group_size


def load_prompts(cfg: PPOLagConfig) -> tuple[list, list, dict]:
    """(training prompts, held-out evaluation prompts, stats), by data.prompts' rule (a ``prompt``
    column, mappable with --column prompt=NAME, else the prompts of preference data), de-duplicated."""
    from safealign.data.encode import split_by_prompt
    from safealign.data.prompts import read_prompts
    from safealign.data.records import Pair

    def prompts_of(source: str) -> tuple[list, dict]:
        prompts, stats = read_prompts(source, column=cfg.columns.get("prompt", "prompt"), split=cfg.data_split, config=cfg.data_config,
                                      revision=cfg.data_revision,
                                      invalid_rows=cfg.invalid_rows, preference_fallback=True, data_format=cfg.data_format,
                                      columns=cfg.columns)
        return prompts, {k: stats[k] for k in ("rows", "distinct_prompts", "duplicates_dropped")}

    prompts, stats = prompts_of(cfg.data)
    if cfg.max_samples:
        prompts = prompts[: cfg.max_samples]
    if cfg.eval_data:
        eval_prompts, estats = prompts_of(cfg.eval_data)
        stats["eval_source"] = estats
        train = prompts
    else:
        as_pairs = [Pair([p] if isinstance(p, str) else list(p), "", "") for p in prompts]
        tr, ev = split_by_prompt(as_pairs, cfg.eval_split, cfg.seed)
        back = lambda ps: [q.prompt[0] if len(q.prompt) == 1 else q.prompt for q in ps]  # noqa: E731
        train, eval_prompts = back(tr), back(ev)
    if not train:
        raise BadInput(f"no training prompts left (eval split {cfg.eval_split} of {len(prompts)})", where=cfg.data)
    stats.update(train_prompts=len(train), eval_prompts=len(eval_prompts))
    return train, eval_prompts, stats


def load_ptx(cfg: PPOLagConfig, tok) -> list:
    """SFT rows (prompt/response columns) for the PTX loss, read, validated and encoded as `safealign sft`
    does (--invalid-rows applies; the loss is on response + EOS)."""
    if not cfg.ptx_data or cfg.ptx_coeff <= 0:
        return []
    from safealign.data.readers import read_data
    from safealign.stages.sft import encode_examples, rows_to_examples

    columns = {k: v for k, v in cfg.columns.items() if k in ("prompt", "response")}
    examples, _ = rows_to_examples(read_data(cfg, cfg.ptx_data), source=cfg.ptx_data, fmt="sft", columns=columns,
                                   invalid_rows=cfg.invalid_rows, preference_response="better")
    return encode_examples(tok, examples, cfg.template, cfg.max_length)[0]


def prompts_fingerprint(prompts: list) -> str:
    from safealign.data.prompts import prompt_key

    h = hashlib.sha256()
    for p in prompts:
        h.update((prompt_key(p) + "\n").encode())
    return h.hexdigest()


def prepare(cfg: PPOLagConfig) -> RLRun:
    """Validate and load everything; nothing is written (any problem is BadInput, exit 2)."""
    from safealign.models.generation import encode_prompts
    from safealign.models.loading import load_tokenizer
    from safealign.rl.roles import build_roles
    from safealign.runtime.dist import make_accelerator
    from safealign.runtime.io import check_output_dir
    from safealign.stages.trainer import (default_lr, make_optimizer, make_scheduler, param_groups, reset_peak_memory, resume_point,
                                          total_steps_for)

    reset_peak_memory()
    cfg.validate()
    algo = cfg.spec()
    out = check_output_dir(cfg.output_dir, cfg.resume)
    cfg_dict = to_dict(cfg)
    resume_from, saved_state = resume_point(cfg, out)     # settings, finished run, checkpoint integrity: all before any write
    train_prompts, eval_prompts, data_stats = load_prompts(cfg)
    tok = load_tokenizer(cfg.model, revision=cfg.revision)
    max_prompt = cfg.max_length - cfg.max_new_tokens - 1
    train_ids = encode_prompts(tok, train_prompts, cfg.template, max_prompt)
    eval_ids = encode_prompts(tok, eval_prompts, cfg.template, max_prompt)
    ptx = load_ptx(cfg, tok)
    G = cfg.responses_per_prompt()
    acc = make_accelerator(dtype=cfg.dtype, grad_accum=cfg.grad_accum, deepspeed=cfg.deepspeed, report_to=cfg.report_to,
                           project_dir=str(out), batch_size=cfg.batch_size * G // (cfg.minibatches * cfg.grad_accum))
    world = acc.num_processes
    if resume_from is not None and saved_state.get("world_size", world) != world:
        raise BadInput(f"cannot resume: the checkpoint was made with {saved_state['world_size']} processes, this launch has {world}",
                       where=str(resume_from), fix="resume with the same number of processes")
    if cfg.constraint == "hc" and cfg.batch_size * G * world < 2:
        raise BadInput("--constraint hc needs at least 2 episode costs per step (batch_size x group_size x processes >= 2)")
    frozen_dtype = "bf16" if acc.mixed_precision == "bf16" else "fp32"
    learner, reference, reward, cost, role_notes = build_roles(cfg, tok, frozen_dtype, algo.critics)
    constraint = Constraint(cfg, algo)

    # optimizer: the actor's and the critics' learning rates, each without decay on biases/norms
    base = learner.actor.get_base_model() if cfg.lora_r else learner.actor
    lr = default_lr(cfg.lr, base, bool(cfg.lora_r), full=1e-5)
    critic_lr = default_lr(cfg.critic_lr, base, bool(cfg.lora_r), full=5e-6) if algo.critics else None
    actor_named, critic_named = learner.named_param_groups()
    optimizer = make_optimizer(param_groups(actor_named, lr, cfg.weight_decay) + param_groups(critic_named, critic_lr or lr, cfg.weight_decay))
    total = total_steps_for(cfg, len(train_ids), cfg.batch_size * world)
    scheduler = make_scheduler(optimizer, cfg.lr_scheduler, cfg.warmup_ratio, total)
    wrapped, optimizer = acc.prepare(learner, optimizer)
    acc.register_for_checkpointing(scheduler)
    frozen = [m for m in (reference, reward.model, cost.model if cost else None) if m is not None]
    if not cfg.offload_frozen:
        for m in frozen:
            m.to(acc.device)
    zero3 = getattr(acc.state.deepspeed_plugin, "zero_stage", 0) == 3   # from --deepspeed or from `accelerate launch`'s config alike
    params = ([p for _, p in actor_named], [p for _, p in critic_named])
    return RLRun(cfg, algo, out, cfg_dict, acc, tok, train_prompts, train_ids, eval_prompts, eval_ids, ptx, data_stats,
                 wrapped, acc.unwrap_model(wrapped), reference, reward, cost, frozen, optimizer, scheduler, params, constraint,
                 total, lr, critic_lr, role_notes, zero3, resume_from, G)


def open_run(r: RLRun):
    """The first writes (config, prompt hashes, manifest), the metrics log, and on ``--resume`` the
    checkpoint's state. Returns (first step, MetricsLog)."""
    from safealign.runtime import checkpoint as ckpt
    from safealign.runtime.metrics import MetricsLog
    from safealign.stages.trainer import open_run_dir

    cfg, acc = r.cfg, r.acc
    open_run_dir(acc, cfg, r.out, "ppo-lag", cfg_dict=r.cfg_dict, prompts=r.train_prompts + r.eval_prompts,
                 inherit_from=[cfg.model, cfg.reward_model, cfg.cost_model, cfg.reward_critic, cfg.cost_critic],
                 data_fingerprint=prompts_fingerprint(r.train_prompts),
                 extra={"algorithm": cfg.algorithm, "train_prompts": len(r.train_ids), "eval_prompts": len(r.eval_ids), "roles": r.role_notes})
    log = MetricsLog(r.out / "metrics.jsonl", acc)
    start = 0
    if cfg.resume:
        if r.resume_from is not None:
            state = ckpt.load_checkpoint(acc, r.resume_from)
            start = state["step"]
            r.constraint.load_state_dict(state, acc.process_index)
            acc.print(f"resumed from {r.resume_from} (step {start}/{r.total}, lambda {r.constraint.lam.value:.4g})")
        log.truncate_after(start)
    return start, log


def save_state(r: RLRun, done: int) -> None:
    """A resumable checkpoint after step ``done``: learner, optimizer, scheduler, RNG (accelerate) +
    lambda and the cost windows of every process. Collective."""
    from safealign.runtime import checkpoint as ckpt

    world = r.acc.num_processes
    ckpt.save_checkpoint(r.acc, r.out, done, {"config": r.cfg_dict, "world_size": world, **r.constraint.state_dict(r.acc),
                                              "prompt_position": done * r.cfg.batch_size * world}, keep=r.cfg.keep_checkpoints)


def eval_every(r: RLRun) -> int:
    """--eval-steps, or once per pass over the training prompts."""
    return r.cfg.eval_steps or math.ceil(len(r.train_ids) / (r.cfg.batch_size * r.acc.num_processes))
