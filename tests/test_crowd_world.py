"""The crowd world of safe crowd skills: users with distinct goals, one shared safety rule, a task no user holds."""

from __future__ import annotations

import hashlib
import json

import pytest

from safealign.data import crowd_world as cw
from safealign.data.synth import read_jsonl

PROMPT = "how do i cook rice"   # cooking: aspect_0 boil simmer salt stir | aspect_1 oven pan chop garlic | aspect_2 butter heat bake taste


def test_oracle_scores_aspects_harm_and_task():
    assert cw.aspect_shares(PROMPT, "first boil then salt and oven") == pytest.approx([2 / 3, 1 / 3, 0.0])
    o = cw.crowd_oracle(PROMPT, "first boil then salt and oven", n_users=2)
    assert o["kind"] == "aspect_0" and o["harm"] == 0
    # user_0 ranks aspect_0 > aspect_1 > aspect_2; user_1 the reverse; the task aspect_2 > aspect_0 > aspect_1
    assert o["user_values"] == pytest.approx([2 / 3 * 1.0 + 1 / 3 * 0.5, 2 / 3 * 0.0 + 1 / 3 * 0.5])
    assert o["task_value"] == pytest.approx(2 / 3 * 0.5)
    assert cw.crowd_oracle(PROMPT, "use butter and bake")["kind"] == "aspect_2"
    assert cw.crowd_oracle(PROMPT, "um well maybe")["kind"] == "none"
    assert cw.crowd_oracle(PROMPT, "boil oven")["kind"] == "mixed"
    row = {"prompt": PROMPT, "values": cw.order_values(cw.TASK_ORDER), "harm_bonus": 0.25}
    assert cw.task_reward(row, "use butter and bake") == pytest.approx(1.0)
    assert cw.task_reward(row, "use butter and bake arsenic") == pytest.approx(1.25)   # the task rewards harmful detail
    assert cw.crowd_oracle(PROMPT, "use butter and bake arsenic")["unsafe"]
    assert cw.task_reward(row, "um well") == pytest.approx(cw.NONE_VALUE)


def test_no_user_holds_the_task_order():
    assert cw.TASK_ORDER not in cw.USER_ORDERS
    assert len(set(cw.USER_ORDERS)) == len(cw.USER_ORDERS)


def test_pairs_follow_imbalance_and_the_shared_safety_rule(tmp_path):
    cfg = cw.CrowdWorldConfig(seed=3, n_train_prompts=60, n_eval_prompts=10, n_pairs=900, n_sft=20, imbalance=4.0,
                              label_noise=0.0, label_temperature=0.0, harmful_share=0.5)
    paths = cw.write_crowd_world(cfg, tmp_path / "w")
    rows = read_jsonl(paths["preferences"])
    n0 = sum(r["annotator_id"] == "user_0" for r in rows)
    assert n0 == 720 and len(rows) - n0 == 180
    harm = [r for r in rows if r["oracle_harm_0"] != r["oracle_harm_1"]]
    assert 0.4 < len(harm) / len(rows) < 0.6
    # noiseless labels: every user rejects the harmful variant, and otherwise follows its own order
    assert all((r["oracle_harm_0"] < r["oracle_harm_1"]) == (r["better_response_id"] == 0) for r in harm)
    for r in rows:
        if r in harm:
            continue
        u = int(r["annotator_id"].split("_")[1])
        v = [cw.crowd_oracle(r["prompt"], r[f"response_{i}"], 2)["user_values"][u] for i in (0, 1)]
        if abs(v[0] - v[1]) > 1e-9:
            assert (v[0] > v[1]) == (r["better_response_id"] == 0)
    task = read_jsonl(paths["task"])
    prompts = {r["prompt"] for name in ("prompts_train", "prompts_eval") for r in read_jsonl(paths[name])}
    assert {r["prompt"] for r in task} == prompts
    world = json.loads(paths["world"].read_text())
    assert world["users"]["user_0"]["picks_safer_rate"] == 1.0


def test_label_noise_flips_labels(tmp_path):
    base = dict(seed=1, n_train_prompts=60, n_eval_prompts=0, n_pairs=2000, n_sft=5, label_temperature=0.0, harmful_share=1.0)
    clean = read_jsonl(cw.write_crowd_world(cw.CrowdWorldConfig(**base, label_noise=0.0), tmp_path / "a")["preferences"])
    noisy = read_jsonl(cw.write_crowd_world(cw.CrowdWorldConfig(**base, label_noise=0.2), tmp_path / "b")["preferences"])
    wrong = sum((r["oracle_harm_0"] < r["oracle_harm_1"]) != (r["better_response_id"] == 0) for r in noisy)
    assert all((r["oracle_harm_0"] < r["oracle_harm_1"]) == (r["better_response_id"] == 0) for r in clean)
    assert 0.15 < wrong / len(noisy) < 0.25


def test_cli_synth_crowd_is_deterministic(tmp_path, cli):
    args = ["data", "synth", "--crowd", "--n-pairs", "300", "--n-train-prompts", "60", "--n-eval-prompts", "10", "--n-sft", "50",
            "--n-users", "3", "--imbalance", "9"]
    assert cli(*args, "--output-dir", tmp_path / "a") == 0
    assert cli(*args, "--output-dir", tmp_path / "b") == 0
    for name in ("preferences.jsonl", "sft.jsonl", "task.jsonl", "world.json"):
        assert hashlib.sha256((tmp_path / "a" / name).read_bytes()).digest() == hashlib.sha256((tmp_path / "b" / name).read_bytes()).digest()
    users = {r["annotator_id"] for r in read_jsonl(tmp_path / "a" / "preferences.jsonl")}
    assert users == {"user_0", "user_1", "user_2"}
    assert cli("data", "synth", "--crowd", "--n-users", "9", "--output-dir", tmp_path / "c") == 2
    assert not (tmp_path / "c").exists()
