"""`--help` tells: every default and choice is printed (rich markup used to swallow them), text in
brackets survives ("E[cost]"), options sit in panels named after what they set, bool flags have a
--no- form, and the top level has --version and shell completion."""

import re

import pytest

from safealign import config as C


def _help(cli, capsys, monkeypatch, *args) -> str:
    monkeypatch.setenv("COLUMNS", "300")  # one option per line: assertions do not depend on wrapping
    assert cli(*args, "--help") == 0
    return capsys.readouterr().out


def _lines(text: str, flag: str) -> str:
    """The help row of ``flag``, its wrapped continuation lines joined."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"│ (-\w\s+)?{re.escape(flag)}\s", line))
    row = [lines[start]]
    for line in lines[start + 1:]:
        if not re.match(r"│\s{2,}\S", line):
            break
        row.append(line)
    return " ".join(" ".join(r.strip("│ ").split()) for r in row)


def test_defaults_and_choices_are_shown(cli, capsys, monkeypatch):
    text = _help(cli, capsys, monkeypatch, "ppo-lag")
    assert "[default: 0.01]" in _lines(text, "--kl-coeff")
    assert "[choices: ppo-lag, ppo, reward-shaping, grpo-lag, grpo]" in _lines(text, "--algorithm") and "[default: ppo-lag]" in _lines(text, "--algorithm")
    assert "[default: on; --no-normalize-by-lambda turns it off]" in _lines(text, "--normalize-by-lambda")
    assert "[default: off]" in _lines(text, "--resume")
    assert "E[cost] <= d" in _lines(text, "--threshold")
    assert "E[cost] <= threshold" in text  # the command's own description


@pytest.mark.parametrize("command,cls", [("train-rm", C.RewardConfig), ("train-cost", C.CostConfig), ("ppo-lag", C.PPOLagConfig),
                                         ("safety-test", C.SafetyTestConfig), ("sft", C.SFTConfig), ("eval", C.EvalConfig),
                                         ("demo", C.DemoConfig), ("data synth", C.SynthConfig)])
def test_every_option_with_a_default_or_choices_shows_them(cli, capsys, monkeypatch, command, cls):
    text = _help(cli, capsys, monkeypatch, *command.split())
    for f in C.config_fields(cls):
        if not f.metadata.get("flag", True):
            continue
        default = f.default if f.default is not C.dataclasses.MISSING else f.default_factory()
        flag = "--" + (f.name.rstrip("s") if isinstance(default, dict) else f.name).replace("_", "-")
        line = _lines(text, flag)
        if default not in (None, {}, [], ""):
            assert "[default: " in line, (command, flag, line)
        for choice in f.metadata.get("choices") or ():
            assert choice in line.split("[choices: ")[1], (command, flag)


def test_options_are_grouped_in_panels(cli, capsys, monkeypatch):
    text = _help(cli, capsys, monkeypatch, "ppo-lag")
    titles = re.findall(r"╭─ (.+?) ─", text)
    assert titles[:2] == ["Options", "Data"] and {"Model", "Training", "RL", "Lagrangian", "Generation", "Output and checkpoints"} <= set(titles)
    panel_of = {}
    title = None
    for line in text.splitlines():
        m = re.match(r"╭─ (.+?) ─", line)
        title = m.group(1) if m else title
        m = re.match(r"│ (--[\w-]+)", line)
        if m:
            panel_of[m.group(1)] = title
    assert panel_of["--data"] == "Data" and panel_of["--model"] == "Model" and panel_of["--reward-model"] == "Model"
    assert panel_of["--lambda-lr"] == "Lagrangian" and panel_of["--batch-size"] == "Training" and panel_of["--gae-lambda"] == "RL"
    assert panel_of["--output-dir"] == "Output and checkpoints" and panel_of["--max-new-tokens"] == "Generation"


def test_field_panel_rules():
    fields = {f.name: f for f in C.config_fields(C.SFTConfig)}
    assert C.field_panel(C.SFTConfig, fields["data_format"]) == "Data"          # redeclared: keeps the panel of its origin
    assert C.field_panel(C.SFTConfig, fields["check_prompts"]) == "SFT"         # the class's own default
    assert C.field_panel(C.SFTConfig, fields["lora_r"]) == "Model"              # named by TrainOptions


def test_bool_flags_have_a_no_form(cli, tmp_path):
    # both forms parse; giving both is bad input
    assert cli("demo", "--output-dir", tmp_path / "d", "--quick", "--no-quick", "--max-new-tokens", "500") == 2
    assert not (tmp_path / "d").exists()


def test_version_and_completion(cli, capsys):
    assert cli("--version") == 0
    assert re.fullmatch(r"safealign \d+\.\d+\.\d+\S*\n", capsys.readouterr().out)
    assert cli("--help") == 0
    out = capsys.readouterr().out
    assert "--install-completion" in out and "--show-completion" in out
