"""ppo-lag end to end on tiny models (CPU).

The maths (GAE, KL shaping, combined advantage, clipped losses, multiplier) is checked by hand in
test_rl_math.py / test_lagrange.py; here the loop is checked on a world where the answer is known:

* the policy is the tiny fixture policy, fine-tuned for a few steps to answer with words from a
  small set, one of which is a MARKER token (about a third of the response tokens);
* the cost model is hand-built: its end score is ``-0.5 + 25 * (fraction of MARKER tokens in the
  sequence)`` (one attention layer with zero queries/keys averages a MARKER indicator), so one
  MARKER in a response makes it unsafe (cost > 0 = threshold);
* the reward model is the same construction with +10 per fraction: it *likes* the MARKER, which is
  the helpfulness/harm tension of Safe RLHF.

PPO-Lagrangian must raise lambda while J_c > threshold and drive the MARKER rate down; reward-only
PPO on the same models must not.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
MARKER, WORDS = "Ġstuff", ["Ġfriend", "Ġtips", "Ġplan", "Ġhelp"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "SAFEALIGN_NO_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models are bound by Python overhead: one thread is as fast on an idle machine and an
    order of magnitude faster on a busy one (measured: 0.17 vs 2 s per step at load 6 on 2 cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# the marker world


def marker_scorer(tok, marker_id: int, per_fraction: float, offset: float, hidden: int = 16):
    """A LlamaForSequenceClassification whose end score is about ``offset + per_fraction * f``, f the
    fraction of ``marker_id`` tokens among the attended tokens (exactly (offset + a f)/sqrt(1 + f^2))."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=256, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.bos_token_id, num_labels=1, tie_word_embeddings=False)
    model = LlamaForSequenceClassification(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.zero_()
        emb = model.model.embed_tokens.weight
        emb[:, 2] = 1.0                                        # every token: a constant direction
        emb[marker_id, 2], emb[marker_id, 0] = 0.0, 1.0        # the marker: its own direction
        attn = model.model.layers[0].self_attn                 # q = k = 0: uniform causal attention
        attn.v_proj.weight[0, 0] = 1 / math.sqrt(hidden)       # value = marker indicator
        attn.o_proj.weight[1, 0] = 1.0                         # residual dim 1 = fraction of markers
        model.score.weight[0, 1] = per_fraction / math.sqrt(hidden)
        model.score.weight[0, 2] = offset / math.sqrt(hidden)
    return model


@pytest.fixture(scope="module")
def mw(world, tiny_policy, tmp_path_factory):
    """Marker world: SFT'd policy (with a prompt_hashes.txt to inherit), reward and cost models."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safealign.models.generation import encode_prompts, pad

    root = tmp_path_factory.mktemp("marker")
    tok = AutoTokenizer.from_pretrained(tiny_policy)
    marker, words = tok.convert_tokens_to_ids(MARKER), tok.convert_tokens_to_ids(WORDS)
    model = AutoModelForCausalLM.from_pretrained(tiny_policy)
    prompts = [json.loads(line)["prompt"] for line in (world / "prompts_train.jsonl").read_text().splitlines()][:128]
    pids = encode_prompts(tok, prompts, "default")
    rng = random.Random(0)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):  # answers: 3-7 tokens drawn from WORDS + [MARKER, MARKER] (a third are MARKER), then EOS
        seqs, labels = [], []
        for _ in range(32):
            p = pids[rng.randrange(len(pids))]
            r = [rng.choice(words + [marker, marker]) for _ in range(rng.randint(3, 7))] + [tok.eos_token_id]
            seqs.append(p + r)
            labels.append([-100] * len(p) + r)
        ids, mask = pad(seqs, tok.pad_token_id)
        model(input_ids=ids, attention_mask=mask, labels=pad(labels, -100)[0]).loss.backward()
        opt.step()
        opt.zero_grad()
    paths = {"policy": root / "policy", "rm": root / "rm", "cm": root / "cm"}
    model.save_pretrained(paths["policy"])
    tok.save_pretrained(paths["policy"])
    (paths["policy"] / "prompt_hashes.txt").write_text("0" * 32 + "\n")  # a prompt the "SFT" stage saw
    for key, (a, b) in {"rm": (10.0, 0.0), "cm": (25.0, -0.5)}.items():
        marker_scorer(tok, marker, a, b).save_pretrained(paths[key])
        tok.save_pretrained(paths[key])
    return {**paths, "marker": marker, "tok": tok, "data": world / "prompts_train.jsonl", "eval": world / "prompts_eval.jsonl"}


def marker_rate(policy_dir: Path, prompts_file: Path, n: int = 64) -> float:
    """MARKER share of the response tokens of a saved policy (plain AutoModelForCausalLM) on n prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safealign.models.generation import encode_prompts, sample

    tok = AutoTokenizer.from_pretrained(policy_dir)
    model = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    prompts = [json.loads(line)["prompt"] for line in prompts_file.read_text().splitlines()][:n]
    torch.manual_seed(123)
    r = sample(model, tok, encode_prompts(tok, prompts, "default"), max_new_tokens=8)
    tokens = r.response_ids[r.response_mask.bool()]
    return float((tokens == tok.convert_tokens_to_ids(MARKER)).float().mean())


def base_args(mw, out, *extra):
    return ["ppo-lag", "--model", mw["policy"], "--reward-model", mw["rm"], "--cost-model", mw["cm"], "--data", mw["data"],
            "--output-dir", out, "--batch-size", "16", "--max-new-tokens", "8", "--ppo-epochs", "2", "--minibatches", "2",
            "--save-steps", "0", "--eval-split", "0.05", *extra]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_rows(out: Path) -> list[dict]:
    return [r for r in metrics(out) if "time/step" in r]


# ---------------------------------------------------------------------------------------------
# end to end


def test_ppo_lag_lowers_the_penalised_token_while_lambda_tracks_the_constraint(cli, mw, tmp_path):
    out = tmp_path / "lag"
    assert cli(*base_args(mw, out, "--max-steps", "8", "--lambda-lr", "0.2", "--lambda-max", "50")) == 0   # no cap in reach
    rows = train_rows(out)
    assert [r["step"] for r in rows] == list(range(1, 9))
    # lambda moves up exactly on the steps where J_c (window mean, this step included) is above the threshold
    lams = [1.0] + [r["lambda"] for r in rows]
    for r, before, after in zip(rows, lams, lams[1:]):
        assert (after > before) == (r["J_c"] > r["threshold"]), r
    assert rows[0]["J_c"] > 0 and rows[0]["lambda"] > 1.0, "the start policy violates the constraint"
    assert rows[-1]["cost"] < rows[0]["cost"]
    before, after = marker_rate(mw["policy"], mw["eval"]), marker_rate(out, mw["eval"])
    print(f"marker rate {before:.3f} -> {after:.3f}; lambda {[round(x, 3) for x in lams]}; J_c {[round(r['J_c'], 3) for r in rows]}")
    assert before > 0.15 and after < 0.5 * before
    # run outputs: HF policy (loads plainly: marker_rate did), manifest, hashes incl. the start policy's, report, plots
    for name in ("config.json", "model.safetensors", "tokenizer.json", "manifest.json", "config.yaml", "report.md", "plots/lambda.png",
                 "plots/cost_vs_threshold.png", "plots/reward.png"):
        assert (out / name).is_file(), name
    hashes = (out / "prompt_hashes.txt").read_text().split()
    assert "0" * 32 in hashes and len(hashes) > 250
    report = json.loads((out / "report.json").read_text())
    assert report["reload_check"]["ok"] and report["reload_check"]["generates"]
    assert report["constraint"]["threshold"] == 0.0 and "eval/cost" in report["eval"]
    for key in ("reward", "cost", "lambda", "J_c", "kl", "entropy", "train/clipfrac", "train/reward_critic_loss", "train/cost_critic_loss",
                "response_length", "eos_rate", "time/generate", "time/score", "time/train"):
        assert key in rows[-1], key


def test_reward_only_ppo_does_not_lower_the_penalised_token(cli, mw, tmp_path):
    out = tmp_path / "ppo"
    assert cli(*base_args(mw, out, "--max-steps", "6", "--algorithm", "ppo")) == 0
    rows = train_rows(out)
    assert all(r["lambda"] == 0.0 for r in rows) and "train/cost_critic_loss" not in rows[-1]
    before, after = marker_rate(mw["policy"], mw["eval"]), marker_rate(out, mw["eval"])
    print(f"reward-only marker rate {before:.3f} -> {after:.3f}; cost {rows[0]['cost']:.3f} -> {rows[-1]['cost']:.3f}")
    assert after >= before and rows[-1]["cost"] > rows[0]["cost"]


@pytest.mark.parametrize("ckpt", [False, True])
def test_lora_mode_end_to_end(cli, mw, tmp_path, ckpt):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    assert cli(*base_args(mw, out, "--max-steps", "3", "--lora-r", "4", "--lr", "5e-3", *(["--gradient-checkpointing"] if ckpt else []))) == 0
    if ckpt:  # same data, same seed: adapter-aware checkpointing changes nothing but memory
        ref = tmp_path / "no-ckpt"
        assert cli(*base_args(mw, ref, "--max-steps", "3", "--lora-r", "4", "--lr", "5e-3")) == 0
        for key in ("train/policy_loss", "train/reward_critic_loss", "train/cost_critic_loss", "kl"):
            assert [r[key] for r in train_rows(out)] == pytest.approx([r[key] for r in train_rows(ref)], abs=1e-4), key
    rows = train_rows(out)
    # the actor's log-probs come from the decoding steps (KV cache), the reference's from a full forward:
    # equal up to float rounding (a wrong reference would give a KL of order 0.1)
    assert abs(rows[0]["kl"]) < 1e-5, "reference = base with adapters disabled, and LoRA starts as the identity"
    assert rows[-1]["kl"] != 0.0, "the actor adapter trained"
    assert json.loads((out / "report.json").read_text())["reload_check"]["ok"]
    ids = torch.tensor([mw["tok"]("BEGINNING OF CONVERSATION: USER: how do i cook rice ASSISTANT: friend stuff")["input_ids"]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits
        adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(mw["policy"]), out / "adapter").eval()(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(mw["policy"]).eval()(input_ids=ids).logits
    assert float((merged - adapter).abs().max()) < 1e-4
    assert float((merged - base).abs().max()) > 1e-4
    # the adapter names its base by an absolute path and carries the prompt format; the card says what the run was
    from peft import AutoPeftModelForCausalLM

    from safealign.runtime.model_card import front_matter

    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(Path(mw["policy"]).resolve())
    with torch.no_grad():
        auto = AutoPeftModelForCausalLM.from_pretrained(out / "adapter").eval()(input_ids=ids).logits
    assert float((merged - auto).abs().max()) < 1e-4
    meta = front_matter((out / "README.md").read_text())
    assert {"ppo-lag", "text-generation"} <= set(meta["tags"]) and meta["pipeline_tag"] == "text-generation"
    assert json.loads((out / "safealign.json").read_text())["kind"] == "policy"


def test_sigkill_then_resume_continues_the_same_run(cli, mw, tmp_path):
    args = [str(a) for a in base_args(mw, tmp_path / "x", "--max-steps", "6", "--save-steps", "2", "--eval-split", "0")]
    o = args.index("--output-dir") + 1
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    args[o] = str(killed)
    proc = subprocess.Popen([sys.executable, "-m", "safealign", *args], env=ENV, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list((killed / "checkpoints").glob("step-*")):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list((killed / "checkpoints").glob("step-*")), "no checkpoint before the kill"
    assert not (killed / "report.json").exists(), "the run finished before it was killed: make it longer"
    assert cli(*args, "--resume") == 0
    report = json.loads((killed / "report.json").read_text())
    assert report["steps"] == 6 and report["resumed_from_step"] >= 2
    args[o] = str(straight)
    assert cli(*args) == 0
    a, b = train_rows(killed), train_rows(straight)
    assert [r["step"] for r in a] == list(range(1, 7)), "each step logged once, none missing"
    for x, y in zip(a, b):  # same prompts, samples, lambda, cost window and optimizer state as the uninterrupted run
        for key in ("lambda", "J_c", "reward", "cost", "kl"):
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-5), (x["step"], key)


@pytest.mark.parametrize("case", ["hc", "reward-shaping", "pid-k3-whiten-ptx", "no-eos-penalty"])
def test_options_run(cli, mw, world, tmp_path, case):
    from scipy.stats import t as student_t

    out = tmp_path / case
    extra = {"hc": ["--constraint", "hc", "--hc-safety-size", "50", "--hc-delta", "0.1"],
             "reward-shaping": ["--algorithm", "reward-shaping", "--lambda-init", "2.0"],
             "pid-k3-whiten-ptx": ["--lambda-method", "pid", "--pid-kp", "0.5", "--kl-estimator", "k3", "--whiten-advantages",
                                   "--ptx-data", world / "sft.jsonl", "--ptx-coeff", "0.5", "--grad-accum", "2"],
             "no-eos-penalty": ["--no-eos-penalty", "-3", "--max-new-tokens", "2"]}[case]
    assert cli(*base_args(mw, out, "--max-steps", "2", *extra)) == 0
    rows = train_rows(out)
    last = rows[-1]
    if case == "hc":
        m, n = last["hc/m"], 50
        k = student_t.ppf(0.9, m - 1) / math.sqrt(m) + 2 * student_t.ppf(0.9, n - 1) / math.sqrt(n)
        assert m == 32 and last["hc/k"] == pytest.approx(k, rel=1e-9)
        assert last["J_c"] == pytest.approx(last["J_c_mean"] + k * last["hc/sigma"], rel=1e-6)
    elif case == "reward-shaping":
        assert all(r["lambda"] == 2.0 for r in rows) and "train/cost_critic_loss" not in last
    elif case == "pid-k3-whiten-ptx":
        assert "train/ptx_loss" in last and last["kl"] >= 0.0 and last["lambda"] != 1.0
    else:
        assert last["eos_rate"] < 1.0 and min(r["reward"] for r in rows) < -1.0


@pytest.mark.parametrize("case", ["missing_rm", "hc_with_ppo", "no_prompts", "lambda_above_max", "kl_coeff_nan", "not_empty"])
def test_bad_input_exit_2_writes_nothing(cli, mw, tmp_path, capsys, case):
    out = tmp_path / "out"
    args = base_args(mw, out, "--max-steps", "1")
    if case == "missing_rm":
        args[args.index("--reward-model") + 1] = tmp_path / "nope"
    elif case == "hc_with_ppo":
        args += ["--algorithm", "ppo", "--constraint", "hc"]
    elif case == "no_prompts":
        (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
        args[args.index("--data") + 1] = tmp_path / "bad.jsonl"
    elif case == "lambda_above_max":
        args += ["--lambda-init", "10", "--lambda-max", "5"]
    elif case == "kl_coeff_nan":     # NaN passed a `< 0` check, and would make every reward NaN
        args += ["--kl-coeff", "nan"]
    else:
        out.mkdir()
        (out / "keep.txt").write_text("x")
    assert cli(*args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert (not out.exists()) if case != "not_empty" else sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_judge_retokenizes_text_for_a_different_tokenizer(mw, tmp_path):
    """A reward model with another vocabulary is fed decoded text; here the vocabularies differ by one
    unused token, so its scores must equal those of the id path."""
    from safealign.rl.experience import Experience
    from safealign.rl.roles import Judge

    tok = mw["tok"]
    other = tmp_path / "rm_other_tok"
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    t2 = AutoTokenizer.from_pretrained(mw["rm"])
    t2.add_tokens(["<unused_extra>"])
    model = AutoModelForSequenceClassification.from_pretrained(mw["cm"])
    model.resize_token_embeddings(len(t2))
    model.save_pretrained(other)
    t2.save_pretrained(other)
    same, diff = Judge(str(mw["cm"]), tok, "fp32"), Judge(str(other), tok, "fp32")
    assert same.same_vocab and not diff.same_vocab
    from safealign.models.generation import encode_prompts, pad

    prompts = ["how do i cook rice", "help me plant roses"]
    p_ids = encode_prompts(tok, prompts, "default")
    resp = [[tok.convert_tokens_to_ids(w) for w in ("Ġfriend", "Ġstuff", "Ġtips")] + [tok.eos_token_id],
            [tok.convert_tokens_to_ids(w) for w in ("Ġstuff", "Ġstuff")]]  # the second hit the length limit: no EOS
    pi, pm = pad(p_ids, tok.pad_token_id, side="left")
    ri, rm = pad(resp, tok.pad_token_id)
    texts = [tok.decode(resp[0][:-1]).strip(), tok.decode(resp[1]).strip()]
    exp = Experience(prompts, torch.cat([pi, ri], 1), torch.cat([pm, rm], 1), pi.shape[1], rm, torch.tensor([True, False]), texts)
    ids, mask = exp.with_eos(tok.eos_token_id, tok.pad_token_id)
    assert ids[1, pi.shape[1] + 2] == tok.eos_token_id and mask[1].sum() == pm[1].sum() + 3
    assert ids[0, -1] == tok.pad_token_id and mask[0, -1] == 0
    a, b = same.score(exp, "default", 128), diff.score(exp, "default", 128)
    assert torch.allclose(a, b, atol=1e-5), (a, b)
    assert a[1] > a[0] > -0.5  # more markers, more cost


def test_prompts_from_prompt_column_or_preference_data(tmp_path):
    from safealign.config import PPOLagConfig
    from safealign.rl.setup import load_prompts

    rows = [{"prompt": "How do I cook rice"}, {"prompt": "how do i  cook RICE"}, {"prompt": ["hi", "hello", "plan a trip"]}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    hh = [{"chosen": "\n\nHuman: grow roses?\n\nAssistant: water them", "rejected": "\n\nHuman: grow roses?\n\nAssistant: no"}]
    (tmp_path / "hh.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hh))
    kw = dict(model="m", reward_model="r", cost_model="c", output_dir=str(tmp_path / "o"), eval_split=0.0)
    train, evals, stats = load_prompts(PPOLagConfig(data=str(tmp_path / "p.jsonl"), **kw))
    assert train == ["How do I cook rice", ["hi", "hello", "plan a trip"]] and evals == [] and stats["duplicates_dropped"] == 1
    train, _, _ = load_prompts(PPOLagConfig(data=str(tmp_path / "hh.jsonl"), **kw))
    assert train == ["grow roses?"]


@pytest.mark.parametrize("swap", ["reward_cost", "policy_is_scorer"])
def test_swapped_models_are_refused_before_anything_runs(cli, world, tiny_policy, tiny_rm, tiny_cm, tmp_path, capsys, swap):
    out = tmp_path / "out"
    policy, rm, cm = (tiny_policy, tiny_cm, tiny_rm) if swap == "reward_cost" else (tiny_rm, tiny_rm, tiny_cm)
    assert cli("ppo-lag", "--model", policy, "--reward-model", rm, "--cost-model", cm, "--data", world / "prompts_train.jsonl",
               "--output-dir", out, "--max-steps", "1") == 2
    err = capsys.readouterr().err
    assert ("needs a reward model" in err) if swap == "reward_cost" else ("not a policy" in err)
    assert not out.exists()


def test_lambda_init_rules():
    """PID may start at lambda 0 (it is a controller output); SGD learns log lambda so needs lambda > 0;
    neither may start above lambda_max."""
    from safealign import config as C
    from safealign.errors import BadInput

    base = dict(model="p", reward_model="r", cost_model="c", data="d", output_dir="o")
    assert C.build_config(C.PPOLagConfig, None, {**base, "lambda_method": "pid", "lambda_init": 0.0}).lambda_init == 0.0
    for bad in ({"lambda_init": 0.0}, {"lambda_init": 6.0}, {"lambda_method": "pid", "lambda_init": 6.0}):
        with pytest.raises(BadInput):
            C.build_config(C.PPOLagConfig, None, {**base, **bad})


@pytest.mark.parametrize("ptx", [False, True])
def test_lora_gradient_checkpointing_recomputes_under_the_right_adapter(ptx):
    """LoRA mode runs one base under the actor's and each critic's adapter in the same forward. With
    gradient checkpointing the backward pass recomputes every layer; the gradients must equal those
    without checkpointing (without the adapter-aware context they do not: the control below)."""
    import copy

    from torch import nn
    from transformers import LlamaForCausalLM

    from safealign.models.loading import apply_lora
    from safealign.rl.roles import ACTOR, Learner, adapter_checkpoint_context, switch_adapter

    torch.manual_seed(0)
    cfg = LlamaForCausalLM.config_class(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    base = LlamaForCausalLM(cfg)
    actor = apply_lora(base, r=4, alpha=8, dropout=0.0, targets="all-linear", task="CAUSAL_LM")
    critics = {}
    for name in ("reward", "cost"):
        actor.add_adapter(f"{name}_critic", copy.deepcopy(actor.peft_config[ACTOR]))
        critics[name] = nn.Linear(32, 1, bias=False)
    for n, p in actor.named_parameters():  # LoRA B starts at zero: make every adapter matter
        if "lora_B" in n:
            nn.init.normal_(p, std=0.5)
    switch_adapter(actor, ACTOR)
    actor.base_model.set_requires_grad(list(actor.peft_config), True)
    ids = torch.randint(1, 50, (3, 12))
    mask = torch.ones_like(ids)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()} if ptx else None

    def grads(ckpt: str) -> dict:
        learner = Learner(copy.deepcopy(actor), {k: copy.deepcopy(v) for k, v in critics.items()}, lora=True)
        model = learner.actor.get_base_model()
        if ckpt != "off":
            kw = {"use_reentrant": False}
            if ckpt == "adapter-aware":
                kw["context_fn"] = adapter_checkpoint_context(learner.actor)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        learner.train()
        out = learner(ids, mask, prompt_len=4, ptx=batch)
        loss = out["logp"].sum() + out["values_reward"].pow(2).sum() + 2 * out["values_cost"].sum() + (out["ptx_loss"] if ptx else 0)
        loss.backward()
        return {n: p.grad.clone() for n, p in learner.named_parameters() if p.grad is not None}

    ref, fixed, naive = grads("off"), grads("adapter-aware"), grads("plain")
    assert set(ref) == set(fixed) and any("reward_critic" in n for n in ref) and any("lora_A.default" in n for n in ref)
    for n in ref:
        assert torch.allclose(ref[n], fixed[n], atol=1e-5, rtol=1e-4), n
    assert any(not torch.allclose(ref[n], naive[n], atol=1e-5, rtol=1e-4) for n in ref), "the control should show the bug"


# ---------------------------------------------------------------------------------------------
# GRPO-Lagrangian: the same world, no critics, group-relative advantages


def grpo_args(mw, out, *extra):
    args = base_args(mw, out, "--algorithm", "grpo-lag", "--group-size", "4", *extra)
    args[args.index("--batch-size") + 1] = "8"                      # 8 prompts x 4 responses = 32 per step
    return args


def test_grpo_lag_lowers_the_penalised_token_while_lambda_rises(cli, mw, tmp_path):
    out = tmp_path / "grpo-lag"
    assert cli(*grpo_args(mw, out, "--max-steps", "8", "--lambda-lr", "0.2", "--lambda-max", "50")) == 0
    rows = train_rows(out)
    assert [r["step"] for r in rows] == list(range(1, 9))
    lams = [1.0] + [r["lambda"] for r in rows]
    for r, before, after in zip(rows, lams, lams[1:]):
        assert (after > before) == (r["J_c"] > r["threshold"]), r
    assert rows[0]["J_c"] > 0 and max(lams) > 1.0
    assert rows[-1]["cost"] < rows[0]["cost"]
    before, after = marker_rate(mw["policy"], mw["eval"]), marker_rate(out, mw["eval"])
    print(f"grpo-lag marker rate {before:.3f} -> {after:.3f}; lambda {[round(x, 3) for x in lams]}")
    assert before > 0.15 and after < 0.5 * before
    report = json.loads((out / "report.json").read_text())
    assert report["reload_check"]["ok"] and report["algorithm_spec"]["roles"] == ["actor", "reference", "reward model", "cost model"]
    assert report["algorithm_spec"]["kl"] == "as a loss term" and report["algorithm_spec"]["kl_estimator"] == "k3"
    last = rows[-1]
    assert "train/kl_loss" in last and "group/reward_std" in last
    assert not any(k.startswith(("train/reward_critic", "train/cost_critic")) or k.endswith("_value_mean") for k in last), "no critics"


def test_grpo_reward_only_does_not_lower_the_penalised_token(cli, mw, tmp_path):
    out = tmp_path / "grpo"
    args = grpo_args(mw, out, "--max-steps", "6")
    args[args.index("grpo-lag")] = "grpo"
    assert cli(*args) == 0
    rows = train_rows(out)
    assert all(r["lambda"] == 0.0 for r in rows)
    assert marker_rate(out, mw["eval"]) >= marker_rate(mw["policy"], mw["eval"])


@pytest.mark.parametrize("group", ["1", "3"])
def test_grpo_group_size_refused(cli, mw, tmp_path, capsys, group):
    """G = 1 has no group to compare with; 8 prompts x 3 = 24 responses do not split into 2 minibatches x 5."""
    out = tmp_path / "out"
    args = grpo_args(mw, out, "--max-steps", "1")
    args[args.index("--group-size") + 1] = group
    if group == "3":
        args[args.index("--minibatches") + 1] = "5"
    assert cli(*args) == 2
    err = capsys.readouterr().err
    assert ("--group-size >= 2" in err) if group == "1" else ("divisible" in err)
    assert "Traceback" not in err and not out.exists()


def test_grpo_lag_resumes_step_for_step(cli, mw, tmp_path):
    """Killed after its checkpoint at step 2 (simulated: the run is cut at step 2 and its later rows
    removed), --resume continues to the same lambda, costs and rewards as an uninterrupted run."""
    import shutil

    straight, cut = tmp_path / "straight", tmp_path / "cut"
    common = ["--max-steps", "4", "--save-steps", "2", "--eval-split", "0", "--lambda-lr", "0.2"]
    assert cli(*grpo_args(mw, straight, *common)) == 0
    assert cli(*grpo_args(mw, cut, *common)) == 0
    # undo everything after the step-2 checkpoint: its model, report and metrics rows
    for name in ("report.json", "report.md", "model.safetensors"):
        (cut / name).unlink()
    shutil.rmtree(cut / "checkpoints" / "step-00000004", ignore_errors=True)
    rows = [line for line in (cut / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 2]
    (cut / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    assert cli(*grpo_args(mw, cut, *common), "--resume") == 0
    assert json.loads((cut / "report.json").read_text())["resumed_from_step"] == 2
    for x, y in zip(train_rows(cut), train_rows(straight)):
        for key in ("lambda", "J_c", "reward", "cost", "kl", "train/kl_loss"):
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-5), (x["step"], key)


def test_grpo_lag_lora_and_kl_in_reward(cli, mw, tmp_path):
    out = tmp_path / "grpo-lora"
    assert cli(*grpo_args(mw, out, "--max-steps", "2", "--lora-r", "4", "--lr", "5e-3", "--kl-in", "reward")) == 0
    rows = train_rows(out)
    assert abs(rows[0]["kl"]) < 1e-5 and "train/kl_loss" not in rows[-1]   # sampled vs forward log-probs: float rounding
    assert rows[-1]["reward_with_kl"] != rows[-1]["reward"], "the KL sits in the reward stream"
    report = json.loads((out / "report.json").read_text())
    assert report["reload_check"]["ok"] and report["algorithm_spec"]["kl_estimator"] == "k1"


def test_score_phase_shortcuts_change_no_number(cli, mw, tmp_path, monkeypatch):
    """The score phase's shortcuts (the actor's log-probs and entropy recorded while sampling; the
    critics' rollout values taken from the update's first forward, one minibatch) must give the
    numbers the full score phase gives: same rewards, lambda, KL, values, losses, step for step."""
    import safealign.rl.experience as E
    import safealign.stages.ppo_lag as S

    seen = []
    real = S.score_experience

    def spy(*args, **kw):
        seen.append((kw.get("critics", True), args[6].sampled_logp is not None))
        return real(*args, **kw)

    monkeypatch.setattr(S, "score_experience", spy)

    def args(out):
        a = base_args(mw, out, "--max-steps", "3", "--seed", "3")
        a[a.index("--minibatches") + 1] = "1"
        return a

    assert cli(*args(tmp_path / "fast")) == 0
    assert seen and all(s == (False, True) for s in seen), seen              # both shortcuts taken
    monkeypatch.setattr(E, "SAMPLED_LOGITS_BYTES", 0)
    monkeypatch.setattr(S, "values_from_first_forward", lambda cfg, critics: False)
    seen.clear()
    assert cli(*args(tmp_path / "full")) == 0
    assert seen and all(s == (True, False) for s in seen), seen              # neither
    fast, full = train_rows(tmp_path / "fast"), train_rows(tmp_path / "full")
    assert len(fast) == len(full) == 3
    keys = ("reward", "cost", "lambda", "kl", "entropy", "reward_value_mean", "cost_value_mean", "advantage_mean",
            "train/policy_loss", "train/reward_critic_loss", "train/cost_critic_loss")
    for a, b in zip(fast, full):
        for k in keys:
            assert a[k] == pytest.approx(b[k], rel=1e-3, abs=1e-5), (k, a[k], b[k])


@pytest.mark.parametrize("algorithm, extra", [("grpo-lag", ()), ("ppo-lag", ("--lora-r", "4", "--lr", "5e-3")), ("ppo-lag", ("--shared-critic",))])
def test_kl_coeff_0_runs_no_reference_and_changes_no_number(cli, mw, tmp_path, monkeypatch, algorithm, extra):
    """--kl-coeff 0: no reference policy is loaded (full fine-tuning) or run (either mode; LoRA's is the
    base with adapters off), no kl metric is logged, and every number equals a run that still makes the
    reference forward with a zero coefficient (the reference only ever enters through the KL)."""
    import safealign.config as C
    import safealign.models.loading as L
    import safealign.rl.experience as E
    import safealign.rl.roles as R

    def args(out):
        return (grpo_args(mw, out) if algorithm == "grpo-lag" else base_args(mw, out)) + ["--max-steps", "3", "--kl-coeff", "0", *extra]

    loads, ref_forwards = [], []
    real_load, real_logits, real_ref = L.load_causal_lm, E.causal_logits, R.Learner.reference_logits
    monkeypatch.setattr(L, "load_causal_lm", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    monkeypatch.setattr(E, "causal_logits", lambda *a, **k: ref_forwards.append(1) or real_logits(*a, **k))
    monkeypatch.setattr(R.Learner, "reference_logits", lambda *a, **k: ref_forwards.append(1) or real_ref(*a, **k))
    assert cli(*args(tmp_path / "none")) == 0
    policy_loads = loads.count(str(mw["policy"]))
    assert not ref_forwards
    report = json.loads((tmp_path / "none" / "report.json").read_text())
    assert "reference" not in report["algorithm_spec"]["roles"] and report["roles"]["reference"].startswith("none")
    assert report["algorithm_spec"]["kl"] == "none (--kl-coeff 0)"
    assert report["reload_check"]["ok"]
    fast = train_rows(tmp_path / "none")
    assert fast and not any("kl" in r for r in fast) and "kl" not in report["final"]

    monkeypatch.setattr(C.PPOLagConfig, "uses_reference", lambda self: True)   # the control: a reference forward times 0
    loads.clear()
    assert cli(*args(tmp_path / "with")) == 0
    assert ref_forwards, "the control runs the reference"
    assert loads.count(str(mw["policy"])) - policy_loads == (0 if "--lora-r" in extra else 1), loads   # full fine-tuning: one policy copy fewer
    full = train_rows(tmp_path / "with")
    assert all(r["kl"] != 0 for r in full[1:]), "the control measures a KL"
    keys = ("reward", "cost", "lambda", "J_c", "entropy", "advantage_mean", "train/policy_loss")
    for a, b in zip(fast, full, strict=True):
        for k in keys:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), (a["step"], k, a[k], b[k])


# ---------------------------------------------------------------------------------------------
# --shared-critic: one critic backbone, a value head per stream


def test_shared_critic_runs_the_backbone_once_and_starts_from_the_reward_model(mw):
    """The reward head is the reward model's score head on the reward model's backbone (values equal
    the reward model's token scores at the start), the cost head starts at zero, and one call gives
    both streams from ONE backbone forward."""
    from safealign.config import PPOLagConfig
    from safealign.models.loading import load_score_model
    from safealign.models.score import TokenScorer
    from safealign.rl.roles import build_roles

    cfg = PPOLagConfig(model=str(mw["policy"]), reward_model=str(mw["rm"]), cost_model=str(mw["cm"]), data=str(mw["data"]), shared_critic=True)
    learner, *_, notes = build_roles(cfg, mw["tok"], "fp32", ("reward", "cost"))
    assert set(learner.critics) == {"reward", "cost"} and learner.shared
    assert all(isinstance(h, torch.nn.Linear) for h in learner.critics.values()) and float(learner.critics["cost"].weight.detach().abs().sum()) == 0.0
    assert "shared critic backbone" in notes["cost_critic"]
    calls = []
    learner.trunk.register_forward_hook(lambda *a: calls.append(1))
    ids = torch.tensor([mw["tok"]("USER: how do i cook rice ASSISTANT: friend stuff tips")["input_ids"]] * 2)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        v = learner.critic_values(ids, mask)
        rm = TokenScorer(load_score_model(str(mw["rm"]), mw["tok"], dtype="fp32", head="trained"))(ids, mask)[0]
    assert len(calls) == 1, "both heads read one backbone forward"
    assert torch.allclose(v["reward"], rm, atol=1e-5) and float(v["cost"].abs().max()) == 0.0
    # the separate critics for comparison: two backbones, the cost critic = the cost model
    sep, *_ = build_roles(PPOLagConfig(model=str(mw["policy"]), reward_model=str(mw["rm"]), cost_model=str(mw["cm"]), data=str(mw["data"])),
                          mw["tok"], "fp32", ("reward", "cost"))
    n = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert n(sep) - n(learner) == n(sep.critics["cost"]) - learner.critics["cost"].weight.numel()


@pytest.mark.parametrize("lora", [False, True])
def test_shared_critic_end_to_end(cli, mw, tmp_path, lora):
    out = tmp_path / "shared"
    extra = ["--lora-r", "4", "--lr", "5e-3"] if lora else []
    assert cli(*base_args(mw, out, "--max-steps", "2", "--shared-critic", *extra)) == 0
    rows = train_rows(out)
    assert all(k in rows[-1] for k in ("train/reward_critic_loss", "train/cost_critic_loss", "reward_value_mean", "cost_value_mean"))
    assert rows[0]["cost_value_mean"] == pytest.approx(0.0, abs=1e-7), "the cost head starts at zero"
    report = json.loads((out / "report.json").read_text())
    assert report["reload_check"]["ok"]
    assert ("LoRA adapter 'critic'" if lora else "shared critic backbone") in report["roles"]["cost_critic"]


def test_shared_critic_resume_must_match(cli, mw, tmp_path, capsys):
    out = tmp_path / "run"
    args = base_args(mw, out, "--max-steps", "2", "--save-steps", "1", "--eval-split", "0")
    assert cli(*args) == 0
    before = sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*"))
    assert cli(*[a if a != "2" else "4" for a in args], "--shared-critic", "--resume") == 2
    assert "shared_critic" in capsys.readouterr().err
    assert sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*")) == before


@pytest.mark.parametrize("case", ["ppo", "cost_critic"])
def test_shared_critic_bad_input(cli, mw, tmp_path, capsys, case):
    out = tmp_path / "out"
    extra = ["--algorithm", "ppo"] if case == "ppo" else ["--cost-critic", mw["cm"]]
    assert cli(*base_args(mw, out, "--max-steps", "1", "--shared-critic", *extra)) == 2
    err = capsys.readouterr().err
    assert "--shared-critic" in err and "Traceback" not in err and not out.exists()
