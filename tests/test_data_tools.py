"""`safealign data inspect` and `safealign score-eval` end to end: counts by hand on files the tests
write, lengths in a model's tokens, prompt overlap, and a score model's accuracy on held-out pairs
(equal to what train-rm reports on the same pairs), overall and by subset."""

from __future__ import annotations

import json

import pytest


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _pairs_with_defects(path):
    rows = [{"prompt": "a b c", "chosen": "x y", "rejected": "z", "chosen_safe": True, "rejected_safe": False} for _ in range(6)]
    rows += [{"prompt": "a b c", "chosen": "same", "rejected": "same", "chosen_safe": True, "rejected_safe": True}] * 2   # identical responses
    rows += [{"prompt": "d", "chosen": "   ", "rejected": "z", "chosen_safe": True, "rejected_safe": True}]            # empty text
    rows += [{"prompt": "d", "chosen": "x", "rejected": "z", "chosen_safe": "maybe", "rejected_safe": True}]          # bad label (cost only)
    rows += [{"prompt": "d", "chosen": "x", "rejected": "z", "chosen_safe": False, "rejected_safe": True}]            # contradicts the order
    return _write(path, rows)


def test_inspect_counts_invalid_rows_by_reason_labels_and_lengths(cli, tmp_path):
    data = _pairs_with_defects(tmp_path / "pairs.jsonl")
    other = _write(tmp_path / "safety.jsonl", [{"prompt": "A  B c"}, {"prompt": "new one"}, {"prompt": "another"}])
    out = tmp_path / "inspect.json"
    assert cli("data", "inspect", "--data", data, "--against", other, "--output", out) == 0
    o = json.loads(out.read_text())
    assert o["format"] == "pairs" and o["rows"] == 11
    assert o["invalid_rows"]["train-rm"] == {"identical_responses": 2, "empty_text": 1}
    assert o["invalid_rows"]["train-cost"] == {"identical_responses": 2, "empty_text": 1, "wrong_type": 1, "inconsistent_safety_labels": 1}
    assert o["usable"]["train-rm"] == "8 of 11 rows" and o["usable"]["train-cost"] == "6 of 11 rows"
    assert o["labels"]["responses labelled unsafe"] == pytest.approx(6 / 12)        # the six good rows: one unsafe response each
    # whitespace words: "BEGINNING OF CONVERSATION: USER: a b c ASSISTANT:" = 8; responses "x y" 2, "z" 1 (+ EOS)
    L = o["lengths"]
    assert L["unit"] == "whitespace words" and L["prompt"]["p50"] == 8 and L["response"]["max"] == 2
    assert L["sequence"]["max"] == 8 + 2 + 1 and L["over_max_length"] == 0
    assert o["prompts"] == {"distinct": 2, "rows_without_prompt": 0, "rows_repeating_a_prompt": 9}
    assert o["overlap"]["shared"] == 1 and o["overlap"]["share_of_theirs"] == pytest.approx(1 / 3)   # normalised text: "A  B c" = "a b c"


def test_inspect_in_model_tokens_and_bad_input(cli, tiny_rm, world, tmp_path, capsys):
    from safealign.data.templates import format_prompt
    from safealign.models.loading import load_tokenizer

    out = tmp_path / "i.json"
    assert cli("data", "inspect", "--data", world / "prompts_eval.jsonl", "--model", tiny_rm, "--output", out) == 0
    o = json.loads(out.read_text())
    tok = load_tokenizer(str(tiny_rm))
    lens = sorted(len(tok(format_prompt(json.loads(l)["prompt"], "default"))["input_ids"]) for l in (world / "prompts_eval.jsonl").read_text().splitlines())
    assert o["format"] == "prompts" and o["lengths"]["unit"] == "tokens" and o["lengths"]["prompt"]["max"] == lens[-1]
    assert "Lengths in tokens of" in capsys.readouterr().out
    assert cli("data", "inspect", "--data", tmp_path / "missing.jsonl") == 2
    assert cli("data", "inspect", "--data", world / "prompts_eval.jsonl", "--model", "tiny") == 2


def test_score_eval_matches_train_rm_on_the_same_held_out_pairs(cli, world, tiny_policy, tmp_path):
    rows = [json.loads(l) for l in (world / "preferences.jsonl").read_text().splitlines()]
    train, held = _write(tmp_path / "train.jsonl", rows[:300]), _write(tmp_path / "held.jsonl", rows[300:])
    rm = tmp_path / "rm"
    assert cli("train-rm", "--model", tiny_policy, "--data", train, "--eval-data", held, "--output-dir", rm, "--max-steps", "4",
               "--batch-size", "8", "--lr", "2e-3", "--save-steps", "0") == 0
    trained = json.loads((rm / "report.json").read_text())["eval"]
    out = tmp_path / "se"
    assert cli("score-eval", "--model", rm, "--data", held, "--output-dir", out, "--by", "category", "--by", "harmful_prompt") == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["task"] == "helpful" and rep["metrics"]["pairs"] == 100
    assert rep["metrics"]["accuracy"] == pytest.approx(trained["eval/accuracy"])     # the same numbers train-rm reported
    scores = [json.loads(l) for l in (out / "scores.jsonl").read_text().splitlines()]
    assert sum(s["correct"] for s in scores) / 100 == pytest.approx(rep["metrics"]["accuracy"])
    for group in rep["by"]["category"]:
        mine = [s for s in scores if s["category"] == group["value"]]
        assert group["pairs"] == len(mine) and group["accuracy"] == pytest.approx(sum(s["correct"] for s in mine) / len(mine))
    assert {g["value"] for g in rep["by"]["harmful_prompt"]} == {"True", "False"}


def test_score_eval_cost_model_and_refusals(cli, world, tiny_cm, tiny_policy, tmp_path):
    out = tmp_path / "se"
    assert cli("score-eval", "--model", tiny_cm, "--data", world / "preferences.jsonl", "--output-dir", out, "--max-samples", "80") == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["task"] == "safety" and {"accuracy", "sign_accuracy", "ece"} <= set(rep["metrics"])
    assert (out / "plots" / "reliability.png").is_file()
    bad = tmp_path / "bad"
    assert cli("score-eval", "--model", tiny_policy, "--data", world / "preferences.jsonl", "--output-dir", bad) == 2       # no kind: say --task
    assert cli("score-eval", "--model", tiny_cm, "--data", world / "preferences.jsonl", "--output-dir", bad, "--by", "nope") == 2
    assert not bad.exists()
