"""safealign data split: deterministic, disjoint on normalised prompt text, rows kept whole."""

from __future__ import annotations

import json

import pytest

from safealign.data.records import normalize_prompt, prompt_hash
from safealign.stages.split import set_id


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def prompts(tmp_path):
    """100 distinct prompts, 20 of them repeated with other case/whitespace (must stay on one side)."""
    rows = [{"prompt": f"how do i do task number {i}", "id": i} for i in range(100)]
    rows += [{"prompt": f"  How do I   do TASK number {i} ", "id": 100 + i} for i in range(0, 100, 5)]
    return _write(tmp_path / "prompts.jsonl", rows)


def test_split_is_disjoint_deduplicated_and_complete(prompts, tmp_path, cli):
    out = tmp_path / "split"
    assert cli("data", "split", "--data", prompts, "--output-dir", out, "--safety-fraction", 0.3, "--seed", 7) == 0
    cand, safe = _rows(out / "candidate.jsonl"), _rows(out / "safety.jsonl")
    norm = lambda rows: {normalize_prompt(r["prompt"]) for r in rows}  # noqa: E731
    assert not norm(cand) & norm(safe)
    assert len(norm(safe)) == 30 and len(norm(cand)) == 70
    assert sorted(r["id"] for r in cand + safe) == sorted(r["id"] for r in _rows(prompts))   # every row kept, whole
    info = json.loads((out / "split.json").read_text())
    assert info["distinct_prompts"] == 100 and info["duplicate_rows"] == 20 and info["disjoint"]
    assert info["safety_set_id"] == set_id(prompt_hash(r["prompt"]) for r in safe)   # the id safety-test records
    assert (out / "report.md").is_file()


def test_split_is_deterministic_and_ignores_row_order(prompts, tmp_path, cli):
    rows = _rows(prompts)
    shuffled = _write(tmp_path / "shuffled.jsonl", rows[::-1])
    assert cli("data", "split", "--data", prompts, "--output-dir", tmp_path / "a", "--seed", 3) == 0
    assert cli("data", "split", "--data", shuffled, "--output-dir", tmp_path / "b", "--seed", 3) == 0
    assert cli("data", "split", "--data", prompts, "--output-dir", tmp_path / "c", "--seed", 4) == 0
    ids = lambda d: sorted(r["id"] for r in _rows(tmp_path / d / "safety.jsonl"))  # noqa: E731
    assert ids("a") == ids("b")
    assert ids("a") != ids("c")
    assert sorted(_rows(tmp_path / "a" / "candidate.jsonl"), key=lambda r: r["id"]) == sorted(_rows(tmp_path / "b" / "candidate.jsonl"), key=lambda r: r["id"])


def test_split_preference_data_keeps_pairs_with_their_prompt(world, tmp_path, cli):
    out = tmp_path / "split"
    assert cli("data", "split", "--data", world / "preferences.jsonl", "--output-dir", out, "--safety-fraction", 0.4) == 0
    cand, safe = _rows(out / "candidate.jsonl"), _rows(out / "safety.jsonl")
    assert {"response_0", "safer_response_id"} <= set(safe[0])
    assert not {prompt_hash(r["prompt"]) for r in cand} & {prompt_hash(r["prompt"]) for r in safe}
    assert len(cand) + len(safe) == len(_rows(world / "preferences.jsonl"))


def test_split_hh_rows_use_the_dialogue_prefix(tmp_path, cli):
    rows = [{"chosen": f"\n\nHuman: question {i}\n\nAssistant: good", "rejected": f"\n\nHuman: question {i}\n\nAssistant: bad"} for i in range(10)]
    out = tmp_path / "split"
    assert cli("data", "split", "--data", _write(tmp_path / "hh.jsonl", rows), "--output-dir", out, "--safety-fraction", 0.5) == 0
    assert len(_rows(out / "safety.jsonl")) == 5


def test_split_bad_input_writes_nothing(prompts, tmp_path, cli, capsys):
    out = tmp_path / "out"
    assert cli("data", "split", "--data", prompts, "--output-dir", out, "--prompt-column", "question") == 2
    assert "--prompt-column" in capsys.readouterr().err
    one = _write(tmp_path / "one.jsonl", [{"prompt": "same"}, {"prompt": " SAME "}])
    assert cli("data", "split", "--data", one, "--output-dir", out) == 2
    empty = _write(tmp_path / "empty.jsonl", [{"prompt": "a"}, {"prompt": "  "}])
    assert cli("data", "split", "--data", empty, "--output-dir", out) == 2
    assert cli("data", "split", "--data", prompts, "--output-dir", out, "--safety-fraction", 1.0) == 2
    assert not out.exists()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("x")
    assert cli("data", "split", "--data", prompts, "--output-dir", taken) == 2
    assert sorted(p.name for p in taken.iterdir()) == ["x"]
