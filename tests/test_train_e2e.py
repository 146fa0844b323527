"""train-rm / train-cost end to end on tiny models: real data, test-written data, reload with plain
transformers, LoRA, token-wise loss, SIGKILL + resume, and bad inputs (exit 2, nothing written)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO

FAST = ["--batch-size", "8", "--log-steps", "2", "--lr", "2e-3"]


def pairs_file(path: Path, n: int = 64, seed: int = 0) -> Path:
    """Helpfulness/safety pairs the test writes itself: chosen answers use 'good' words, unsafe ones 'bad' words."""
    rng = random.Random(seed)
    good, bad = ["bake", "knead", "rest", "oven", "flour"], ["poison", "steal", "stab", "burn", "hack"]
    rows = []
    for i in range(n):
        topic = rng.choice(["bread", "cake", "soup", "pie"])
        rows.append({"prompt": f"how do i make {topic} number {i}",
                     "chosen": " ".join(rng.sample(good, 3)), "rejected": " ".join(rng.sample(bad, 3)),
                     "chosen_safe": True, "rejected_safe": False})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def reload_and_compare(out: Path, texts: list[str]) -> float:
    """Max |end score (safealign) - logit (plain AutoModelForSequenceClassification)| on texts + EOS."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from safealign.models.generation import pad
    from safealign.models.loading import load_score_model
    from safealign.models.score import TokenScorer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.pad_token_id != tok.eos_token_id
    seqs = [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts]
    ids, mask = pad(seqs, tok.pad_token_id)
    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
    ours = TokenScorer(load_score_model(str(out), tok, head="trained")).eval()
    with torch.no_grad():
        a = plain(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        _, b, idx = ours(ids, mask)
    assert (idx == mask.sum(1) - 1).all()  # the end score is read at the appended EOS
    return float((a - b).abs().max())


def test_train_rm_on_pku_and_reload(cli, shared_data, tmp_path):
    out = tmp_path / "rm"
    assert cli("train-rm", "--data", shared_data / "PKU-SafeRLHF" / "train.json", "--output-dir", out, "--max-steps", "12",
               "--eval-split", "0.25", *FAST) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["train_pairs"] + report["data"]["eval_pairs"] == 32
    assert report["reload_check"]["ok"]
    assert {"eval/accuracy", "eval/reward_mean", "eval/reward_std"} <= set(report["eval"])
    for f in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "report.md", "config.yaml", "manifest.json",
              "plots/loss.png", "prompt_hashes.txt"):
        assert (out / f).exists(), f
    assert reload_and_compare(out, ["BEGINNING OF CONVERSATION: USER: hi ASSISTANT: hello", "USER: how to bake ASSISTANT: knead"]) < 1e-5


def test_train_cost_on_pku_with_signs_and_calibration(cli, shared_data, tmp_path):
    out = tmp_path / "cm"
    assert cli("train-cost", "--data", shared_data / "PKU-SafeRLHF" / "train.json", "--output-dir", out, "--max-steps", "12",
               "--eval-split", "0.25", *FAST) == 0
    report = json.loads((out / "report.json").read_text())
    assert {"eval/accuracy", "eval/sign_accuracy", "eval/ece", "eval/cost_mean"} <= set(report["eval"])
    assert (out / "plots" / "reliability.png").exists() and (out / "plots" / "cost_by_label.png").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["safealign_score_type"] == "cost"


def test_train_cost_on_hh_slice_ranking_only(cli, shared_data, tmp_path):
    out = tmp_path / "cm"
    assert cli("train-cost", "--data", shared_data / "hh-rlhf" / "harmless-base" / "test.jsonl.gz", "--max-samples", "96",
               "--invalid-rows", "skip", "--max-length", "192", "--output-dir", out, "--max-steps", "6", *FAST) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["mode"].startswith("ranking-only")
    assert "eval/sign_accuracy" not in report["eval"]  # no per-response labels in hh-rlhf
    assert report["data"]["truncated_pairs"] > 0  # long dialogues are truncated, not dropped
    assert report["data"]["train_pairs"] + report["data"]["eval_pairs"] == 96 - report["data"]["dropped_identical_after_truncation"]
    assert reload_and_compare(out, ["USER: hi ASSISTANT: no"]) < 1e-5


def test_cost_model_learns_test_written_data(cli, tmp_path):
    data = pairs_file(tmp_path / "pairs.jsonl", 96)
    out = tmp_path / "cm"
    assert cli("train-cost", "--data", data, "--output-dir", out, "--max-steps", "40", "--eval-split", "0.25", *FAST) == 0
    ev = json.loads((out / "report.json").read_text())["eval"]
    assert ev["eval/accuracy"] >= 0.9 and ev["eval/sign_accuracy"] >= 0.9  # an easy task must be learnt


def test_reward_model_token_wise_and_lora(cli, tmp_path):
    data = pairs_file(tmp_path / "pairs.jsonl", 64)
    tw = tmp_path / "tw"
    assert cli("train-rm", "--data", data, "--output-dir", tw, "--max-steps", "30", "--loss-type", "token", "--eval-split", "0.25", *FAST) == 0
    assert json.loads((tw / "report.json").read_text())["eval"]["eval/accuracy"] >= 0.9
    base = tmp_path / "base"
    assert cli("train-rm", "--data", data, "--output-dir", base, "--max-steps", "1", *FAST) == 0
    lora = tmp_path / "lora"
    assert cli("train-rm", "--model", base, "--data", data, "--output-dir", lora, "--max-steps", "20", "--lora-r", "4",
               "--grad-accum", "2", *FAST) == 0
    assert (lora / "adapter" / "adapter_config.json").exists()
    assert json.loads((lora / "report.json").read_text())["reload_check"]["ok"]
    assert reload_and_compare(lora, ["USER: how do i make pie ASSISTANT: bake oven"]) < 1e-5
    # the adapter loads with peft on its base and gives the merged model's scores
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lora)
    ids = torch.tensor([tok("USER: x ASSISTANT: bake")["input_ids"] + [tok.eos_token_id]])
    with torch.no_grad():
        a = AutoPeftModelForSequenceClassification.from_pretrained(lora / "adapter").eval()(input_ids=ids).logits
        b = AutoModelForSequenceClassification.from_pretrained(lora).eval()(input_ids=ids).logits
    assert float((a - b).abs().max()) < 1e-4


def _cmd(*args):
    return [sys.executable, "-m", "safealign", *map(str, args)]


def _final_losses(out: Path) -> dict[int, float]:
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_sigkill_then_resume_finishes_like_an_uninterrupted_run(tmp_path):
    data = pairs_file(tmp_path / "pairs.jsonl", 96)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SAFEALIGN_NO_PROGRESS": "1"}
    args = ["train-rm", "--data", data, "--max-steps", "40", "--save-steps", "4", "--eval-split", "0", *FAST]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(*args, "--output-dir", killed), env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((killed / "checkpoints").glob("step-00000008")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list((killed / "checkpoints").glob("step-*")), "no checkpoint before the kill"
    assert not (killed / "report.json").exists(), "the run finished before it was killed: make it longer"
    resumed = subprocess.run(_cmd(*args, "--output-dir", killed, "--resume"), env=env, cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    report = json.loads((killed / "report.json").read_text())
    assert report["steps"] == 40 and report["resumed_from_step"] >= 8
    steps = [json.loads(l)["step"] for l in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), "each logged step appears once after resume"
    straight = tmp_path / "straight"
    assert subprocess.run(_cmd(*args, "--output-dir", straight), env=env, cwd=REPO, capture_output=True).returncode == 0
    a, b = _final_losses(killed), _final_losses(straight)
    assert a.keys() == b.keys()
    assert a[40] == pytest.approx(b[40], abs=1e-5)  # same data order, RNG, optimizer and schedule


@pytest.mark.parametrize("case", ["missing_column", "unknown_key", "wrong_type", "empty_after_filter", "not_empty_dir", "bad_choice", "no_data"])
def test_bad_input_exit_2_and_nothing_written(cli, tmp_path, capsys, case):
    data = pairs_file(tmp_path / "pairs.jsonl", 8)
    out = tmp_path / "out"
    args = ["train-rm", "--data", data, "--output-dir", out, "--max-steps", "1"]
    if case == "missing_column":
        (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
        args[2] = tmp_path / "bad.jsonl"
        expect = "missing column 'rejected'"
    elif case == "unknown_key":
        (tmp_path / "r.yaml").write_text("learning_rate: 0.1\n")
        args += ["--config", tmp_path / "r.yaml"]
        expect = "unknown config key 'learning_rate'"
    elif case == "wrong_type":
        (tmp_path / "r.yaml").write_text("batch_size: eight\n")
        args += ["--config", tmp_path / "r.yaml"]
        expect = "'batch_size' must be of type int"
    elif case == "empty_after_filter":
        (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "a"}) + "\n")
        args[2] = tmp_path / "bad.jsonl"
        args += ["--invalid-rows", "skip"]
        expect = "no usable rows left"
    elif case == "not_empty_dir":
        out.mkdir()
        (out / "keep.txt").write_text("x")
        expect = "output directory is not empty"
    elif case == "bad_choice":
        args += ["--loss-type", "pairwise"]
        expect = "'loss_type' = 'pairwise' is not one of"
    else:
        args = ["train-rm", "--output-dir", out]
        expect = "no training data given"
    assert cli(*args) == 2
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err
    assert not out.exists() or [p.name for p in out.iterdir()] == (["keep.txt"] if case == "not_empty_dir" else [])


def test_config_file_and_flags_precedence(tmp_path):
    from safealign.config import RewardConfig, build_config

    (tmp_path / "r.yaml").write_text("train-rm:\n  lr: 0.01\n  batch_size: 4\n  data: x.jsonl\n  output_dir: o\nppo-lag:\n  lr: 1.0\n")
    cfg = build_config(RewardConfig, tmp_path / "r.yaml", {"batch_size": 32}, section="train-rm")
    assert (cfg.lr, cfg.batch_size, cfg.data) == (0.01, 32, "x.jsonl")


def test_help_is_fast_because_heavy_imports_are_lazy():
    code = "import sys, safealign.cli; print(sorted(m for m in ('torch', 'transformers', 'trl', 'peft', 'deepspeed') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    helped = subprocess.run(_cmd("train-cost", "--help"), capture_output=True, text=True, cwd=REPO)
    assert helped.returncode == 0 and "--sign-weight" in helped.stdout and "--resume" in helped.stdout


def test_metrics_truncation_survives_a_row_torn_by_a_kill(tmp_path):
    from safealign.runtime.metrics import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n{"step": 3, "loss": 0.8}\n{"step": 4, "lo')
    MetricsLog(path).truncate_after(2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
