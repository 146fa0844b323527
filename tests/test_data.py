"""Data layer: readers for every format, row formats, column mapping, validation and truncation."""

import gzip
import json

import pytest

from safealign.data.encode import encode, encode_pairs, encode_responses, split_by_prompt
from safealign.data.readers import read_rows
from safealign.data.records import Pair, parse_hh_dialogue, rows_to_pairs
from safealign.errors import BadInput

ROWS = [
    {"prompt": "how do i bake bread", "chosen": "knead and bake", "rejected": "no idea", "chosen_safe": True, "rejected_safe": False},
    {"prompt": "how do i pick a lock", "chosen": "ask a locksmith", "rejected": "use a pin", "chosen_safe": True, "rejected_safe": False},
]


def write(path, rows, kind):
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "csv":
        import csv

        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet"])
def test_readers_all_formats_and_gzip(tmp_path, kind):
    p = write(tmp_path / f"d.{kind}", ROWS, kind)
    assert [r["prompt"] for r in read_rows(str(p))] == [r["prompt"] for r in ROWS]
    gz = tmp_path / f"d.{kind}.gz"
    gz.write_bytes(gzip.compress(p.read_bytes()))
    assert len(read_rows(str(gz))) == 2


def test_reader_hf_dataset_dir(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "ds"))
    assert len(read_rows(str(tmp_path / "ds"), "train")) == 2
    with pytest.raises(BadInput, match="split 'test' not found"):
        read_rows(str(tmp_path / "ds"), "test")


def test_reader_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{not json}\n')
    with pytest.raises(BadInput, match=r"bad.jsonl.*line 2"):
        read_rows(str(bad))
    with pytest.raises(BadInput, match="not found"):
        read_rows(str(tmp_path / "missing.jsonl"))
    with pytest.raises(BadInput, match="unknown data format"):
        (tmp_path / "x.txt").write_text("hi")
        read_rows(str(tmp_path / "x.txt"))


def test_pku_missing_safety_label_on_either_response_means_ranking_only():
    row = {"prompt": "p", "response_0": "a", "response_1": "b", "better_response_id": 0, "safer_response_id": 1}
    for labels in ({"is_response_0_safe": None, "is_response_1_safe": True}, {"is_response_0_safe": True, "is_response_1_safe": None}, {}):
        [pair], _ = rows_to_pairs([{**row, **labels}], source="pku", task="safety", fmt="pku")
        assert pair.chosen == "b" and pair.chosen_unsafe is None and pair.rejected_unsafe is None


def test_pku_schema_real_rows(shared_data):
    rows = read_rows(str(shared_data / "PKU-SafeRLHF" / "train.json"))
    helpful, _ = rows_to_pairs(rows, source="pku", task="helpful")
    safety, _ = rows_to_pairs(rows, source="pku", task="safety")
    assert len(helpful) == len(safety) == 32
    for row, h, s in zip(rows, helpful, safety):
        assert h.chosen == row[f"response_{row['better_response_id']}"]
        sid = row["safer_response_id"]
        assert s.chosen == row[f"response_{sid}"] and s.rejected == row[f"response_{1 - sid}"]
        assert s.chosen_unsafe == (not row[f"is_response_{sid}_safe"])
        assert h.chosen_unsafe is None  # safety labels are not used for helpfulness


def test_hh_dialogues_split_prefix_from_final_turn(shared_data):
    rows = read_rows(str(shared_data / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"))[:200]
    with pytest.raises(BadInput, match="row 87: the final assistant turn is empty"):  # real data has such rows
        rows_to_pairs(rows, source="hh", task="safety")
    pairs, stats = rows_to_pairs(rows, source="hh", task="safety", invalid_rows="skip")
    assert stats.kept + sum(stats.skipped.values()) == 200 and stats.skipped["empty_text"] >= 1
    p = pairs[0]
    assert len(p.prompt) % 2 == 1 and p.chosen_unsafe is None
    assert rows[p.row - 1]["chosen"].endswith(p.chosen)


def test_parse_hh_dialogue():
    turns = parse_hh_dialogue("\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: ok")
    assert turns == [("user", "hi there"), ("assistant", "hello"), ("user", "bye"), ("assistant", "ok")]


def test_column_mapping():
    rows = [{"q": "question", "good": "yes", "bad": "no"}]
    pairs, _ = rows_to_pairs(rows, source="x", task="helpful", columns={"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected) == (["question"], "yes", "no")


@pytest.mark.parametrize("row,match", [
    ({"prompt": "p", "chosen": "a"}, "missing column 'rejected'"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "row 1: column 'chosen' must be a string"),
    ({"prompt": "p", "chosen": "  ", "rejected": "b"}, "row 1: column 'chosen' is empty"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "row 1: the two responses are identical"),
])
def test_validation_errors(row, match):
    with pytest.raises(BadInput, match=match):
        rows_to_pairs([row], source="d.jsonl", task="helpful")


def test_invalid_rows_skip_counts_and_empty_after_filtering():
    rows = [{"prompt": "p", "chosen": "same", "rejected": "same"}, {"prompt": "p", "chosen": "", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": "b"}]
    pairs, stats = rows_to_pairs(rows, source="d", task="helpful", invalid_rows="skip")
    assert len(pairs) == 1 and stats.skipped == {"identical_responses": 1, "empty_text": 1}
    with pytest.raises(BadInput, match="no usable rows left"):
        rows_to_pairs(rows[:2], source="d", task="helpful", invalid_rows="skip")


def test_pku_wrong_id_type():
    row = {"prompt": "p", "response_0": "a", "response_1": "b", "better_response_id": "first", "safer_response_id": 0}
    with pytest.raises(BadInput, match="better_response_id' must be 0 or 1"):
        rows_to_pairs([row], source="d", task="helpful")


def test_inconsistent_safety_labels_policy():
    # safer response (id 0) labelled unsafe, the other labelled safe: safe-rlhf #181 crashes on this
    row = {"prompt": "p", "response_0": "a", "response_1": "b", "better_response_id": 0, "safer_response_id": 0,
           "is_response_0_safe": False, "is_response_1_safe": True}
    ok = dict(row, prompt="q", is_response_0_safe=True)
    pairs, stats = rows_to_pairs([row, ok], source="d", task="safety", inconsistent="skip")
    assert len(pairs) == 1 and stats.skipped["inconsistent_safety_labels"] == 1
    kept, _ = rows_to_pairs([row, ok], source="d", task="safety", inconsistent="keep")
    assert len(kept) == 2 and kept[0].chosen_unsafe is True and kept[0].rejected_unsafe is False


class CharTok:
    """A stand-in tokenizer: one id per character, eos = 1."""
    eos_token_id = 1

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}


def test_truncation_keeps_eos_and_cuts_prompt_first():
    e = encode(CharTok(), "p" * 20, "r" * 5, max_length=16)
    assert e.truncated and len(e.ids) == 16 and e.ids[-1] == 1
    assert e.ids[:-1].count(ord("r")) == 5  # the whole response survived, the prompt was cut from the left
    e2 = encode(CharTok(), "p" * 20, "r" * 40, max_length=16)
    assert len(e2.ids) == 16 and e2.ids[:3] == [ord("p")] * 3  # a quarter of the budget stays prompt
    assert not encode(CharTok(), "ab", "cd", max_length=16).truncated


def test_an_over_long_pair_keeps_one_prompt_cut_for_both_sides():
    # budget 15 = 16 - EOS; the longer response (8) leaves 7 prompt tokens, and the shorter side gets
    # the same 7 (cut alone it would keep 12 and start elsewhere): one context, a common start
    c, r = encode_responses(CharTok(), "abcdefghijklmnopqrst", ["x" * 3, "y" * 8], max_length=16)
    assert c.ids[:7] == r.ids[:7] == [ord(ch) for ch in "nopqrst"] and c.prompt_len == r.prompt_len == 7
    assert c.truncated and r.truncated and len(c.ids) == 11 and len(r.ids) == 16
    assert encode(CharTok(), "abcdefghijklmnopqrst", "x" * 3, max_length=16).ids[:12] == [ord(ch) for ch in "ijklmnopqrst"]
    (e,) = encode_pairs(CharTok(), [Pair(["abcdefghijklmnopqrst"], "xxx", "yyyyyyyy")], "raw", max_length=16)[0]
    assert e.diverge >= 7                                                        # the shared-prefix forward applies


def test_encode_pairs_counts_truncation_and_drops_pairs_made_identical():
    pairs = [Pair(["p" * 30], "same start x", "same start y"), Pair(["q"], "a", "b")]
    out, counts = encode_pairs(CharTok(), pairs, "raw", max_length=12)
    assert counts["truncated_pairs"] == 1 and counts["identical_after_truncation"] == 1 and len(out) == 1
    assert out[0].diverge == 2  # "q a" vs "q b" differ at index 2


def test_split_by_prompt_is_disjoint_and_seeded():
    pairs = [Pair([f"prompt {i % 10}"], f"a{i}", f"b{i}") for i in range(40)]
    tr, ev = split_by_prompt(pairs, 0.2, seed=3)
    assert {p.prompt[0] for p in tr}.isdisjoint({p.prompt[0] for p in ev}) and len(ev) == 8
    assert split_by_prompt(pairs, 0.2, seed=3)[1] == ev
