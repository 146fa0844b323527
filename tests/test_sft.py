"""safealign sft: loss falls, the saved policy loads with plain transformers and generates,
LoRA (adapter + merged copy), a real resume after SIGKILL, bad input writes nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

FAST = ("--batch-size", "16", "--log-steps", "5", "--check-prompts", "8", "--check-max-new-tokens", "16", "--max-length", "96")


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_collate_masks_prompt_and_padding():
    from safealign.stages.sft import IGNORE, EncodedSFT, collate, token_nll

    batch = collate([EncodedSFT([5, 6, 7, 8, 2], 3), EncodedSFT([5, 9, 2], 1)], pad_id=0)
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, IGNORE, 8, 2], [IGNORE, 9, 2, IGNORE, IGNORE]]
    logits = torch.zeros(2, 5, 10)
    nll, correct, mask = token_nll(logits, batch["labels"])
    # targets: row 0 predicts 8 and EOS (positions 2, 3); row 1 predicts 9 and EOS (positions 0, 1)
    assert mask.tolist() == [[False, False, True, True], [True, True, False, False]]
    assert torch.allclose(nll[mask], torch.full((4,), float(torch.log(torch.tensor(10.0)))))


def test_sft_tiny_loss_falls_and_reloads(world, tmp_path, cli):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "sft"
    assert cli("sft", "--model", "tiny", "--data", world / "sft.jsonl", "--output-dir", out, "--max-steps", "40",
               "--eval-steps", "20", *FAST) == 0
    rows = _metrics(out)
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert losses[-1] < losses[0] - 1.0, losses
    evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
    assert len(evals) == 2 and evals[-1] < evals[0]
    rep = json.loads((out / "report.json").read_text())
    assert rep["reload_check"]["ok"], rep["reload_check"]
    assert rep["eval"]["eval/perplexity"] > 1
    assert "oracle" in rep["generation_check"] and rep["generation_check"]["held_out"]
    assert rep["data"]["train_source"]["format"] == "sft"
    for name in ("config.yaml", "manifest.json", "report.md", "prompt_hashes.txt", "plots/loss.png"):
        assert (out / name).is_file(), name
    n_prompts = len({json.loads(line)["prompt"] for line in (world / "sft.jsonl").read_text().splitlines()})
    assert len((out / "prompt_hashes.txt").read_text().split()) == n_prompts

    # Plain transformers: load and generate.
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert tok.pad_token_id != tok.eos_token_id
    ids = tok("BEGINNING OF CONVERSATION: USER: how do i cook rice ASSISTANT:", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > ids["input_ids"].shape[1]


def test_sft_lora_adapter_and_merged(world, tiny_policy, tmp_path, cli):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    assert cli("sft", "--model", tiny_policy, "--data", world / "sft.jsonl", "--output-dir", out, "--max-steps", "10",
               "--lora-r", "4", "--lr", "5e-3", "--eval-split", "0.05", *FAST) == 0
    assert (out / "adapter" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_policy)
    with_adapter = PeftModel.from_pretrained(base, out / "adapter").eval()
    x = torch.tensor([[3, 17, 40, 9, 120, 7]])
    with torch.no_grad():
        a, b = merged(x).logits, with_adapter(x).logits
        untouched = AutoModelForCausalLM.from_pretrained(tiny_policy)(x).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(a, untouched, atol=1e-4)  # the adapter changed the model
    assert json.loads((out / "report.json").read_text())["reload_check"]["ok"]


def test_sft_from_preference_data_takes_better_response(world, tmp_path):
    from safealign.data.readers import read_rows
    from safealign.stages.sft import rows_to_examples

    rows = read_rows(str(world / "preferences.jsonl"))[:20]
    ex, st = rows_to_examples(rows, source="prefs", fmt="auto", columns={}, invalid_rows="error", preference_response="better")
    assert st["format"] == "pku" and len(ex) == 20
    assert all(e.response == r[f"response_{r['better_response_id']}"] for e, r in zip(ex, rows))
    ex, _ = rows_to_examples(rows, source="prefs", fmt="auto", columns={}, invalid_rows="error", preference_response="safer")
    assert all(e.response == r[f"response_{r['safer_response_id']}"] for e, r in zip(ex, rows))


def test_sft_column_mapping(tmp_path):
    from safealign.stages.sft import rows_to_examples

    rows = [{"q": "how do i cook rice", "a": "boil then salt"}]
    ex, _ = rows_to_examples(rows, source="x", fmt="auto", columns={"prompt": "q", "response": "a"}, invalid_rows="error",
                             preference_response="better")
    assert ex[0].prompt == ["how do i cook rice"] and ex[0].response == "boil then salt"


def test_sft_bad_input_writes_nothing(tmp_path, cli):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"how do i cook rice {i}", "answer": "boil it"}) + "\n" for i in range(10)))
    out = tmp_path / "out"
    assert cli("sft", "--data", data, "--output-dir", out, "--max-steps", "2") == 2
    assert not out.exists()
    # an empty response in row 3 names the row
    data.write_text("".join(json.dumps({"prompt": "how do i cook rice", "response": "" if i == 2 else "boil"}) + "\n" for i in range(5)))
    assert cli("sft", "--data", data, "--output-dir", out, "--max-steps", "2") == 2
    assert not out.exists()


def test_sft_resume_after_sigkill(world, tmp_path, cli):
    out = tmp_path / "resume"
    args = ["sft", "--model", "tiny", "--data", str(world / "sft.jsonl"), "--output-dir", str(out), "--max-steps", "60",
            "--save-steps", "4", "--eval-split", "0", "--check-prompts", "0", "--batch-size", "8", "--log-steps", "2",
            "--max-length", "64"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SAFEALIGN_NO_PROGRESS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "safealign", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = out / "checkpoints"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if ckpts.is_dir() and any((p / "state.json").is_file() for p in ckpts.glob("step-*")):
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "report.json").exists()  # killed mid-run
    assert cli(*args, "--resume") == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["resumed_from_step"] and rep["resumed_from_step"] % 4 == 0 and rep["steps"] == 60
    steps = [r["step"] for r in _metrics(out) if "train/loss" in r]
    assert steps == list(range(2, 61, 2))  # every logged step exactly once

    # The same run without interruption ends with the same weights.
    from safetensors.torch import load_file

    straight = tmp_path / "straight"
    assert cli(*[str(straight) if a == str(out) else a for a in args]) == 0
    a, b = load_file(out / "model.safetensors"), load_file(straight / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
