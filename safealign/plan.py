"""`safealign plan`: per-device GPU memory of a stage, before renting the GPUs.

For each role of the stage (ppo-lag: actor, frozen reference, frozen reward model, frozen cost
model, reward critic, cost critic) the plan counts parameters from the model's dimensions and
turns them into bytes per device under each ZeRO stage (0/1/2/3), offload setting (none,
optimizer, optimizer+params) and LoRA, then recommends the cheapest layout that fits.

Nothing is loaded: the dimensions come from a local ``config.json``, ``tiny`` (the tiny Llama of
``safealign.models.loading.tiny_config``), the Hugging Face cache, or a built-in preset
(:data:`PRESETS`, published configs). Anything else is bad input (exit 2).

Formulas (all approximations of what DeepSpeed/transformers allocate; 1 GiB = 2**30 bytes, and a
"80GB" card is read as 80 GiB)

* Parameters (Llama family): embedding V*h; per layer q/k/v/o with GQA (h*a*d + 2*h*kv*d + a*d*h,
  plus q/k/v biases for Qwen2), MLP gate/up/down 3*h*I, two RMSNorms 2*h; final norm h; lm_head V*h
  unless tied (causal LMs); a score head h*1 instead of lm_head for reward/cost models and critics.
* Trained weights/grads/optimizer, bytes per parameter: bf16 mixed precision 2 / 2 / 12 (fp32
  master + Adam m + v, DeepSpeed style), fp32 training 4 / 4 / 8. ZeRO-1 divides the optimizer
  states by the number of devices N = gpus x nodes, ZeRO-2 also the gradients, ZeRO-3 also the
  weights. Frozen roles: weights only (2 bytes bf16), divided by N under ZeRO-3 and replicated
  otherwise (safe-rlhf's eval config). Offload "optimizer" (ZeRO-Offload) moves the optimizer
  states and the fp32 gradient partition to CPU; the GPU keeps at most one reduce bucket of
  gradients (DeepSpeed's default 5e8 elements); "optimizer+params" (ZeRO-3 only) also moves the
  weights of every role. Under ZeRO-3 a working set of gathered parameters stays on the GPU:
  max(largest module, 6e7 params) (safe-rlhf's max_live_parameters + prefetch bucket, 3e7 each). The rows describe DeepSpeed (ZeRO-0 = its
  stage 0 with bf16). safealign without --deepspeed (DDP + autocast) keeps trained models in fp32:
  the same 16 bytes per trained parameter at ZeRO-0, but a LoRA base costs 4 bytes per parameter
  instead of 2.
* LoRA: r*(in+out) trainable parameters per targeted linear layer (all-linear: q,k,v,o,gate,up,
  down of every layer; never lm_head), plus the score/value heads, which train fully. Gradients and
  optimizer states exist only for those. In ppo-lag the actor and both critics are adapters on ONE
  frozen policy base, and the reference is that base with the adapters disabled, so the base
  weights are counted once; the reward and cost models stay separate frozen models.
* Activations per token and layer, bytes, e = 2 (bf16) or 4 (fp32): a Llama-specific derivation
  in the style of Korthikanti et al. 2022 (their GPT formula is 34h + 5as bytes in half precision,
  without flash attention), from what transformers' Llama code keeps for backward:
  two RMSNorms 2*(4h + 4 + 2eh) (fp32 input copy, rsqrt, normalised input, output; with LoRA the
  frozen norm weight drops one eh); attention 4e*a*d (q, repeated k and v, output) + 4a
  (log-sum-exp) + e*s (the padded mask the sdpa kernel keeps per layer), or with eager attention
  4e*a*d + a*s*(4 + e) (fp32 softmax and its cast: the seq x seq term); SwiGLU MLP 4eI; LoRA adds
  r*e per targeted linear. Outside the layers: a final norm, 8 bytes of token ids and the rotary
  cos/sin 2*d*e per token, and the head: causal LMs keep the fp32 log-softmax of the logits (4V
  per logit token; ppo-lag's actor computes logits on the response positions only), score models
  4 bytes per token. With gradient checkpointing each layer keeps only its input (e*h per token,
  plus the mask the layers share). The peak adds the largest backward transient: 8V (SFT) or
  (e+2)V (ppo-lag actor) per logit token on top of the kept log-softmax, 16h per token of fp32
  hidden gradients, or, with checkpointing, one recomputed layer (its activations + e*h per token).
  Not modelled: fused kernels (Liger, fused cross-entropy), sequence packing, tensor/sequence
  parallelism; a GPU sdpa kernel may keep slightly different buffers than the CPU one measured.
* ppo-lag: the actor and the critics are one module with one backward (safealign's Learner), so
  their activations add up. A rollout needs the KV cache 2*L*kv*d*(prompt+new)*batch*e (or the
  logits of a no-grad scoring pass, if larger) instead of training activations; the peak is the
  larger of the two phases. The rollout also keeps the fp32 logits of every decoding step when
  they fit in 512 MiB (the sampled tokens' log-probs then need no forward pass), and under ZeRO-3
  with zero3_gather (the default) it samples from an unsharded copy of the actor (gathered once per
  rollout), which the ZeRO-3 rows add to the rollout phase.
* A setting fits when its peak is at most gpu_mem x (1 - margin) (default margin 15%: CUDA
  context, NCCL/ZeRO buckets, fragmentation, which are not modelled).

Checked against measurement (``bench/plan_vs_measured.py``, CPU, Llamas of hidden 256 / 4 layers
with GQA and hidden 384 / 3 layers without, fp32 and bf16, full and LoRA, sdpa and eager, with and
without checkpointing, through safealign's own TokenScorer, sft loss and ppo-lag Learner; results
in ``bench/results/plan_vs_measured.md``):

* weights, gradients and optimizer states: exact up to 0.02% (AdamW's 4-byte step counters);
* activations kept at the end of the forward: within 0.6% without checkpointing, within +10.3%
  (over) with it;
* activation peak during forward + backward (a tracker of every live tensor): -3.6% to +4.0%;
* KV cache after ``generate``: +0.8% (the last sampled token is never cached).

What a real GPU adds on top (CUDA context, allocator fragmentation, NCCL/ZeRO buckets) is not
measured on CPU; that is what --margin is for. ZeRO partitioning itself is arithmetic (tests).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from safealign.errors import BadInput

GiB = 2 ** 30
STAGE_KINDS = ("train-rm", "train-cost", "sft", "ppo-lag")
OFFLOADS = ("none", "optimizer", "optimizer+params")
ZERO3_LIVE_PARAMS = 6e7             # safe-rlhf: stage3_max_live_parameters 3e7 + prefetch bucket 3e7
GRAD_BUCKET_PARAMS = 5e8            # DeepSpeed's default reduce_bucket_size (gradients on the GPU under offload)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# --------------------------------------------------------------------------------------------
# Model dimensions


@dataclass(frozen=True)
class Dims:
    """What the memory of a Llama-family decoder depends on."""

    name: str
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int = 0               # 0: hidden // heads
    tie: bool = False
    qkv_bias: bool = False          # Qwen2
    o_bias: bool = False            # Llama attention_bias=True biases o_proj too
    mlp_bias: bool = False
    qk_norm: bool = False           # Qwen3: RMSNorm on q and k (head_dim weights each)
    source: str = ""

    @property
    def d(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        return self.heads * self.d

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.d


def _preset(h, L, I, V, a, kv, **kw) -> dict:
    return dict(hidden=h, layers=L, intermediate=I, vocab=V, heads=a, kv_heads=kv, **kw)


#: Published configs (config.json of the hub checkpoints), for planning offline.
PRESETS: dict[str, dict] = {
    "llama-7b": _preset(4096, 32, 11008, 32000, 32, 32),
    "llama-13b": _preset(5120, 40, 13824, 32000, 40, 40),
    "llama-2-70b": _preset(8192, 80, 28672, 32000, 64, 8),
    "llama-3-8b": _preset(4096, 32, 14336, 128256, 32, 8),
    "mistral-7b": _preset(4096, 32, 14336, 32000, 32, 8),
    "qwen2.5-0.5b": _preset(896, 24, 4864, 151936, 14, 2, tie=True, qkv_bias=True),
    "qwen2.5-1.5b": _preset(1536, 28, 8960, 151936, 12, 2, tie=True, qkv_bias=True),
    "qwen2.5-7b": _preset(3584, 28, 18944, 152064, 28, 4, qkv_bias=True),
    # safe-rlhf's starting policy: LLaMA-7B with an added <pad> token
    "alpaca-7b-reproduced": _preset(4096, 32, 11008, 32001, 32, 32),
}
ALIASES = {
    "llama-2-7b": "llama-7b", "llama2-7b": "llama-7b", "llama-2-13b": "llama-13b", "llama2-13b": "llama-13b",
    "meta-llama-3-8b": "llama-3-8b", "llama-3.1-8b": "llama-3-8b", "meta-llama-3.1-8b": "llama-3-8b",
    "mistral-7b-v0.1": "mistral-7b",
    "beaver-7b-v1.0": "alpaca-7b-reproduced", "beaver-7b-v1.0-reward": "alpaca-7b-reproduced",
    "beaver-7b-v1.0-cost": "alpaca-7b-reproduced",
}


def _preset_key(name: str) -> str | None:
    key = name.strip().lower().rsplit("/", 1)[-1]
    for suffix in ("-hf", "-instruct", "-chat"):
        if key.endswith(suffix):
            key = key[: -len(suffix)]
    key = ALIASES.get(key, key)
    return key if key in PRESETS else None


def tiny_dims(hidden: int = 64, layers: int = 2, heads: int = 4, vocab: int = 1024) -> Dims:
    """The tiny Llama of ``safealign.models.loading.tiny_config`` (intermediate 2h, kv heads h/2)."""
    return Dims(name="tiny", hidden=hidden, layers=layers, intermediate=2 * hidden, vocab=vocab, heads=heads,
                kv_heads=max(1, heads // 2), source="tiny")


def dims_from_config(cfg: dict, name: str = "model", source: str = "") -> Dims:
    """Dims from a transformers config.json (Llama, Mistral, Qwen2/3 and alike)."""
    if "text_config" in cfg and "hidden_size" not in cfg:
        cfg = cfg["text_config"]
    need = ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size", "num_attention_heads")
    missing = [k for k in need if cfg.get(k) is None]
    if missing:
        raise BadInput(f"config.json lacks {', '.join(missing)} (not a Llama-style decoder?)", where=source or name,
                       fix="pass --model with a Llama/Mistral/Qwen checkpoint directory or a preset")
    mt = str(cfg.get("model_type", "")).lower()
    attn_bias = bool(cfg.get("attention_bias", False))
    return Dims(name=name, hidden=int(cfg["hidden_size"]), layers=int(cfg["num_hidden_layers"]),
                intermediate=int(cfg["intermediate_size"]), vocab=int(cfg["vocab_size"]),
                heads=int(cfg["num_attention_heads"]), kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
                head_dim=int(cfg.get("head_dim") or 0), tie=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=attn_bias or mt == "qwen2", o_bias=attn_bias, mlp_bias=bool(cfg.get("mlp_bias", False)),
                qk_norm=mt.startswith("qwen3"), source=source)


def resolve_dims(name: str | None, *, tiny: dict | None = None) -> Dims:
    """Dims of ``name``: 'tiny', a local directory (or config.json file), a preset, or a hub name
    already in the Hugging Face cache. Anything else is BadInput."""
    if not name:
        raise BadInput("no model to plan for", fix="pass --model (a local model directory, tiny, or a preset such as llama-7b), or --config with a recipe naming one")
    if name == "tiny":
        return tiny_dims(**(tiny or {}))
    p = Path(name).expanduser()
    if p.exists():
        cfg_file = p if p.is_file() else p / "config.json"
        if not cfg_file.is_file():
            adapter = p / "adapter_config.json"
            if adapter.is_file():   # a LoRA adapter directory: plan its base model
                base = json.loads(adapter.read_text()).get("base_model_name_or_path")
                return resolve_dims(base, tiny=tiny)
            raise BadInput("model directory has no config.json", where=str(p), fix="point --model at a directory written by save_pretrained")
        try:
            cfg = json.loads(cfg_file.read_text())
        except (OSError, ValueError) as e:
            raise BadInput(f"cannot read config.json ({e})", where=str(cfg_file)) from None
        return dims_from_config(cfg, name=p.name if p.is_dir() else p.parent.name, source=str(cfg_file))
    key = _preset_key(name)
    if key:
        return Dims(name=key, source=f"preset {key}", **PRESETS[key])
    if not name.startswith((".", "/", "~")) and name.count("/") == 1:
        try:   # a hub model downloaded earlier: its config.json is in the local cache
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "config.json")
        except Exception:   # noqa: BLE001 - any cache problem means "not cached"
            cached = None
        if isinstance(cached, str) and Path(cached).is_file():
            return dims_from_config(json.loads(Path(cached).read_text()), name=name, source=cached)
    close = difflib.get_close_matches(name.lower().rsplit("/", 1)[-1], list(PRESETS), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise BadInput(f"unknown model '{name}': not a local directory, not in the Hugging Face cache, and not a preset{hint}",
                   fix=f"pass a local model directory, tiny, or one of the presets: {', '.join(PRESETS)}")


# --------------------------------------------------------------------------------------------
# Parameters


def param_breakdown(dims: Dims, head: str = "lm") -> dict[str, int]:
    """Parameters by part. head: 'lm' (causal LM), 'score' (one-output score head), 'none' (backbone)."""
    h, d = dims.hidden, dims
    attn = h * d.q_dim + 2 * h * d.kv_dim + d.q_dim * h
    if d.qkv_bias:
        attn += d.q_dim + 2 * d.kv_dim
    if d.o_bias:
        attn += h
    if d.qk_norm:
        attn += 2 * d.d
    mlp = 3 * h * d.intermediate + ((2 * d.intermediate + h) if d.mlp_bias else 0)
    out = {"embedding": d.vocab * h, "attention": d.layers * attn, "mlp": d.layers * mlp, "norms": d.layers * 2 * h + h}
    if head == "lm":
        out["lm_head"] = 0 if d.tie else d.vocab * h
    elif head == "score":
        out["score_head"] = h
    return out


def param_count(dims: Dims, head: str = "lm") -> int:
    return sum(param_breakdown(dims, head).values())


def lora_linears(dims: Dims) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear layer LoRA can target, per decoder layer."""
    h = dims.hidden
    return {"q_proj": (h, dims.q_dim), "k_proj": (h, dims.kv_dim), "v_proj": (h, dims.kv_dim), "o_proj": (dims.q_dim, h),
            "gate_proj": (h, dims.intermediate), "up_proj": (h, dims.intermediate), "down_proj": (dims.intermediate, h)}


def lora_targets(targets: str) -> list[str]:
    if targets.strip() == "all-linear":
        return list(LORA_TARGETS)
    names = [t.strip() for t in targets.split(",") if t.strip()]
    unknown = [t for t in names if t not in LORA_TARGETS]
    if unknown:
        raise BadInput(f"cannot plan LoRA on {', '.join(unknown)}", fix=f"use lora_targets all-linear or names among {', '.join(LORA_TARGETS)}")
    return names


def lora_param_count(dims: Dims, r: int, targets: str = "all-linear") -> int:
    """Adapter parameters: r*(in+out) per targeted linear layer (peft's A and B), all layers."""
    lin = lora_linears(dims)
    return dims.layers * sum(r * sum(lin[t]) for t in lora_targets(targets))


# --------------------------------------------------------------------------------------------
# Activations


def activation_bytes(dims: Dims, *, batch: int, seq: int, dtype: str = "bf16", kind: str = "score",
                     logit_tokens: int | None = None, checkpointing: bool = False, attention: str = "sdpa",
                     lora_r: int = 0, lora_targets: int = len(LORA_TARGETS)) -> dict[str, int]:
    """Activation memory of one training forward + backward on ``batch`` sequences of ``seq`` tokens.

    kind: 'score' (reward/cost model, critic: one score per token), 'sft' (causal LM, loss on every
    position), 'actor' (ppo-lag policy: log-probs of ``logit_tokens`` response positions per
    sequence). ``lora_r`` > 0: a frozen base with adapters on ``lora_targets`` linear layers per
    layer. Returns ``saved`` (kept for backward at the end of the forward) and ``peak`` (plus the
    largest backward transient), in bytes. See the module docstring for the formula.
    """
    e = 2 if dtype == "bf16" else 4
    h, a, qd, I, V, L = dims.hidden, dims.heads, dims.q_dim, dims.intermediate, dims.vocab, dims.layers
    tokens = batch * seq
    # RMSNorm: fp32 input copy (4h) + rsqrt (4) + normalised input (eh, only when the norm weight
    # trains) + output (eh, the next linear's input)
    norm = 4 * h + 4 + (1 if lora_r else 2) * e * h
    if attention == "eager":
        attn = 4 * e * qd + a * seq * (4 + (e if e < 4 else 0))     # q, k, v, output; fp32 softmax + cast
    else:
        attn = 4 * e * qd + 4 * a + e * seq                          # q, k, v, output; log-sum-exp; mask copy
    layer = 2 * norm + attn + 4 * e * I + (lora_targets * lora_r * e if lora_r else 0)
    # final norm, token ids, rotary cos/sin
    outside = norm + 8 + 2 * dims.d * e
    if kind == "score":
        head_saved, head_bwd = 4 * tokens, 0
    else:
        n = batch * (logit_tokens if kind == "actor" and logit_tokens else seq)
        head_saved = 4 * V * n                                        # fp32 log-softmax / logsumexp input
        head_bwd = (8 if kind == "sft" else e + 2) * V * n
    if checkpointing:
        body = tokens * (L * e * h + outside + e * seq)               # layer inputs (+ the mask they share)
        transient = max(head_saved + head_bwd, tokens * 16 * h, tokens * (layer + e * h))
    else:
        body = tokens * (L * layer + outside - ((4 * h + 4) if lora_r else 0))   # LoRA: layer 0's first norm input needs no grad
        transient = max(head_saved + head_bwd, tokens * 16 * h)
    return {"saved": int(body + head_saved), "peak": int(body + transient), "per_layer_per_token": int(layer)}


def kv_cache_bytes(dims: Dims, *, batch: int, positions: int, dtype: str = "bf16") -> int:
    """KV cache of generation: 2 (k and v) * layers * kv_heads * head_dim * positions * batch * bytes."""
    e = 2 if dtype == "bf16" else 4
    return 2 * dims.layers * dims.kv_heads * dims.d * positions * batch * e


# --------------------------------------------------------------------------------------------
# Roles and states


@dataclass
class Role:
    name: str
    kind: str                 # 'causal' or 'score'
    params: int               # weights this role holds on its own (0 when it shares another role's)
    trainable: int
    note: str = ""
    act: dict = field(default_factory=dict)      # {'nockpt': {...}, 'ckpt': {...}} for trained forward passes
    kv_cache: int = 0


def state_bytes(trainable: int, frozen: int, *, zero: int, offload: str, devices: int, dtype: str = "bf16") -> dict[str, float]:
    """Per-device bytes of weights, gradients and optimizer states (and CPU bytes per process).

    ``trainable`` parameters carry weights + gradients + Adam states; ``frozen`` ones weights only.
    """
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage {zero}")
    if offload not in OFFLOADS or (offload != "none" and zero == 0) or (offload == "optimizer+params" and zero != 3):
        raise ValueError(f"offload {offload!r} with ZeRO-{zero}")
    w, g, o = (2, 2, 12) if dtype == "bf16" else (4, 4, 8)
    n = devices
    weights = (trainable * w + frozen * w) / (n if zero >= 3 else 1)
    grads = trainable * g / (n if zero >= 2 else 1)
    optim = trainable * o / (n if zero >= 1 else 1)
    cpu = 0.0
    if offload in ("optimizer", "optimizer+params"):
        cpu += optim + trainable * 4 / n      # fp32 master/Adam states + fp32 gradient partition
        optim = 0.0
        grads = min(grads, GRAD_BUCKET_PARAMS * g)   # ZeRO-Offload streams gradients to CPU through the reduce bucket
    if offload == "optimizer+params":
        cpu += weights
        weights = 0.0
    return {"weights": weights, "grads": grads, "optimizer": optim, "cpu": cpu}


def settings() -> list[tuple[int, str]]:
    """Valid (ZeRO stage, offload) pairs: offload needs ZeRO >= 1, parameter offload ZeRO-3."""
    return [(0, "none"), (1, "none"), (1, "optimizer"), (2, "none"), (2, "optimizer"),
            (3, "none"), (3, "optimizer"), (3, "optimizer+params")]


# --------------------------------------------------------------------------------------------
# The plan


@dataclass
class Stage:
    """What the plan needs from a stage's recipe."""

    stage: str
    model: str
    batch_size: int           # pairs / sequences / prompts per rollout, per device
    micro_batch: int          # sequences per training forward, per device
    seq: int
    new_tokens: int = 0       # ppo-lag: max_new_tokens
    group_size: int = 1       # ppo-lag: responses per prompt (G of the grpo algorithms)
    zero3_gather: bool = True   # ppo-lag: ZeRO-3 rollouts sample from a gathered copy of the actor (PPOLagConfig.zero3_gather)
    lora_r: int = 0
    lora_targets: str = "all-linear"
    checkpointing: bool = False
    algorithm: str = "ppo-lag"
    reward_model: str | None = None
    cost_model: str | None = None
    reward_critic: str | None = None
    cost_critic: str | None = None
    shared_critic: bool = False
    reference: bool = True    # ppo-lag: a reference policy (not with kl_coeff 0: PPOLagConfig.uses_reference)
    tiny: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


def _stage_config_class(stage: str):
    from safealign import config as C

    return {"train-rm": C.RewardConfig, "train-cost": C.CostConfig, "sft": C.SFTConfig, "ppo-lag": C.PPOLagConfig}[stage]


def read_stage(cfg) -> Stage:
    """The stage's settings: dataclass defaults < recipe section < plan flags. The recipe is not
    validated as a run would be (no data or output_dir needed), but unknown keys and wrong types
    are still bad input."""
    from safealign import config as C

    cls = _stage_config_class(cfg.stage)
    fields = {f.name: f for f in C.config_fields(cls)}
    values: dict = {}
    if cfg.config:
        import yaml

        path = Path(cfg.config)
        raw = C.read_yaml(path)   # validates the file, flat view
        try:
            top = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            top = {}
        sectioned = isinstance(top, dict) and top and all(k in C.STAGE_NAMES for k in top)
        if sectioned:
            if cfg.stage not in top:
                raise BadInput(f"the recipe has no '{cfg.stage}' section (it has {', '.join(top)})", where=str(path),
                               fix=f"pass --stage with one of: {', '.join(k for k in top if k in STAGE_KINDS) or 'train-rm, train-cost, sft, ppo-lag'}")
            raw = C.read_yaml(path, cfg.stage)
        for key, value in raw.items():
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"not an option of {cfg.stage}"
                raise BadInput(f"unknown config key '{key}' ({hint})", where=str(path))
            values[key] = C.coerce(key, value, fields[key].type, str(path))
    sc = cls(**values)
    model = cfg.model or (sc.model if (cfg.config and "model" in values) else None)
    batch = cfg.batch_size if cfg.batch_size is not None else sc.batch_size
    if batch < 1:
        raise BadInput(f"batch_size {batch} must be >= 1")
    notes: list[str] = []
    tiny = {"hidden": sc.tiny_hidden, "layers": sc.tiny_layers, "heads": sc.tiny_heads, "vocab": sc.tiny_vocab}
    st = Stage(stage=cfg.stage, model=model, batch_size=batch, micro_batch=batch, seq=sc.max_length,
               lora_r=sc.lora_r, lora_targets=sc.lora_targets, checkpointing=sc.gradient_checkpointing, tiny=tiny, notes=notes)
    if cfg.stage in ("train-rm", "train-cost"):
        st.micro_batch = 2 * batch   # chosen and rejected in one forward
    if cfg.stage == "ppo-lag":
        st.new_tokens = sc.max_new_tokens
        st.algorithm = sc.algorithm
        st.group_size = sc.responses_per_prompt()
        st.reward_model, st.cost_model = sc.reward_model, sc.cost_model
        st.reward_critic, st.cost_critic = sc.reward_critic, sc.cost_critic
        st.shared_critic = sc.shared_critic
        st.reference = sc.uses_reference()
        st.zero3_gather = sc.zero3_gather
        div = sc.minibatches * sc.grad_accum
        st.micro_batch = max(1, batch * st.group_size // div)
        if cfg.seq_len is None and sc.max_length < sc.max_new_tokens + 8:
            st.seq = sc.max_length + sc.max_new_tokens
            notes.append(f"the recipe's max_length {sc.max_length} leaves no room for a prompt with max_new_tokens {sc.max_new_tokens} "
                         f"(safealign ppo-lag would refuse it: max_length is prompt + response); planned with {st.seq} tokens "
                         "(max_length of prompt + max_new_tokens); set max_length or pass --seq-len")
        if sc.ptx_coeff > 0:
            notes.append("the PTX loss's extra forward (ptx_data) is not counted")
        if sc.offload_frozen:
            notes.append("offload_frozen is not modelled: the frozen models are counted on the GPU throughout (an upper bound)")
    else:
        if sc.grad_accum > 1:
            notes.append(f"grad_accum {sc.grad_accum} does not change memory (micro-batch = batch_size)")
    if cfg.seq_len is not None:
        if cfg.seq_len < 2 or (cfg.stage == "ppo-lag" and cfg.seq_len <= st.new_tokens):
            raise BadInput(f"--seq-len {cfg.seq_len} is too short" + (f" for max_new_tokens {st.new_tokens}" if cfg.stage == "ppo-lag" else ""))
        st.seq = cfg.seq_len
    if cfg.stage == "ppo-lag":
        st.new_tokens = min(st.new_tokens, st.seq - 1)
    return st


def _aux_dims(path: str | None, fallback: Dims, what: str, notes: list, tiny: dict) -> Dims:
    if not path:
        notes.append(f"{what}: none named, assumed the size of the policy ({fallback.name})")
        return fallback
    try:
        return resolve_dims(path, tiny=tiny)
    except BadInput:
        notes.append(f"{what} '{path}' could not be read, assumed the size of the policy ({fallback.name})")
        return fallback


def build_roles(st: Stage, dims: Dims, *, lora_r: int, dtype: str, attention: str, micro_batch: int | None = None) -> list[Role]:
    """The roles of the stage, with their parameters and (for trained ones) activations."""
    mb = micro_batch or st.micro_batch

    n_targets = len(lora_targets(st.lora_targets)) if lora_r else 0

    def acts(d: Dims, kind: str, logit_tokens: int | None = None) -> dict:
        return {ck: activation_bytes(d, batch=mb, seq=st.seq, dtype=dtype, kind=kind, logit_tokens=logit_tokens,
                                     checkpointing=ck == "ckpt", attention=attention, lora_r=lora_r, lora_targets=n_targets)
                for ck in ("nockpt", "ckpt")}

    if st.stage in ("train-rm", "train-cost", "sft"):
        head, kind = ("lm", "sft") if st.stage == "sft" else ("score", "score")
        label = {"sft": "policy", "train-rm": "reward model", "train-cost": "cost model"}[st.stage]
        total = param_count(dims, head)
        if lora_r:
            adapter = lora_param_count(dims, lora_r, st.lora_targets)
            if head == "score":   # peft trains a copy of the score head (modules_to_save)
                return [Role(f"{label} base", "score", total, 0, "frozen"),
                        Role(f"{label} LoRA", "score", adapter + dims.hidden, adapter + dims.hidden,
                             f"r={lora_r} adapters + score head copy", act=acts(dims, kind))]
            return [Role(f"{label} base", "causal", total, 0, "frozen"),
                    Role(f"{label} LoRA", "causal", adapter, adapter, f"r={lora_r} adapters", act=acts(dims, kind))]
        return [Role(label, "causal" if head == "lm" else "score", total, total, "trained", act=acts(dims, kind))]

    # ppo-lag
    notes: list = []
    from safealign.rl.algorithms import ALGORITHMS

    algo = ALGORITHMS[st.algorithm]
    critics = list(algo.critics)            # ppo-lag: reward and cost critics; grpo*: none (four roles)
    rm = _aux_dims(st.reward_model, dims, "reward model", notes, st.tiny)
    cm = _aux_dims(st.cost_model, dims, "cost model", notes, st.tiny) if algo.cost != "none" else None
    for n in notes:
        if n not in st.notes:
            st.notes.append(n)
    T = st.new_tokens
    kv = kv_cache_bytes(dims, batch=st.batch_size * st.group_size, positions=st.seq, dtype=dtype)
    roles: list[Role] = []
    if lora_r:
        adapter = lora_param_count(dims, lora_r, st.lora_targets)
        roles.append(Role("policy base", "causal", param_count(dims, "lm"), 0,
                          "frozen; shared by actor, critics" + (" and reference (adapters disabled)" if st.reference else "")))
        roles.append(Role("actor", "causal", adapter, adapter, f"LoRA r={lora_r}", act=acts(dims, "actor", T + 1), kv_cache=kv))
        if st.reference:
            roles.append(Role("reference", "causal", 0, 0, "= policy base, adapters disabled"))
        if st.shared_critic and critics:   # one adapter, a value head per stream
            n = adapter + len(critics) * dims.hidden
            roles.append(Role(f"{' + '.join(critics)} critic (shared)", "score", n, n,
                              f"one LoRA r={lora_r} adapter on the policy base + {len(critics)} value heads", act=acts(dims, "score")))
        for c in critics if not st.shared_critic else ():
            roles.append(Role(f"{c} critic", "score", adapter + dims.hidden, adapter + dims.hidden,
                              f"LoRA r={lora_r} on the policy base + value head", act=acts(dims, "score")))
    else:
        roles.append(Role("actor", "causal", param_count(dims, "lm"), param_count(dims, "lm"), "trained",
                          act=acts(dims, "actor", T + 1), kv_cache=kv))
        if st.reference:
            roles.append(Role("reference", "causal", param_count(dims, "lm"), 0, "frozen"))
        if st.shared_critic and critics:   # the reward critic's backbone + a value head per stream
            cd = _aux_dims(st.reward_critic, rm, "reward critic", st.notes, st.tiny) if st.reward_critic else rm
            n = param_count(cd, "score") + (len(critics) - 1) * cd.hidden
            roles.append(Role(f"{' + '.join(critics)} critic (shared)", "score", n, n,
                              f"one backbone, {len(critics)} value heads; initialised from the {'reward critic' if st.reward_critic else 'reward model'}",
                              act=acts(cd, "score")))
        for c in critics if not st.shared_critic else ():
            judge = rm if c == "reward" else cm
            given = getattr(st, f"{c}_critic")
            cd = _aux_dims(given, judge, f"{c} critic", st.notes, st.tiny) if given else judge
            roles.append(Role(f"{c} critic", "score", param_count(cd, "score"), param_count(cd, "score"),
                              "trained" if given else f"trained, initialised from the {c} model", act=acts(cd, "score")))
    at = 1 + bool(lora_r) + st.reference          # after the actor (the policy base first with LoRA) and the reference
    roles.insert(at, Role("reward model", "score", param_count(rm, "score"), 0, "frozen"))
    if cm is not None:
        roles.insert(at + 1, Role("cost model", "score", param_count(cm, "score"), 0, "frozen"))
    return roles


def _rollout_bytes(st: Stage, dims: Dims, dtype: str) -> int:
    if st.stage != "ppo-lag":
        return 0
    e = 2 if dtype == "bf16" else 4
    from safealign.rl.experience import SAMPLED_LOGITS_BYTES

    responses = st.batch_size * st.group_size
    kv = kv_cache_bytes(dims, batch=responses, positions=st.seq, dtype=dtype)
    sampled = responses * st.new_tokens * dims.vocab * 4                # fp32 logits generate() keeps for the sampled log-probs
    scoring = st.batch_size * (st.new_tokens + 1) * dims.vocab * e     # logits of a no-grad log-prob pass
    return max(kv + (sampled if sampled <= SAMPLED_LOGITS_BYTES else 0), scoring)


def gathered_learner_bytes(st: Stage, roles: list, dtype: str) -> int:
    """ZeRO-3 with zero3_gather: the unsharded copy of the actor that a rollout samples from, on every
    device, on top of its shard. With LoRA the actor module is the policy base with every adapter on
    it (the actor's and each critic's; the critics' value heads live outside it)."""
    if st.stage != "ppo-lag" or not st.zero3_gather:
        return 0
    by = {r.name: r for r in roles}
    n = by["actor"].params
    if "policy base" in by:   # every adapter is the actor's size: one per critic, or one for all with --shared-critic
        from safealign.rl.algorithms import ALGORITHMS

        critics = ALGORITHMS[st.algorithm].critics
        n = by["policy base"].params + n * (1 + (min(len(critics), 1) if st.shared_critic else len(critics)))
    return n * (2 if dtype == "bf16" else 4)


def evaluate(st: Stage, dims: Dims, *, devices: int, dtype: str, attention: str, lora_r: int,
             micro_batch: int | None = None) -> dict:
    """Per-device totals of every (ZeRO, offload) setting, with and without checkpointing."""
    roles = build_roles(st, dims, lora_r=lora_r, dtype=dtype, attention=attention, micro_batch=micro_batch)
    trainable = sum(r.trainable for r in roles)
    frozen = sum(r.params - r.trainable for r in roles)
    largest_module = dims.vocab * dims.hidden
    act = {}
    for ck in ("nockpt", "ckpt"):
        trained = [r.act[ck] for r in roles if r.act]
        saved = sum(a["saved"] for a in trained)
        act[ck] = saved + max((a["peak"] - a["saved"] for a in trained), default=0)
    rollout_base = _rollout_bytes(st, dims, dtype)
    gathered = gathered_learner_bytes(st, roles, dtype)
    e = 2 if dtype == "bf16" else 4
    rows = []
    for zero, off in settings():
        rollout = rollout_base + (gathered if zero == 3 else 0)
        s = state_bytes(trainable, frozen, zero=zero, offload=off, devices=devices, dtype=dtype)
        live = min(max(largest_module, ZERO3_LIVE_PARAMS), max(r.params for r in roles)) * e if zero == 3 else 0
        static = s["weights"] + s["grads"] + s["optimizer"] + live
        rows.append({"zero": zero, "offload": off, "lora_r": lora_r, **{k: s[k] for k in ("weights", "grads", "optimizer")},
                     "zero3_live": live, "activations_nockpt": act["nockpt"], "activations_ckpt": act["ckpt"], "rollout": rollout,
                     "rollout_gathered_learner": gathered if zero == 3 else 0,
                     "peak_nockpt": static + max(act["nockpt"], rollout), "peak_ckpt": static + max(act["ckpt"], rollout),
                     "cpu_per_process": s["cpu"]})
    return {"roles": roles, "rows": rows, "trainable": trainable, "frozen": frozen}


def _pick(rows: list[dict], usable: float, recipe_ckpt: bool, offloads: tuple[str, ...] = OFFLOADS) -> dict | None:
    """Cheapest fitting setting: no offload first, then not adding checkpointing, then the lowest ZeRO stage."""
    cands = []
    for r in rows:
        if r["offload"] not in offloads:
            continue
        for ck in ([recipe_ckpt] if recipe_ckpt else [False, True]):
            peak = r["peak_ckpt"] if ck else r["peak_nockpt"]
            if peak <= usable:
                cands.append(((OFFLOADS.index(r["offload"]), ck and not recipe_ckpt, r["zero"]), {**r, "checkpointing": ck, "peak": peak}))
    if not cands:
        return None
    return min(cands, key=lambda c: c[0])[1]


def _what_would(st: Stage, dims: Dims, cfg, usable: float, kw: dict, lora_r: int, extra_r: int,
                offloads: tuple[str, ...]) -> list[str]:
    """What would fit (with only ``offloads`` allowed): more GPUs, LoRA, a smaller micro-batch."""
    out: list[str] = []
    pick = lambda rows: _pick(rows, usable, st.checkpointing, offloads)  # noqa: E731
    # more devices: up to 8 per node first, then whole nodes; same model and per-device batch
    layouts = [(g, 1) for g in range(cfg.gpus + 1, 9)] if cfg.nodes == 1 else []
    per_node = max(cfg.gpus, 8) if cfg.nodes == 1 else cfg.gpus
    layouts += [(per_node, n) for n in range(cfg.nodes + 1, cfg.nodes + 65)]
    for g, nodes in layouts:
        r = pick(evaluate(st, dims, devices=g * nodes, lora_r=lora_r, **kw)["rows"])
        if r:
            where = f"{g} GPUs" if nodes == 1 else f"{nodes} nodes x {g} GPUs"
            out.append(f"more GPUs: {where} with {setting_name(r)}: {fmt_bytes(r['peak'])} per device")
            break
    else:
        out.append("more GPUs alone do not help: what is not partitioned (activations, rollout) exceeds the memory")
    if extra_r:
        r = pick(evaluate(st, dims, devices=cfg.gpus * cfg.nodes, lora_r=extra_r, **kw)["rows"])
        if r:
            out.append(f"LoRA (lora_r: {extra_r}) with {setting_name(r)}: {fmt_bytes(r['peak'])} per device")
    mb = main_mb = st.micro_batch
    step = 2 if st.stage in ("train-rm", "train-cost") else 1
    while mb > step:
        mb = max(step, mb // 2)
        r = pick(evaluate(st, dims, devices=cfg.gpus * cfg.nodes, lora_r=lora_r, micro_batch=mb, **kw)["rows"])
        if r:
            if st.stage == "ppo-lag":
                what = (f"a micro-batch of {mb} (raise grad_accum to {max(1, main_mb // mb)} so that batch_size {st.batch_size} "
                        f"/ (minibatches x grad_accum) = {mb})")
            else:
                what = f"--batch-size {mb // step} (raise grad_accum to keep the global batch)"
            out.append(f"smaller batch: {what} with {setting_name(r)}: {fmt_bytes(r['peak'])} per device")
            break
    if len(out) == 1 and out[0].startswith("more GPUs alone"):
        out.append("a shorter --seq-len or a smaller model")
    return out


def parse_mem(text: str) -> float:
    """'80GB', '80GiB', '80G', '80' (GiB), '24576MB' -> bytes. GB and GiB both mean 2**30 (an '80GB' GPU has 80 GiB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*", str(text).lower())
    if not m or float(m.group(1)) <= 0:
        raise BadInput(f"--gpu-mem {text!r} is not a memory size", fix="write it like 80GB, 24GiB or 40960MB")
    unit = m.group(2) or "g"
    return float(m.group(1)) * {"k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "t": 2 ** 40}[unit]


def fmt_bytes(n: float) -> str:
    if n <= 0:
        return "0"
    for unit, size in (("G", GiB), ("M", 2 ** 20), ("K", 2 ** 10)):
        if n >= size * 0.995:
            return f"{n / size:.1f}{unit}" if n / size < 1000 else f"{n / size:.0f}{unit}"
    return f"{n:.0f}B"


def fmt_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def setting_name(r: dict) -> str:
    parts = [f"ZeRO-{r['zero']}", {"none": "no offload", "optimizer": "optimizer offloaded to CPU",
                                    "optimizer+params": "optimizer and parameters offloaded to CPU"}[r["offload"]]]
    if r.get("lora_r"):
        parts.append(f"LoRA r={r['lora_r']}")
    if "checkpointing" in r:
        parts.append("gradient checkpointing " + ("on" if r["checkpointing"] else "off"))
    return ", ".join(parts)


def make_plan(cfg) -> dict:
    """The whole plan as a JSON-able dict (also used by the tests and the benchmark)."""
    if cfg.gpus < 1 or cfg.nodes < 1:
        raise BadInput(f"--gpus {cfg.gpus} and --nodes {cfg.nodes} must be >= 1")
    if not 0 <= cfg.margin < 1:
        raise BadInput(f"--margin {cfg.margin} must be in [0, 1)")
    if cfg.lora_r is not None and cfg.lora_r < 1:
        raise BadInput(f"--lora-r {cfg.lora_r} must be >= 1")
    st = read_stage(cfg)
    dims = resolve_dims(st.model, tiny=st.tiny)
    devices = cfg.gpus * cfg.nodes
    mem = parse_mem(cfg.gpu_mem)
    usable = mem * (1 - cfg.margin)
    kw = dict(dtype=cfg.dtype, attention=cfg.attention)
    recipe_lora = st.lora_r > 0
    extra_r = 0 if recipe_lora else (cfg.lora_r or 16)
    main = evaluate(st, dims, devices=devices, lora_r=st.lora_r if not (recipe_lora and cfg.lora_r) else cfg.lora_r, **kw)
    extra = evaluate(st, dims, devices=devices, lora_r=extra_r, **kw) if extra_r else None
    rec = _pick(main["rows"], usable, st.checkpointing)
    lora_main = main["rows"][0]["lora_r"]
    suggestions: list[str] = []
    alternatives: list[str] = []
    if rec is None:
        suggestions = _what_would(st, dims, cfg, usable, kw, lora_main, extra_r, OFFLOADS)
    elif rec["offload"] != "none":
        alternatives = [s for s in _what_would(st, dims, cfg, usable, kw, lora_main, extra_r, ("none",))
                        if not s.startswith(("more GPUs alone", "a shorter"))]
    roles = main["roles"]
    plan = {
        "stage": st.stage, "model": {**dataclasses.asdict(dims), "params": param_count(dims, "score" if st.stage in ("train-rm", "train-cost") else "lm")},
        "devices": devices, "gpus": cfg.gpus, "nodes": cfg.nodes, "gpu_mem_bytes": mem, "usable_bytes": usable, "margin": cfg.margin,
        "dtype": cfg.dtype, "attention": cfg.attention, "batch_size": st.batch_size, "micro_batch": st.micro_batch, "seq_len": st.seq,
        "new_tokens": st.new_tokens, "recipe_checkpointing": st.checkpointing, "recipe_lora_r": st.lora_r,
        "roles": [dataclasses.asdict(r) for r in roles], "rows": main["rows"], "lora_rows": extra["rows"] if extra else [],
        "recommendation": rec, "suggestions": suggestions, "alternatives_without_offload": alternatives, "notes": st.notes,
    }
    return plan


def render(plan: dict) -> str:
    """The plan as text tables."""
    m = plan["model"]
    lines = []
    ck_recipe = "on" if plan["recipe_checkpointing"] else "off"
    shape = (f"{plan['micro_batch']} sequences x {plan['seq_len']} tokens per micro-batch"
             + (f", rollout {plan['batch_size']} prompts x {plan['new_tokens']} new tokens" if plan["stage"] == "ppo-lag" else ""))
    lines.append(f"plan: {plan['stage']}, model {m['name']} ({fmt_count(m['params'])} params, {m['layers']} layers, hidden {m['hidden']}), "
                 f"{plan['nodes']} node(s) x {plan['gpus']} GPU(s) of {fmt_bytes(plan['gpu_mem_bytes'])}, {plan['dtype']}, {plan['attention']} attention")
    lines.append(f"  {shape}; recipe gradient checkpointing {ck_recipe}")
    lines.append("")
    lines.append("Per role (whole model, before ZeRO partitioning)")
    hdr = ["role", "params", "trainable", "weights", "grads", "optimizer", "act", "act ckpt", "KV cache", "note"]
    w_b, g_b, o_b = (2, 2, 12) if plan["dtype"] == "bf16" else (4, 4, 8)
    table = []
    for r in plan["roles"]:
        table.append([r["name"], fmt_count(r["params"]), fmt_count(r["trainable"]), fmt_bytes(r["params"] * w_b),
                      fmt_bytes(r["trainable"] * g_b), fmt_bytes(r["trainable"] * o_b),
                      fmt_bytes(r["act"]["nockpt"]["peak"]) if r["act"] else "-", fmt_bytes(r["act"]["ckpt"]["peak"]) if r["act"] else "-",
                      fmt_bytes(r["kv_cache"]) if r["kv_cache"] else "-", r["note"]])
    lines += _table(hdr, table)
    lines.append("")
    usable = plan["usable_bytes"]

    def totals(rows, title):
        lines.append(title)
        hdr = ["ZeRO", "offload", "weights", "grads", "optim", "act", "act ckpt", "rollout", "peak", "peak ckpt", "CPU/node", "fits"]
        t = []
        for r in rows:
            fit_no, fit_ck = r["peak_nockpt"] <= usable, r["peak_ckpt"] <= usable
            fits = "yes" if fit_no else ("ckpt" if fit_ck else "no")
            t.append([str(r["zero"]), r["offload"], fmt_bytes(r["weights"] + r["zero3_live"]), fmt_bytes(r["grads"]), fmt_bytes(r["optimizer"]),
                      fmt_bytes(r["activations_nockpt"]), fmt_bytes(r["activations_ckpt"]), fmt_bytes(r["rollout"]) if r["rollout"] else "-",
                      fmt_bytes(r["peak_nockpt"]), fmt_bytes(r["peak_ckpt"]), fmt_bytes(r["cpu_per_process"] * plan["gpus"]) if r["cpu_per_process"] else "-", fits])
        lines.extend(_table(hdr, t))
        lines.append("")

    lora = plan["rows"][0]["lora_r"]
    totals(plan["rows"], f"Per device, {'LoRA r=' + str(lora) if lora else 'full fine-tuning'} (limit {fmt_bytes(usable)} = "
                         f"{fmt_bytes(plan['gpu_mem_bytes'])} - {plan['margin']:.0%} margin; fits: yes, ckpt = only with gradient checkpointing, no)")
    if plan["lora_rows"]:
        totals(plan["lora_rows"], f"Per device, LoRA r={plan['lora_rows'][0]['lora_r']} instead (extra rows)")
    if plan["suggestions"]:
        lines.append("Nothing fits. What would:")
        for s in plan["suggestions"]:
            lines.append(f"  - {s}")
    if plan["alternatives_without_offload"]:
        rec = plan["recommendation"]
        lines.append(f"The recommended layout offloads to CPU ({fmt_bytes(rec['cpu_per_process'] * plan['gpus'])} of CPU memory per node, "
                     "and slower steps). Without offload:")
        for s in plan["alternatives_without_offload"]:
            lines.append(f"  - {s}")
    for n in plan["notes"]:
        lines.append(f"note: {n}")
    gathered = max((r["rollout_gathered_learner"] for r in plan["rows"] + plan["lora_rows"]), default=0)
    if gathered:
        lines.append(f"note: the ZeRO-3 rows' rollout includes up to {fmt_bytes(gathered)} for the actor gathered once per rollout "
                     "(zero3_gather; --no-zero3-gather samples from the shards instead: less memory, every layer all-gathered at every decoding step)")
    lines.append("note: estimates (formulas in safealign/plan.py); against tensors measured on tiny models, weights/grads/optimizer "
                 "are exact and the activation peak within 4% (bench/results/plan_vs_measured.md); CUDA context and "
                 "fragmentation are left to the margin")
    return "\n".join(lines)


def _table(hdr: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(hdr, *rows)]
    fmt = lambda row: "  ".join(str(x).ljust(w) if i in (0, 1) or i == len(row) - 1 else str(x).rjust(w)  # noqa: E731
                                for i, (x, w) in enumerate(zip(row, widths))).rstrip()
    return [fmt(hdr), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]


def headline(plan: dict) -> str:
    rec = plan["recommendation"]
    where = f"{plan['devices']} x {fmt_bytes(plan['gpu_mem_bytes'])}"
    if rec:
        cpu = f", {fmt_bytes(rec['cpu_per_process'] * plan['gpus'])} of CPU memory per node" if rec["cpu_per_process"] else ""
        return (f"Recommended for {plan['stage']} on {where}: {setting_name(rec)}; "
                f"peak {fmt_bytes(rec['peak'])} per device of {fmt_bytes(plan['usable_bytes'])} usable{cpu}.")
    useful = [x for x in plan["suggestions"] if not x.startswith("more GPUs alone")]
    first = f"; would fit: {useful[0]}" if useful else ""
    return f"Nothing fits {plan['stage']} on {where} ({fmt_bytes(plan['usable_bytes'])} usable per device){first}."


def run(cfg) -> dict:
    """`safealign plan`: print the tables and the recommendation; write JSON to --output."""
    import typer

    plan = make_plan(cfg)
    typer.echo(render(plan))
    summary = {"headline": headline(plan),
               "recommendation": plan["recommendation"], "suggestions": plan["suggestions"]}
    if cfg.output:
        out = Path(cfg.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(plan, indent=1, default=float) + "\n")
        typer.echo(f"wrote {out}")
    return summary
