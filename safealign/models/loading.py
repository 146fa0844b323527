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


PICKLE_WEIGHTS = ("*.bin", "*.pkl", "*.pt", "*.pth", "*.ckpt")   # never loaded: unpickling can run code


def _check_source(name: str, what: str, revision: str | None = None) -> None:
    p = Path(name).expanduser()
    if p.exists():
        if what != "tokenizer":
            check_model_folder(p, what)
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise BadInput(f"{what} path not found", where=name, fix="check the path, or use --model tiny")
    from safealign.runtime import hub

    hub.require(name, "model" if what == "tokenizer" else what, kind="model", revision=revision)


def _is_hub(name: str) -> bool:
    return not Path(name).expanduser().exists()


def _what_is(p: Path) -> str:
    """Why ``p`` is not a model directory, in words."""
    from safealign.runtime.io import describe_run_dir

    if (p / "release").is_dir() or (p / "costs.jsonl").is_file():
        hint = f"; the model it released is in {p / 'release'}" if (p / "release").is_dir() else " (it released nothing)"
        return f"it is the output directory of a safety test, not a model{hint}"
    held = describe_run_dir(p)
    if held and (p / "checkpoints").is_dir():
        return f"it holds {held} that has not saved its model yet (only checkpoints/): finish it with the same command and --resume"
    if held:
        return f"it holds {held}, which contains no model"
    return "it has no config.json (a model directory holds what save_pretrained writes: config.json, model.safetensors, tokenizer files)"


def check_model_folder(p: Path, what: str) -> None:
    """A local model directory safealign may load: a model (config.json or an adapter), written
    completely (a safealign run's report.json is there), with safetensors weights that are not cut
    short; weights only in pickle files (``*.bin``) are refused, since unpickling can run code."""
    import json

    from safealign.runtime.io import check_safetensors

    if not p.is_dir():
        raise BadInput(f"{what} path is a file, not a model directory", where=str(p), fix="pass the directory that holds config.json")
    if not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
        raise BadInput(f"not a {what} directory: {_what_is(p)}", where=str(p),
                       fix="point at a directory written by save_pretrained (or by safealign sft/train-rm/train-cost/ppo-lag, or a safety test's release/)")
    if (p / "manifest.json").is_file() and not (p / "report.json").is_file():
        raise BadInput(f"the safealign run that wrote this {what} did not finish (it has no report.json): it was stopped after saving "
                       "the model and before its final checks, so the model is not accepted", where=str(p),
                       fix="finish that run with the same command and --resume, then use it")
    weights = sorted(p.glob("*.safetensors"))
    if not weights:
        pickles = sorted(f.name for pattern in PICKLE_WEIGHTS for f in p.glob(pattern) if f.name != "training_args.bin")
        if pickles:
            raise BadInput(f"the {what}'s weights are pickle files ({', '.join(pickles[:3])}), which safealign never loads (unpickling can run code)",
                           where=str(p), fix="convert them to safetensors where you trust the files: from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")
    try:
        explicit = json.loads((p / "config.json").read_text()).get("transformers_weights") if (p / "config.json").is_file() else None
    except (ValueError, AttributeError):
        raise BadInput("config.json is not valid JSON", where=str(p / "config.json")) from None
    if explicit and not str(explicit).endswith((".safetensors", ".safetensors.index.json")):
        raise BadInput(f"config.json names weights in a pickle file ({explicit}), which safealign never loads", where=str(p / "config.json"),
                       fix="save the model with safe_serialization=True")
    for f in weights:
        check_safetensors(f)


def check_score_config(name: str, what: str) -> None:
    """A trained reward/cost model (or critic) is a ``*ForSequenceClassification`` with exactly one
    label: refuse a causal LM (its score head would be initialised at random) before any weight is read."""
    from transformers import AutoConfig

    fix = "pass a model trained by safealign train-rm/train-cost (or any *ForSequenceClassification with num_labels=1 and its head saved)"
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise BadInput(f"cannot read the {what}'s config ({str(e).splitlines()[0]})", where=name) from None
    archs = list(getattr(config, "architectures", None) or [])
    if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
        missing = _missing_head_weights(name, config)
        head = f" ({', '.join(missing)} not in the checkpoint)" if missing else ""
        raise BadInput(f"this is a {archs[0]} checkpoint, not a {what}: a {what} is a *ForSequenceClassification with one label, and "
                       f"loading this one would initialise its score head at random{head}, so every score would be noise", where=name, fix=fix)
    if config.num_labels != 1:
        raise BadInput(f"the {what} has {config.num_labels} labels; a {what} scores with exactly one (num_labels=1)", where=name, fix=fix)


def _missing_head_weights(name: str, config) -> list[str]:
    """Weights a one-label sequence classifier of this architecture needs that a local checkpoint
    lacks (read from the safetensors headers; the model is built on the meta device, no memory)."""
    import copy
    import json

    import torch
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification

    p = Path(name).expanduser()
    index = p / "model.safetensors.index.json"
    try:
        if index.is_file():
            have = set(json.loads(index.read_text())["weight_map"])
        else:
            have = set()
            for f in p.glob("*.safetensors"):
                with safe_open(str(f), "pt") as fh:
                    have |= set(fh.keys())
        cfg = copy.deepcopy(config)
        cfg.num_labels = 1
        with torch.device("meta"):
            need = set(AutoModelForSequenceClassification.from_config(cfg).state_dict())
    except Exception:  # an architecture without a sequence-classification head, a hub name: say less
        return []
    return sorted(need - have) if have else []


def _load_error(e: Exception, kind: str, name: str) -> BadInput:
    """A failed load as one paragraph: a hub name's likely fix (runtime/hub), or the local file's fault."""
    if _is_hub(name):
        from safealign.runtime import hub

        return hub.load_error(e, name, f"a {kind}")
    from safealign.runtime.io import disk_fault

    cause = disk_fault(e)
    text = cause or (str(e).splitlines()[0] if str(e) else type(e).__name__)
    return BadInput(f"cannot load a {kind} ({text})", where=name)


def _refuse_missing(info: dict, name: str, what: str) -> None:
    """Weights the model needs that the checkpoint does not have (transformers would initialise them at random)."""
    missing = sorted(info.get("missing_keys") or []) + sorted(k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys") or [])
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise BadInput(f"not a usable {what}: the checkpoint lacks weights the model needs, which would be initialised at random ({shown})",
                       where=name, fix="pass a model whose saved weights include them (for a reward/cost model: one trained by safealign train-rm/train-cost)")


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
            raise _load_error(e, "tokenizer", name) from None
        if Path(name).expanduser().is_dir():
            from safealign.data.templates import read_format

            tok.safealign_format = read_format(Path(name).expanduser())  # the prompt format the model was trained with
    ensure_special_tokens(tok)
    return tok


def save_tokenizer(tok, path) -> None:
    """``tok.save_pretrained(path)`` plus the prompt format it carries (so a resumed run formats as the first did)."""
    import json

    from safealign.data.templates import FORMAT_FILE

    tok.save_pretrained(path)
    if getattr(tok, "safealign_format", None):
        (Path(path) / FORMAT_FILE).write_text(json.dumps(tok.safealign_format, indent=2) + "\n")


def portable_base(name: str | None) -> str | None:
    """Where a model's base can be found from any working directory: the absolute path of a local
    directory, a hub name as it is, None for ``tiny`` (a model that exists only in memory)."""
    if not name or is_tiny(name):
        return None
    p = Path(name).expanduser()
    return str(p.resolve()) if p.exists() else name


def check_model_kind(path: str, what: str, flag: str, score_type: str | None = None) -> None:
    """Refuse a local model of the wrong kind. Models trained by safealign record their kind (config
    ``safealign_score_type``), so a score model given as a policy, or a reward model given as the cost
    model (swapped arguments), is caught before anything runs. Hub names and foreign models pass.

    score_type: None for a policy; "reward"/"cost" for a score model.
    """
    import json

    p = Path(path).expanduser()
    if p.exists():
        check_model_folder(p, what)
    cfg_file = p / "config.json"
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
    check_model_kind(path, what, flag, score_type)
    if not (p / "config.json").is_file():
        raise BadInput(f"{what} directory has no config.json", where=path, fix=fix)
    if score_type:
        check_score_config(str(p), what)
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


def count_params(model) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3 partitions: ds_numel is the full size


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


def load_score_model(name: str, tok, *, head: str, dtype: str = "auto", seed: int = 0, tiny: dict | None = None,
                     score_type: str | None = None, revision: str | None = None):
    """A sequence-classification model (one score) from ``name`` (path/hub/causal LM checkpoint) or tiny.

    head="new":     the start of a score model's training (train-rm/train-cost from an SFT policy, a
                    critic initialised from the policy): a causal-LM checkpoint gets a freshly
                    initialised score head; a sequence-classification checkpoint keeps its own.
    head="trained": a trained judge (a reward or cost model, a critic given by path): it must be a
                    ``*ForSequenceClassification`` with one label whose weights, score head included,
                    are all in the checkpoint; anything else is BadInput naming what is missing.
    """
    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification, LlamaForSequenceClassification

    if head not in ("new", "trained"):
        raise ValueError(f"head must be 'new' or 'trained', got {head!r}")
    what = f"{score_type} model" if score_type in ("reward", "cost") else "critic" if score_type == "critic" else "score model"
    torch_dtype = pick_dtype(dtype)
    if is_tiny(name):
        if head == "trained":
            raise BadInput(f"'tiny' is not a trained {what}", fix="pass a directory written by safealign train-rm/train-cost")
        torch.manual_seed(seed)
        model = LlamaForSequenceClassification(tiny_config(tok, num_labels=1, **(tiny or {}))).to(torch_dtype)
    else:
        _check_source(name, "model", revision)
        if head == "trained":
            check_score_config(name, what)
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # a causal-LM checkpoint prints a "score.weight MISSING" report (expected for head="new")
        try:
            torch.manual_seed(seed)
            model, info = AutoModelForSequenceClassification.from_pretrained(name, dtype=torch_dtype, use_safetensors=True, output_loading_info=True,
                                                                             **({"num_labels": 1} if head == "new" else {}), **_rev(name, revision))
        except Exception as e:  # OSError, ValueError, RuntimeError (shapes), safetensors' own error
            raise _load_error(e, "score model", name) from None
        finally:
            transformers.logging.set_verbosity(verbosity)
        if head == "trained":
            _refuse_missing(info, name, what)
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
            model, info = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, use_safetensors=True, output_loading_info=True,
                                                               **_rev(name, revision))
        except Exception as e:  # OSError, ValueError, RuntimeError (shapes), safetensors' own error
            raise _load_error(e, "causal LM", name) from None
        _refuse_missing(info, name, "causal LM (policy)")
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
