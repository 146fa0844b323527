"""Accelerator set-up that is correct on CPU and GPU, or refuses.

Measured pitfalls (research/feasibility.md §4): without CUDA, ``Accelerator()`` under torchrun
silently starts N independent single-process runs, and DeepSpeed needs the gloo backend named
explicitly. We build the accelerator accordingly and check that every process joined one group.
"""

from __future__ import annotations

import os
import sys

from safealign.errors import BadInput


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def one_process(command: str) -> None:
    """Refuse a multi-process launch of a command that runs in one process (eval, data split, data
    synth, safety-test): its processes would each sample everything and race for one output directory."""
    if launched_world_size() > 1:
        raise BadInput(f"`safealign {command}` runs in one process, and it was launched as {launched_world_size()} (WORLD_SIZE)",
                       fix="run it without accelerate launch / torchrun (the training commands and score-eval are the distributed ones)")


def make_accelerator(*, dtype: str = "auto", grad_accum: int = 1, deepspeed: str | None = None,
                     report_to: str = "none", project_dir: str | None = None, batch_size: int | None = None):
    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    from safealign.models.loading import pick_dtype

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.getcwd(), ".torch_extensions"))
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would otherwise warn while probing for a GPU
    mixed = "bf16" if pick_dtype(dtype) == torch.bfloat16 else "no"
    kwargs: dict = {"gradient_accumulation_steps": grad_accum, "mixed_precision": mixed}
    if report_to != "none":
        _check_tracker(report_to)
        kwargs.update(log_with=report_to, project_dir=project_dir)
    launched_ds = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if deepspeed or launched_ds:
        if not cuda:
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
        if launched_ds:
            # `accelerate launch --use_deepspeed/--config_file` already describes the plugin through the
            # environment; a second description (ours) would conflict with it.
            kwargs.pop("mixed_precision")
        else:
            from accelerate.utils import DeepSpeedPlugin

            if not os.path.isfile(deepspeed):
                raise BadInput("DeepSpeed config not found", where=deepspeed)
            kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=deepspeed, gradient_accumulation_steps=grad_accum)
    elif not cuda:
        kwargs["cpu"] = True
    acc = Accelerator(**kwargs)
    if acc.state.deepspeed_plugin is not None and batch_size:
        ds_cfg = acc.state.deepspeed_plugin.deepspeed_config
        ds_cfg["train_micro_batch_size_per_gpu"] = batch_size
        ds_cfg["gradient_accumulation_steps"] = grad_accum
        ds_cfg["train_batch_size"] = batch_size * grad_accum * acc.num_processes
    check_world(acc, launched_world_size())
    return acc


def check_world(acc, world: int) -> None:
    """Refuse a launch whose processes did not join one group (they would train unsynchronised copies)."""
    if acc.num_processes != world:
        raise BadInput(f"the launcher started WORLD_SIZE={world} processes, but they did not join one process group "
                       f"(accelerate sees {acc.num_processes}); they would train unsynchronised copies",
                       fix="launch with `torchrun --nproc_per_node N` or `accelerate launch --multi_gpu --num_processes N` "
                           "(never `accelerate launch --cpu --num_processes N`)")


def _check_tracker(name: str) -> None:
    import importlib.util

    module = {"tensorboard": "tensorboard", "wandb": "wandb"}[name]
    if importlib.util.find_spec(module) is None and not (name == "tensorboard" and importlib.util.find_spec("tensorboardX")):
        raise BadInput(f"--report-to {name} needs the '{module}' package, which is not installed", fix=f"pip install {module}, or use --report-to none")


def finish(acc) -> None:
    """End a stage's use of the accelerator (every process calls it).

    Multi-process runs leave the process group to :func:`exit_distributed`, which the CLI calls
    after printing: torch 2.13's gloo can abort at interpreter shutdown after all work is done
    (feasibility.md §4), so the CLI ends such runs with barrier + destroy + ``os._exit``.
    """
    if acc is None:
        return
    if acc.num_processes > 1:
        for tracker in acc.trackers:  # what end_training would do: exit_distributed skips atexit hooks
            tracker.finish()
        acc.wait_for_everyone()
        return
    acc.end_training()
    reset_state()


def exit_distributed(code: int) -> None:
    """If this process is part of a process group: barrier, destroy it, flush and ``os._exit(code)``."""
    try:
        import torch.distributed as dist
    except ImportError:
        return
    if "torch" not in sys.modules or not dist.is_available() or not dist.is_initialized():
        return
    try:
        if code == 0:
            dist.barrier()
        dist.destroy_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def reset_state() -> None:
    """Forget accelerate's process-wide state so another stage can run in the same process (demo, tests)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
