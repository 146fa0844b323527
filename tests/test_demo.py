"""The demo chain end to end in its reduced form (few steps per stage: plumbing, not results)."""

import json
import shutil

import pytest


def test_demo_quick_runs_every_stage_and_writes_the_table(cli, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SAFEALIGN_HOME", str(tmp_path / "home"))
    out = tmp_path / "demo"
    assert cli("demo", "--quick", "--output-dir", out) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["policy"] for r in summary["table"]] == ["SFT policy", "reward-only PPO", "reward shaping (fixed lambda)", "PPO-Lagrangian",
                                                       "GRPO-Lagrangian"]
    for row in summary["table"]:
        assert row["safety test"] in ("PASS", "NSF")
        assert 0.0 <= row["oracle harm rate"] <= 1.0
    # one test with the full delta, four Bonferroni-corrected retests on the same safety set
    deltas = sorted(r["delta used"] for r in summary["table"])
    assert deltas[-1] == 0.05 and deltas[0] < 0.05
    assert summary["threshold_calibration"]["given"] is False
    assert set(summary["claims"]) == {"ppo_lag_harm_below_target", "ppo_lag_benign_helpfulness_at_least_sft", "reward_only_ppo_more_harmful_than_ppo_lag",
                                      "grpo_lag_harm_below_target", "grpo_lag_benign_helpfulness_at_least_sft"}
    rl_rows = {r["policy"]: r for r in summary["table"]}
    for name in ("PPO-Lagrangian", "GRPO-Lagrangian"):
        assert rl_rows[name]["s/update"] > 0 and rl_rows[name]["peak RSS (MB)"] > 0
    for sub in ("world", "sft", "labels", "rm", "cm", "ppo", "shaping", "ppo_lag", "grpo_lag", "safety/ppo_lag", "safety/grpo_lag", "eval/grpo_lag"):
        assert (out / sub / "report.json").exists() or sub == "world", sub
    assert (out / "report.md").read_text().count("| PPO-Lagrangian |") == 1
    assert (out / "plots" / "lambda.png").exists()
    assert not (tmp_path / "home").exists(), "the demo keeps its safety-test registry in its own output directory"

    # The same command again: the finished demo says so and runs nothing.
    capsys.readouterr()
    assert cli("demo", "--quick", "--output-dir", out) == 0
    assert "already complete" in capsys.readouterr().out

    # Interrupted: killed in the last safety test (GRPO-Lagrangian's) after the registry recorded it but
    # before its directory was installed (it is written whole or not at all: what is left is a staging
    # directory of a dead process), so the evals never ran. Running again redoes exactly those stages,
    # and the table is the same.
    registry = out / "safety_tests.jsonl"
    assert len(registry.read_text().splitlines()) == 5
    shutil.move(out / "safety" / "grpo_lag", out / "safety" / ".grpo_lag.partial-999999")
    shutil.rmtree(out / "eval")
    (out / "summary.json").unlink()
    state = json.loads((out / "demo_state.json").read_text())
    (out / "demo_state.json").write_text(json.dumps({**state, "complete": False}))
    monkeypatch.delenv("SAFEALIGN_NO_PROGRESS", raising=False)  # the stage counter's lines say what ran
    capsys.readouterr()
    assert cli("demo", "--quick", "--output-dir", out) == 0
    err = capsys.readouterr().err
    assert "stage 1/19 synth (done earlier, skipped)" in err and "stage 14/19 safety-test:grpo_lag (interrupted earlier, restarted)" in err
    assert "stage 15/19 eval:sft," in err
    again = json.loads((out / "summary.json").read_text())
    assert again["table"] == summary["table"], "an interrupted test is not counted twice: the same deltas, the same decisions"
    assert len(registry.read_text().splitlines()) == 5
    assert not list((out / "safety").glob(".*partial*")), "the killed test's staging directory is removed"


def test_demo_refuses_another_demos_directory_or_a_foreign_one(cli, tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "config.yaml").write_text("seed: 7\nquick: true\n")
    (out / "demo_state.json").write_text('{"seconds": {}, "complete": false}')
    assert cli("demo", "--quick", "--output-dir", out) == 2
    assert "other settings" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert cli("demo", "--quick", "--output-dir", foreign) == 2
    assert "holds no demo" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_interrupted_training_stage_resumes_from_its_checkpoint(tmp_path):
    from safealign.stages.demo import _continue_or_restart

    d = tmp_path / "ppo_lag"
    (d / "checkpoints" / "step-00000050").mkdir(parents=True)
    (d / "checkpoints" / "step-00000050" / "state.json").write_text("{}")
    overrides, note = _continue_or_restart("rl:ppo_lag", d, {"max_steps": 300}, tmp_path, finished=False)
    assert overrides == {"max_steps": 300, "resume": True} and "step-00000050" in note and d.exists()
    # no complete checkpoint: restarted from an empty directory
    e = tmp_path / "eval"
    (e / "plots").mkdir(parents=True)
    overrides, note = _continue_or_restart("eval:sft", e, {}, tmp_path, finished=False)
    assert overrides == {} and not e.exists() and "restarted" in note


def test_rl_runs_are_data(monkeypatch):
    """One entry of RL_RUNS is one more RL run: its stage, its safety test, its eval and its row."""
    from safealign import config as C
    from safealign.stages import demo

    runs = demo.RL_RUNS + (demo.RLRun("extra", "another RL run", lambda cfg: {"algorithm": "ppo", "kl_coeff": 4 * cfg.kl_coeff}),)
    monkeypatch.setattr(demo, "RL_RUNS", runs)
    monkeypatch.setattr(demo, "POLICIES", (("sft", "SFT policy"),) + tuple((r.name, r.label) for r in runs))
    from pathlib import Path

    plan = demo._stage_overrides(C.build_config(C.DemoConfig, None, {}), Path("o"), Path("o/world"), threshold=-1.0, train_threshold=-1.5)
    assert plan["ppo-lag:extra"]["kl_coeff"] == 0.2 and plan["ppo-lag:extra"]["output_dir"] == str(Path("o/extra"))
    assert plan["safety-test:extra"]["allow_retest"] and not plan["safety-test:ppo_lag"]["allow_retest"]
    keys = demo.stage_keys()
    assert keys.index("rl:extra") < keys.index("safety-test:ppo_lag") == keys.index("rl:extra") + 1
    assert keys[-1] == "eval:extra" and len(keys) == 5 + 5 + 6 + 6   # synth, sft, label, train-rm, train-cost + 4 RL runs and the extra one, a safety test and an eval each


def test_demo_checks_every_stage_setting_before_writing(cli, tmp_path):
    """A setting that only a later stage rejects (ppo-lag: no room for the prompt) is bad input at
    once: exit 2 and no output directory, not an error after minutes of training."""
    out = tmp_path / "demo"
    assert cli("demo", "--output-dir", out, "--max-new-tokens", "121") == 2
    assert cli("demo", "--output-dir", out, "--train-harm", "0.2") == 2
    assert cli("demo", "--output-dir", out, "--sft-answers", "3") == 2
    assert not out.exists()


@pytest.mark.slow_demo
def test_full_demo_shows_the_method_claim(cli, tmp_path):
    """The full demo (minutes, outside `make test`; `make demo-check`): on the reference world PPO-Lagrangian
    brings the oracle harm rate under the target with benign helpfulness at least the SFT policy's, and
    reward-only PPO is more harmful."""
    out = tmp_path / "demo"
    assert cli("demo", "--output-dir", out) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["claims"] == {k: True for k in summary["claims"]}, summary["headline"]


def test_thresholds_are_expected_costs_at_the_harm_rates():
    from safealign import config as C
    from safealign.stages.demo import _thresholds

    cm = {"eval": {"eval/cost_mean_labelled_safe": -3.0, "eval/cost_mean_labelled_unsafe": 2.0}}
    cfg = C.build_config(C.DemoConfig, None, {"harm_target": 0.1, "train_harm": 0.06})
    test, train, info = _thresholds(cfg, cm)
    assert test == pytest.approx(0.9 * -3.0 + 0.1 * 2.0) and train == pytest.approx(0.94 * -3.0 + 0.06 * 2.0)
    assert info["given"] is False and info["train_given"] is False
    # A hand-set threshold is trained at too, unless a training threshold is given as well.
    cfg = C.build_config(C.DemoConfig, None, {"threshold": -1.0})
    assert _thresholds(cfg, cm)[:2] == (-1.0, -1.0)
    cfg = C.build_config(C.DemoConfig, None, {"threshold": -1.0, "train_threshold": -1.5})
    assert _thresholds(cfg, cm)[:2] == (-1.0, -1.5)
    # No labelled eval data: Safe RLHF's threshold 0.
    assert _thresholds(C.build_config(C.DemoConfig, None, {}), {"eval": {}})[:2] == (0.0, 0.0)
    # train_harm above the target is refused (exit 2 from the CLI).
    from safealign.errors import BadInput
    with pytest.raises(BadInput):
        C.build_config(C.DemoConfig, None, {"harm_target": 0.1, "train_harm": 0.2})


def test_reward_and_cost_models_train_on_labelled_sft_answers():
    """The "label" stage samples SFT answers to every training prompt and the world's annotators label them in
    pairs; train-rm and train-cost read the world's pairs followed by those. --sft-answers 0 removes the stage."""
    from pathlib import Path

    from safealign import config as C
    from safealign.stages import demo

    cfg = C.build_config(C.DemoConfig, None, {})
    plan = demo._stage_overrides(cfg, Path("o"), Path("o/world"), threshold=-1.0, train_threshold=-1.5)
    assert plan["train-rm"]["data"] == plan["train-cost"]["data"] == str(Path("o/labels/preferences.jsonl"))
    assert (plan["label"]["samples"], plan["label"]["max_prompts"], plan["label"]["policy"]) == (6, 0, str(Path("o/sft")))
    assert plan["label"]["prompts"] == str(Path("o/world/prompts_train.jsonl"))
    assert demo.stage_keys(cfg).index("label") == demo.stage_keys(cfg).index("sft") + 1
    off = C.build_config(C.DemoConfig, None, {"sft_answers": 0})
    plan = demo._stage_overrides(off, Path("o"), Path("o/world"), threshold=-1.0, train_threshold=-1.5)
    assert "label" not in plan and "label" not in demo.stage_keys(off)
    assert plan["train-rm"]["data"] == str(Path("o/world/preferences.jsonl"))
