"""The `safealign` command line. One thin function per command; heavy imports inside commands.

Every option of a command comes from its config dataclass (safealign/config.py): the flag
``--some-key`` sets ``some_key``, its help is the field's help, and ``--config recipe.yaml``
supplies any of them (flags win).
"""

from __future__ import annotations

import inspect
import os
import re
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from safealign import config as C
from safealign.errors import EXIT_BAD_INPUT, EXIT_ERROR, EXIT_NOT_SAFE, BadInput, PushFailed, RunFinished, SafetyTestFailed

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

app = typer.Typer(help="Safe RLHF from the command line: reward model, cost model, PPO-Lagrangian, and a high-confidence safety test. "
                       "`safealign COMMAND --help` lists a command's options by panel with their defaults; every option is also a "
                       "key of a YAML recipe (--config).",
                  no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Inspect, split and synthesise datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
crowd_app = typer.Typer(help="Safe crowd skills (Lin & Brown 2026): a latent preference model of the crowd (latent), a z-conditioned skill policy (skills), "
                             "a high-level policy that composes the skills for a new task reward (compose).", no_args_is_help=True)
app.add_typer(crowd_app, name="crowd")


def _option_type(tp) -> Any:
    inner, _ = C._base_type(tp)
    origin = typing.get_origin(inner)
    if origin in (dict, list):
        return Optional[list[str]]
    return Optional[inner]


# Rich reads "[word...]" in help text as a style tag and drops it ("E[cost]" became "E", every
# "[default: ...]" vanished); a backslash before the bracket keeps it literal.
_RICH_TAG = re.compile(r"\[(?=[a-z#/@][^\[]*?\])")
NEG = "_no__"  # keyword of the hidden --no-FLAG option of a bool field

# Panels of --help in this order (others after them, in the order they first appear).
PANEL_ORDER = ("Options", "Data", "Model", "Training", "Loss", "Cost model", "Crowd (--crowd)", "SFT", "RL", "Lagrangian",
               "HC-RLHF constraint (--constraint hc)", "Generation", "Safety test", "Evaluation", "Split", "World", "Sizes",
               "Annotators", "Plan", "Cluster", "Demo", "Stages", "Thresholds and multiplier", "Output and checkpoints", "Output")


def _show(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value)


def option_help(f, default) -> str:
    """The --help text of a config field: its help, its choices and its default, never eaten by markup."""
    text = f.metadata.get("help", "")
    inner, _ = C._base_type(f.type)
    if typing.get_origin(inner) is dict:
        text += " (repeatable)"
    if f.metadata.get("choices"):
        text += f" [choices: {', '.join(f.metadata['choices'])}]"
    if inner is bool:
        text += f" [default: on; --no-{f.name.replace('_', '-')} turns it off]" if default else " [default: off]"
    elif default not in (None, {}, [], ""):
        text += f" [default: {_show(default)}]"
    return _escape(text)


def _escape(text: str) -> str:
    return _RICH_TAG.sub(r"\\[", text) if typer.core.HAS_RICH else text


def config_command(target: typer.Typer, name: str, cls, runner: Callable[[Any], Any], section: str | None = None,
                   recipe_flag: bool = True):
    """Register ``name`` on ``target`` with one flag per config field, running ``runner(cfg)``.

    ``recipe_flag=False`` leaves ``--config`` to a field of ``cls`` (a command whose recipe is another stage's).
    Options are grouped in --help panels by :func:`safealign.config.field_panel`."""
    params, annotations, negs = [], {}, []
    if recipe_flag:
        params.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                                        default=typer.Option(None, "--config", "-c", help="YAML recipe; flags override its values.")))
        annotations["config"] = Optional[Path]
    fields = [f for f in C.config_fields(cls) if f.metadata.get("flag", True)]
    panels = {f.name: C.field_panel(cls, f) for f in fields}
    seen = list(dict.fromkeys(panels.values()))
    rank = {p: (PANEL_ORDER.index(p) if p in PANEL_ORDER else len(PANEL_ORDER) + seen.index(p)) for p in seen}
    for f in sorted(fields, key=lambda f: rank[panels[f.name]]):
        flag = "--" + f.name.replace("_", "-")
        inner, _ = C._base_type(f.type)
        default = f.default if f.default is not dataclasses_missing() else f.default_factory()  # type: ignore[misc]
        metavar = None
        if typing.get_origin(inner) is dict:
            decl, metavar = ["--" + f.name.rstrip("s").replace("_", "-")], "KEY=VALUE"
        else:
            decl = [flag]
        tp = _option_type(f.type)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=tp,
                                        default=typer.Option(None, *decl, help=option_help(f, default), show_default=False,
                                                             metavar=metavar, rich_help_panel=panels[f.name])))
        annotations[f.name] = tp
        if inner is bool:  # --no-FLAG: its own hidden option, so --help keeps one narrow name column
            negs.append(f.name)
            params.append(inspect.Parameter(NEG + f.name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[bool],
                                            default=typer.Option(None, "--no-" + flag[2:], hidden=True)))
            annotations[NEG + f.name] = Optional[bool]

    def command(**kwargs):
        for key in negs:
            if kwargs.pop(NEG + key):
                if kwargs[key]:
                    raise BadInput(f"both --{key.replace('_', '-')} and --no-{key.replace('_', '-')} given", fix="give one of them")
                kwargs[key] = False
        config_path = kwargs.pop("config") if recipe_flag else None
        cfg = C.build_config(cls, config_path, kwargs, section=section or name)
        return runner(cfg)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = annotations
    command.__doc__ = (cls.__doc__ or "").strip()
    target.command(name, help=_escape(" ".join(command.__doc__.split())))(command)


def dataclasses_missing():
    import dataclasses

    return dataclasses.MISSING


# ---- commands -------------------------------------------------------------------------------


def _quiet() -> None:
    """No per-file progress bars from transformers/datasets/huggingface_hub (our own progress stays).

    By environment, read when those libraries are imported: importing transformers and datasets
    here only to switch their bars off cost a re-decision from --costs-file 1.4 s."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")       # huggingface_hub, and transformers' own bars
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def _pushed(cfg, run: Callable[[Any], dict], stage: str) -> dict:
    """Run a stage; with --push-to-hub the hub settings are checked first and the result is uploaded
    only after the stage succeeded (runtime/hub.py)."""
    from safealign.runtime import hub

    hub.check_settings(cfg)
    summary = run(cfg)
    pushed = hub.push_result(cfg, summary, stage)
    if pushed:
        typer.echo(f"pushed {pushed['folder']} to {pushed['url']}")
    return summary


def _stage(target: str, push: str | None = None) -> Callable[[Any], None]:
    """The runner of a stage command: import ``module:function`` of ``safealign.stages`` only when the
    command runs (``--help`` stays fast), run it, print its headline; ``push`` names the stage for
    --push-to-hub (training stages and safety-test)."""
    module, _, function = target.partition(":")

    def runner(cfg):
        _quiet()
        import importlib

        run = getattr(importlib.import_module(f"safealign.stages.{module}"), function or "run")
        _print_summary(_pushed(cfg, run, push) if push else run(cfg))
    return runner


def _train_cost(cfg):
    """train-cost: the crowd route (per-annotator heads, shared safety cost) or the Safe RLHF cost model."""
    _stage("crowd" if cfg.crowd else "preference:run_cost", "train-cost")(cfg)


def _inspect(cfg):
    from safealign.data.inspect import inspect, markdown
    from safealign.runtime.io import atomic_write_json

    result = inspect(cfg)
    typer.echo(markdown(result))
    if cfg.output:
        atomic_write_json(cfg.output, result)
        typer.echo(f"wrote {cfg.output}")


def _synth(cfg):
    from safealign.data.synth import write_world
    from safealign.runtime.dist import one_process
    from safealign.runtime.io import check_output_dir, whole_output_dir

    one_process("data synth")
    out = check_output_dir(cfg.output_dir, resume=False, resumable=False)
    with whole_output_dir(out, "the synthetic world") as d:
        if cfg.crowd:
            from safealign.data.crowd_world import write_crowd_world

            paths = write_crowd_world(cfg.to_crowd_world(), d)
        else:
            paths = write_world(cfg.to_world(), d)
    for name, path in paths.items():
        typer.echo(f"{name}: {out / Path(path).relative_to(d)}")


def _label(cfg):
    from safealign.data.label import label_file

    summary = label_file(cfg.world, cfg.responses, cfg.output, include=cfg.include, seed=cfg.seed)
    typer.echo(summary["headline"])


def _plan(cfg):
    from safealign.plan import run

    _print_summary(run(cfg))


def _print_summary(summary: dict | None) -> None:
    if not summary:
        return
    line = summary.get("headline")
    if line:
        typer.echo(line)
    if summary.get("output_dir"):
        typer.echo(f"wrote {summary['output_dir']}/report.md")


config_command(app, "train-rm", C.RewardConfig, _stage("preference:run_reward", "train-rm"))
config_command(app, "train-cost", C.CostConfig, _train_cost)
config_command(app, "ppo-lag", C.PPOLagConfig, _stage("ppo_lag", "ppo-lag"))
config_command(app, "safety-test", C.SafetyTestConfig, _stage("safety_test", "safety-test"))
config_command(app, "sft", C.SFTConfig, _stage("sft", "sft"))
config_command(app, "eval", C.EvalConfig, _stage("evaluate"))
config_command(app, "score-eval", C.ScoreEvalConfig, _stage("score_eval"))
config_command(data_app, "inspect", C.InspectConfig, _inspect)
config_command(data_app, "split", C.SplitConfig, _stage("split"))
config_command(data_app, "synth", C.SynthConfig, _synth)
config_command(data_app, "label", C.LabelConfig, _label)
config_command(app, "plan", C.PlanConfig, _plan, recipe_flag=False)
config_command(app, "demo", C.DemoConfig, _stage("demo"))
config_command(crowd_app, "latent", C.CrowdLatentConfig, _stage("crowd_latent"), section="crowd-latent")
config_command(crowd_app, "skills", C.CrowdSkillsConfig, _stage("crowd_skills"), section="crowd-skills")
config_command(crowd_app, "compose", C.CrowdComposeConfig, _stage("crowd_compose"), section="crowd-compose")


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version as dist_version

        try:
            typer.echo(f"safealign {dist_version('safealign')}")
        except PackageNotFoundError:
            from safealign import __version__

            typer.echo(f"safealign {__version__}")
        raise typer.Exit()


@app.callback()
def _top(version: Optional[bool] = typer.Option(None, "--version", is_eager=True, callback=_print_version,
                                                  help="Print the version of safealign and exit (`safealign version`: the whole stack).")) -> None:
    """The top-level options (--version, shell completion)."""


@app.command("version")
def version() -> None:
    """Print the versions of safealign and its stack."""
    from safealign.runtime.io import package_versions

    for k, v in package_versions().items():
        typer.echo(f"{k} {v}")


def _click_errors() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(usage errors, other click errors). Typer 0.29 bundles its own copy of click
    (``typer._click``) and raises that copy's classes; a separately installed click's are caught too."""
    import importlib

    usage, other = [], []
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        usage.append(mod.UsageError)
        other.append(mod.ClickException)
    return tuple(usage), tuple(other)


def _show_usage_error(e) -> None:
    """Print a usage error as typer's standalone mode does (its rich panel when rich is installed)."""
    from typer import core

    if getattr(core, "HAS_RICH", False) and app.rich_markup_mode is not None:
        from typer import rich_utils

        rich_utils.rich_format_error(e)
    elif type(e).__name__ != "NoArgsIsHelpError":
        e.show()


def main(argv: list[str] | None = None) -> int:
    """Entry point: maps errors to exit codes (2 bad input, usage error or fixable disk fault;
    3 safety test not passed; 1 other). Usage errors print typer's usage message, no traceback."""
    usage_errors, click_errors = _click_errors()
    try:
        app(args=argv, standalone_mode=False)
    except BadInput as e:
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        return EXIT_BAD_INPUT
    except SafetyTestFailed as e:
        typer.secho(f"No Solution Found: {e}", err=True, fg=typer.colors.YELLOW)
        return EXIT_NOT_SAFE
    except PushFailed as e:
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        return EXIT_ERROR
    except RunFinished as e:
        typer.echo(str(e), err=True)
        return 0
    except usage_errors as e:  # unknown command or option, bad or missing value; bare `safealign` (its help is printed already)
        _show_usage_error(e)
        return EXIT_BAD_INPUT
    except click_errors as e:
        e.show()
        return e.exit_code or EXIT_ERROR
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        return EXIT_ERROR
    except typer.Exit as e:
        return e.exit_code
    except Exception as e:
        from safealign.runtime.io import disk_fault

        cause = disk_fault(e)
        if cause is None:
            raise
        where = getattr(e, "filename", None)
        typer.secho(f"error: {where + ': ' if where else ''}{cause} ({e}). Fix: free space or choose a writable --output-dir, "
                    "then run the command again.", err=True, fg=typer.colors.RED)
        return EXIT_BAD_INPUT
    return 0


def entry() -> None:
    code = main()
    if "torch" in sys.modules:
        from safealign.runtime.dist import exit_distributed

        exit_distributed(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
