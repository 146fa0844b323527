"""Load or build tokenizers and models: a local path, a hub name, or ``tiny``.

``tiny`` builds a small Llama from a config and trains a byte-level BPE tokenizer on the run's
own texts, so every command works offline. Whatever the source, the tokenizer ends up with an
EOS token and a *distinct* pad token (DESIGN.md: the end score is read at the appended EOS, and
transformers' pooling reads the token before EOS when pad == EOS).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from safealign.errors import BadInput

SPECIAL = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>"}


def silence_known_deprecations() -> None:
    """Hide the one deprecation warning our runs trigger that only a library can fix.

    peft 0.21.2 (the latest release) reads ``model.is_gradient_checkpointing`` in
    ``PeftModel.__init__`` (every get_peft_model and PeftModel.from_pretrained), which transformers 5
    deprecated for ``is_activation_checkpointing``; a property of the model class, so no caller can
    avoid it. Our own code passes ``dtype=`` (never ``torch_dtype=``). Drop this filter once peft
    stops reading the old property (tests/test_warnings.py then still passes)."""
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


silence_known_deprecations()


def is_tiny(name: str) -> bool:
    return name == "tiny"


def _check_source(name: str, what: str, revision: str | None = None) -> None:
    p = Path(name).expanduser()
    if p.exists():
        if p.is_dir() and not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file() and what != "tokenizer":
            raise BadInput(f"{what} directory has no config.json", where=str(p), fix="point at a directory written by save_pretrained (or a safealign output directory)")
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise BadInput(f"{what} path not found", where=name, fix="check the path, or use --model tiny")
    from safealign.runtime import hub

    hub.require(name, "model" if what == "tokenizer" else what, kind="model", revision=revision)


def _is_hub(name: str) -> bool:
    return not Path(name).expanduser().exists()


def _load_failed(e: Exception, name: str, what: str) -> BadInput:
    if _is_hub(name):
        from safealign.runtime import hub

        return hub.load_error(e, name, what)
    return BadInput(f"cannot load {what} ({str(e).splitlines()[0] if str(e) else type(e).__name__})", where=name)


def train_tiny_tokenizer(texts: list[str], vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained on ``texts`` with distinct <pad>/<unk>/<bos>/<eos>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, **SPECIAL)
    tok.padding_side = "right"
    return tok


def load_tokenizer(name: str, *, train_texts: list[str] | None = None, vocab_size: int = 1024, revision: str | None = None):
    """Tokenizer of ``name`` with an EOS and a pad token distinct from it (added when missing);
    ``revision`` applies to a hub name."""
    if is_tiny(name):
        if not train_texts:
            raise BadInput("--model tiny needs texts to train its tokenizer on")
        tok = train_tiny_tokenizer(train_texts, vocab_size)
    else:
        from transformers import AutoTokenizer

        _check_source(name, "tokenizer", revision)
        try:
            tok = AutoTokenizer.from_pretrained(name, **_rev(name, revision))
        except (OSError, ValueError) as e:
            raise _load_failed(e, name, "a tokenizer") from None
    ensure_special_tokens(tok)
    return tok


def check_model_kind(path: str, what: str, flag: str, score_type: str | None = None) -> None:
    """Refuse a local model of the wrong kind. Models trained by safealign record their kind (config
    ``safealign_score_type``), so a score model given as a policy, or a reward model given as the cost
    model (swapped arguments), is caught before anything runs. Hub names and foreign models pass.

    score_type: None for a policy; "reward"/"cost" for a score model.
    """
    import json

    cfg_file = Path(path).expanduser() / "config.json"
    if not cfg_file.is_file():
        return
    try:
        kind = json.loads(cfg_file.read_text()).get("safealign_score_type")
    except (ValueError, AttributeError):
        raise BadInput("config.json is not valid JSON", where=str(cfg_file)) from None
    if score_type is None and kind:
        raise BadInput(f"this is a {kind} model, not a policy", where=path, fix=f"pass a causal LM (e.g. from safealign sft or ppo-lag) to {flag}")
    if score_type and kind and kind != score_type:
        raise BadInput(f"this is a {kind} model, but {flag} needs a {score_type} model", where=path,
                       fix="check the order of --reward-model and --cost-model")


def check_model_dir(path: str, what: str, flag: str, score_type: str | None = None) -> None:
    """A local model directory that exists, has a config and a tokenizer, and is the right kind
    (:func:`check_model_kind`)."""
    p = Path(path).expanduser()
    fix = f"pass {flag} DIR written by safealign (or save_pretrained)"
    if not p.is_dir():
        raise BadInput(f"{what} directory not found", where=path, fix=fix)
    if not (p / "config.json").is_file():
        raise BadInput(f"{what} directory has no config.json", where=path, fix=fix)
    check_model_kind(path, what, flag, score_type)
    load_tokenizer(str(p))  # raises BadInput when the tokenizer is missing or unreadable


def ensure_special_tokens(tok) -> bool:
    """Give ``tok`` an EOS and a pad token different from EOS. Returns True if tokens were added."""
    added = {}
    if tok.eos_token is None:
        added["eos_token"] = "<eos>"
    if tok.pad_token is None or tok.pad_token == (tok.eos_token or added.get("eos_token")):
        added["pad_token"] = "<pad>"
    if added:
        tok.add_special_tokens(added)
    return bool(added)


def pick_dtype(choice: str):
    import torch

    if choice == "fp32":
        return torch.float32
    if choice == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32


def tiny_config(tok, *, hidden: int = 64, layers: int = 2, heads: int = 4, max_positions: int = 512, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=max_positions,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       tie_word_embeddings=False, **extra)


def _fit_vocab(model, tok) -> None:
    """Resize embeddings when the tokenizer gained tokens; record pad/eos ids in the config."""
    emb = model.get_input_embeddings().weight.shape[0]
    if len(tok) > emb:
        model.resize_token_embeddings(len(tok), mean_resizing=True)
    model.config.pad_token_id = tok.pad_token_id
    model.config.eos_token_id = tok.eos_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.pad_token_id = tok.pad_token_id
        gen.eos_token_id = tok.eos_token_id


def _rev(name: str, revision: str | None) -> dict:
    """from_pretrained's revision argument, for a hub name only."""
    return {"revision": revision} if revision and _is_hub(name) else {}


def load_score_model(name: str, tok, *, dtype: str = "auto", seed: int = 0, tiny: dict | None = None, score_type: str | None = None,
                     revision: str | None = None):
    """A sequence-classification model (one score) from ``name`` (path/hub/causal LM checkpoint) or tiny."""
    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification, LlamaForSequenceClassification

    torch_dtype = pick_dtype(dtype)
    if is_tiny(name):
        torch.manual_seed(seed)
        model = LlamaForSequenceClassification(tiny_config(tok, num_labels=1, **(tiny or {}))).to(torch_dtype)
    else:
        _check_source(name, "model", revision)
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # a causal-LM checkpoint prints an expected "score.weight MISSING" report
        try:
            torch.manual_seed(seed)
            model = AutoModelForSequenceClassification.from_pretrained(name, num_labels=1, dtype=torch_dtype, **_rev(name, revision))
        except (OSError, ValueError) as e:
            raise _load_failed(e, name, "a score model") from None
        finally:
            transformers.logging.set_verbosity(verbosity)
    _fit_vocab(model, tok)
    if score_type:
        model.config.safealign_score_type = score_type
    return model


def load_causal_lm(name: str, tok, *, dtype: str = "auto", seed: int = 0, tiny: dict | None = None, revision: str | None = None):
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    torch_dtype = pick_dtype(dtype)
    if is_tiny(name):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_config(tok, **(tiny or {}))).to(torch_dtype)
    else:
        _check_source(name, "model", revision)
        try:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, **_rev(name, revision))
        except (OSError, ValueError) as e:
            raise _load_failed(e, name, "a causal LM") from None
    _fit_vocab(model, tok)
    return model


def apply_lora(model, *, r: int, alpha: int, dropout: float, targets: str, task: str):
    """Wrap ``model`` with LoRA adapters (task: 'SEQ_CLS' or 'CAUSAL_LM'); the score head trains fully."""
    from peft import LoraConfig, TaskType, get_peft_model

    silence_known_deprecations()  # again: a caller may have reset the warning filters since the import
    target = "all-linear" if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    cfg = LoraConfig(task_type=getattr(TaskType, task), r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target)
    try:
        return get_peft_model(model, cfg)
    except ValueError as e:
        raise BadInput(f"cannot apply LoRA ({e})", fix="check --lora-targets against the model's module names") from None


class local_load:
    """Context manager: load a model in this process only, even while a ZeRO-3 run is active.

    Under ZeRO-3 transformers builds models inside ``deepspeed.zero.Init``, which partitions the
    weights with collectives every process must join; a load done by one process (a reload check, an
    export) would wait for the others for ever. This hides the global DeepSpeed config meanwhile.
    """

    def __enter__(self):
        from transformers.integrations import deepspeed as hf_ds

        self._ref = hf_ds._hf_deepspeed_config_weak_ref
        hf_ds._hf_deepspeed_config_weak_ref = None
        return self

    def __exit__(self, *exc):
        from transformers.integrations import deepspeed as hf_ds

        hf_ds._hf_deepspeed_config_weak_ref = self._ref
        return False
