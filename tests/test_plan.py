"""`safealign plan`: parameter counts against real models, ZeRO arithmetic, LoRA against peft,
the recommendation, and the CLI's exit codes."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from safealign import plan as P
from safealign.config import PlanConfig
from safealign.errors import BadInput


class _Tok:
    """Just what tiny_config reads from a tokenizer."""

    pad_token_id, bos_token_id, eos_token_id = 0, 2, 3

    def __len__(self):
        return 1024


def _numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _cfg(**kw) -> PlanConfig:
    return PlanConfig(**kw)


# ---- parameter counts -------------------------------------------------------------------------


def test_tiny_param_count_matches_real_models():
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    from safealign.models.loading import tiny_config

    dims = P.tiny_dims()
    assert P.param_count(dims, "lm") == _numel(LlamaForCausalLM(tiny_config(_Tok())))
    assert P.param_count(dims, "score") == _numel(LlamaForSequenceClassification(tiny_config(_Tok(), num_labels=1)))
    # bigger tiny (the train-rm recipe's knobs) and the dims read back from a config.json
    big = tiny_config(_Tok(), hidden=128, layers=3, heads=8)
    d = P.dims_from_config(big.to_dict())
    assert P.param_count(d, "lm") == _numel(LlamaForCausalLM(big))
    assert P.param_count(P.tiny_dims(hidden=128, layers=3, heads=8), "lm") == _numel(LlamaForCausalLM(big))


def test_qwen2_style_dims_bias_tied_gqa():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=512, hidden_size=96, intermediate_size=256, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=2, tie_word_embeddings=True)
    d = P.dims_from_config(cfg.to_dict())
    assert d.qkv_bias and d.tie and d.kv_heads == 2
    assert P.param_count(d, "lm") == _numel(Qwen2ForCausalLM(cfg))


@pytest.mark.parametrize("name,published", [
    ("llama-7b", 6_738_415_616), ("llama-13b", 13_015_864_320), ("llama-3-8b", 8_030_261_248),
    ("mistral-7b", 7_241_732_096), ("qwen2.5-0.5b", 494_032_768), ("qwen2.5-1.5b", 1_543_714_304), ("qwen2.5-7b", 7_615_616_512),
])
def test_presets_match_published_sizes(name, published):
    assert P.param_count(P.resolve_dims(name), "lm") == published


def test_model_names():
    assert P.resolve_dims("Qwen/Qwen2.5-7B-Instruct").name == "qwen2.5-7b"
    assert P.resolve_dims("meta-llama/Llama-2-7b-hf").name == "llama-7b"
    assert P.resolve_dims("PKU-Alignment/alpaca-7b-reproduced").vocab == 32001
    with pytest.raises(BadInput, match="unknown model"):
        P.resolve_dims("someone/unknown-model-7b")
    with pytest.raises(BadInput, match="no model"):
        P.resolve_dims(None)


def test_local_model_directory(tmp_path):
    from safealign.models.loading import tiny_config

    tiny_config(_Tok(), hidden=32, layers=1, heads=2).save_pretrained(tmp_path)
    d = P.resolve_dims(str(tmp_path))
    assert (d.hidden, d.layers, d.heads, d.kv_heads, d.vocab) == (32, 1, 2, 1, 1024)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="no config.json"):
        P.resolve_dims(str(tmp_path / "empty"))


# ---- ZeRO arithmetic ----------------------------------------------------------------------------


def test_zero_partitioning_hand_numbers():
    B = 1e9
    s = lambda zero, off="none", dtype="bf16": P.state_bytes(B, 0, zero=zero, offload=off, devices=8, dtype=dtype)  # noqa: E731
    assert s(0) == {"weights": 2e9, "grads": 2e9, "optimizer": 12e9, "cpu": 0.0}
    assert s(1) == {"weights": 2e9, "grads": 2e9, "optimizer": 12e9 / 8, "cpu": 0.0}
    assert s(2) == {"weights": 2e9, "grads": 2e9 / 8, "optimizer": 12e9 / 8, "cpu": 0.0}
    assert s(3) == {"weights": 2e9 / 8, "grads": 2e9 / 8, "optimizer": 12e9 / 8, "cpu": 0.0}
    assert s(0, dtype="fp32") == {"weights": 4e9, "grads": 4e9, "optimizer": 8e9, "cpu": 0.0}
    # optimizer offload: Adam states + fp32 gradient partition on CPU, at most one reduce bucket of grads on GPU
    off = s(2, "optimizer")
    assert off["optimizer"] == 0 and off["cpu"] == 12e9 / 8 + 4e9 / 8 and off["grads"] == 2e9 / 8
    full = s(3, "optimizer+params")
    assert full["weights"] == 0 and full["cpu"] == 12e9 / 8 + 4e9 / 8 + 2e9 / 8
    big = P.state_bytes(20e9, 0, zero=1, offload="optimizer", devices=1)
    assert big["grads"] == P.GRAD_BUCKET_PARAMS * 2
    # frozen models: weights only, partitioned under ZeRO-3 only
    assert P.state_bytes(0, B, zero=2, offload="none", devices=8)["weights"] == 2e9
    assert P.state_bytes(0, B, zero=3, offload="none", devices=8)["weights"] == 2e9 / 8
    with pytest.raises(ValueError):
        P.state_bytes(B, 0, zero=0, offload="optimizer", devices=8)
    with pytest.raises(ValueError):
        P.state_bytes(B, 0, zero=2, offload="optimizer+params", devices=8)


def test_kv_cache_and_activation_shape():
    d = P.resolve_dims("llama-7b")
    assert P.kv_cache_bytes(d, batch=16, positions=512, dtype="bf16") == 2 * 32 * 32 * 128 * 512 * 16 * 2 == 4 * P.GiB
    a1 = P.activation_bytes(d, batch=1, seq=512, kind="sft")
    a2 = P.activation_bytes(d, batch=2, seq=512, kind="sft")
    ck = P.activation_bytes(d, batch=1, seq=512, kind="sft", checkpointing=True)
    assert a2["saved"] == 2 * a1["saved"] and ck["peak"] < a1["peak"] / 5
    assert P.activation_bytes(d, batch=1, seq=512, attention="eager")["saved"] > P.activation_bytes(d, batch=1, seq=512)["saved"]


def test_activation_formula_against_saved_tensors():
    """The no-checkpointing formula is the bytes autograd keeps, on a tiny padded batch."""
    import torch
    from transformers import LlamaForSequenceClassification

    from safealign.models.loading import tiny_config

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(tiny_config(_Tok(), num_labels=1)).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ids = torch.randint(4, 1024, (4, 32))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=mask)
    planned = P.activation_bytes(P.tiny_dims(), batch=4, seq=32, dtype="fp32", kind="score")["saved"]
    assert abs(planned - sum(seen.values())) / sum(seen.values()) < 0.03


# ---- LoRA ------------------------------------------------------------------------------------------


def test_lora_counts_match_peft():
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    from safealign.models.loading import apply_lora, tiny_config

    dims = P.tiny_dims()
    causal = apply_lora(LlamaForCausalLM(tiny_config(_Tok())), r=8, alpha=16, dropout=0.0, targets="all-linear", task="CAUSAL_LM")
    assert causal.get_nb_trainable_parameters()[0] == P.lora_param_count(dims, 8)
    some = apply_lora(LlamaForCausalLM(tiny_config(_Tok())), r=4, alpha=16, dropout=0.0, targets="q_proj,v_proj", task="CAUSAL_LM")
    assert some.get_nb_trainable_parameters()[0] == P.lora_param_count(dims, 4, "q_proj,v_proj")
    score = apply_lora(LlamaForSequenceClassification(tiny_config(_Tok(), num_labels=1)), r=8, alpha=16, dropout=0.0,
                       targets="all-linear", task="SEQ_CLS")
    st = P.Stage(stage="train-rm", model="tiny", batch_size=4, micro_batch=8, seq=64, lora_r=8)
    roles = P.build_roles(st, dims, lora_r=8, dtype="bf16", attention="sdpa")
    assert sum(r.trainable for r in roles) == score.get_nb_trainable_parameters()[0]   # adapters + the score head copy
    with pytest.raises(BadInput):
        P.lora_targets("q_proj,lm_head")


def test_ppo_lora_shares_one_base():
    dims = P.resolve_dims("llama-7b")
    st = P.Stage(stage="ppo-lag", model="llama-7b", batch_size=16, micro_batch=16, seq=512, new_tokens=256)
    full = P.build_roles(st, dims, lora_r=0, dtype="bf16", attention="sdpa")
    lora = P.build_roles(st, dims, lora_r=16, dtype="bf16", attention="sdpa")
    assert [r.name for r in full] == ["actor", "reference", "reward model", "cost model", "reward critic", "cost critic"]
    lm, sc = P.param_count(dims, "lm"), P.param_count(dims, "score")
    assert sum(r.params for r in full) == 2 * lm + 4 * sc
    adapter = P.lora_param_count(dims, 16)
    # base once (actor + critics + reference), reward and cost models separate
    assert sum(r.params - r.trainable for r in lora) == lm + 2 * sc
    assert sum(r.trainable for r in lora) == 3 * adapter + 2 * dims.hidden


def test_shared_critic_is_one_backbone_with_two_heads():
    dims = P.resolve_dims("llama-7b")
    st = P.Stage(stage="ppo-lag", model="llama-7b", batch_size=16, micro_batch=16, seq=512, new_tokens=256, shared_critic=True)
    full = P.build_roles(st, dims, lora_r=0, dtype="bf16", attention="sdpa")
    assert [r.name for r in full] == ["actor", "reference", "reward model", "cost model", "reward + cost critic (shared)"]
    lm, sc = P.param_count(dims, "lm"), P.param_count(dims, "score")
    assert sum(r.params for r in full) == 2 * lm + 3 * sc + dims.hidden      # one 7B critic (and its Adam state) fewer
    assert sum(r.trainable for r in full) == lm + sc + dims.hidden
    lora = P.build_roles(st, dims, lora_r=16, dtype="bf16", attention="sdpa")
    assert sum(r.trainable for r in lora) == 2 * P.lora_param_count(dims, 16) + 2 * dims.hidden


def test_grpo_lag_has_four_roles_and_g_times_the_rollout():
    dims = P.resolve_dims("llama-7b")
    ppo = P.Stage(stage="ppo-lag", model="llama-7b", batch_size=16, micro_batch=16, seq=512, new_tokens=256)
    grpo = P.Stage(stage="ppo-lag", model="llama-7b", batch_size=16, micro_batch=16, seq=512, new_tokens=256, algorithm="grpo-lag", group_size=4)
    roles = P.build_roles(grpo, dims, lora_r=0, dtype="bf16", attention="sdpa")
    assert [r.name for r in roles] == ["actor", "reference", "reward model", "cost model"]
    lm, sc = P.param_count(dims, "lm"), P.param_count(dims, "score")
    assert sum(r.params for r in roles) == 2 * lm + 2 * sc and sum(r.trainable for r in roles) == lm
    kv = {r.name: r.kv_cache for r in P.build_roles(ppo, dims, lora_r=0, dtype="bf16", attention="sdpa")}["actor"]
    assert {r.name: r.kv_cache for r in roles}["actor"] == 4 * kv       # 16 prompts x G = 4 responses in the rollout
    only = P.Stage(stage="ppo-lag", model="llama-7b", batch_size=16, micro_batch=16, seq=512, new_tokens=256, algorithm="grpo", group_size=4)
    assert [r.name for r in P.build_roles(only, dims, lora_r=0, dtype="bf16", attention="sdpa")] == ["actor", "reference", "reward model"]


# ---- recommendation ---------------------------------------------------------------------------------


def test_recommendation_7b_ppo_lag_8x80():
    plan = P.make_plan(_cfg(model="llama-7b", stage="ppo-lag", gpus=8, gpu_mem="80GB", seq_len=512))
    rec = plan["recommendation"]
    assert rec and rec["zero"] == 3 and rec["offload"] == "none" and rec["checkpointing"]
    assert rec["peak"] <= plan["usable_bytes"]
    # ZeRO-2 without offload does not fit: the optimizer and weights of six 7B models
    z2 = next(r for r in plan["rows"] if r["zero"] == 2 and r["offload"] == "none")
    assert z2["peak_ckpt"] > plan["usable_bytes"]


def test_recommendation_tiny_fits_without_anything():
    plan = P.make_plan(_cfg(model="tiny", stage="train-rm", gpus=1, gpu_mem="8GB"))
    rec = plan["recommendation"]
    assert (rec["zero"], rec["offload"], rec["checkpointing"]) == (0, "none", False)
    assert not plan["suggestions"]


def test_nothing_fits_says_what_would():
    plan = P.make_plan(_cfg(model="llama-7b", stage="sft", gpus=1, gpu_mem="8GB", batch_size=16, seq_len=2048))
    assert plan["recommendation"] is None
    assert any(s.startswith("smaller batch: --batch-size") for s in plan["suggestions"])
    assert P.headline(plan).startswith("Nothing fits sft on 1 x 8.0G")


def test_offload_recommendation_lists_alternatives():
    plan = P.make_plan(_cfg(model="llama-7b", stage="ppo-lag", gpus=1, gpu_mem="80GB", seq_len=512))
    rec = plan["recommendation"]
    assert rec["offload"] == "optimizer+params" and rec["cpu_per_process"] > 100 * P.GiB
    alt = " ".join(plan["alternatives_without_offload"])
    assert "LoRA (lora_r: 16) with ZeRO-0, no offload" in alt and "more GPUs" in alt
    assert "CPU memory per node" in P.headline(plan)


def test_pick_prefers_no_offload_then_low_stage():
    rows = [{"zero": 1, "offload": "optimizer", "peak_nockpt": 10, "peak_ckpt": 5, "lora_r": 0},
            {"zero": 3, "offload": "none", "peak_nockpt": 10, "peak_ckpt": 5, "lora_r": 0},
            {"zero": 2, "offload": "none", "peak_nockpt": 50, "peak_ckpt": 8, "lora_r": 0}]
    assert P._pick(rows, 20, recipe_ckpt=False)["zero"] == 3               # no offload, no checkpointing needed
    r = P._pick(rows, 9, recipe_ckpt=False)
    assert (r["zero"], r["offload"], r["checkpointing"]) == (2, "none", True)
    assert P._pick(rows, 4, recipe_ckpt=True) is None


def test_parse_mem():
    assert P.parse_mem("80GB") == P.parse_mem("80GiB") == P.parse_mem("80") == 80 * P.GiB
    assert P.parse_mem("40960MB") == 40 * P.GiB
    with pytest.raises(BadInput):
        P.parse_mem("lots")


# ---- recipes and CLI -------------------------------------------------------------------------------


def test_recipe_sections(tmp_path):
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "safe-rlhf-7b.yaml"
    plan = P.make_plan(_cfg(config=str(recipe), stage="ppo-lag"))
    assert plan["model"]["name"] == "alpaca-7b-reproduced" and plan["recipe_checkpointing"]
    assert plan["recommendation"]["zero"] == 3
    rm = P.make_plan(_cfg(config=str(recipe), stage="train-rm"))
    assert rm["micro_batch"] == 32 and rm["roles"][0]["name"] == "reward model"
    sectioned = tmp_path / "r.yaml"
    sectioned.write_text("train-rm:\n  model: tiny\n")
    with pytest.raises(BadInput, match="no 'sft' section"):
        P.make_plan(_cfg(config=str(sectioned), stage="sft"))
    flat = tmp_path / "flat.yaml"
    flat.write_text("model: tiny\nlora_r: 4\nbogus_key: 1\n")
    with pytest.raises(BadInput, match="bogus_key"):
        P.make_plan(_cfg(config=str(flat), stage="sft"))
    flat.write_text("model: tiny\nlora_r: 4\n")
    plan = P.make_plan(_cfg(config=str(flat), stage="sft", gpus=1))
    assert plan["rows"][0]["lora_r"] == 4 and not plan["lora_rows"]


def test_cli_exit_codes_and_json(cli, tmp_path, capsys):
    assert cli("plan", "--model", "nobody/no-such-model-7b") == 2
    assert "unknown model" in capsys.readouterr().err
    assert cli("plan", "--model", "llama-7b", "--gpu-mem", "lots") == 2
    out = tmp_path / "plan.json"
    assert cli("plan", "--model", "llama-7b", "--stage", "ppo-lag", "--seq-len", "512", "--output", str(out)) == 0
    printed = capsys.readouterr().out
    assert "reward critic" in printed and "Recommended for ppo-lag on 8 x 80.0G: ZeRO-3" in printed
    data = json.loads(out.read_text())
    assert data["recommendation"]["zero"] == 3 and len(data["roles"]) == 6


def test_run_returns_headline(tmp_path):
    summary = P.run(SimpleNamespace(**{**vars(_cfg(model="tiny", stage="sft", gpus=1, gpu_mem="4GB"))}))
    assert summary["headline"].startswith("Recommended for sft")


def test_zero3_rows_count_the_gathered_actor():
    """ppo-lag under ZeRO-3 samples from the actor gathered once per rollout (zero3_gather, the default):
    one unsharded copy of the actor on every device, which only the ZeRO-3 rows add to the rollout."""
    from peft import LoraConfig
    from transformers import LlamaForCausalLM

    from safealign.models.loading import apply_lora, tiny_config

    dims = P.tiny_dims()
    for lora_r, shared in ((0, False), (8, False), (8, True)):
        st = P.Stage(stage="ppo-lag", model="tiny", batch_size=4, micro_batch=4, seq=64, new_tokens=16, lora_r=lora_r, shared_critic=shared)
        rows = P.evaluate(st, dims, devices=2, dtype="fp32", attention="sdpa", lora_r=lora_r)["rows"]
        off = P.evaluate(P.Stage(**{**st.__dict__, "zero3_gather": False}), dims, devices=2, dtype="fp32", attention="sdpa",
                         lora_r=lora_r)["rows"]
        actor = LlamaForCausalLM(tiny_config(_Tok()))
        if lora_r:   # the actor module: the policy base with the actor's adapter and one adapter per critic (one for both when shared)
            actor = apply_lora(actor, r=8, alpha=16, dropout=0.0, targets="all-linear", task="CAUSAL_LM")
            for name in (("critic",) if shared else ("reward_critic", "cost_critic")):
                actor.add_adapter(name, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        copy = 4 * _numel(actor)
        for r, o in zip(rows, off):
            assert r["rollout_gathered_learner"] == (copy if r["zero"] == 3 else 0)
            assert r["rollout"] - o["rollout"] == r["rollout_gathered_learner"]
            assert o["rollout_gathered_learner"] == 0


def test_recipe_can_turn_the_gather_off(tmp_path):
    on = P.make_plan(_cfg(model="llama-7b", stage="ppo-lag", gpus=8, gpu_mem="80GB", seq_len=512))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("zero3_gather: false\n")
    off = P.make_plan(_cfg(config=str(recipe), model="llama-7b", stage="ppo-lag", gpus=8, gpu_mem="80GB", seq_len=512))
    z3 = lambda plan: next(r for r in plan["rows"] if r["zero"] == 3 and r["offload"] == "none")  # noqa: E731
    assert z3(on)["rollout_gathered_learner"] == 2 * P.param_count(P.resolve_dims("llama-7b"), "lm")   # bf16 copy of the 7B actor
    assert z3(off)["rollout_gathered_learner"] == 0 and z3(on)["rollout"] > z3(off)["rollout"]
    assert "gathered once per rollout" in P.render(on) and "gathered once per rollout" not in P.render(off)


def test_recipe_with_kl_coeff_0_plans_no_reference(tmp_path):
    """kl_coeff 0: ppo-lag loads no reference policy (PPOLagConfig.uses_reference), so the plan counts none."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("algorithm: grpo-lag\nkl_coeff: 0\n")
    st = P.read_stage(_cfg(config=str(recipe), model="llama-7b", stage="ppo-lag", gpus=8, gpu_mem="80GB", seq_len=512))
    assert st.reference is False
    dims = P.resolve_dims("llama-7b")
    roles = P.build_roles(st, dims, lora_r=0, dtype="bf16", attention="sdpa")
    assert [r.name for r in roles] == ["actor", "reward model", "cost model"]
    assert sum(r.params for r in roles) == P.param_count(dims, "lm") + 2 * P.param_count(dims, "score")
    assert "reference" not in [r.name for r in P.build_roles(st, dims, lora_r=16, dtype="bf16", attention="sdpa")]
    recipe.write_text("kl_coeff: 0\n")                               # ppo-lag: the critics stay after the judges
    st = P.read_stage(_cfg(config=str(recipe), model="llama-7b", stage="ppo-lag", gpus=8, gpu_mem="80GB", seq_len=512))
    assert [r.name for r in P.build_roles(st, dims, lora_r=0, dtype="bf16", attention="sdpa")] == [
        "actor", "reward model", "cost model", "reward critic", "cost critic"]
    assert [r.name for r in P.build_roles(st, dims, lora_r=16, dtype="bf16", attention="sdpa")] == [
        "policy base", "actor", "reward model", "cost model", "reward critic", "cost critic"]
    recipe.write_text("algorithm: grpo-lag\n")
    assert P.read_stage(_cfg(config=str(recipe), model="llama-7b", stage="ppo-lag", gpus=8, gpu_mem="80GB", seq_len=512)).reference
