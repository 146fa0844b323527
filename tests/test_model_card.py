"""Models the ecosystem can use without our code: the chat template + safealign.json that carry the
prompt format, the Hub card whose snippet reproduces safealign's numbers in plain transformers (run
in a subprocess from another directory), and LoRA adapters that load with AutoPeftModel* from
anywhere (a relative base made absolute, a tiny base saved beside the adapter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

FAST = ["--batch-size", "8", "--log-steps", "2", "--lr", "2e-3", "--save-steps", "0"]


def snippet(model_dir: Path) -> str:
    """The python block of the model card ``model_dir/README.md``."""
    text = (model_dir / "README.md").read_text()
    return text.split("```python\n", 1)[1].split("```", 1)[0]


def run_python(code: str, cwd: Path) -> list[str]:
    """Run ``code`` in a fresh interpreter in ``cwd``; its stdout lines."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return [line for line in res.stdout.splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------
# The chat template renders exactly what format_prompt formats


@pytest.mark.parametrize("template", ["default", "raw", 'Q: {prompt}\n"A"{{x}}: {% raw %}\\', "<s>[INST] {prompt} [/INST] {prompt}?"])
def test_chat_template_equals_format_prompt(template):
    from safealign.data.templates import chat_template_for, format_prompt
    from safealign.models.loading import train_tiny_tokenizer

    tok = train_tiny_tokenizer(["hello world", "a b c"], vocab_size=300)
    tok.chat_template = chat_template_for(template)
    for turns in (["  how do I bake? "], ["hi", " hello there ", "and then?"], ["a\nb", "c", "d", "e", "f 'g' \"h\""]):
        messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
        rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert rendered == format_prompt(turns, template), (template, turns)


# --------------------------------------------------------------------------------------------
# Score models: the card's snippet gives safealign's score, a plain tok(text) does not


def test_reward_and_cost_cards_reproduce_safealign_scores(tiny_rm, tiny_cm, tmp_path):
    from safealign.models.generation import load_scorer, score_texts
    from safealign.runtime.model_card import EXAMPLE_PROMPT, EXAMPLE_RESPONSE, front_matter

    ours, naive = {}, {}
    for name, d in (("rm", tiny_rm), ("cm", tiny_cm)):
        scorer, tok = load_scorer(str(d), dtype="fp32")
        ours[name] = float(score_texts(scorer, tok, [EXAMPLE_PROMPT], [EXAMPLE_RESPONSE], template="default")[0])
        ids = torch.tensor([tok(f"{EXAMPLE_PROMPT} {EXAMPLE_RESPONSE}")["input_ids"]])
        with torch.no_grad():
            naive[name] = float(scorer(ids, torch.ones_like(ids))[1][0])
        meta = front_matter((d / "README.md").read_text())
        assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-classification"
        assert {"safealign", "reward-model" if name == "rm" else "cost-model"} <= set(meta["tags"])
        fmt = json.loads((d / "safealign.json").read_text())
        assert fmt["template"] == "default" and fmt["append_eos"] and fmt["kind"] == ("reward" if name == "rm" else "cost")
    assert "cost > 0 means unsafe" in (tiny_cm / "README.md").read_text()
    assert "| held out: accuracy |" in (tiny_rm / "README.md").read_text()  # the stage's held-out metrics
    out = run_python(snippet(tiny_rm) + "\n" + snippet(tiny_cm), cwd=tmp_path)
    got = [float(x) for x in out]
    assert got == pytest.approx([ours["rm"], ours["cm"]], abs=1e-5)
    for name, d in (("rm", tiny_rm), ("cm", tiny_cm)):  # the card states safealign's number too
        assert f"# safealign: {ours[name]:.6f}" in snippet(d)
        assert abs(naive[name] - ours[name]) > 1e-4  # the template and the EOS matter: plain tok(text) is another number


def test_recorded_template_is_read_back_by_every_loader(cli, world, tmp_path):
    from safealign.data.templates import format_prompt
    from safealign.models.generation import encode_prompts, load_scorer, score_texts
    from safealign.models.loading import load_tokenizer

    custom = "Question: {prompt}\nAnswer:"
    out = tmp_path / "rm"
    assert cli("train-rm", "--model", "tiny", "--data", world / "preferences.jsonl", "--output-dir", out, "--max-steps", "2",
               "--max-samples", "64", "--template", custom, *FAST) == 0
    tok = load_tokenizer(str(out))
    assert tok.safealign_format["template"] == custom
    turns = ["hi", "hello", "how do i bake"]
    msgs = [{"role": r, "content": t} for r, t in zip(("user", "assistant", "user"), turns)]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == format_prompt(turns, custom)
    # a stage that loads the model with the default --template formats as the model was trained
    assert encode_prompts(tok, ["how do i bake"], "default") == encode_prompts(tok, ["how do i bake"], custom)
    scorer, stok = load_scorer(str(out), dtype="fp32")
    a = score_texts(scorer, stok, ["how do i bake"], ["knead it"], template="default")
    b = score_texts(scorer, stok, ["how do i bake"], ["knead it"], template=custom)
    c = score_texts(scorer, stok, ["how do i bake"], ["knead it"], template="raw")
    assert float(a) == float(b) and float(a) != float(c)  # an explicit other template still wins


# --------------------------------------------------------------------------------------------
# Policies and LoRA adapters


def test_tiny_lora_policy_card_and_adapter_load_from_elsewhere(cli, world, tmp_path):
    from safealign.runtime.model_card import EXAMPLE_PROMPT, front_matter, safealign_greedy

    out = tmp_path / "sft"
    assert cli("sft", "--model", "tiny", "--data", world / "sft.jsonl", "--output-dir", out, "--max-steps", "6", "--lora-r", "4",
               "--check-prompts", "0", "--max-samples", "200", *FAST) == 0
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str((out / "base").resolve())   # was null for tiny bases
    assert (out / "base" / "config.json").is_file() and (out / "adapter" / "safealign.json").is_file()
    assert front_matter((out / "README.md").read_text())["pipeline_tag"] == "text-generation"
    assert front_matter((out / "adapter" / "README.md").read_text())["library_name"] == "peft"
    expected = safealign_greedy(out, 32)
    check = f"""
import torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM
ids = torch.tensor([tok(tok.apply_chat_template([{{"role": "user", "content": {EXAMPLE_PROMPT!r}}}], tokenize=False, add_generation_prompt=True))["input_ids"]])
a = AutoPeftModelForCausalLM.from_pretrained({str(out / 'adapter')!r}).eval()(input_ids=ids).logits
b = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()(input_ids=ids).logits
print(float((a - b).abs().max()))
"""
    lines = run_python(snippet(out) + check, cwd=tmp_path)
    assert lines[0] == expected and f"# safealign (greedy): {json.dumps(expected)}" in snippet(out)
    assert float(lines[1]) < 1e-4


def test_relative_base_is_recorded_absolute(cli, tiny_policy, world, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_policy.parent)
    out = tmp_path / "rm"
    assert cli("train-rm", "--model", tiny_policy.name, "--data", world / "preferences.jsonl", "--output-dir", out, "--max-steps", "3",
               "--max-samples", "64", "--lora-r", "4", *FAST) == 0
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_policy.resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok("USER: x ASSISTANT: bake")["input_ids"] + [tok.eos_token_id]])
    with torch.no_grad():
        a = AutoPeftModelForSequenceClassification.from_pretrained(out / "adapter", num_labels=1).eval()(input_ids=ids).logits
        b = AutoModelForSequenceClassification.from_pretrained(out).eval()(input_ids=ids).logits
    assert float((a - b).abs().max()) < 1e-4
