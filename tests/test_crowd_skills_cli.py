"""Safe crowd skills end to end on a tiny crowd world: data synth --crowd -> sft -> crowd latent -> crowd skills
-> crowd compose, and the bad inputs that must exit 2 without writing anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from safealign.data.synth import read_jsonl


@pytest.fixture(scope="module")
def crowd_run(tmp_path_factory, request):
    """Balanced (1:1), noiseless users with opposite aspect orders; 30% of pairs with a harmful variant."""
    from conftest import run_cli

    root = tmp_path_factory.mktemp("crowd")
    w = root / "world"
    assert run_cli("data", "synth", "--crowd", "--output-dir", w, "--n-pairs", "2400", "--n-train-prompts", "240", "--n-eval-prompts", "40",
                   "--n-sft", "1200", "--imbalance", "1", "--label-noise", "0", "--harmful-share", "0.3", "--sft-harmful-rate", "0.1") == 0
    assert run_cli("sft", "--model", "tiny", "--data", w / "sft.jsonl", "--output-dir", root / "sft", "--max-steps", "500", "--batch-size", "32",
                   "--lr", "3e-3", "--max-length", "64", "--save-steps", "0", "--eval-split", "0.05") == 0
    assert run_cli("crowd", "latent", "--data", w / "preferences.jsonl", "--output-dir", root / "latent", "--max-steps", "300") == 0
    assert run_cli("crowd", "skills", "--model", root / "sft", "--latent", root / "latent", "--data", w / "preferences.jsonl",
                   "--output-dir", root / "skills", "--max-steps", "300", "--lr", "2e-3", "--beta", "0.5",
                   "--eval-prompts", w / "prompts_eval.jsonl", "--eval-samples", "40", "--save-steps", "100") == 0
    assert run_cli("crowd", "compose", "--skills", root / "skills", "--task", w / "task.jsonl", "--prompts", w / "prompts_train.jsonl",
                   "--eval-prompts", w / "prompts_eval.jsonl", "--output-dir", root / "compose", "--max-steps", "25", "--lr", "0.1",
                   "--save-steps", "10") == 0
    return root


def _report(d: Path) -> dict:
    return json.loads((d / "report.json").read_text())


def test_latent_separates_the_users(crowd_run):
    r = _report(crowd_run / "latent")
    assert r["z_separation"]["identity_accuracy"] >= 0.9
    per = r["heldout"]["per_annotator"]
    # opposite orders at 1:1: one pooled reward cannot serve both users, the z-conditioned one can
    assert min(v["vpl_accuracy"] for v in per.values()) > max(0.7, min(v["pooled_accuracy"] for v in per.values()) + 0.1)
    assert (crowd_run / "latent" / "plots" / "z.png").is_file()


def test_skills_reproduce_each_users_preferred_kind(crowd_run):
    skills = _report(crowd_run / "skills")["skills"]
    k0, k1 = skills["user_0"]["oracle"]["kinds"], skills["user_1"]["oracle"]["kinds"]
    # user_0 ranks aspect_0 first, user_1 aspect_2 first: each skill writes more of its user's favourite than the other skill
    assert k0.get("aspect_0", 0) > k1.get("aspect_0", 0) + 0.15
    assert k1.get("aspect_2", 0) > k0.get("aspect_2", 0) + 0.15
    assert _report(crowd_run / "skills")["reload_check"]["ok"]


def test_skills_load_with_plain_transformers_peft_and_the_prefix_module(crowd_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safealign.models.skills import load_zprefix, prefix_logits

    d = crowd_run / "skills"
    cfg = json.loads((d / "z_prefix.json").read_text())
    assert cfg["format"] == "safealign-z-prefix-v1" and (d / "z_prefix.safetensors").is_file()
    merged = AutoModelForCausalLM.from_pretrained(d).eval()
    base = AutoModelForCausalLM.from_pretrained(crowd_run / "sft")
    adapted = PeftModel.from_pretrained(base, d / "adapter").eval()
    tok = AutoTokenizer.from_pretrained(d)
    ids = torch.tensor([tok("BEGINNING OF CONVERSATION: USER: how do i cook rice ASSISTANT: boil")["input_ids"]])
    z = torch.tensor([json.loads((d / "skills.json").read_text())["annotators"]["user_1"]["z"]])
    prefix = load_zprefix(d)(z)
    assert prefix.shape == (1, cfg["n_prefix"], cfg["hidden_size"])
    with torch.no_grad():
        a = prefix_logits(merged, prefix, ids, torch.ones_like(ids))
        b = prefix_logits(adapted, prefix, ids, torch.ones_like(ids))
    assert torch.allclose(a, b, atol=1e-4)


def test_compose_moves_z_toward_the_skill_the_task_prefers(crowd_run):
    """The task ranks aspect_2 first (user_1's favourite): the high-level policy moves z toward user_1's skill and gains task reward."""
    r = _report(crowd_run / "compose")
    skills = json.loads((crowd_run / "skills" / "skills.json").read_text())
    prior = torch.tensor(skills["prior"]["mu"])
    z1 = torch.tensor(skills["annotators"]["user_1"]["z"])
    after = torch.tensor(r["mean_z_after"])
    assert float((after - z1).norm()) < float((prior - z1).norm())
    assert r["after"]["task_reward"] > r["before_prior_mean_z"]["task_reward"]
    assert (crowd_run / "compose" / "high_level.safetensors").is_file()
    rows = read_jsonl(crowd_run / "compose" / "metrics.jsonl")
    assert rows[-1]["step"] == 25


def test_finished_runs_resume_to_nothing(crowd_run, cli):
    before = (crowd_run / "compose" / "report.json").read_bytes()
    assert cli("crowd", "compose", "--skills", crowd_run / "skills", "--task", crowd_run / "world" / "task.jsonl",
               "--prompts", crowd_run / "world" / "prompts_train.jsonl", "--eval-prompts", crowd_run / "world" / "prompts_eval.jsonl",
               "--output-dir", crowd_run / "compose", "--max-steps", "25", "--lr", "0.1", "--save-steps", "10", "--resume") == 0
    assert (crowd_run / "compose" / "report.json").read_bytes() == before


def test_bad_inputs_exit_2_and_write_nothing(crowd_run, cli, tmp_path):
    w = crowd_run / "world"
    rows = read_jsonl(w / "preferences.jsonl")
    no_ids = tmp_path / "no_ids.jsonl"
    no_ids.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "annotator_id"}) + "\n" for r in rows[:200]))
    assert cli("crowd", "latent", "--data", no_ids, "--output-dir", tmp_path / "a") == 2
    few = tmp_path / "few.jsonl"     # user_1 keeps 5 pairs
    keep = [r for r in rows if r["annotator_id"] == "user_0"][:200] + [r for r in rows if r["annotator_id"] == "user_1"][:5]
    few.write_text("".join(json.dumps(r) + "\n" for r in keep))
    assert cli("crowd", "latent", "--data", few, "--output-dir", tmp_path / "b") == 2
    assert cli("crowd", "skills", "--model", crowd_run / "sft", "--latent", tmp_path, "--data", w / "preferences.jsonl",
               "--output-dir", tmp_path / "c") == 2
    partial = tmp_path / "task.jsonl"
    partial.write_text("".join(json.dumps(r) + "\n" for r in read_jsonl(w / "task.jsonl")[:10]))
    assert cli("crowd", "compose", "--skills", crowd_run / "skills", "--task", partial, "--prompts", w / "prompts_train.jsonl",
               "--output-dir", tmp_path / "d") == 2
    for name in "abcd":
        assert not (tmp_path / name).exists()
