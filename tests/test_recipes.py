"""recipes/safe-rlhf-7b.yaml is a pipeline that runs stage by stage: every section builds a valid
configuration of its command (as `safealign COMMAND --config recipe` would, nothing downloaded),
each stage reads the paths the one before writes, and the README lists the commands in that order."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import REPO

from safealign import config as C

RECIPE = REPO / "recipes" / "safe-rlhf-7b.yaml"
ORDER = [("split", "data split", C.SplitConfig), ("train-rm", "train-rm", C.RewardConfig), ("train-cost", "train-cost", C.CostConfig),
         ("ppo-lag", "ppo-lag", C.PPOLagConfig), ("safety-test", "safety-test", C.SafetyTestConfig)]


def test_every_section_is_a_valid_config_of_its_command():
    cfgs = {section: C.build_config(cls, RECIPE, {}, section=section) for section, _, cls in ORDER}   # validate() runs inside
    split, rm, cm, ppo, st = (cfgs[s] for s, _, _ in ORDER)
    candidate, safety = str(Path(split.output_dir) / "candidate.jsonl"), str(Path(split.output_dir) / "safety.jsonl")
    assert rm.data == cm.data == ppo.data == candidate           # every training stage on the candidate part only
    assert st.prompts == safety                                   # the safety test on the held-out part
    assert ppo.reward_model == rm.output_dir and ppo.cost_model == cm.output_dir == st.cost_model
    assert st.policy == ppo.output_dir
    assert st.threshold == ppo.threshold and ppo.algorithm == "ppo-lag"
    assert len({c.output_dir for c in cfgs.values()}) == len(cfgs)   # no stage writes over another


def test_readme_runs_the_recipe_in_order():
    readme = (REPO / "README.md").read_text()
    section = readme.split("### The Safe RLHF 7B recipe, stage by stage", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [re.search(r"safealign (data split|train-rm|train-cost|ppo-lag|safety-test)\b", line)
                for line in section.splitlines() if "--config $R" in line]
    assert [m.group(1) for m in commands if m] == [cmd for _, cmd, _ in ORDER]
    assert "R=recipes/safe-rlhf-7b.yaml" in section
