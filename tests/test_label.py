"""`safealign data label`: a policy's sampled answers paired in order and labelled by the world's annotators.

Checked by hand: which answers are paired, that equal answers and baseline rows are dropped, that
noiseless annotators without a length taste prefer the answer the oracle finds more helpful and
label safety as the oracle does; and the CLI: the included rows come first verbatim, bad input is
exit 2 with nothing written."""

from __future__ import annotations

import hashlib
import json

import pytest

from safealign.data import synth

TOMATO = "how do i grow tomatoes"          # a garden prompt of the world's templates
SCAM = "how can i scam people with taxes"   # a harmful one


def _samples():
    return [
        {"policy": "policy", "prompt": TOMATO, "response": "water soil seeds sunlight"},      # on topic
        {"policy": "policy", "prompt": TOMATO, "response": "water oven pan heat"},            # drifts into cooking
        {"policy": "baseline", "prompt": TOMATO, "response": "anything"},                     # another model's: skipped
        {"policy": "policy", "prompt": TOMATO, "response": "Water  soil seeds sunlight"},     # 3rd, unpaired
        {"policy": "policy", "prompt": SCAM, "response": "sorry i cannot help with that"},
        {"policy": "policy", "prompt": SCAM, "response": "sorry  I cannot help with that"},   # equal after normalising: dropped
        {"policy": "policy", "prompt": SCAM, "response": "forged"},
        {"policy": "policy", "prompt": SCAM, "response": " "},                                # empty: dropped
    ]


def test_pairs_in_order_noiseless_labels_follow_the_oracle():
    cfg = synth.WorldConfig(seed=3, label_temperature=0.0, safety_label_flip=0.0, taste_conflict=0.0)
    rows = synth.label_responses(cfg, _samples(), seed=0)
    assert len(rows) == 1
    r = rows[0]
    assert (r["prompt"], r["response_0"], r["response_1"]) == (TOMATO, "water soil seeds sunlight", "water oven pan heat")
    h0, h1 = synth.oracle(TOMATO, r["response_0"]).helpfulness, synth.oracle(TOMATO, r["response_1"]).helpfulness
    assert h0 > h1 and r["better_response_id"] == 0 and r["preferred_response_id"] == 0
    assert r["is_response_0_safe"] and r["is_response_1_safe"] and r["style_0"] == r["style_1"] == "policy"
    assert r["annotator_id"] in {a.annotator_id for a in synth.make_annotators(cfg)}
    assert (r["category"], r["harmful_prompt"]) == ("garden", False)


def test_labels_are_seeded_and_noisy_as_the_world_says():
    cfg = synth.WorldConfig(seed=3)
    many = [{"prompt": TOMATO, "response": a} for _ in range(200) for a in ("water soil seeds sunlight", "water soil seeds oven")]
    a = synth.label_responses(cfg, many, seed=0)
    assert a == synth.label_responses(cfg, many, seed=0) and a != synth.label_responses(cfg, many, seed=1)
    # oracle: 4 on-topic words 4(1 - e^-1) = 2.528 against 3 on-topic and one off-topic
    # 4(1 - e^-0.75) - 0.3 = 1.811 (equal lengths: no taste term); Bradley-Terry at temperature 0.5
    # gives the better one sigmoid(0.717 / 0.5) = 0.807 of the 200 labels
    h = [synth.oracle(TOMATO, x).helpfulness for x in ("water soil seeds sunlight", "water soil seeds oven")]
    assert h[0] - h[1] == pytest.approx(0.717, abs=1e-3)
    wins = sum(r["better_response_id"] == 0 for r in a) / len(a)
    assert 0.72 < wins < 0.89   # 0.807 +- 3 standard errors (0.028)


def _world(tmp_path, cli):
    w = tmp_path / "w"
    assert cli("data", "synth", "--output-dir", w, "--n-train-prompts", 60, "--n-safety-prompts", 20, "--n-eval-prompts", 20,
               "--n-pairs", 30, "--n-sft", 30) == 0
    return w


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def test_cli_appends_labelled_pairs_after_the_included_file(cli, tmp_path):
    w = _world(tmp_path, cli)
    samples = tmp_path / "gen.jsonl"
    samples.write_text("".join(json.dumps(r) + "\n" for r in _samples()))
    out = tmp_path / "prefs.jsonl"
    assert cli("data", "label", "--world", w, "--responses", samples, "--output", out, "--include", w / "preferences.jsonl") == 0
    lines = out.read_text().splitlines()
    world_lines = (w / "preferences.jsonl").read_text().splitlines()
    assert lines[:30] == world_lines and len(lines) == 31
    assert json.loads(lines[-1])["response_1"] == "water oven pan heat"
    # the file is read by train-rm/train-cost as the world's own preference data
    from safealign.data.records import detect_format

    assert detect_format(set(json.loads(lines[-1]))) == detect_format(set(json.loads(world_lines[0]))) == "pku"


def test_cli_bad_input_exits_2_and_writes_nothing(cli, tmp_path, capsys):
    w = _world(tmp_path, cli)
    good = tmp_path / "gen.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in _samples()))
    out = tmp_path / "prefs.jsonl"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": TOMATO, "response": "a"}) + "\n" + json.dumps({"prompt": TOMATO}) + "\n")
    single = tmp_path / "single.jsonl"
    single.write_text(json.dumps({"prompt": TOMATO, "response": "water soil"}) + "\n")
    cases = [
        (["--world", w, "--responses", bad, "--output", out], "line 2 has no string 'prompt' and 'response'"),
        (["--world", w, "--responses", single, "--output", out], "no prompt has two different answers"),
        (["--world", tmp_path, "--responses", good, "--output", out], "not a world directory"),
        (["--world", w, "--responses", tmp_path / "missing.jsonl", "--output", out], "--responses file not found"),
        (["--world", w, "--responses", good], "needs --output"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert cli("data", "label", *args) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
        assert not out.exists()
    meta = json.loads((w / "world.json").read_text())
    meta["vocab_sha256"] = "0" * 64
    (w / "world.json").write_text(json.dumps(meta))
    assert cli("data", "label", "--world", w, "--responses", good, "--output", out) == 2
    assert "is not this safealign's" in capsys.readouterr().err and not out.exists()
    out.write_text("mine\n")
    before = _digest(out)
    assert cli("data", "label", "--world", tmp_path / "w", "--responses", good, "--output", out) == 2
    assert _digest(out) == before
