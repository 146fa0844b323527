"""The README walkthrough runs top to bottom as written.

Every ```bash block right after a ``<!-- walkthrough -->`` line of README.md is run, in README
order, in one temporary directory (with ``recipes/`` of the repository beside it, as in a clone),
each command through the CLI in this process. To stay fast, tiny settings are appended to each
command (``TINY`` below; a flag given twice takes its last value), never substituted inside it,
so the command the reader types is the command that runs. A safety test may answer NSF (exit 3):
on tiny models that is the expected answer; every other command must exit 0.
"""

from __future__ import annotations

import re
import shlex

from tests.conftest import REPO

# Appended to the command whose first words are the key (longest key wins).
TINY = {
    "data synth": "--n-train-prompts 150 --n-pairs 800 --n-sft 100 --n-eval-prompts 12 --n-safety-prompts 12",
    "sft": "--max-steps 2 --batch-size 8 --check-prompts 2",
    "train-rm": "--max-steps 2 --batch-size 8",
    "train-cost": "--max-steps 2 --batch-size 8",
    "ppo-lag": "--max-steps 2 --batch-size 4 --max-new-tokens 6",
    "safety-test": "--max-new-tokens 6",
    "eval": "--samples 1 --max-prompts 6 --max-new-tokens 6",
}


def walkthrough_commands(text: str) -> list[str]:
    """The commands of the marked blocks, in order: comments dropped, continuation lines joined."""
    commands = []
    for block in re.findall(r"<!-- walkthrough -->\s*\n```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(shlex.join(words))
    return commands


def tiny_args(words: list[str]) -> list[str]:
    key = max((k for k in TINY if words[1:1 + len(k.split())] == k.split()), key=len, default=None)
    return shlex.split(TINY[key]) if key else []


def test_the_readme_has_a_walkthrough_that_covers_the_pipeline():
    cmds = walkthrough_commands((REPO / "README.md").read_text())
    names = [" ".join(w[1:3]) if w[1] == "data" else w[1] for w in map(shlex.split, cmds)]
    order = ["data synth", "data split", "sft", "train-rm", "train-cost", "ppo-lag", "safety-test", "eval"]
    positions = [names.index(o) for o in order]
    assert positions == sorted(positions), names
    assert all(shlex.split(c)[0] == "safealign" for c in cmds)


def test_readme_walkthrough_runs_in_order(cli, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SAFEALIGN_HOME", str(tmp_path / "home"))
    (tmp_path / "recipes").symlink_to(REPO / "recipes")
    cmds = walkthrough_commands((REPO / "README.md").read_text())
    for cmd in cmds:
        words = shlex.split(cmd)
        code = cli(*words[1:], *tiny_args(words))
        allowed = (0, 3) if words[1] == "safety-test" else (0,)
        assert code in allowed, f"README command failed (exit {code}): {cmd}\n{capsys.readouterr().err[-3000:]}"
    for made in ("world/world.json", "runs/split/safety.jsonl", "runs/sft/report.json", "runs/rm/report.json", "runs/cm/report.json",
                 "runs/ppo-lag/report.json", "runs/safety/report.json", "runs/eval/report.json"):
        assert (tmp_path / made).is_file(), made
