"""ppo-lag: PPO-Lagrangian (Safe RLHF) on accelerate, readable top to bottom.

One step of ``run`` (research/safe-rlhf.md §4) is::

    1. rollout   each process samples one response per prompt of its own shard
                 (left-padded prompts, response-only right-padded masks up to the first EOS)
    2. score     old log-probs and values (actor, reward/cost critics), reference log-probs,
                 reward R and cost C (frozen score models: end score at EOS)
    3. lambda    the episode costs join a window; J_c (its mean over every process, or the HC-RLHF
                 pessimistic bound mean + k*std) moves log-lambda by gradient ascent on J_c - threshold
    4. shape     per-token streams: r_t = -beta*kl_t + [t=end] R,  c_t = +beta*kl_t + [t=end] C, clipped
    5. GAE       per stream; A = (A_r - lambda*A_c) / (1 + lambda)
    6. PPO       epochs x minibatches of the clipped surrogate + clipped value losses (+ PTX)

Every formula lives in ``safealign.algorithms`` (rl, lagrange, hc); this file is the loop.

Roles: actor (trained, from --model), reference (frozen copy; with --lora-r the base with the
adapters disabled), reward and cost models (frozen; re-tokenized from text when their tokenizer
differs from the actor's), reward and cost critics (trained; from the reward/cost models by
default, or with --lora-r LoRA adapters + linear value heads on the actor's frozen base).

Responses that hit --max-new-tokens without EOS are scored as generated with an EOS appended for
the score models (so the end score is read at an EOS, as in training) and counted (eos_rate);
--no-eos-penalty X replaces their reward by X instead.

Baselines (--algorithm): ``ppo`` is reward-only PPO (lambda = 0, no cost critic; a given cost model
is still scored for the metrics); ``reward-shaping`` trains on the terminal reward R - lambda_init*C
with one critic (Safe RLHF's fixed-lambda baseline).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from safealign.algorithms import hc as HC
from safealign.algorithms import rl as RL
from safealign.algorithms.lagrange import EpisodeCostWindow, LagrangeMultiplier
from safealign.config import PPOLagConfig, to_dict
from safealign.errors import BadInput
from safealign.models.generation import decode_responses, encode_prompts, sample, score_texts
from safealign.models.loading import local_load
from safealign.models.score import TokenScorer, backbone, position_ids_from_mask

ACTOR = "default"            # peft's name for the first adapter: saved at adapter/ without a sub-folder
TINY_PARAMS = 10_000_000     # below this, default learning rates are those of a from-scratch tiny model
RESUME_KEYS = ("data", "model", "reward_model", "cost_model", "reward_critic", "cost_critic", "seed", "batch_size",
               "grad_accum", "minibatches", "ppo_epochs", "max_steps", "epochs", "lora_r", "algorithm", "constraint",
               "max_new_tokens", "max_length", "template", "episode_cost_window", "lambda_method", "eval_split")


# =============================================================================================
# Roles
# =============================================================================================


def switch_adapter(peft_model, adapter: str) -> None:
    """Make ``adapter`` the active LoRA adapter, keeping every adapter trainable (peft's set_adapter
    freezes the others; the single optimizer and DDP expect them all trainable). Both calls walk every
    module, so an adapter that is already active is left alone."""
    tuner = peft_model.base_model
    if tuner.active_adapter == adapter:
        return
    tuner.set_adapter(adapter)
    tuner.set_requires_grad(list(peft_model.peft_config), True)


def adapter_checkpoint_context(peft_model):
    """``context_fn`` for torch's non-reentrant checkpointing of a base shared by several adapters.

    One forward of the learner runs the base under the actor's adapter, then under each critic's;
    the backward pass recomputes every checkpointed layer, and a LoRA layer reads the active adapter
    when it is called, so without this every layer would be recomputed under the adapter active at
    backward time (the last one used) and the actor's gradients would come from a critic's weights.
    The recompute context re-activates the adapter that was active when the layer ran forward."""

    def context_fn():
        at_forward = peft_model.base_model.active_adapter

        @contextmanager
        def recompute():
            at_backward = peft_model.base_model.active_adapter
            switch_adapter(peft_model, at_forward)
            try:
                yield
            finally:
                switch_adapter(peft_model, at_backward)

        return nullcontext(), recompute()

    return context_fn


class Learner(nn.Module):
    """Everything PPO trains, in one module: one DDP/DeepSpeed wrapper and one backward per
    minibatch cover the actor and both critics (their parameters are disjoint, so one optimizer with
    two learning-rate groups equals separate optimizers).

    full fine-tuning: ``actor`` a causal LM; ``critics[name]`` a TokenScorer (seq-cls model).
    LoRA:             ``actor`` a PeftModel over one frozen base with adapters ``default`` (actor),
                      ``reward_critic`` and ``cost_critic``; ``critics[name]`` a linear value head
                      on the base's last hidden state under that critic's adapter.
    """

    def __init__(self, actor: nn.Module, critics: dict[str, nn.Module], lora: bool):
        super().__init__()
        self.actor = actor
        self.critics = nn.ModuleDict(critics)
        self.lora = lora

    # -- adapters (LoRA mode) -------------------------------------------------------------
    def _use(self, adapter: str) -> None:
        if self.lora:
            switch_adapter(self.actor, adapter)

    # -- forward pieces ---------------------------------------------------------------------
    def policy(self) -> nn.Module:
        """The causal LM to generate with (actor adapter active)."""
        self._use(ACTOR)
        return self.actor

    def logits(self, ids: torch.Tensor, mask: torch.Tensor, keep: int = 0) -> torch.Tensor:
        """[B, L] -> [B, L, V], or only the last ``keep`` positions [B, keep, V] (no lm_head on the prompt)."""
        self._use(ACTOR)
        return causal_logits(self.actor, ids, mask, keep)

    @torch.no_grad()
    def reference_logits(self, ids: torch.Tensor, mask: torch.Tensor, keep: int = 0) -> torch.Tensor:
        """LoRA mode: the reference is the base with every adapter disabled."""
        with self.actor.disable_adapter():
            return causal_logits(self.actor, ids, mask, keep)

    def values(self, name: str, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # [B, L] -> [B, L]
        if not self.lora:
            return self.critics[name](ids, mask)[0]
        self._use(f"{name}_critic")
        hidden = backbone(self.actor)(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).last_hidden_state
        return self.critics[name](hidden).squeeze(-1).float()

    def forward(self, ids, mask, prompt_len: int, with_entropy: bool = False, ptx: dict | None = None) -> dict:
        """ids/mask [B, P+T] (prompt left-padded to P, response right-padded) ->
        logp [B, T] of the response tokens, values_<name> [B, T] (state before each response
        token), optionally entropy [B, T] and the PTX language-modelling loss."""
        P, T = prompt_len, ids.shape[1] - prompt_len
        logits = self.logits(ids, mask, keep=T + 1)[:, :-1]                             # [B, T, V] at P-1..L-2: predicts response
        out = {"logp": RL.logprobs_from_logits(logits, ids[:, P:])}                      # [B, T]
        if with_entropy:
            out["entropy"] = RL.entropy_from_logits(logits)                              # [B, T]
        for name in self.critics:
            out[f"values_{name}"] = self.values(name, ids, mask)[:, P - 1:-1]            # [B, T]
        if ptx is not None:
            lm = self.logits(ptx["input_ids"], ptx["attention_mask"])[:, :-1].float()    # [B', L'-1, V]
            out["ptx_loss"] = F.cross_entropy(lm.reshape(-1, lm.shape[-1]), ptx["labels"][:, 1:].reshape(-1), ignore_index=-100)
        return out

    def param_groups(self) -> tuple[list, list]:
        """(actor parameters, critic parameters), trainable only."""
        actor, critic = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            is_actor = (f".{ACTOR}." in name) if self.lora and name.startswith("actor.") else name.startswith("actor.")
            (actor if is_actor else critic).append(p)
        return actor, critic


def causal_logits(model, ids: torch.Tensor, mask: torch.Tensor, keep: int = 0) -> torch.Tensor:
    """Logits of a causal LM with positions counted over attended tokens (as generate() does for
    left-padded prompts); ``keep`` > 0 computes the lm_head on the last ``keep`` positions only."""
    return model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), logits_to_keep=keep).logits


class Judge:
    """A frozen reward or cost model. Same vocabulary as the actor: the rollout ids are scored as
    they are (EOS appended when missing); otherwise prompt and response are decoded to text and
    re-encoded with the judge's tokenizer (data.encode: prompt + response + EOS)."""

    def __init__(self, path: str, policy_tok, dtype: str):
        from safealign.models.loading import load_score_model, load_tokenizer

        self.path = path
        self.tok = load_tokenizer(path)
        self.model = TokenScorer(load_score_model(path, self.tok, dtype=dtype)).eval().requires_grad_(False)
        self.same_vocab = same_tokenizer(self.tok, policy_tok)

    @torch.no_grad()
    def score(self, exp: "Experience", template: str, max_length: int) -> torch.Tensor:    # -> [B] float32
        if self.same_vocab:
            ids, mask = exp.with_eos(self.tok.eos_token_id, self.tok.pad_token_id)
            dev = next(self.model.parameters()).device
            return self.model(ids.to(dev), mask.to(dev))[1].float().to(exp.seq.device)
        return score_texts(self.model, self.tok, exp.prompts, exp.texts, template=template, max_length=max_length,
                           batch_size=len(exp.texts)).to(exp.seq.device)


def same_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id and a.pad_token_id == b.pad_token_id


@contextmanager
def on_device(modules: list, device, enabled: bool):
    """--offload-frozen: frozen models live on CPU and visit the accelerator only while in use."""
    if not enabled or torch.device(device).type == "cpu":
        yield
        return
    for m in modules:
        m.to(device)
    try:
        yield
    finally:
        for m in modules:
            m.to("cpu")


def disable_dropout(model: nn.Module) -> None:
    """PPO ratios assume the same function at rollout and update time: no dropout anywhere."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


def count_params(model: nn.Module) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3 partitions: ds_numel is the full size


def build_roles(cfg: PPOLagConfig, tok, frozen_dtype: str, acc=None):
    """(learner, reference or None, reward judge, cost judge or None, notes). Loads everything:
    any unusable path or tokenizer is BadInput, raised before the output directory is touched."""
    from safealign.models.loading import apply_lora, check_model_kind, load_causal_lm, load_score_model, load_tokenizer

    check_model_kind(cfg.model, "policy", "--model")
    check_model_kind(cfg.reward_model, "reward model", "--reward-model", "reward")
    if cfg.cost_model:
        check_model_kind(cfg.cost_model, "cost model", "--cost-model", "cost")
    critic_names = ["reward", "cost"] if cfg.algorithm == "ppo-lag" else ["reward"]
    notes: dict = {}
    with local_load():
        reward = Judge(cfg.reward_model, tok, frozen_dtype)
        cost = Judge(cfg.cost_model, tok, frozen_dtype) if cfg.cost_model else None
    notes["reward_model"] = {"path": cfg.reward_model, "fed": "token ids" if reward.same_vocab else "re-tokenized text"}
    if cost is not None:
        notes["cost_model"] = {"path": cfg.cost_model, "fed": "token ids" if cost.same_vocab else "re-tokenized text"}
    actor = load_causal_lm(cfg.model, tok, dtype="fp32", revision=cfg.revision)
    if cfg.lora_r:
        actor = apply_lora(actor, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_targets, task="CAUSAL_LM")
        import copy

        hidden = actor.get_base_model().config.hidden_size
        critics = {}
        for name in critic_names:
            actor.add_adapter(f"{name}_critic", copy.deepcopy(actor.peft_config[ACTOR]))
            critics[name] = nn.Linear(hidden, 1, bias=False)
            nn.init.zeros_(critics[name].weight)          # V = 0 at the start
            notes[f"{name}_critic"] = f"LoRA adapter '{name}_critic' on the policy base + zero-initialised value head"
        reference = None
        notes["reference"] = "the policy base with adapters disabled"
        if cfg.gradient_checkpointing:
            actor.get_base_model().activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False, "context_fn": adapter_checkpoint_context(actor)})
    else:
        critics = {}
        for name in critic_names:
            given = getattr(cfg, f"{name}_critic")
            source = given or getattr(cfg, f"{name}_model")
            if not same_tokenizer(load_tokenizer(source), tok):
                if given:
                    raise BadInput(f"the {name} critic must use the actor's tokenizer, and this one differs", where=given,
                                   fix=f"pass a --{name}-critic trained with the policy's tokenizer (or the policy itself)")
                source = cfg.model   # a score model on the actor's checkpoint, fresh value head
            critics[name] = TokenScorer(load_score_model(source, tok, dtype="fp32", seed=cfg.seed, score_type="critic"))
            notes[f"{name}_critic"] = f"initialised from {source}" + (" (the reward/cost model's tokenizer differs from the actor's)" if source == cfg.model else "")
        with local_load():
            reference = load_causal_lm(cfg.model, tok, dtype=frozen_dtype, revision=cfg.revision).eval().requires_grad_(False)
        notes["reference"] = f"frozen copy of {cfg.model}"
        if cfg.gradient_checkpointing:
            actor.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            for c in critics.values():
                c.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    learner = Learner(actor, critics, lora=bool(cfg.lora_r))
    if cfg.lora_r:  # the actor's adapter active, every adapter trainable (add_adapter leaves the new ones frozen)
        switch_adapter(actor, ACTOR)
        actor.base_model.set_requires_grad(list(actor.peft_config), True)
    disable_dropout(learner)
    return learner, reference, reward, cost, notes


# =============================================================================================
# Data
# =============================================================================================


def load_prompts(cfg: PPOLagConfig) -> tuple[list, list, dict]:
    """(training prompts, held-out evaluation prompts, stats): a ``prompt`` column (mappable with
    --column prompt=NAME), else the prompts of preference data; de-duplicated on normalised text.
    A prompt is a string, or a list of turns (user, assistant, ..., user)."""
    from safealign.data.encode import split_by_prompt
    from safealign.data.readers import read_rows
    from safealign.data.records import Pair, normalize_prompt

    def prompts_of(source: str) -> tuple[list, dict]:
        rows = read_rows(source, cfg.data_split, config=cfg.data_config, revision=cfg.data_revision)
        if not rows:
            raise BadInput("no rows", where=source)
        col = cfg.columns.get("prompt", "prompt")
        if all(col in r for r in rows):
            raw = []
            for i, r in enumerate(rows, start=1):
                p = r[col]
                if isinstance(p, list) and len(p) == 1:
                    p = p[0]
                ok = (isinstance(p, str) and p.strip()) or (isinstance(p, list) and p and all(isinstance(t, str) and t.strip() for t in p))
                if not ok:
                    if cfg.invalid_rows == "skip":
                        continue
                    raise BadInput(f"row {i}: column '{col}' is empty or not text", where=source, fix="fix the row, or pass --invalid-rows skip")
                raw.append(p)
        else:
            from safealign.data.records import rows_to_pairs

            try:
                pairs, _ = rows_to_pairs(rows, source=source, task="helpful", fmt=cfg.data_format, columns=cfg.columns,
                                         invalid_rows=cfg.invalid_rows)
            except BadInput as e:
                raise BadInput(f"no '{col}' column, and not readable as preference data ({e})", where=source,
                               fix="give prompt data with a 'prompt' column (or --column prompt=NAME)") from None
            raw = [p.prompt[0] if len(p.prompt) == 1 else p.prompt for p in pairs]
        seen, out = set(), []
        for p in raw:
            key = normalize_prompt(p if isinstance(p, str) else " ".join(p))
            if key not in seen:
                seen.add(key)
                out.append(p)
        return out, {"rows": len(rows), "distinct_prompts": len(out), "duplicates_dropped": len(raw) - len(out)}

    prompts, stats = prompts_of(cfg.data)
    if cfg.max_samples:
        prompts = prompts[: cfg.max_samples]
    if cfg.eval_data:
        eval_prompts, estats = prompts_of(cfg.eval_data)
        stats["eval_source"] = estats
        train = prompts
    else:
        as_pairs = [Pair([p] if isinstance(p, str) else list(p), "", "") for p in prompts]
        tr, ev = split_by_prompt(as_pairs, cfg.eval_split, cfg.seed)
        back = lambda ps: [q.prompt[0] if len(q.prompt) == 1 else q.prompt for q in ps]  # noqa: E731
        train, eval_prompts = back(tr), back(ev)
    if not train:
        raise BadInput(f"no training prompts left (eval split {cfg.eval_split} of {len(prompts)})", where=cfg.data)
    stats.update(train_prompts=len(train), eval_prompts=len(eval_prompts))
    return train, eval_prompts, stats


def load_ptx(cfg: PPOLagConfig, tok) -> list:
    """SFT rows (prompt/response columns) for the PTX loss, read, validated and encoded as `safealign sft`
    does (--invalid-rows applies; the loss is on response + EOS)."""
    if not cfg.ptx_data or cfg.ptx_coeff <= 0:
        return []
    from safealign.data.readers import read_rows
    from safealign.stages.sft import encode_examples, rows_to_examples

    columns = {k: v for k, v in cfg.columns.items() if k in ("prompt", "response")}
    examples, _ = rows_to_examples(read_rows(cfg.ptx_data, cfg.data_split, config=cfg.data_config, revision=cfg.data_revision), source=cfg.ptx_data, fmt="sft", columns=columns,
                                   invalid_rows=cfg.invalid_rows, preference_response="better")
    return encode_examples(tok, examples, cfg.template, cfg.max_length)[0]


def prompts_fingerprint(prompts: list) -> str:
    from safealign.data.records import normalize_prompt

    h = hashlib.sha256()
    for p in prompts:
        h.update((normalize_prompt(p if isinstance(p, str) else "\n".join(p)) + "\n").encode())
    return h.hexdigest()


# =============================================================================================
# Rollout and scoring
# =============================================================================================


@dataclass
class Experience:
    """One rollout batch of this process. Response tensors are [B, T], right-padded."""

    prompts: list
    seq: torch.Tensor            # [B, P+T] prompt (left-padded) + response
    attn: torch.Tensor           # [B, P+T]
    P: int
    mask: torch.Tensor           # [B, T] response tokens up to and including the first EOS
    eos_hit: torch.Tensor        # [B] bool
    texts: list[str]
    old_logp: torch.Tensor = None       # [B, T]
    ref_logp: torch.Tensor = None       # [B, T]
    entropy: torch.Tensor = None        # [B, T]
    old_values: dict = field(default_factory=dict)   # name -> [B, T]
    reward: torch.Tensor = None         # [B] reward-model end score (after --no-eos-penalty)
    cost: torch.Tensor = None           # [B] cost-model end score (None without a cost model)

    def with_eos(self, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ids/mask [B, P+T+1]: responses that hit the length limit get an EOS after their last token."""
        ids = F.pad(self.seq, (0, 1), value=pad_id)
        mask = F.pad(self.attn, (0, 1), value=0)
        rows = (~self.eos_hit).nonzero().squeeze(-1)                      # [B']
        pos = self.P + self.mask.sum(dim=1)[rows]                           # first free position
        ids[rows, pos] = eos_id
        mask[rows, pos] = 1
        return ids, mask


def step_seed(seed: int, step: int, rank: int, salt: int = 0) -> int:
    """Sampling seed of (run seed, step, process): a resumed run draws exactly the same responses."""
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729 + salt) % (2**63 - 1)


@torch.no_grad()
def rollout(acc, learner_u: Learner, tok, prompts: list, prompt_ids: list[list[int]], cfg: PPOLagConfig, synced_gpus: bool) -> Experience:
    learner_u.eval()
    with acc.autocast():
        r = sample(learner_u.policy(), tok, prompt_ids, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                   top_p=cfg.top_p, synced_gpus=synced_gpus)
    return Experience(prompts, r.sequences, r.attention_mask, r.prompt_ids.shape[1], r.response_mask, r.eos_hit, decode_responses(tok, r))


@torch.no_grad()
def score_experience(acc, learner, learner_u: Learner, reference, reward: Judge, cost: Judge | None, exp: Experience,
                     cfg: PPOLagConfig, chunk: int) -> None:
    """Fill old log-probs, entropy, old values, reference log-probs, reward and cost (no grad)."""
    learner.eval()
    parts: dict[str, list] = {}
    for i in range(0, exp.seq.shape[0], chunk):
        ids, attn = exp.seq[i:i + chunk], exp.attn[i:i + chunk]
        with acc.autocast():
            out = learner(ids, attn, exp.P, with_entropy=True)
            keep = ids.shape[1] - exp.P + 1
            ref_logits = (learner_u.reference_logits(ids, attn, keep) if reference is None
                          else causal_logits(reference, ids, attn, keep))[:, :-1]                        # [b, T, V]
        out["ref_logp"] = RL.logprobs_from_logits(ref_logits, ids[:, exp.P:])
        for k, v in out.items():
            parts.setdefault(k, []).append(v.float())
    cat = {k: torch.cat(v) for k, v in parts.items()}
    m = exp.mask.float()
    exp.old_logp, exp.ref_logp, exp.entropy = cat["logp"] * m, cat["ref_logp"] * m, cat["entropy"] * m
    exp.old_values = {name: cat[f"values_{name}"] * m for name in learner_u.critics}
    with acc.autocast():
        exp.reward = reward.score(exp, cfg.template, cfg.max_length)
        exp.cost = cost.score(exp, cfg.template, cfg.max_length) if cost is not None else None
    if cfg.no_eos_penalty is not None:
        exp.reward = torch.where(exp.eos_hit, exp.reward, torch.full_like(exp.reward, cfg.no_eos_penalty))


# =============================================================================================
# Saving
# =============================================================================================


def save_policy(acc, learner, tok, out: Path, cfg: PPOLagConfig) -> dict:
    """The policy in HF format at the top of ``out`` (LoRA: the adapter under adapter/ and a merged
    copy), installed atomically (temp dir + rename). Collective: every process calls it."""
    from safealign.stages.trainer import save_collectively, strip_prefix

    def write(tmp: Path, state: dict) -> dict:
        actor = acc.unwrap_model(learner).actor
        inner = strip_prefix(state, "actor.")
        if not cfg.lora_r:
            actor.save_pretrained(tmp, state_dict=inner, safe_serialization=True)
            return {}
        from peft import PeftModel

        from safealign.models.loading import load_causal_lm

        actor.save_pretrained(tmp / "adapter", selected_adapters=[ACTOR], state_dict=inner)
        with local_load():
            base = load_causal_lm(cfg.model, tok, dtype="fp32", revision=cfg.revision)
        merged = PeftModel.from_pretrained(base, str(tmp / "adapter")).merge_and_unload()
        merged.save_pretrained(tmp, safe_serialization=True)
        return {"adapter": str(out / "adapter")}

    return save_collectively(acc, learner, tok, out, write, tmp_name=".tmp-policy")


@torch.no_grad()
def verify_policy(acc, out: Path, learner_u: Learner, tok, exp: Experience, compare: bool) -> dict:
    """Reload the saved policy with plain AutoModelForCausalLM: it generates, and (``compare``) its
    logits equal ours on this rollout. Main process only."""
    from transformers import AutoModelForCausalLM

    if count_params(learner_u.actor) > 200_000_000:
        return {"checked": False, "why": "model above 200M parameters: skipped to save time"}
    with local_load():
        plain = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids, attn = exp.seq[:8].cpu(), exp.attn[:8].cpu()
    gen = plain.generate(input_ids=ids[:2, :exp.P], attention_mask=attn[:2, :exp.P], max_new_tokens=4, do_sample=False,
                         pad_token_id=tok.pad_token_id, synced_gpus=False)  # main process only, even under ZeRO-3
    res = {"checked": True, "generates": gen.shape[1] > exp.P}
    if compare:  # (not under ZeRO-3: our actor's shards are only gathered collectively)
        ref = causal_logits(plain, ids, attn).float()
        dev = next(learner_u.parameters()).device
        ours = learner_u.logits(ids.to(dev), attn.to(dev)).float().cpu()
        res["max_abs_logit_diff"] = float((ref - ours).abs()[attn.bool()].max())
    res["ok"] = res["generates"] and res.get("max_abs_logit_diff", 0.0) < 1e-3
    return res


# =============================================================================================
# The stage
# =============================================================================================


def run(cfg: PPOLagConfig) -> dict:
    from safealign.models.loading import load_tokenizer
    from safealign.runtime import checkpoint as ckpt
    from safealign.runtime.dist import finish, make_accelerator
    from safealign.runtime.io import check_output_dir
    from safealign.runtime.metrics import MetricsLog
    from safealign.stages.trainer import DataOrder, check_resume_compatible, make_scheduler, open_run_dir, peak_memory_mb

    # ---- validate every input before anything is written -------------------------------
    cfg.validate()
    out = check_output_dir(cfg.output_dir, cfg.resume)
    cfg_dict = to_dict(cfg)
    resume_from = ckpt.latest_checkpoint(out) if cfg.resume else None
    if resume_from is not None:
        saved_state = json.loads((resume_from / "state.json").read_text())
        check_resume_compatible(saved_state.get("config", {}), cfg_dict, RESUME_KEYS, resume_from)
    train_prompts, eval_prompts, data_stats = load_prompts(cfg)
    tok = load_tokenizer(cfg.model, revision=cfg.revision)
    max_prompt = cfg.max_length - cfg.max_new_tokens - 1
    train_ids = encode_prompts(tok, train_prompts, cfg.template, max_prompt)
    eval_ids = encode_prompts(tok, eval_prompts, cfg.template, max_prompt)
    ptx = load_ptx(cfg, tok)
    acc = make_accelerator(dtype=cfg.dtype, grad_accum=cfg.grad_accum, deepspeed=cfg.deepspeed, report_to=cfg.report_to,
                           project_dir=str(out), batch_size=cfg.batch_size // (cfg.minibatches * cfg.grad_accum))
    world, rank = acc.num_processes, acc.process_index
    if resume_from is not None and saved_state.get("world_size", world) != world:
        raise BadInput(f"cannot resume: the checkpoint was made with {saved_state['world_size']} processes, this launch has {world}",
                       where=str(resume_from), fix="resume with the same number of processes")
    if cfg.constraint == "hc" and cfg.batch_size * world < 2:
        raise BadInput("--constraint hc needs at least 2 episode costs per step (batch_size x processes >= 2)")
    frozen_dtype = "bf16" if acc.mixed_precision == "bf16" else "fp32"
    learner, reference, reward_judge, cost_judge, role_notes = build_roles(cfg, tok, frozen_dtype, acc)
    tiny = count_params(learner.actor.get_base_model() if cfg.lora_r else learner.actor) < TINY_PARAMS
    lr = cfg.lr if cfg.lr is not None else (1e-3 if tiny else 1e-4 if cfg.lora_r else 1e-5)
    critic_lr = cfg.critic_lr if cfg.critic_lr is not None else (1e-3 if tiny else 1e-4 if cfg.lora_r else 5e-6)
    try:
        lam = LagrangeMultiplier(init=cfg.lambda_init, lr=cfg.lambda_lr, max_value=cfg.lambda_max, update_delay=cfg.lambda_update_delay,
                                 threshold=cfg.threshold, method=cfg.lambda_method, pid_kp=cfg.pid_kp, pid_ki=cfg.pid_ki, pid_kd=cfg.pid_kd)
    except ValueError as e:
        raise BadInput(f"Lagrange multiplier settings: {e}") from None
    window = EpisodeCostWindow(cfg.episode_cost_window)

    # ---- optimizer (two learning rates), schedule, accelerate -------------------------------
    actor_params, critic_params = learner.param_groups()
    groups = []
    for params, group_lr in ((actor_params, lr), (critic_params, critic_lr)):
        decay = [p for p in params if p.ndim >= 2]
        groups += [{"params": decay, "lr": group_lr, "weight_decay": cfg.weight_decay},
                   {"params": [p for p in params if p.ndim < 2], "lr": group_lr, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.95))
    n_prompts = len(train_ids)
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * n_prompts / (cfg.batch_size * world)))
    scheduler = make_scheduler(optimizer, cfg.lr_scheduler, cfg.warmup_ratio, total)
    learner, optimizer = acc.prepare(learner, optimizer)
    acc.register_for_checkpointing(scheduler)
    learner_u: Learner = acc.unwrap_model(learner)
    frozen = [m for m in (reference, reward_judge.model, cost_judge.model if cost_judge else None) if m is not None]
    if not cfg.offload_frozen:
        for m in frozen:
            m.to(acc.device)
    zero3 = bool(cfg.deepspeed) and getattr(acc.state.deepspeed_plugin, "zero_stage", 0) == 3
    synced = zero3 and world > 1

    # ---- from here on the output directory is written ----------------------------------------
    open_run_dir(acc, cfg, out, "ppo-lag", cfg_dict=cfg_dict, prompts=train_prompts + eval_prompts,
                 inherit_from=[cfg.model, cfg.reward_model, cfg.cost_model, cfg.reward_critic, cfg.cost_critic],
                 data_fingerprint=prompts_fingerprint(train_prompts),
                 extra={"train_prompts": n_prompts, "eval_prompts": len(eval_ids), "roles": role_notes})
    log = MetricsLog(out / "metrics.jsonl", acc)
    start = 0
    if cfg.resume:
        if resume_from is not None:
            state = ckpt.load_checkpoint(acc, resume_from)
            start = state["step"]
            lam.load_state_dict(state["lagrange"])
            window.load_state_dict({"values": state["cost_windows"][rank]})
            acc.print(f"resumed from {resume_from} (step {start}/{total}, lambda {lam.value:.4g})")
        log.truncate_after(start)

    order = DataOrder(n_prompts, cfg.seed)
    ptx_order = DataOrder(len(ptx), cfg.seed + 1) if ptx else None
    B, mb = cfg.batch_size, cfg.batch_size // cfg.minibatches
    micro = mb // cfg.grad_accum
    use_cost = cfg.algorithm == "ppo-lag"
    eval_every = cfg.eval_steps or math.ceil(n_prompts / (B * world))   # 0: at the end of each pass over the prompts

    def ptx_for(update: int) -> dict | None:
        """The PTX micro-batch of this process for the update-th micro-batch of the run (deterministic)."""
        if ptx_order is None:
            return None
        from safealign.stages.sft import collate as sft_collate

        batch = sft_collate([ptx[i] for i in ptx_order.take(update * micro * world + rank * micro, micro)], tok.pad_token_id)
        return {k: v.to(acc.device) for k, v in batch.items()}
    from safealign.runtime.progress import progress
    bar = progress(total, out.name, initial=start, enabled=acc.is_local_main_process)
    last: dict = {}
    exp = None
    t_run = time.perf_counter()
    for step in range(start, total):
        t0 = time.perf_counter()
        # ---- 1. rollout: this process's shard of the step's prompts -------------------------
        idx = order.take(step * B * world + rank * B, B)
        torch.manual_seed(step_seed(cfg.seed, step, rank))
        exp = rollout(acc, learner_u, tok, [train_prompts[i] for i in idx], [train_ids[i] for i in idx], cfg, synced)
        t1 = time.perf_counter()

        # ---- 2. score: old log-probs/values, reference log-probs, reward, cost ---------------
        with on_device(frozen, acc.device, cfg.offload_frozen):
            score_experience(acc, learner, learner_u, reference, reward_judge, cost_judge, exp, cfg, chunk=mb)
        t2 = time.perf_counter()

        # ---- 3. the multiplier: J_c over the cost window of every process ---------------------
        lam_value, pg_cost, lag_stats = update_multiplier(acc, cfg, lam, window, exp.cost, step)

        # ---- 4. shape: per-token reward and cost streams with the KL to the reference ---------
        kl = RL.kl_estimate(exp.old_logp, exp.ref_logp, cfg.kl_estimator) * exp.mask             # [B, T]
        reward_score = exp.reward - lam_value * exp.cost if cfg.algorithm == "reward-shaping" else exp.reward
        streams = {"reward": RL.shape_token_rewards(reward_score, kl, exp.mask, cfg.kl_coeff, -1, cfg.clip_range_score)}
        if use_cost:
            streams["cost"] = RL.shape_token_rewards(pg_cost.to(kl.dtype), kl, exp.mask, cfg.kl_coeff, +1, cfg.clip_range_score)

        # ---- 5. GAE per stream, then the Lagrangian advantage ---------------------------------
        adv, returns = {}, {}
        for name, stream in streams.items():
            adv[name], returns[name] = RL.gae(stream, exp.old_values[name], exp.mask, cfg.gamma, cfg.gae_lambda)
            if cfg.whiten_advantages:
                adv[name] = RL.masked_whiten(adv[name], exp.mask)
        advantage = (RL.combined_advantage(adv["reward"], adv["cost"], lam_value, cfg.normalize_by_lambda)
                     if use_cost else adv["reward"])                                              # [B, T]

        # ---- 6. PPO epochs x minibatches (x gradient-accumulation micro-batches) ----------------
        train_stats = ppo_update(acc, learner, optimizer, (actor_params, critic_params), exp, advantage, returns, cfg, step, ptx_for)
        scheduler.step()
        t3 = time.perf_counter()

        # ---- metrics (averaged over processes; lambda is the same everywhere) ----------------
        done = step + 1
        row = step_metrics(acc, exp, kl, streams, advantage, train_stats, (t0, t1, t2, t3))
        row.update({"lambda": lam_value, "lr": scheduler.get_last_lr()[0], "critic_lr": scheduler.get_last_lr()[-1],
                    "prompts_seen": done * B * world, **lag_stats})
        if eval_ids and done % eval_every == 0 and done < total:
            row.update(evaluate(acc, learner_u, tok, reward_judge, cost_judge, eval_prompts, eval_ids, cfg, frozen, synced))
        last = log.log(done, row)
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward']:.3f}", **({"cost": f"{row['cost']:.3f}"} if "cost" in row else {}), lam=f"{lam_value:.3f}")

        # ---- checkpoint: learner, optimizer, scheduler, RNG (accelerate) + lambda, cost windows ----
        if cfg.save_steps and done % cfg.save_steps == 0 and done < total:
            windows = acc.gather(torch.tensor(window.values(), dtype=torch.float64, device=acc.device)).reshape(world, -1)
            ckpt.save_checkpoint(acc, out, done, {"config": cfg_dict, "world_size": world, "lagrange": lam.state_dict(),
                                                  "cost_windows": windows.tolist(), "prompt_position": done * B * world},
                                 keep=cfg.keep_checkpoints)
    bar.close()
    seconds = time.perf_counter() - t_run
    train_peak_mb = peak_memory_mb()  # high-water mark of the training loop (saving loads extra copies)

    # ---- final evaluation, save, report ------------------------------------------------------
    final_eval = evaluate(acc, learner_u, tok, reward_judge, cost_judge, eval_prompts, eval_ids, cfg, frozen, synced) if eval_ids else {}
    if final_eval:
        last = {**last, **final_eval}
        log.log(total, final_eval)
    in_sync = ranks_in_sync(acc, learner_u, lam.value, weights=not zero3)
    saved = save_policy(acc, learner, tok, out, cfg)
    summary: dict = {}
    if acc.is_main_process:
        from safealign.runtime.metrics import read_metrics

        rows = [r for r in read_metrics(out / "metrics.jsonl") if "time/step" in r]
        reload = (verify_policy(acc, out, learner_u, tok, exp, compare=not zero3) if exp is not None
                  else {"checked": False, "why": "no step ran in this process"})
        summary = make_summary(cfg, out, rows, last, total, start, world, lr, critic_lr, lam, data_stats, role_notes, reload, saved,
                               seconds, train_peak_mb)
        summary["ranks_in_sync"] = in_sync
        make_plots(out, rows, cfg)
        from safealign.runtime import report

        report.write(out, summary, title="safealign ppo-lag", intro=INTRO.get(cfg.algorithm, ""))
    finish(acc)
    return summary


def update_multiplier(acc, cfg: PPOLagConfig, lam: LagrangeMultiplier, window: EpisodeCostWindow, cost: torch.Tensor | None,
                      step: int) -> tuple[float, torch.Tensor | None, dict]:
    """Add this rollout's costs to the window, compute J_c over the windows of every process and
    move lambda (identically on every process). Returns (lambda, the per-sample cost for the policy
    gradient, stats). --constraint hc: J_c is the pessimistic bound mean + k*std and the policy
    gradient sees the augmented costs (research/hc-rlhf.md §1.3)."""
    fixed = cfg.lambda_init if cfg.algorithm == "reward-shaping" else 0.0
    if cost is None:
        return fixed, None, {}
    window.extend(cost)
    all_costs = acc.gather(torch.tensor(window.values(), dtype=torch.float64, device=acc.device)).cpu()   # [world * window]
    j_mean = float(all_costs.mean())
    j_c, pg_cost, stats = j_mean, cost, {}
    if cfg.constraint == "hc":
        k = HC.hc_inflation_k(len(all_costs), cfg.hc_safety_size, cfg.hc_delta, cfg.hc_c1, cfg.hc_c2)
        j_c = HC.pessimistic_cost(all_costs, k)
        sigma = float(all_costs.std())                                                                   # ddof=1
        pg_cost = HC.augmented_costs(cost.double(), j_mean, sigma, k).to(cost.dtype)
        stats = {"hc/k": k, "hc/sigma": sigma, "hc/m": len(all_costs)}
    if cfg.algorithm == "ppo-lag":
        lam.update(j_c, step)
    stats.update({"J_c": j_c, "J_c_mean": j_mean, "threshold": cfg.threshold, "cost_window": len(all_costs)})
    return (lam.value if cfg.algorithm == "ppo-lag" else fixed), pg_cost, stats


def ppo_update(acc, learner, optimizer, params: tuple[list, list], exp: Experience, advantage: torch.Tensor, returns: dict,
               cfg: PPOLagConfig, step: int, ptx_for) -> dict:
    """cfg.ppo_epochs passes over the rollout in cfg.minibatches minibatches (each split into
    cfg.grad_accum micro-batches): clipped surrogate + clipped value loss per critic (+ PTX).
    Returns the mean of each statistic over the micro-batches."""
    B = exp.seq.shape[0]
    mb = B // cfg.minibatches
    micro = mb // cfg.grad_accum
    gen = torch.Generator().manual_seed(step_seed(cfg.seed, step, acc.process_index, salt=1))
    stats: dict[str, list[float]] = {}
    learner.train()
    for epoch in range(cfg.ppo_epochs):
        perm = torch.randperm(B, generator=gen)
        for m_i in range(cfg.minibatches):
            for k_i in range(cfg.grad_accum):
                part = perm[m_i * mb + k_i * micro: m_i * mb + (k_i + 1) * micro].to(exp.seq.device)
                update = ((step * cfg.ppo_epochs + epoch) * cfg.minibatches + m_i) * cfg.grad_accum + k_i
                ptx = ptx_for(update)
                mask = exp.mask[part]                                                                   # [b, T]
                with acc.accumulate(learner):
                    new = learner(exp.seq[part], exp.attn[part], exp.P, ptx=ptx)
                    pg_loss, pg_stats = RL.ppo_policy_loss(new["logp"], exp.old_logp[part], advantage[part], mask, cfg.clip_range_ratio)
                    loss, parts = pg_loss, {"policy_loss": pg_loss.detach(), **pg_stats}
                    for name in returns:
                        v_loss, v_stats = RL.clipped_value_loss(new[f"values_{name}"], exp.old_values[name][part], returns[name][part],
                                                                mask, cfg.clip_range_value)
                        loss = loss + v_loss
                        parts.update({f"{name}_critic_loss": v_loss.detach(), f"{name}_vf_clipfrac": v_stats["vf_clipfrac"]})
                    if ptx is not None:
                        loss = loss + cfg.ptx_coeff * new["ptx_loss"]
                        parts["ptx_loss"] = new["ptx_loss"].detach()
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.max_grad_norm:
                        for which, group in zip(("actor", "critic"), params):
                            norm = acc.clip_grad_norm_(group, cfg.max_grad_norm)
                            if norm is not None:
                                parts[f"{which}_grad_norm"] = norm
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                for key, v in parts.items():
                    stats.setdefault(key, []).append(float(v))
    return {k: sum(v) / len(v) for k, v in stats.items()}


def step_metrics(acc, exp: Experience, kl: torch.Tensor, streams: dict, advantage: torch.Tensor, train_stats: dict, times) -> dict:
    """One metrics row, averaged over processes."""
    t0, t1, t2, t3 = times
    m = exp.mask.float()
    lengths = m.sum(dim=1)                                                                  # [B]
    local = {
        "reward": exp.reward.mean(), "reward_with_kl": streams["reward"].sum(dim=1).mean(),
        "kl": kl.sum(dim=1).mean(), "entropy": RL.masked_mean(exp.entropy, m),
        "response_length": lengths.mean(), "eos_rate": exp.eos_hit.float().mean(),
        "advantage_mean": RL.masked_mean(advantage, m), "reward_value_mean": RL.masked_mean(exp.old_values["reward"], m),
        **{f"train/{k}": v for k, v in train_stats.items()},
        "time/generate": t1 - t0, "time/score": t2 - t1, "time/train": t3 - t2, "time/step": t3 - t0,
    }
    if exp.cost is not None:
        local.update({"cost": exp.cost.mean(), "unsafe_rate": (exp.cost > 0).float().mean()})
    if "cost" in streams:
        local["cost_with_kl"] = streams["cost"].sum(dim=1).mean()
    keys = sorted(local)
    vals = acc.reduce(torch.tensor([float(local[k]) for k in keys], dtype=torch.float64, device=acc.device), reduction="mean").tolist()
    row = dict(zip(keys, vals))
    row["response_length_max"] = float(acc.gather(lengths.max().reshape(1).to(acc.device)).max())
    return row


@torch.no_grad()
def ranks_in_sync(acc, learner_u: Learner, lam_value: float, weights: bool = True) -> bool:
    """Every process must end with the same trainable weights (not checked under ZeRO-3, where each
    holds a shard) and lambda; a silent divergence (unsynchronised gradients, different data) is an
    error, not a result."""
    if acc.num_processes == 1:
        return True
    checksum = sum(float(p.double().sum()) for p in learner_u.parameters() if p.requires_grad) if weights else 0.0
    local = torch.tensor([checksum, lam_value], dtype=torch.float64, device=acc.device)
    every = acc.gather(local[None]).cpu()                                   # [world, 2]
    ok = bool(torch.allclose(every, every[:1].expand_as(every), rtol=1e-6, atol=1e-8))
    if not ok:
        raise RuntimeError(f"processes disagree on the trained weights or lambda: {every.tolist()}")
    return ok


@torch.no_grad()
def evaluate(acc, learner_u: Learner, tok, reward: Judge, cost: Judge | None, prompts: list, prompt_ids: list, cfg, frozen,
             synced: bool = False) -> dict:
    """Reward and cost of fresh samples on the held-out prompts (same seed every time), gathered."""
    rank, world = acc.process_index, acc.num_processes
    shard = list(range(rank, len(prompts), world))
    n_max = -(-len(prompts) // world)
    rows = []
    with on_device(frozen, acc.device, cfg.offload_frozen):
        for b, i in enumerate(range(0, n_max, cfg.batch_size)):
            part = shard[i:i + cfg.batch_size]
            n_real = len(part)
            part = part + [shard[0] if shard else 0] * (min(cfg.batch_size, n_max - i) - n_real)  # equal work everywhere
            torch.manual_seed(step_seed(cfg.seed, 10**6 + b, rank))
            exp = rollout(acc, learner_u, tok, [prompts[j] for j in part], [prompt_ids[j] for j in part], cfg, synced)
            with acc.autocast():
                r = reward.score(exp, cfg.template, cfg.max_length)
                c = cost.score(exp, cfg.template, cfg.max_length) if cost is not None else torch.zeros_like(r)
            valid = (torch.arange(len(part), device=r.device) < n_real).float()
            rows.append(torch.stack([r.float(), c.float(), exp.eos_hit.float(), exp.mask.sum(1).float(), valid], dim=1))
    local = torch.cat(rows).to(acc.device) if rows else torch.zeros(0, 5, device=acc.device)
    allrows = acc.gather(local)
    allrows = allrows[allrows[:, 4] > 0].cpu()
    if not len(allrows):
        return {}
    res = {"eval/reward": float(allrows[:, 0].mean()), "eval/eos_rate": float(allrows[:, 2].mean()),
           "eval/response_length": float(allrows[:, 3].mean()), "eval/prompts": len(allrows)}
    if cost is not None:
        res.update({"eval/cost": float(allrows[:, 1].mean()), "eval/unsafe_rate": float((allrows[:, 1] > 0).float().mean())})
    return res


INTRO = {
    "ppo-lag": "PPO-Lagrangian (Safe RLHF): maximise reward subject to E[cost] <= threshold; lambda learned by gradient ascent on J_c - threshold.",
    "ppo": "Reward-only PPO baseline (no cost in the objective; cost reported when a cost model is given).",
    "reward-shaping": "Fixed-lambda reward-shaping baseline: PPO on R - lambda_init * C with one critic.",
}


def _mean_of(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def make_summary(cfg, out, rows, last, total, start, world, lr, critic_lr, lam, data_stats, role_notes, reload, saved, seconds, peak_mb) -> dict:
    use_cost = cfg.algorithm == "ppo-lag"
    lam_hist = [r["lambda"] for r in rows if "lambda" in r]
    j_c = last.get("J_c")
    constraint = None
    if j_c is not None:
        constraint = {"quantity": "HC-RLHF pessimistic bound mean + k*std" if cfg.constraint == "hc" else "window mean of episode costs",
                      "J_c": j_c, "J_c_mean": last.get("J_c_mean"), "threshold": cfg.threshold, "satisfied": j_c <= cfg.threshold,
                      "note": "training-time estimate on training prompts; run `safealign safety-test` on held-out prompts for a guarantee"}
    summary = {
        "stage": "ppo-lag", "algorithm": cfg.algorithm, "constraint_type": cfg.constraint, "output_dir": str(out),
        "model": cfg.model, "steps": total, "resumed_from_step": start or None, "world_size": world,
        "mode": f"LoRA r={cfg.lora_r}" if cfg.lora_r else "full fine-tuning", "lr": lr, "critic_lr": critic_lr,
        "lambda": {"init": cfg.lambda_init, "final": lam_hist[-1] if lam_hist else None, "max_seen": max(lam_hist) if lam_hist else None,
                   "method": cfg.lambda_method if use_cost else "fixed" if cfg.algorithm == "reward-shaping" else "none"},
        "constraint": constraint,
        "final": {k: last.get(k) for k in ("reward", "cost", "unsafe_rate", "lambda", "J_c", "kl", "entropy", "response_length", "eos_rate")
                  if last.get(k) is not None},
        "eval": {k: v for k, v in last.items() if k.startswith("eval/")},
        "no_eos_policy": f"reward replaced by {cfg.no_eos_penalty}" if cfg.no_eos_penalty is not None else "scored with an EOS appended",
        "time_per_step_s": {k: _mean_of(rows, f"time/{k}") for k in ("generate", "score", "train", "step")},
        "throughput": {"seconds": seconds, "peak_memory_mb": peak_mb, "peak_memory_note": "high-water mark at the end of training: max GPU memory allocated, or peak RSS on CPU"},
        "data": data_stats, "roles": role_notes, "reload_check": reload, "saved": saved,
    }
    cost_txt = f", cost {last['cost']:.3f}" if last.get("cost") is not None else ""
    jc_txt = f" (J_c {j_c:.3f} vs threshold {cfg.threshold:g})" if j_c is not None and use_cost else ""
    lam_txt = f", lambda {lam_hist[-1]:.3f}" if use_cost and lam_hist else ""
    algo = "" if cfg.algorithm == "ppo-lag" else f" [{cfg.algorithm}]"
    summary["headline"] = f"ppo-lag{algo}: {total} steps, reward {last.get('reward', float('nan')):.3f}{cost_txt}{jc_txt}{lam_txt}"
    return summary


def make_plots(out: Path, rows: list[dict], cfg) -> None:
    from safealign.runtime import plots

    d = out / "plots"
    plots.curves(rows, ["lambda"], d / "lambda.png", "Lagrange multiplier")
    plots.curves(rows, [k for k in ("J_c", "J_c_mean", "cost") if any(k in r for r in rows)], d / "cost_vs_threshold.png",
                 "episode cost vs threshold", hlines={"threshold": cfg.threshold})
    plots.curves(rows, ["reward", "reward_with_kl"], d / "reward.png", "reward")
    plots.curves(rows, ["kl", "entropy"], d / "kl_entropy.png", "KL to reference (sum per response) and entropy")
    plots.curves(rows, ["time/generate", "time/score", "time/train"], d / "time.png", "seconds per step")
