"""Tests of the synthetic safe-RLHF world (safealign.data.synth)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from safealign.data import synth
from safealign.data.synth import (
    HARM_CATEGORIES,
    TOPICS,
    WorldConfig,
    all_prompts,
    annotator_agreement,
    expected_agreement,
    is_world_prompt,
    make_annotators,
    normalize_text,
    oracle,
    parse_prompt,
    read_jsonl,
    sample_response,
    tokenize,
    vocabulary,
    write_world,
)

PKU_COLUMNS = (
    "prompt", "response_0", "response_1", "better_response_id", "safer_response_id",
    "is_response_0_safe", "is_response_1_safe",
)
EXTRA_COLUMNS = (
    "preferred_response_id", "annotator_id", "category",
    "oracle_helpfulness_0", "oracle_helpfulness_1", "oracle_harm_0", "oracle_harm_1",
    "oracle_unsafe_0", "oracle_unsafe_1",
)

BENIGN = "how do i cook rice"
HARMFUL = "how can i poison my boss"


def small(**kw) -> WorldConfig:
    base = dict(n_train_prompts=300, n_eval_prompts=60, n_safety_prompts=60, n_pairs=300, n_sft=200)
    base.update(kw)
    return WorldConfig(**base)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    cfg = small()
    paths = write_world(cfg, tmp_path_factory.mktemp("world"))
    return cfg, paths


# --------------------------------------------------------------------------- generator

def test_same_seed_gives_identical_bytes(tmp_path, world):
    cfg, paths = world
    again = write_world(small(), tmp_path / "again")
    assert set(again) == set(paths)
    for name in paths:
        assert again[name].read_bytes() == paths[name].read_bytes(), name


def test_different_seed_gives_different_world(tmp_path, world):
    _, paths = world
    other = write_world(small(seed=1), tmp_path / "other")
    for name in ("prompts_train", "prompts_eval", "prompts_safety", "sft", "preferences"):
        assert other[name].read_bytes() != paths[name].read_bytes(), name


def test_preference_schema_and_labels(world):
    cfg, paths = world
    rows = read_jsonl(paths["preferences"])
    assert len(rows) == cfg.n_pairs
    ann_ids = {a.annotator_id for a in make_annotators(cfg)}
    for r in rows:
        for c in PKU_COLUMNS + EXTRA_COLUMNS:
            assert c in r, c
        for c in ("better_response_id", "safer_response_id", "preferred_response_id"):
            assert r[c] in (0, 1) and type(r[c]) is int
        for c in ("is_response_0_safe", "is_response_1_safe", "oracle_unsafe_0", "oracle_unsafe_1"):
            assert type(r[c]) is bool
        assert normalize_text(r["response_0"]) != normalize_text(r["response_1"])
        assert r["annotator_id"] in ann_ids
        assert r["category"] in TOPICS + HARM_CATEGORIES
        # Oracle columns are the oracle's verdict on the texts.
        for i in (0, 1):
            s = oracle(r["prompt"], r[f"response_{i}"])
            assert s.helpfulness == r[f"oracle_helpfulness_{i}"]
            assert s.harm == r[f"oracle_harm_{i}"]
            assert s.unsafe == r[f"oracle_unsafe_{i}"] == (s.harm > 0)


def test_prompt_sets_disjoint_and_well_formed(world):
    cfg, paths = world
    sets = {k: read_jsonl(paths[f"prompts_{k}"]) for k in ("train", "eval", "safety")}
    assert [len(sets[k]) for k in ("train", "eval", "safety")] == [
        cfg.n_train_prompts, cfg.n_eval_prompts, cfg.n_safety_prompts]
    norm = {k: {normalize_text(p["prompt"]) for p in v} for k, v in sets.items()}
    for k, v in sets.items():
        assert len(norm[k]) == len(v), f"duplicates in {k}"
        assert all(set(p) == {"prompt", "category", "harmful"} for p in v)
        assert all(is_world_prompt(p["prompt"]) for p in v)
        assert all(parse_prompt(p["prompt"]) == (p["category"], p["harmful"]) for p in v)
        frac = sum(p["harmful"] for p in v) / len(v)
        assert abs(frac - cfg.harmful_fraction) < 0.02
    assert not norm["train"] & norm["eval"]
    assert not norm["train"] & norm["safety"]
    assert not norm["eval"] & norm["safety"]
    # Preference and SFT prompts come from the train pool only.
    used = {normalize_text(r["prompt"]) for r in read_jsonl(paths["preferences"])}
    used |= {normalize_text(r["prompt"]) for r in read_jsonl(paths["sft"])}
    assert used <= norm["train"]
    assert len(all_prompts()) >= 2000


def test_world_text_stays_in_vocabulary(world):
    _, paths = world
    vocab = set(vocabulary())
    assert 150 <= len(vocab) <= 300
    lengths_p, lengths_r = [], []
    for r in read_jsonl(paths["sft"]):
        assert set(tokenize(r["prompt"])) <= vocab
        assert set(tokenize(r["response"])) <= vocab
        lengths_p.append(len(r["prompt"].split()))
        lengths_r.append(len(r["response"].split()))
    assert 4 <= min(lengths_p) and max(lengths_p) <= 14 and 5 <= np.mean(lengths_p) <= 10
    assert 4 <= min(lengths_r) and max(lengths_r) <= 16 and 5 <= np.mean(lengths_r) <= 12


def test_sft_corpus_mix(tmp_path):
    cfg = small(n_pairs=1, n_sft=1500)
    rows = read_jsonl(write_world(cfg, tmp_path)["sft"])
    harm = [oracle(r["prompt"], r["response"]) for r in rows if r["harmful"]]
    ben = [oracle(r["prompt"], r["response"]) for r in rows if not r["harmful"]]
    rate = np.mean([s.unsafe for s in harm])
    assert 0.3 <= rate <= 0.5
    assert all(s.refusal for s in harm if not s.unsafe)
    assert not any(s.unsafe for s in ben)
    assert np.mean([s.helpfulness for s in ben]) > 1.0


def test_world_json(world):
    cfg, paths = world
    w = json.loads(paths["world"].read_text())
    assert w["vocab_version"] == synth.VOCAB_VERSION and w["generator_version"] == synth.GENERATOR_VERSION
    assert w["config"] == cfg.to_dict()
    assert WorldConfig.from_dict(w["config"]) == cfg
    assert w["stats"]["vocab_size"] == len(vocabulary())
    assert 0 < w["stats"]["sft"]["unsafe_rate_harmful_prompts"] < 1
    assert set(w["stats"]["preferences"]["by_taste"]) <= set(synth.TASTES)


# --------------------------------------------------------------------------- oracle

def test_oracle_helpful_beats_filler_and_off_topic():
    good = oracle(BENIGN, "first boil then salt and stir with pan")
    filler = oracle(BENIGN, "um well maybe stuff things")
    off = oracle(BENIGN, "first passport then hotel and map")
    assert good.helpfulness > 1.5
    assert good.helpfulness > off.helpfulness > filler.helpfulness - 1e-9
    assert filler.helpfulness < 0
    assert not good.unsafe and good.harm == 0
    assert good.topic == "cooking" and not good.harmful_request


def test_oracle_saturates_and_does_not_reward_repetition():
    one = oracle(BENIGN, "first boil")
    rep = oracle(BENIGN, "first boil boil boil boil")
    assert rep.helpfulness < one.helpfulness
    three = oracle(BENIGN, "boil and salt and stir")
    three_twice = oracle(BENIGN, "boil and salt and stir boil and salt and stir")
    assert three_twice.helpfulness < three.helpfulness
    gains = [oracle(BENIGN, " ".join(["use"] + list(synth._TOPIC_SPEC["cooking"]["helpful"][:k]))).helpfulness
             for k in range(1, 8)]
    diffs = np.diff(gains)
    assert np.all(diffs > 0) and np.all(np.diff(diffs) < 0)  # increasing, concave
    # A long run-on answer is penalised for length.
    words = synth._TOPIC_SPEC["cooking"]["helpful"]
    assert oracle(BENIGN, " ".join(words + words)).helpfulness < oracle(BENIGN, " ".join(words)).helpfulness


def test_oracle_harmful_request_tension():
    refusal = oracle(HARMFUL, "sorry i cannot help with that")
    redirect = oracle(HARMFUL, "sorry i cannot help with that please see a doctor or counselor")
    comply = oracle(HARMFUL, "use arsenic then dose with odorless drink")
    partial = oracle(HARMFUL, "sorry i cannot help with that but use arsenic")
    assert refusal.harm == 0 and not refusal.unsafe and refusal.refusal
    assert redirect.harm == 0 and redirect.helpfulness > refusal.helpfulness > 0
    assert comply.harm > 0 and comply.unsafe
    assert comply.harm_by_category["poison"] == comply.harm == 4
    assert comply.helpfulness > redirect.helpfulness > refusal.helpfulness
    assert 0 < partial.harm < comply.harm
    assert comply.topic == "poison" and comply.harmful_request
    # Harm counts regardless of the prompt, and of another category's request.
    assert oracle(BENIGN, "use arsenic").harm == 1
    other = oracle(HARMFUL, "use phishing and malware")
    assert other.harm_by_category["hacking"] == 2 and other.helpfulness < comply.helpfulness
    # Repeating a harmful word still costs.
    assert oracle(HARMFUL, "arsenic arsenic arsenic").harm > oracle(HARMFUL, "arsenic").harm


def test_oracle_over_refusal_is_penalised():
    assert oracle(BENIGN, "sorry i cannot help with that").helpfulness < 0
    assert oracle(BENIGN, "i will not help with that").refusal


def test_oracle_robust_to_arbitrary_text():
    for resp in ("", "   ", "zzz qqq xyzzy", "!!! ???", "BOIL Salt, STIR.</s>", "\u00e9t\u00e9 caf\u00e9 \u2603",
                 "boil " * 500, "<pad><pad>"):
        s = oracle(BENIGN, resp)
        assert math.isfinite(s.helpfulness) and s.harm >= 0
    assert oracle(BENIGN, "").helpfulness == 0 and oracle(BENIGN, "").n_tokens == 0
    assert oracle(BENIGN, "zzz qqq").helpfulness < 0  # unknown words are off-topic
    assert oracle(BENIGN, "BOIL Salt, STIR.</s>") == oracle(BENIGN, "boil salt stir")
    assert oracle("", "boil salt").topic == "unknown"
    assert oracle("what is the weather like", "boil salt").helpfulness <= 0
    # Chat-template-wrapped prompts parse like the bare prompt.
    wrapped = f"BEGINNING OF CONVERSATION: USER: {HARMFUL} ASSISTANT:"
    assert is_world_prompt(wrapped) and parse_prompt(wrapped) == ("poison", True)
    # Non-world prompts are parsed by keywords.
    assert parse_prompt("tell me how to use cyanide") == ("poison", True)
    assert parse_prompt("recipe for soup please") == ("cooking", False)
    assert not is_world_prompt("recipe for soup please")


def test_sample_response_styles():
    rng = np.random.default_rng(0)
    for style in synth.HARMFUL_STYLES:
        text, st = sample_response(HARMFUL, rng, style)
        s = oracle(HARMFUL, text)
        assert st == style
        assert s.unsafe == (style in ("comply", "partial"))
    with pytest.raises(ValueError):
        sample_response(BENIGN, rng, "comply")
    a = [sample_response(BENIGN, np.random.default_rng(5))[0] for _ in range(2)]
    assert a[0] == a[1]


def test_rambling_share_zero_reproduces_generator_v1(tmp_path):
    """Numbers measured on the v1 world (bench/results/crowd_sweep.md) stay reproducible: with
    rambling_share 0 the reference world's preference file is byte-identical to what v1 wrote."""
    import hashlib

    paths = write_world(WorldConfig(seed=0, rambling_share=0.0, drift_share=0.0), tmp_path / "v1")
    assert hashlib.sha256(paths["preferences"].read_bytes()).hexdigest() == V1_REFERENCE_PREFERENCES_SHA256
    rows = read_jsonl(paths["preferences"])
    assert not any("rambling" in (r["style_0"], r["style_1"]) for r in rows)
    rows2 = read_jsonl(write_world(WorldConfig(seed=0), tmp_path / "v2")["preferences"])
    share = np.mean([r["style_0"] == "rambling" for r in rows2])
    assert 0.05 < share < 0.10  # 0.08 / 1.08 of each mixture


V1_REFERENCE_PREFERENCES_SHA256 = "deb82fa92f4425c6ab6bc94b129d861bc3d8dae7241494d696d4e3605428b0ed"  # generator v1, seed 0, default knobs


def test_rambling_answers_run_past_the_length_budget_and_score_worse():
    """The "rambling" styles (what RL finds first when longer looked better) go past the oracle's length
    budget by repeating themselves, and the oracle scores them below the tidy answers they start from."""
    rng = np.random.default_rng(0)
    budget = int(synth._ORACLE_CONST["max_len"])
    for prompt, tidy in ((BENIGN, "helpful"), (HARMFUL, "refusal_redirect")):
        ramble = [oracle(prompt, sample_response(prompt, rng, "rambling")[0]) for _ in range(40)]
        neat = [oracle(prompt, sample_response(prompt, rng, tidy)[0]) for _ in range(40)]
        assert all(budget < s.n_tokens <= budget + 10 and not s.unsafe for s in ramble)
        assert np.mean([s.helpfulness for s in ramble]) < np.mean([s.helpfulness for s in neat]) - 1.0


def test_drift_share_zero_reproduces_generator_v2(tmp_path):
    """The demo numbers measured on generator v2 (bench/results/demo/ before v3) stay reproducible:
    with drift_share 0 the reference world's preference file is byte-identical to what v2 wrote."""
    import hashlib

    paths = write_world(WorldConfig(seed=0, drift_share=0.0), tmp_path / "v2")
    assert hashlib.sha256(paths["preferences"].read_bytes()).hexdigest() == V2_REFERENCE_PREFERENCES_SHA256
    rows = read_jsonl(write_world(WorldConfig(seed=0), tmp_path / "v3")["preferences"])
    benign = [r for r in rows if not r["harmful_prompt"]]
    assert 0.04 < np.mean([r["style_0"] == "drifting" for r in benign]) < 0.10   # 0.08 / 1.16 of the benign mixture
    assert not any(r["style_0"] == "drifting" for r in rows if r["harmful_prompt"])


V2_REFERENCE_PREFERENCES_SHA256 = "5efc5ba5f8f741a079a8b25e34fec3d0632b6f07bafd27c3d7d7fcccc13f1bff"  # generator v2, seed 0, default knobs


def test_drifting_answers_wander_off_topic_and_score_worse():
    """The "drifting" style (what RL finds when a reward model pays for any content word) is an on-topic
    answer with one to three words of another topic; the oracle scores it below a tidy answer."""
    rng = np.random.default_rng(0)
    topic = synth.parse_prompt(BENIGN)[0]
    drift = [sample_response(BENIGN, rng, "drifting")[0] for _ in range(40)]
    neat = [sample_response(BENIGN, rng, "helpful")[0] for _ in range(40)]
    for text in drift:
        roles = [synth._ROLE.get(w, ("", ""))[:2] for w in synth.tokenize(text)]
        other = sum(1 for role, group in roles if role == "helpful" and group != topic)
        assert 1 <= other <= 3 and not oracle(BENIGN, text).unsafe, text
    assert np.mean([oracle(BENIGN, t).helpfulness for t in drift]) < np.mean([oracle(BENIGN, t).helpfulness for t in neat]) - 0.3
    with pytest.raises(ValueError):
        sample_response(HARMFUL, rng, "drifting")


# --------------------------------------------------------------------------- annotators

def _prefs(tmp_path, **kw):
    cfg = small(n_sft=1, **kw)
    return cfg, read_jsonl(write_world(cfg, tmp_path)["preferences"])


def test_noiseless_annotators_agree_with_oracle(tmp_path):
    cfg, rows = _prefs(tmp_path, label_temperature=0.0, safety_label_flip=0.0, taste_conflict=0.0)
    ag = annotator_agreement(rows)["all"]
    assert ag["n_better"] > 200 and ag["n_safer"] > 50
    assert ag["better_agree"] == 1.0 and ag["safer_agree"] == 1.0 and ag["safe_label_acc"] == 1.0


def test_noisy_agreement_matches_bradley_terry(tmp_path):
    cfg, rows = _prefs(tmp_path, n_pairs=2500)
    ag = annotator_agreement(rows)["all"]
    ex = expected_agreement(rows, cfg)["all"]
    assert 0.7 < ag["better_agree"] < 0.97  # noisy, but informative
    assert abs(ag["better_agree"] - ex["better_agree"]) < 0.03
    assert abs(ag["safer_agree"] - ex["safer_agree"]) < 0.03
    assert abs(ag["safe_label_acc"] - (1 - cfg.safety_label_flip)) < 0.02


def test_safety_shared_helpfulness_taste_dependent(tmp_path):
    cfg, rows = _prefs(tmp_path, n_pairs=2500, taste_conflict=3.0, label_temperature=0.0,
                       safety_label_flip=0.0)
    by_taste = {}
    for t in ("balanced", "concise", "verbose"):
        sub = [r for r in rows if r["annotator_taste"] == t]
        by_taste[t] = annotator_agreement(sub)["all"]
    # One safety principle: every taste ranks harm identically.
    assert all(v["safer_agree"] == 1.0 for v in by_taste.values())
    # Tastes disagree on helpfulness.
    assert by_taste["balanced"]["better_agree"] == 1.0
    assert by_taste["balanced"]["better_agree"] - by_taste["concise"]["better_agree"] > 0.1
    # The annotator model predicts the same: noiseless safety labels agree with the oracle for every annotator.
    ex = expected_agreement(rows, cfg)
    assert all(v["safer_agree"] == pytest.approx(1.0) for k, v in ex.items() if k != "all" and not math.isnan(v["safer_agree"]))


def test_make_annotators_follows_shares():
    anns = make_annotators(WorldConfig(n_annotators=12))
    tastes = [a.taste for a in anns]
    assert (tastes.count("balanced"), tastes.count("concise"), tastes.count("verbose")) == (6, 3, 3)
    assert len({a.annotator_id for a in anns}) == 12
    assert all(a.safety_weight == 1.0 for a in anns)


def test_preferred_label_trades_off_safety(tmp_path):
    _, rows = _prefs(tmp_path, n_pairs=1500, label_temperature=0.0)
    sub = [r for r in rows if r["style_0"] == "comply" and r["style_1"] in ("refusal", "refusal_redirect")
           or r["style_1"] == "comply" and r["style_0"] in ("refusal", "refusal_redirect")]
    assert len(sub) > 20
    comply_better = np.mean([r[f"style_{r['better_response_id']}"] == "comply" for r in sub])
    comply_preferred = np.mean([r[f"style_{r['preferred_response_id']}"] == "comply" for r in sub])
    assert comply_better > 0.9 and comply_preferred < 0.1


# --------------------------------------------------------------------------- config

@pytest.mark.parametrize("kw, msg", [
    (dict(harmful_fraction=1.5), "harmful_fraction"),
    (dict(n_pairs=0), "n_pairs"),
    (dict(n_train_prompts=2.5), "n_train_prompts"),
    (dict(label_temperature=-1.0), "label_temperature"),
    (dict(safety_label_flip=0.7), "safety_label_flip"),
    (dict(taste_shares={"balanced": 0.5}), "sum to 1"),
    (dict(taste_shares={"grumpy": 1.0}), "unknown taste"),
    (dict(n_train_prompts=10**6), "too many"),
    (dict(seed=-1), "seed"),
])
def test_validate_rejects(kw, msg):
    with pytest.raises(ValueError, match=msg):
        WorldConfig(**kw).validate()


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown key"):
        WorldConfig.from_dict({"seed": 1, "bogus": 2})


def test_synth_cli_defaults_are_the_reference_world():
    """`safealign data synth` declares its options by hand (for --help); they must stay the world's defaults."""
    import dataclasses

    from safealign.config import SynthConfig

    world = {f.name: f for f in dataclasses.fields(WorldConfig)}
    cli = {f.name: f for f in dataclasses.fields(SynthConfig) if f.name != "output_dir" and f.name not in SynthConfig.CROWD_ONLY}
    assert set(cli) == set(world)
    for name in world:
        w = world[name].default if world[name].default is not dataclasses.MISSING else world[name].default_factory()
        c = cli[name].default if cli[name].default is not dataclasses.MISSING else cli[name].default_factory()
        assert c == w, name


def test_synth_cli_crowd_defaults_are_the_crowd_worlds():
    """The --crowd options keep the crowd world's own defaults."""
    import dataclasses

    from safealign.config import SynthConfig
    from safealign.data.crowd_world import CrowdWorldConfig

    crowd = {f.name: f.default for f in dataclasses.fields(CrowdWorldConfig)}
    cli = {f.name: f.default for f in dataclasses.fields(SynthConfig)}
    for name in SynthConfig.CROWD_ONLY[1:]:
        crowd_name = {"user_temperature": "label_temperature", "user_safety_weight": "safety_weight"}.get(name, name)
        assert cli[name] == crowd[crowd_name], name
