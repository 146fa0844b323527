"""The roles of an RL run: what is trained (the :class:`Learner`: actor + critics) and what only
judges (:class:`Judge`: the frozen reward and cost models), and how they are loaded.

Full fine-tuning: the actor is a causal LM, each critic a seq-cls model scoring every token, the
reference a frozen copy of the starting policy. LoRA (``--lora-r``): one frozen base carries the
actor's adapter and one adapter per critic (each critic a linear value head on the base's last
hidden state under its adapter); the reference is the base with every adapter disabled. Which
critics exist is the algorithm's choice (``rl.algorithms``): two for ppo-lag, none for GRPO.
``--shared-critic``: the critics are linear value heads on ONE critic backbone (full fine-tuning: a
seq-cls model, whose score head becomes the reward head; LoRA: one adapter, ``critic``), so the
backbone runs once for all of them.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from safealign.algorithms import rl as RL
from safealign.errors import BadInput
from safealign.models.generation import score_texts
from safealign.models.loading import local_load
from safealign.models.score import TokenScorer, attention_inputs, backbone, score_head

ACTOR = "default"            # peft's name for the first adapter: saved at adapter/ without a sub-folder

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
    shared critic:    ``critics[name]`` a linear value head each, all on one backbone: ``trunk`` (the
                      backbone of a seq-cls model) in full fine-tuning, the adapter ``critic`` with LoRA.
    """

    def __init__(self, actor: nn.Module, critics: dict[str, nn.Module], lora: bool, trunk: nn.Module | None = None,
                 shared: bool = False):
        super().__init__()
        self.actor = actor
        self.critics = nn.ModuleDict(critics)
        self.lora = lora
        self.shared = shared or trunk is not None
        if trunk is not None:
            self.trunk = trunk

    def critic_adapter(self, name: str) -> str:
        """LoRA mode: the adapter critic ``name`` reads the base under."""
        return "critic" if self.shared else f"{name}_critic"

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

    def critic_values(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:  # [B, L] -> {name: [B, L]}
        """Every critic's value at every position; a backbone that several critics share runs once."""
        if not self.lora and not self.shared:
            return {name: critic(ids, mask)[0] for name, critic in self.critics.items()}
        out, hidden, ran = {}, None, None
        for name, head in self.critics.items():
            adapter = self.critic_adapter(name)
            if hidden is None or (self.lora and adapter != ran):
                self._use(adapter)
                bb = backbone(self.actor) if self.lora else self.trunk
                hidden = bb(input_ids=ids, **attention_inputs(mask)).last_hidden_state   # [B, L, H]
                ran = adapter
            out[name] = head(hidden).squeeze(-1).float()
        return out

    def forward(self, ids, mask, prompt_len: int, with_entropy: bool = False, ptx: dict | None = None) -> dict:
        """ids/mask [B, P+T] (prompt left-padded to P, response right-padded) ->
        logp [B, T] of the response tokens, values_<name> [B, T] (state before each response
        token), optionally entropy [B, T] and the PTX language-modelling loss."""
        P, T = prompt_len, ids.shape[1] - prompt_len
        logits = self.logits(ids, mask, keep=T + 1)[:, :-1]                             # [B, T, V] at P-1..L-2: predicts response
        out = {"logp": RL.logprobs_from_logits(logits, ids[:, P:])}                      # [B, T]
        if with_entropy:
            out["entropy"] = RL.entropy_from_logits(logits)                              # [B, T]
        for name, v in self.critic_values(ids, mask).items():
            out[f"values_{name}"] = v[:, P - 1:-1]                                       # [B, T]
        if ptx is not None:
            lm = self.logits(ptx["input_ids"], ptx["attention_mask"])[:, :-1].float()    # [B', L'-1, V]
            out["ptx_loss"] = F.cross_entropy(lm.reshape(-1, lm.shape[-1]), ptx["labels"][:, 1:].reshape(-1), ignore_index=-100)
        return out

    def named_param_groups(self) -> tuple[list, list]:
        """([(name, parameter)] of the actor, the same of the critics), trainable only."""
        actor, critic = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            is_actor = (f".{ACTOR}." in name) if self.lora and name.startswith("actor.") else name.startswith("actor.")
            (actor if is_actor else critic).append((name, p))
        return actor, critic


def zero_head(hidden: int) -> nn.Linear:
    """A value head reading the last hidden state, V = 0 at the start."""
    head = nn.Linear(hidden, 1, bias=False)
    nn.init.zeros_(head.weight)
    return head


def causal_logits(model, ids: torch.Tensor, mask: torch.Tensor, keep: int = 0) -> torch.Tensor:
    """Logits of a causal LM (mask and positions: :func:`attention_inputs`); ``keep`` > 0 computes the
    lm_head on the last ``keep`` positions only."""
    return model(input_ids=ids, logits_to_keep=keep, **attention_inputs(mask)).logits


class Judge:
    """A frozen reward or cost model. Same vocabulary as the actor: the rollout ids are scored as
    they are (EOS appended when missing); otherwise prompt and response are decoded to text and
    re-encoded with the judge's tokenizer (data.encode: prompt + response + EOS)."""

    def __init__(self, path: str, policy_tok, dtype: str):
        from safealign.models.loading import load_score_model, load_tokenizer

        self.path = path
        self.tok = load_tokenizer(path)
        self.model = TokenScorer(load_score_model(path, self.tok, dtype=dtype, head="trained")).eval().requires_grad_(False)
        self.same_vocab = same_tokenizer(self.tok, policy_tok)

    @torch.no_grad()
    def score(self, exp, template: str, max_length: int) -> torch.Tensor:    # -> [B] float32
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


def build_roles(cfg, tok, frozen_dtype: str, critic_names: tuple[str, ...]):
    """(learner, reference or None, reward judge, cost judge or None, notes). Loads everything (the reference
    None: the LoRA base with adapters disabled, or no reference at all when not ``cfg.uses_reference()``):
    any unusable path or tokenizer is BadInput, raised before the output directory is touched."""
    from safealign.models.loading import apply_lora, check_model_kind, load_causal_lm, load_score_model, load_tokenizer

    check_model_kind(cfg.model, "policy", "--model")
    check_model_kind(cfg.reward_model, "reward model", "--reward-model", "reward")
    if cfg.cost_model:
        check_model_kind(cfg.cost_model, "cost model", "--cost-model", "cost")
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
            adapter = "critic" if cfg.shared_critic else f"{name}_critic"
            if adapter not in actor.peft_config:
                actor.add_adapter(adapter, copy.deepcopy(actor.peft_config[ACTOR]))
            critics[name] = zero_head(hidden)                 # V = 0 at the start
            notes[f"{name}_critic"] = f"LoRA adapter '{adapter}' on the policy base + zero-initialised value head"
        reference = None
        notes["reference"] = "the policy base with adapters disabled"
        if cfg.gradient_checkpointing:
            actor.get_base_model().activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False, "context_fn": adapter_checkpoint_context(actor)})
    else:
        critics, trunk = {}, None
        for name in critic_names:
            if trunk is not None:        # --shared-critic: a value head on the first critic's backbone
                critics[name] = zero_head(trunk.config.hidden_size)
                notes[f"{name}_critic"] = f"zero-initialised value head on the shared critic backbone ({notes[f'{critic_names[0]}_critic']})"
                continue
            given = getattr(cfg, f"{name}_critic")
            source = given or getattr(cfg, f"{name}_model")
            if not same_tokenizer(load_tokenizer(source), tok):
                if given:
                    raise BadInput(f"the {name} critic must use the actor's tokenizer, and this one differs", where=given,
                                   fix=f"pass a --{name}-critic trained with the policy's tokenizer (or the policy itself)")
                source = cfg.model   # a score model on the actor's checkpoint, fresh value head
            critics[name] = TokenScorer(load_score_model(source, tok, dtype="fp32", seed=cfg.seed, score_type="critic",
                                                         head="new" if source == cfg.model else "trained"))
            notes[f"{name}_critic"] = f"initialised from {source}" + (" (the reward/cost model's tokenizer differs from the actor's)" if source == cfg.model else "")
            if cfg.shared_critic:        # its backbone becomes the trunk, its score head this critic's value head
                model = critics[name].model
                trunk = backbone(model)
                critics[name] = zero_head(trunk.config.hidden_size)
                critics[name].weight.data.copy_(score_head(model).weight.data.float())
        reference = None
        if cfg.uses_reference():
            with local_load():
                reference = load_causal_lm(cfg.model, tok, dtype=frozen_dtype, revision=cfg.revision).eval().requires_grad_(False)
            notes["reference"] = f"frozen copy of {cfg.model}"
        if cfg.gradient_checkpointing:
            actor.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            for c in ([trunk] if trunk is not None else [c.model for c in critics.values()]):
                c.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if not cfg.uses_reference():
        notes["reference"] = "none: --kl-coeff 0 (no KL to a reference, so none is loaded or run)"
    learner = Learner(actor, critics, lora=bool(cfg.lora_r), trunk=None if cfg.lora_r else trunk, shared=cfg.shared_critic)
    if cfg.lora_r:  # the actor's adapter active, every adapter trainable (add_adapter leaves the new ones frozen)
        switch_adapter(actor, ACTOR)
        actor.base_model.set_requires_grad(list(actor.peft_config), True)
    disable_dropout(learner)
    return learner, reference, reward, cost, notes


