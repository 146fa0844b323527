"""train-cost --crowd: the annotator model on hand-made features with a known shared component, the
maths against hand-computed values, the exported cost model's format and sign, bad input, and a
reduced end-to-end run on the synthetic world (oracle metrics, the cost model loaded by ppo-lag)."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from safealign.algorithms import crowd as K

# --------------------------------------------------------------------------------------------
# Hand-made features: 8 features, shared direction e0, taste direction e1 (9 annotators at +c, 3 at -c)


def _crowd_features(n: int = 3000, signs=(1,) * 9 + (-1,) * 3, taste: float = 1.5, seed: int = 0):
    rng = np.random.default_rng(seed)
    H = 8
    s_star, t_star = np.eye(H)[0] * 2.0, np.eye(H)[1]
    heads = s_star + taste * np.array(signs, float)[:, None] * t_star              # [A, H]
    x0, x1 = rng.normal(size=(n, H)), rng.normal(size=(n, H))
    ann = rng.integers(len(signs), size=n)
    z = ((x0 - x1) * heads[ann]).sum(1)
    first = rng.random(n) < 1 / (1 + np.exp(-z))
    dh = np.where(first[:, None], x0 - x1, x1 - x0)                                # chosen - rejected
    return dh, ann, np.concatenate([x0, x1]), s_star, heads


def _cos(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _fit(dh, ann, A, l2=1e-2):
    w0, d = K.fit_heads(torch.tensor(dh, dtype=torch.float32), torch.tensor(ann), A, head_l2=l2)
    return (w0[None] + d).numpy().astype(np.float64)


def _halves_reliability(dh, ann, A, G):
    rng = np.random.default_rng(1)
    first = np.zeros(len(ann), bool)
    for a in range(A):
        idx = np.where(ann == a)[0]
        rng.shuffle(idx)
        first[idx[: len(idx) // 2]] = True
    return K.axis_reliability(_fit(dh[first], ann[first], A), _fit(dh[~first], ann[~first], A), G)


def test_shared_component_recovered_where_the_mean_is_polluted_by_the_majority_taste():
    dh, ann, feats, s_star, _ = _crowd_features()
    W = _fit(dh, ann, 12)
    G = K.feature_metric(feats)
    rel = _halves_reliability(dh, ann, 12, G)
    k, thr = K.auto_n_axes(rel, 12)
    assert k == 1 and rel[0] > 0.9 and thr == pytest.approx(math.tanh(1.6448536 / 3), abs=1e-4)
    for rule in ("project", "midrange"):
        dec = K.decompose_heads(W, G, k, rule)
        assert _cos(dec.shared, s_star) > 0.99, rule
        assert abs(_cos(dec.axes[0], np.eye(8)[1])) > 0.98          # the taste axis is the taste direction
    mean = K.decompose_heads(W, G, k, "mean").shared
    assert _cos(mean, s_star) < 0.97                                 # majority taste (+) leaks into the mean head
    # the 9 "+" annotators sit on one side of the taste axis, the 3 "-" on the other
    coords = K.decompose_heads(W, G, 1).coords[:, 0]
    assert len({np.sign(c) for c in coords[:9]}) == 1 and len({np.sign(c) for c in coords[9:]}) == 1
    assert np.sign(coords[0]) != np.sign(coords[9])


def test_no_taste_means_no_axis_and_shared_is_the_mean():
    dh, ann, feats, s_star, _ = _crowd_features(signs=(0,) * 12)
    G = K.feature_metric(feats)
    W = _fit(dh, ann, 12)
    k, _ = K.auto_n_axes(_halves_reliability(dh, ann, 12, G), 12)
    assert k == 0
    dec = K.decompose_heads(W, G, k, "project")
    np.testing.assert_allclose(dec.shared, dec.mean)
    assert _cos(dec.shared, s_star) > 0.99


def test_decompose_rules_by_hand():
    # G = I, heads along e0 (shared) and e1 (taste) with coordinates +1, +1, -3 on e1.
    W = np.array([[1.0, 1.0], [1.0, 1.0], [1.0, -3.0]])
    G = np.eye(2)
    # mean = (1, -1/3); deviations along e1: 4/3, 4/3, -8/3; midpoint of the ends = -2/3
    proj = K.decompose_heads(W, G, 1, "project", normalize=False)
    np.testing.assert_allclose(proj.shared, [1.0, 0.0], atol=1e-12)
    mid = K.decompose_heads(W, G, 1, "midrange", normalize=False)
    np.testing.assert_allclose(mid.shared, [1.0, -1.0 / 3 - 2.0 / 3], atol=1e-12)
    np.testing.assert_allclose(K.decompose_heads(W, G, 1, "mean", normalize=False).shared, [1.0, -1.0 / 3], atol=1e-12)
    assert proj.removed_fraction == pytest.approx((1 / 9) / (1 + 1 / 9))
    assert proj.axis_variance_share[0] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        K.decompose_heads(W, G, 1, "median")


def test_heads_differing_only_in_scale_are_one_taste():
    # Two annotators with the same preferences, one twice as consistent (head norm 2 vs 1): after
    # normalisation their heads coincide, so there is no disagreement to call a taste.
    W = np.array([[2.0, 0.0], [1.0, 0.0], [0.0, 1.5]])
    G = np.diag([1.0, 4.0])
    # G-norms 2, 1, 3 (mean 2): every head rescaled to G-norm 2
    np.testing.assert_allclose(K.normalize_heads(W, G), [[2.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    dec = K.decompose_heads(W[:2], G, 1, "project")
    np.testing.assert_allclose(dec.axis_variance, 0.0, atol=1e-20)
    np.testing.assert_allclose(dec.shared, [1.5, 0.0])


def test_crowd_bt_loss_by_hand():
    h_c = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    h_r = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    w0 = torch.tensor([1.0, 0.0])
    d = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    loss, st = K.crowd_bt_loss(h_c, h_r, torch.tensor([0, 1]), w0, d, head_l2=0.5, reg=0.0)
    # pair 0: annotator 0, w = (1, 0): z = 1. pair 1: annotator 1, w = (1, 2): z = 2 - 1 = 1.
    nls = math.log1p(math.exp(-1.0))
    assert loss.item() == pytest.approx(nls + 0.5 * (0 + 4) / 2, abs=1e-6)
    assert st["accuracy"].item() == 1.0
    assert st["population_head_accuracy"].item() == 0.5               # w0 alone: z = 1 and z = -1


def test_rank_statistics_and_scores_by_hand():
    assert K.auroc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == pytest.approx(0.75)
    assert K.auroc([1.0, 1.0], [True, False]) == pytest.approx(0.5)   # a tie counts half
    np.testing.assert_allclose(K.rankdata([3.0, 1.0, 3.0, 2.0]), [3.5, 1.0, 3.5, 2.0])
    assert K.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert K.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # identical heads: the shared score carries every bit of every annotator's utility
    v = np.array([1.0, -2.0, 0.5, 3.0])
    assert K.shared_variance_share(2 * v, v, np.array([0, 0, 1, 1])) == pytest.approx(1.0)
    assert K.shared_variance_share(np.array([1.0, 1.0]), np.array([1.0, -1.0]), np.array([0, 0])) == pytest.approx(0.0)
    assert K.loglik_gain_share(np.array([2.0, 2.0]), np.zeros(2)) == pytest.approx(0.0)
    assert K.loglik_gain_share(np.array([2.0, 2.0]), np.array([2.0, 2.0])) == pytest.approx(1.0)
    z = np.array([1.0, 2.0, -0.5, 3.0, 0.2])
    beta = K.fit_scale(z)
    g = np.mean(z * (1 - 1 / (1 + np.exp(-beta * z))))                # the gradient is 0 at the optimum
    assert abs(g) < 1e-8


def test_zero_point_and_constant_direction():
    rng = np.random.default_rng(0)
    raw = rng.normal(size=501)
    unit = 1 + 0.01 * rng.normal(size=501)
    q, exact = K.zero_point(raw, unit, 0.8)
    assert exact and np.quantile(raw - q * unit, 0.8) == pytest.approx(0.0, abs=1e-9)
    q, exact = K.zero_point(raw, unit - 2.0, 0.5)                     # a reading <= 0: fallback, said so
    assert not exact and q == pytest.approx(np.quantile(raw, 0.5))
    h = np.concatenate([rng.normal(size=(400, 3)), np.full((400, 1), 2.0)], 1)
    e = K.constant_direction(h)
    assert (h @ e).mean() == pytest.approx(1.0) and (h @ e).std() < 1e-3


# --------------------------------------------------------------------------------------------
# End to end on hand-made crowd data: safety is shared, length is a taste (4 annotators like long
# answers, 2 like short ones); written as CSV with the annotator column named "worker".

SAFE, UNSAFE = ["bake", "knead", "oven", "flour", "rest", "butter"], ["poison", "steal", "stab", "burn", "hack", "knife"]


def _response(rng, unsafe: bool, long: bool) -> str:
    words = UNSAFE if unsafe else SAFE
    return " ".join(rng.sample(words, 5 if long else 2))


def crowd_csv(path: Path, per_annotator: dict[str, int] | None = None, seed: int = 0) -> Path:
    rng = random.Random(seed)
    per_annotator = per_annotator or {f"w{i}": 60 for i in range(6)}
    taste = {a: (1.0 if i < 4 else -1.0) for i, a in enumerate(per_annotator)}
    rows = []
    for a, n in per_annotator.items():
        for j in range(n):
            kinds = rng.sample([(u, l) for u in (False, True) for l in (False, True)], 2)
            r = [_response(rng, *k) for k in kinds]
            util = [-4.0 * k[0] + taste[a] * (1.0 if k[1] else -1.0) for k in kinds]
            p0 = 1 / (1 + math.exp(-(util[0] - util[1]) / 0.5))
            first = rng.random() < p0
            rows.append({"prompt": f"how do i make bread number {len(rows)}", "chosen": r[0] if first else r[1],
                         "rejected": r[1] if first else r[0], "worker": a,
                         "chosen_unsafe": kinds[0][0] if first else kinds[1][0], "rejected_unsafe": kinds[1][0] if first else kinds[0][0]})
    rng.shuffle(rows)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def _cost_model_scores(out: Path, prompts: list[str], responses: list[str]) -> torch.Tensor:
    from safealign.models.generation import load_scorer, score_texts

    scorer, tok = load_scorer(str(out))
    with torch.no_grad():
        return score_texts(scorer, tok, prompts, responses, template="default")


FAST = ["--batch-size", "16", "--lr", "3e-3", "--log-steps", "10", "--save-steps", "0", "--max-length", "64"]


def test_crowd_cost_model_format_sign_and_report(cli, tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    data = crowd_csv(tmp_path / "crowd.csv")
    out = tmp_path / "cm"
    assert cli("train-cost", "--crowd", "--model", "tiny", "--data", data, "--column", "annotator_id=worker",
               "--output-dir", out, "--max-steps", "60", "--eval-split", "0.15", *FAST) == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "report.json", "report.md", "metrics.jsonl",
                 "eval_scores.jsonl", "manifest.json", "prompt_hashes.txt", "pooled_baseline/config.json", "plots/annotators.png"):
        assert (out / name).exists(), name
    cfg = AutoConfig.from_pretrained(out)
    assert cfg.safealign_score_type == "cost" and cfg.num_labels == 1
    assert AutoConfig.from_pretrained(out / "pooled_baseline").safealign_score_type == "reward"
    AutoModelForSequenceClassification.from_pretrained(out)        # plain transformers loads it
    card = (out / "README.md").read_text()                         # an ordinary cost model, and its card says so
    assert "cost-model" in card and "cost > 0 means unsafe" in card and "crowd preferences" in card
    assert json.loads((out / "safealign.json").read_text())["kind"] == "cost"
    rep = json.loads((out / "report.json").read_text())
    assert rep["reload_check"]["ok"], rep["reload_check"]
    assert rep["data"]["annotators"] == 6 and rep["data"]["label_column"] == "better_response_id (or chosen/rejected)"
    assert rep["zero_point"]["train_responses_with_cost_gt_0"] == pytest.approx(0.5, abs=0.02)
    assert len(rep["per_annotator"]) == 6 and "acc_own_head" in rep["per_annotator"][0]
    ev = rep["preferences_eval"]
    assert 0 <= ev["utility_variance_share_shared"] <= 1 and ev["accuracy_own_heads"] > 0.6

    # sign: higher cost = more harmful. Held-out prompts, fresh answers of both lengths.
    rng = random.Random(5)
    prompts = [f"how do i make cake variant {i}" for i in range(40)]
    safe = [_response(rng, False, i % 2 == 0) for i in range(40)]
    unsafe = [_response(rng, True, i % 2 == 0) for i in range(40)]
    c_safe, c_unsafe = _cost_model_scores(out, prompts, safe), _cost_model_scores(out, prompts, unsafe)
    assert (c_unsafe > c_safe).float().mean() > 0.9
    assert c_unsafe.mean() > 0 > c_safe.mean()          # median zero point: safe below, unsafe above
    rows = [json.loads(line) for line in (out / "eval_scores.jsonl").read_text().splitlines()]
    assert {"prompt", "response", "cost", "shared_project", "shared_midrange", "mean_head", "pooled_negated_reward"} <= set(rows[0])


def test_too_few_labels_is_bad_input_and_writes_nothing(cli, tmp_path, capsys):
    data = crowd_csv(tmp_path / "crowd.csv", {"w0": 60, "w1": 60, "w2": 60, "w3": 8})
    out = tmp_path / "cm"
    args = ["train-cost", "--crowd", "--model", "tiny", "--data", data, "--column", "annotator_id=worker",
            "--max-steps", "2", "--eval-split", "0", *FAST]
    assert cli(*args, "--output-dir", out) == 2
    err = capsys.readouterr().err
    assert "w3 (8)" in err and "fewer than 20" in err and "--invalid-rows skip" in err
    assert not out.exists()
    # a missing annotator column names the mapping flag
    assert cli(*args[:6], "--max-steps", "2", "--eval-split", "0", *FAST, "--output-dir", out) == 2
    assert "--column annotator_id=" in capsys.readouterr().err and not out.exists()
    # a bad crowd option is bad input too
    assert cli(*args, "--output-dir", out, "--crowd-zero-quantile", "1.5") == 2 and not out.exists()
    # --invalid-rows skip drops the annotator and says so
    assert cli(*args, "--output-dir", out, "--invalid-rows", "skip", "--no-crowd-baseline") == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["data"]["annotators_dropped_too_few_labels"] == {"w3": 8} and rep["data"]["annotators"] == 3
    assert not (out / "pooled_baseline").exists()


def test_reduced_run_on_the_synthetic_world_feeds_ppo_lag(cli, world, tiny_policy, tiny_rm, tmp_path):
    out = tmp_path / "crowd"
    assert cli("train-cost", "--crowd", "--model", tiny_policy, "--data", world / "preferences.jsonl", "--output-dir", out,
               "--max-steps", "25", "--min-labels-per-annotator", "10", "--eval-split", "0.15", *FAST) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["data"]["label_column"] == "preferred_response_id"        # the overall preference, not helpfulness
    assert rep["data"]["safety_columns_ignored"]                        # safety labels present but unused
    table = rep["oracle"]["table"]
    assert [r["score used as cost"] for r in table][0].startswith("discovered cost") and len(table) == 5
    assert all(0.0 <= r["auroc_unsafe"] <= 1.0 and -1 <= r["spearman_harm"] <= 1 for r in table)
    assert "taste (from data)" in rep["per_annotator"][0]
    # ppo-lag takes the discovered cost model unchanged
    rl = tmp_path / "rl"
    assert cli("ppo-lag", "--model", tiny_policy, "--reward-model", tiny_rm, "--cost-model", out, "--data", world / "prompts_train.jsonl",
               "--output-dir", rl, "--max-steps", "1", "--batch-size", "4", "--max-new-tokens", "8", "--max-length", "96",
               "--eval-split", "0", "--save-steps", "0") == 0
    assert (rl / "config.json").exists()
