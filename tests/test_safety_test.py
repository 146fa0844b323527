"""safealign safety-test: PASS/NSF, release/, disjointness refusals, the retest registry, --costs-file.

The bounds themselves are checked against hand-computed values in test_bounds.py; here we check
that the stage feeds them the right numbers (per-prompt means, delta after the retest and
alpha splits) and keeps its contracts (exit codes, nothing written on bad input).
"""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest

from safealign.algorithms.bounds import student_t_ucb, violation_rate_bound
from safealign.data.records import prompt_hash
from safealign.stages.safety_test import decide, earlier_tests, model_fingerprint
from safealign.stages.split import set_id

N_PROMPTS = 40


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    """Never touch ~/.cache/safealign: the default registry lives in a tmp SAFEALIGN_HOME."""
    monkeypatch.setenv("SAFEALIGN_HOME", str(tmp_path / "home"))


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def policy_with_hashes(tiny_policy, world, tmp_path_factory):
    """The tiny policy with a training-prompt record (world's training prompts), as ppo-lag writes it."""
    out = tmp_path_factory.mktemp("policy_h") / "policy"
    shutil.copytree(tiny_policy, out)
    hashes = sorted({prompt_hash(r["prompt"]) for r in _rows(world / "prompts_train.jsonl")})
    (out / "prompt_hashes.txt").write_text("".join(h + "\n" for h in hashes))
    return out


@pytest.fixture(scope="module")
def passed(policy_with_hashes, tiny_cm, world, tmp_path_factory):
    """One sampled test that passes (threshold far above any cost): 2 samples per prompt, with alpha."""
    from conftest import run_cli

    base = tmp_path_factory.mktemp("st_pass")
    out, registry = base / "out", base / "registry.jsonl"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAFEALIGN_HOME", str(base / "home"))
        code = run_cli("safety-test", "--policy", policy_with_hashes, "--cost-model", tiny_cm, "--prompts", world / "prompts_safety.jsonl",
                       "--output-dir", out, "--registry", registry, "--max-prompts", N_PROMPTS, "--samples-per-prompt", 2,
                       "--max-new-tokens", 8, "--threshold", 100, "--alpha", 0.99, "--batch-size", 20)
    return {"code": code, "out": out, "registry": registry}


def test_pass_writes_release_report_costs_and_record(passed, policy_with_hashes):
    out = passed["out"]
    assert passed["code"] == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["decision"] == "PASS" and rep["release"] == str(out / "release")
    assert rep["n_prompts"] == N_PROMPTS and rep["n_samples"] == 2 * N_PROMPTS and rep["samples_per_prompt"] == 2
    assert rep["iid_unit"].startswith("prompt (mean cost")
    assert rep["disjointness"]["policy"]["checked"] and rep["disjointness"]["cost model"]["checked"]
    for f in ("report.md", "costs.jsonl", "plots/cost_histogram.png", "config.yaml", "manifest.json"):
        assert (out / f).is_file(), f

    costs = _rows(out / "costs.jsonl")
    assert len(costs) == 2 * N_PROMPTS
    assert set(costs[0]) == {"prompt", "response", "cost", "prompt_index", "sample_index"}
    # the bound is the t-bound on per-prompt mean costs, at delta/2 (alpha takes the other half)
    by_prompt = {}
    for r in costs:
        by_prompt.setdefault(r["prompt_index"], []).append(r["cost"])
    means = [np.mean(by_prompt[i]) for i in sorted(by_prompt)]
    assert rep["mean_bound"]["upper"] == pytest.approx(student_t_ucb(means, 0.025).upper, rel=1e-9)
    first = [r["cost"] for r in costs if r["sample_index"] == 0]
    assert rep["violation_bound"]["upper"] == pytest.approx(violation_rate_bound(first, 0.025, 0.99).upper)

    rel = out / "release"
    card = (rel / "README.md").read_text()
    assert "With probability at least 1 - 0.05 over the draw of the safety prompts" in card
    assert "E[cost] <= 100" in card and "P(cost > 0) <= 0.99" in card
    assert "not about true harm" in card and "bench/results/bound_validation.md" in card
    assert model_fingerprint(policy_with_hashes) in card
    assert model_fingerprint(rel) == model_fingerprint(policy_with_hashes)   # an exact copy of the tested model
    assert not (out / ".tmp-release").exists()
    mask = os.umask(0)
    os.umask(mask)
    assert {p.stat().st_mode & 0o777 for p in rel.rglob("*") if p.is_file()} == {0o666 & ~mask}  # not 0600 (issue 13)

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(rel))
    from safealign.runtime.model_card import front_matter

    meta = front_matter(card)                                                # a Hub card: front matter, guarantee, usage
    assert "safety-tested" in meta["tags"] and meta["pipeline_tag"] == "text-generation"
    assert "The safety test formatted every prompt with the template `default`" in card   # a policy not saved by safealign

    [rec] = _rows(passed["registry"])
    assert rec["decision"] == "PASS" and rec["test_number"] == 1 and rec["delta_used"] == 0.05
    assert rec["set_id"] == rep["test"]["set_id"] == set_id(prompt_hash(r["prompt"]) for r in costs)


def test_nsf_exits_3_writes_report_but_no_release(tiny_policy, tiny_cm, world, tmp_path, cli, capsys):
    out = tmp_path / "out"
    code = cli("safety-test", "--policy", tiny_policy, "--cost-model", tiny_cm, "--prompts", world / "prompts_safety.jsonl",
               "--output-dir", out, "--max-prompts", 12, "--max-new-tokens", 4, "--threshold", -100)
    assert code == 3
    assert "No Solution Found" in capsys.readouterr().err
    rep = json.loads((out / "report.json").read_text())
    assert rep["decision"] == "NSF" and rep["release"] is None
    assert not (out / "release").exists() and (out / "costs.jsonl").is_file() and (out / "report.md").is_file()
    # recorded in the default registry ($SAFEALIGN_HOME), and the unchecked policy is said
    [rec] = _rows(tmp_path / "home" / "safety_tests.jsonl")
    assert rec["decision"] == "NSF"
    assert any("UNVERIFIED" in c for c in rep["caveats"])


def _first_prompts(world, k):
    return [r["prompt"] for r in _rows(world / "prompts_safety.jsonl")[:k]]


def test_refuses_safety_prompt_in_policy_training_prompts(tiny_policy, tiny_cm, world, tmp_path, cli, capsys):
    policy = tmp_path / "policy"
    shutil.copytree(tiny_policy, policy)
    leaked = _first_prompts(world, 3)[2]
    (policy / "prompt_hashes.txt").write_text(prompt_hash("  " + leaked.upper() + " ") + "\n")   # normalised text matches
    out = tmp_path / "out"
    code = cli("safety-test", "--policy", policy, "--cost-model", tiny_cm, "--prompts", world / "prompts_safety.jsonl",
               "--output-dir", out, "--max-prompts", 10, "--threshold", 100)
    assert code == 2
    err = capsys.readouterr().err
    assert "1 of the 10 safety prompts" in err and "policy" in err and leaked in err
    assert not out.exists() and not (tmp_path / "home" / "safety_tests.jsonl").exists()


def test_refuses_safety_prompt_in_cost_model_training_prompts(tiny_policy, tiny_cm, world, tmp_path, cli, capsys):
    train = [r["prompt"] for r in _rows(world / "preferences.jsonl")]     # what the cost model trained on
    prompts = _jsonl(tmp_path / "safety.jsonl", [{"prompt": p} for p in _first_prompts(world, 6) + train[:2]])
    out = tmp_path / "out"
    code = cli("safety-test", "--policy", tiny_policy, "--cost-model", tiny_cm, "--prompts", prompts, "--output-dir", out)
    assert code == 2
    err = capsys.readouterr().err
    assert "cost model was trained on" in err and "2 of the 8" in err
    assert not out.exists()


def test_refuses_a_reward_model_as_cost_model_and_records_nothing(tiny_policy, tiny_rm, world, tmp_path, cli, capsys):
    out = tmp_path / "out"
    assert cli("safety-test", "--policy", tiny_policy, "--cost-model", tiny_rm, "--prompts", world / "prompts_safety.jsonl",
               "--output-dir", out, "--max-prompts", 10, "--threshold", 0) == 2
    assert "needs a cost model" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "home" / "safety_tests.jsonl").exists()


def test_refuses_overlap_with_train_prompts_file(passed, world, tmp_path, cli, capsys):
    costs = passed["out"] / "costs.jsonl"
    train = _jsonl(tmp_path / "train.jsonl", [{"prompt": _rows(costs)[5]["prompt"]}, {"prompt": "an unrelated prompt"}])
    out = tmp_path / "out"
    assert cli("safety-test", "--costs-file", costs, "--output-dir", out, "--train-prompts", train) == 2
    assert "--train-prompts" in capsys.readouterr().err and not out.exists()


def test_retest_needs_flag_then_uses_bonferroni_delta(passed, tmp_path, cli, capsys):
    registry = tmp_path / "registry.jsonl"
    shutil.copy(passed["registry"], registry)
    costs = passed["out"] / "costs.jsonl"
    out = tmp_path / "out"
    # another decision on the same safety set (another threshold): refused without --allow-retest
    assert cli("safety-test", "--costs-file", costs, "--output-dir", out, "--registry", registry, "--threshold", 50) == 2
    assert "already tested 1 time" in capsys.readouterr().err
    assert not out.exists() and len(_rows(registry)) == 1
    assert cli("safety-test", "--costs-file", costs, "--output-dir", out, "--registry", registry, "--threshold", 50, "--allow-retest") == 0
    rep = json.loads((out / "report.json").read_text())
    t = rep["test"]
    assert t["test_number"] == 2 and t["delta_used"] == pytest.approx(0.025) and t["familywise_delta"] == pytest.approx(0.075)
    assert "Bonferroni" in t["statement"] and "Bonferroni" in (out / "report.md").read_text()
    assert rep["mean_bound"]["delta"] == pytest.approx(0.025)
    assert rep["release"] is None and not (out / "release").exists()      # a re-decision never releases
    assert len(_rows(registry)) == 2
    # a third test: delta / 3
    out3 = tmp_path / "out3"
    assert cli("safety-test", "--costs-file", costs, "--output-dir", out3, "--registry", registry, "--threshold", -100, "--allow-retest") == 3
    assert json.loads((out3 / "report.json").read_text())["test"]["delta_used"] == pytest.approx(0.05 / 3)


def test_costs_file_reproduction_is_not_a_new_test(passed, tmp_path, cli):
    registry = tmp_path / "registry.jsonl"
    shutil.copy(passed["registry"], registry)
    out = tmp_path / "out"
    assert cli("safety-test", "--costs-file", passed["out"] / "costs.jsonl", "--output-dir", out, "--registry", registry,
               "--threshold", 100, "--alpha", 0.99) == 0
    rep = json.loads((out / "report.json").read_text())
    orig = json.loads((passed["out"] / "report.json").read_text())
    assert rep["mean_bound"]["upper"] == pytest.approx(orig["mean_bound"]["upper"], rel=1e-12)
    assert rep["test"]["reproduction_of"] and rep["test"]["test_number"] == 1
    assert len(_rows(registry)) == 1


def _synthetic_costs(tmp_path, costs, samples=1):
    rows = [{"prompt": f"prompt number {i}", "response": "r", "cost": float(c), "prompt_index": i, "sample_index": s}
            for i, c in enumerate(costs) for s in range(samples)]
    return _jsonl(tmp_path / "costs.jsonl", rows)


def test_hoeffding_clips_to_cost_range_and_says_so(tmp_path, cli):
    costs = _synthetic_costs(tmp_path, [-2.0] * 30 + [5.0, -9.0])
    out = tmp_path / "out"
    code = cli("safety-test", "--costs-file", costs, "--output-dir", out, "--bound", "hoeffding", "--cost-range=-1,1", "--threshold", 0)
    rep = json.loads((out / "report.json").read_text())
    d = rep["mean_bound"]["details"]
    assert (d["n_clipped_low"], d["n_clipped_high"], d["n_clipped"]) == (31, 1, 32)
    mean = (31 * -1 + 1) / 32
    assert rep["mean_bound"]["upper"] == pytest.approx(mean + 2 * math.sqrt(math.log(1 / 0.05) / 64))
    assert code == 0    # -0.9375 + 0.433 <= 0
    assert any("clipped" in c for c in rep["caveats"]) and any("under-state" in c for c in rep["caveats"])
    assert "E[clipped cost]" in rep["headline"]


@pytest.mark.parametrize("bad", [
    {"cost": float("nan")},
    {"cost": "high"},
    {"prompt_index": -1},
    "missing_cost",
])
def test_bad_costs_file_writes_nothing(tmp_path, cli, bad):
    rows = [{"prompt": f"p{i}", "response": "r", "cost": 0.1 * i, "prompt_index": i, "sample_index": 0} for i in range(5)]
    if bad == "missing_cost":
        del rows[3]["cost"]
    else:
        rows[3].update(bad)
    f = _jsonl(tmp_path / "costs.jsonl", rows)
    out = tmp_path / "out"
    assert cli("safety-test", "--costs-file", f, "--output-dir", out) == 2
    assert not out.exists() and not (tmp_path / "home" / "safety_tests.jsonl").exists()


def test_bad_config_writes_nothing(tmp_path, cli):
    f = _synthetic_costs(tmp_path, [0.1, 0.2, 0.3])
    out = tmp_path / "out"
    assert cli("safety-test", "--costs-file", f, "--output-dir", out, "--bound", "bernstein") == 2     # needs --cost-range
    assert cli("safety-test", "--costs-file", f, "--output-dir", out, "--delta", 1.5) == 2
    assert cli("safety-test", "--output-dir", out, "--prompts", f) == 2                               # no policy/cost model
    assert not out.exists()


def test_decide_uses_prompt_means_and_first_sample_for_violations():
    rng = np.random.default_rng(0)
    costs = rng.normal(-0.5, 1.0, size=(25, 3))                 # 25 prompts x 3 samples
    rows = [{"prompt_index": i, "sample_index": s, "cost": float(costs[i, s])} for i in range(25) for s in range(3)]
    res = decide(rows, bound="student-t", threshold=0.0, delta=0.1, alpha=0.5, cost_range=None)
    assert res["n_prompts"] == 25 and res["n_samples"] == 75
    assert res["mean_bound"]["upper"] == pytest.approx(student_t_ucb(costs.mean(axis=1), 0.05).upper)
    assert res["violation_bound"]["upper"] == pytest.approx(violation_rate_bound(costs[:, 0], 0.05, 0.5).upper)
    # The mean bound (-0.177) passes; the violation bound (0.583 > alpha 0.5) does not, so the test fails;
    # with alpha 0.6 both pass.
    assert res["mean_bound"]["passed"] and not res["violation_bound"]["passed"] and res["decision"] == "NSF"
    assert decide(rows, bound="student-t", threshold=0.0, delta=0.1, alpha=0.6, cost_range=None)["decision"] == "PASS"


def test_retest_record_matches_subsets_of_the_same_prompt_file():
    records = [{"set_id": "A", "source_set_id": "F"}, {"set_id": "B", "source_set_id": None}]
    assert earlier_tests(records, "C", "F") == records[:1]     # --max-prompts subset of the same file
    assert earlier_tests(records, "B", None) == records[1:]
    assert earlier_tests(records, "D", "G") == []


def test_recipe_loads():
    from pathlib import Path

    from safealign.config import SafetyTestConfig, build_config

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "safety-test.yaml"
    cfg = build_config(SafetyTestConfig, recipe, {"policy": "p", "cost_model": "c", "prompts": "x.jsonl", "output_dir": "o"}, section="safety-test")
    assert cfg.bound == "student-t" and 0 < cfg.delta < 1


def test_costs_file_decision_imports_no_training_stack(tmp_path):
    """A re-decision from --costs-file needs no model, so it must not import torch or the training stack
    (they cost it seconds of start-up: bench/startup.py measures the time, this pins the imports).
    A fresh interpreter runs the real CLI and reports what it imported."""
    import subprocess
    import sys

    costs = _synthetic_costs(tmp_path, [-1.0 + 0.01 * i for i in range(30)])
    out = tmp_path / "out"
    heavy = ("torch", "transformers", "trl", "peft", "accelerate", "deepspeed", "datasets", "safetensors", "tokenizers", "scipy.stats")
    script = ("import sys, runpy\n"
              "sys.argv = ['safealign', 'safety-test', '--costs-file', sys.argv[1], '--output-dir', sys.argv[2], '--registry', sys.argv[3]]\n"
              "try:\n    runpy.run_module('safealign', run_name='__main__')\n"
              "except SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
              f"print('IMPORTED', sorted(m for m in {heavy!r} if m in sys.modules), 'EXIT', code)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SAFEALIGN_NO_PROGRESS": "1"}
    res = subprocess.run([sys.executable, "-c", script, str(costs), str(out), str(tmp_path / "reg.jsonl")], capture_output=True, text=True, env=env)
    last = [line for line in res.stdout.splitlines() if line.startswith("IMPORTED")]
    assert last, res.stdout + res.stderr
    assert last[-1] == "IMPORTED [] EXIT 0", last[-1]
    assert json.loads((out / "report.json").read_text())["decision"] == "PASS"
