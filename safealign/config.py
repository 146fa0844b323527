"""Configuration: one dataclass per stage, read from a YAML recipe and overridden by flags.

Precedence: dataclass defaults < recipe (``--config x.yaml``) < command-line flags. A recipe is
either flat (keys of one stage) or sectioned by command name (``train-rm: {...}``,
``ppo-lag: {...}``) so one file can describe a whole pipeline. Unknown keys and wrong types are
bad input (exit 2) with the key named. Every field's ``help`` metadata becomes the ``--help``
text of its flag, so the config is the single source of truth for options.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safealign.errors import BadInput
from safealign.rl.algorithms import ALGORITHMS

STAGE_NAMES = ("train-rm", "train-cost", "ppo-lag", "safety-test", "sft", "eval", "demo", "synth", "split", "inspect", "score-eval",
               "crowd-latent", "crowd-skills", "crowd-compose")


def opt(default: Any, help: str, *, flag: bool = True, choices: tuple[str, ...] | None = None, resume: str = "must-match",
        panel: str | None = None):
    """A config field with its help text (``flag=False`` keeps it out of the CLI, YAML only; ``panel``
    overrides the ``--help`` panel that :func:`help_panels` gives it).

    ``resume="may-change"``: a ``--resume`` may give this field a new value (where and how often
    things are written or checked, not what is trained); every other field must equal the run's, or
    the resume is refused (stages.trainer.check_resume_compatible)."""
    meta = {"help": help, "flag": flag, "choices": choices, "resume": resume, "panel": panel}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------
# --help panels: a field's panel is its class's default, or the panel the class (or a subclass)
# names it in, or opt(panel=...). A field redeclared by a subclass keeps the panel of the class
# that introduced it unless the subclass names it. Fields nobody names land in the default, so a
# new field needs no panel line.

_PANELS: dict[type, tuple[str, dict[str, str]]] = {}


def help_panels(default: str, named: dict[str, str] | None = None):
    """Class decorator: ``--help`` panel of the class's fields, ``default`` unless ``named``
    (``{"Panel title": "field_a field_b"}``) lists them elsewhere."""
    by_field = {name: title for title, names in (named or {}).items() for name in names.split()}

    def wrap(cls):
        _PANELS[cls] = (default, by_field)
        return cls

    return wrap


def field_panel(cls, f: dataclasses.Field) -> str:
    """The ``--help`` panel of field ``f`` of config class ``cls``."""
    if f.metadata.get("panel"):
        return f.metadata["panel"]
    mro = [k for k in cls.__mro__ if k in _PANELS]
    for k in mro:
        if f.name in _PANELS[k][1]:
            return _PANELS[k][1][f.name]
    introduced = [k for k in cls.__mro__ if f.name in k.__dict__.get("__annotations__", {})]
    origin = introduced[-1] if introduced else cls
    return _PANELS[origin][0] if origin in _PANELS else (_PANELS[mro[0]][0] if mro else "Options")


# --------------------------------------------------------------------------------------------
# Shared pieces


@help_panels("Data")
@dataclass
class DataOptions:
    data: str | None = opt(None, "Training data: .jsonl/.json/.csv/.parquet (optionally .gz), a saved HF dataset directory, or a hub dataset name.")
    data_split: str = opt("train", "Split to read when --data is a HF dataset (directory or hub name).")
    data_config: str | None = opt(None, "Configuration (subset) name of a hub dataset, as datasets.load_dataset(name, CONFIG), e.g. --data-config default.")
    data_revision: str | None = opt(None, "Revision (branch, tag or commit) of a hub dataset given to --data / --eval-data.")
    eval_data: str | None = opt(None, "Evaluation data (same formats as --data). When absent, --eval-split of the training data is held out.")
    eval_split: float = opt(0.1, "Fraction of the training data held out for evaluation when --eval-data is not given (0 disables evaluation).")
    data_format: str = opt("auto", "Row format: auto (detect), pku (PKU-SafeRLHF columns), hh (hh-rlhf chosen/rejected dialogues), pairs (prompt/chosen/rejected columns).", choices=("auto", "pku", "hh", "pairs"))
    columns: dict[str, str] = opt({}, "Column mapping KEY=COLUMN (repeatable), e.g. --column prompt=question --column chosen=good. Keys: prompt, chosen, rejected, chosen_safe, rejected_safe, response_0, response_1, better_id, safer_id, safe_0, safe_1, annotator_id.")
    template: str = opt("default", "Prompt template: 'default' (BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:), 'chat' (the tokenizer's chat template), 'raw' (prompt text as is), or a custom string containing {prompt}.")
    max_samples: int = opt(0, "Use at most this many rows of the training data (0 = all).")
    invalid_rows: str = opt("error", "Rows with empty text, identical responses or unreadable labels: stop with an error naming the row (error), or skip them and count them in the report (skip).", choices=("error", "skip"))
    max_length: int = opt(512, "Maximum tokens of prompt + response + EOS. Longer pairs are truncated (prompt from the left first, then the response), never dropped; the report counts them.")


@help_panels("Training", {"Model": "model revision lora_r lora_alpha lora_dropout lora_targets dtype gradient_checkpointing deepspeed",
                          "Output and checkpoints": "output_dir resume save_steps keep_checkpoints eval_steps log_steps report_to"})
@dataclass
class HubOptions:
    push_to_hub: bool = opt(False, "After the run succeeded and its checks passed, upload the result to the Hugging Face Hub (training stages: the output directory without checkpoints/; safety-test: release/ on PASS only). The token comes from HF_TOKEN or `hf auth login`; it is checked before the run starts.")
    hub_model_id: str | None = opt(None, "Hub repository of --push-to-hub: NAME (under the token's user) or ORG/NAME (default: the output directory's name).")
    hub_private: bool = opt(False, "Create the hub repository as private (an existing repository keeps its visibility).")


@dataclass
class TrainOptions(HubOptions):
    model: str = opt("tiny", "Model to start from: a local path, a hub name, or 'tiny' (a tiny Llama built from a config with a tokenizer trained locally on the data; runs offline).")
    revision: str | None = opt(None, "Revision (branch, tag or commit) of --model when it is a hub name (the hub's default branch otherwise).")
    output_dir: str | None = opt(None, "Output directory (required): model, checkpoints/, metrics.jsonl, report.json/.md, plots/, config.yaml, manifest.json.", resume="may-change")
    epochs: float = opt(1.0, "Training epochs (ignored when --max-steps > 0).")
    max_steps: int = opt(0, "Total optimizer steps; overrides --epochs when > 0.")
    lr: float | None = opt(None, "Peak learning rate (default: 2e-5 for pretrained models, 1e-3 for --model tiny).")
    batch_size: int = opt(16, "Examples (pairs) per device per micro-batch.")
    grad_accum: int = opt(1, "Gradient accumulation steps (global batch = batch-size x grad-accum x processes).")
    weight_decay: float = opt(0.1, "AdamW weight decay (not applied to biases and norms).")
    warmup_ratio: float = opt(0.03, "Fraction of steps with linear warm-up.")
    lr_scheduler: str = opt("cosine", "Learning-rate schedule after warm-up.", choices=("cosine", "linear", "constant"))
    max_grad_norm: float = opt(1.0, "Gradient clipping norm (0 disables).")
    seed: int = opt(42, "Random seed (model init, data order, sampling).")
    resume: bool = opt(False, "Continue from the last complete checkpoint in --output-dir (same total steps).", resume="may-change")
    save_steps: int = opt(50, "Write a resumable checkpoint every N optimizer steps (0 = only at the end).", resume="may-change")
    keep_checkpoints: int = opt(2, "How many recent checkpoints to keep.", resume="may-change")
    eval_steps: int = opt(0, "Evaluate every N steps (0 = at the end of each epoch and at the end).", resume="may-change")
    log_steps: int = opt(5, "Log training metrics every N steps.", resume="may-change")
    lora_r: int = opt(0, "LoRA rank (0 = full fine-tuning).")
    lora_alpha: int = opt(16, "LoRA alpha.")
    lora_dropout: float = opt(0.0, "LoRA dropout.")
    lora_targets: str = opt("all-linear", "LoRA target modules: 'all-linear' or comma-separated module names.")
    report_to: str = opt("none", "Experiment tracker.", choices=("none", "tensorboard", "wandb"), resume="may-change")
    dtype: str = opt("auto", "Training precision: auto (bf16 on a GPU that supports it, else fp32), fp32, bf16.", choices=("auto", "fp32", "bf16"))
    gradient_checkpointing: bool = opt(False, "Recompute activations in the backward pass to save memory.", resume="may-change")
    deepspeed: str | None = opt(None, "DeepSpeed JSON config (ZeRO stage, offload); use with accelerate launch / torchrun.")
    tiny_hidden: int = opt(64, "Hidden size of --model tiny.", flag=False)
    tiny_layers: int = opt(2, "Layers of --model tiny.", flag=False)
    tiny_heads: int = opt(4, "Attention heads of --model tiny.", flag=False)
    tiny_vocab: int = opt(1024, "Tokenizer vocabulary of --model tiny.", flag=False)


@help_panels("Loss")
@dataclass
class PreferenceConfig(DataOptions, TrainOptions):
    loss_type: str = opt("sequence", "Loss granularity: sequence (end scores) or token (every token from the first differing token to EOS, as in Safe RLHF).", choices=("sequence", "token"))
    regularization: float = opt(0.001, "L2 penalty on the scores (keeps their scale bounded).")
    group_by_length: bool = opt(True, "Batch pairs of similar length together (each epoch still a seeded shuffle: pairs are sorted by length within windows of 64 batches, and the batches shuffled), so that little of a batch is padding. Same pairs and steps, fewer padded tokens.", panel="Training")

    def validate(self) -> None:
        _validate_common(self)


@dataclass
class RewardConfig(PreferenceConfig):
    """`safealign train-rm`: a reward model of helpfulness from preference pairs (Bradley-Terry)."""


@help_panels("Cost model", {"Crowd (--crowd)": "crowd min_labels_per_annotator crowd_taste_axes crowd_shared crowd_head_l2 crowd_zero_quantile crowd_baseline"})
@dataclass
class CostConfig(PreferenceConfig):
    """`safealign train-cost`: a cost model of harm (Safe RLHF cost loss; cost > 0 means unsafe)."""

    sign_weight: float = opt(1.0, "Weight of the sign terms that push safe responses below 0 and unsafe above 0 (0 = ranking only).")
    inconsistent: str = opt("skip", "Rows whose per-response safety labels contradict the safer label (the safer one unsafe, the other safe): skip them (counted in the report) or keep them (the ranking and sign terms then pull against each other).", choices=("skip", "keep"))
    calibration_bins: int = opt(10, "Bins of the expected calibration error of P(unsafe) = sigmoid(cost).")
    crowd: bool = opt(False, "Learn the cost from crowd preferences WITHOUT safety labels: per-annotator preference model over pairs with an annotator_id column; the shared safety component becomes the cost (see README, 'Implicit safety').")
    min_labels_per_annotator: int = opt(20, "--crowd: annotators with fewer labelled pairs are bad input (exit 2) unless --invalid-rows skip drops them.")
    crowd_taste_axes: int = opt(-1, "--crowd: taste axes (directions annotators disagree on) removed from the mean head; -1 = auto: the leading axes whose split-half reliability across annotators is significant.")
    crowd_shared: str = opt("midrange", "--crowd: how the shared component is taken from the heads: midrange (move the mean head to the midpoint of each taste axis' extreme annotators: each end of a taste weighs the same), project (remove its whole projection on the taste axes: uncorrelated with every taste, but also strips shared preferences that correlate with a taste), mean (no correction; one annotator, one vote).", choices=("project", "midrange", "mean"))
    crowd_head_l2: float = opt(0.01, "--crowd: L2 on each annotator's deviation from the population head (random-effects shrinkage; larger = closer to one pooled model).")
    crowd_zero_quantile: float = opt(0.5, "--crowd: without safety labels the zero point is a convention: cost = 0 at this quantile of the training responses' costs (0.8 = the 20% most dispreferred are called unsafe).")
    crowd_baseline: bool = opt(True, "--crowd: also train the pooled Bradley-Terry baseline (one head for all annotators) on the same labels and compare; saved as a reward model under pooled_baseline/.")


def _validate_common(cfg) -> None:
    if not cfg.data:
        raise BadInput("no training data given", fix="pass --data PATH (or set `data:` in the recipe)")
    if not cfg.output_dir:
        raise BadInput("no output directory given", fix="pass --output-dir DIR")
    checks = [
        ("batch_size", cfg.batch_size >= 1, "must be >= 1"),
        ("grad_accum", cfg.grad_accum >= 1, "must be >= 1"),
        ("epochs", cfg.epochs > 0 or cfg.max_steps > 0, "must be > 0 (or set max_steps)"),
        ("max_steps", cfg.max_steps >= 0, "must be >= 0"),
        ("lr", cfg.lr is None or cfg.lr > 0, "must be > 0"),
        ("eval_split", 0.0 <= cfg.eval_split < 1.0, "must be in [0, 1)"),
        ("max_length", cfg.max_length >= 8, "must be >= 8"),
        ("lora_r", cfg.lora_r >= 0, "must be >= 0"),
        ("save_steps", cfg.save_steps >= 0, "must be >= 0"),
        ("keep_checkpoints", cfg.keep_checkpoints >= 1, "must be >= 1"),
        ("warmup_ratio", 0.0 <= cfg.warmup_ratio < 1.0, "must be in [0, 1)"),
    ]
    for key, ok, why in checks:
        if not ok:
            raise BadInput(f"config key '{key}' = {getattr(cfg, key)!r} {why}")
    check_template(cfg.template)


def check_template(template: str) -> None:
    if template not in ("default", "chat", "raw") and "{prompt}" not in template:
        raise BadInput(f"template {template!r} is neither default/chat/raw nor contains {{prompt}}", fix="use --template default, or a string with {prompt} in it")


# --------------------------------------------------------------------------------------------
# Loading: defaults < YAML < flags


def config_fields(cls) -> list[dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        f.type = hints[f.name]
        out.append(f)
    return out


def _base_type(tp) -> tuple[Any, bool]:
    """(inner type, optional?) for ``X | None``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def coerce(key: str, value: Any, tp, source: str) -> Any:
    """Check/convert one value to the field's type, or raise BadInput naming the key."""
    inner, optional = _base_type(tp)
    if value is None:
        if optional:
            return None
        raise BadInput(f"config key '{key}' must not be empty", where=source)
    origin = typing.get_origin(inner)
    try:
        if inner is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            raise TypeError
        if inner is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if inner is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if inner is str:
            if isinstance(value, (dict, list)):
                raise TypeError
            return str(value)
        if origin is dict:
            if isinstance(value, (list, tuple)):  # from repeatable KEY=VALUE flags
                pairs = {}
                for item in value:
                    if "=" not in str(item):
                        raise BadInput(f"'{item}' is not KEY=VALUE", where=f"{source}, key '{key}'")
                    k, v = str(item).split("=", 1)
                    pairs[k.strip()] = v.strip()
                return pairs
            if not isinstance(value, dict):
                raise TypeError
            return {str(k): str(v) for k, v in value.items()}
        if origin is list:
            if isinstance(value, str):
                return [value]
            if not isinstance(value, (list, tuple)):
                raise TypeError
            return [str(v) for v in value]
    except (TypeError, ValueError):
        name = getattr(inner, "__name__", str(inner))
        raise BadInput(f"config key '{key}' must be of type {name}, got {value!r}", where=source) from None
    return value


def read_yaml(path: str | Path, section: str | None = None) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise BadInput("config file not found", where=str(p), fix="check the path given to --config")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise BadInput(f"not valid YAML ({str(e).splitlines()[0]})", where=str(p)) from None
    if not isinstance(raw, dict):
        raise BadInput("a recipe must be a mapping of keys to values", where=str(p))
    if raw and section and all(k in STAGE_NAMES for k in raw):
        raw = raw.get(section) or {}
        if not isinstance(raw, dict):
            raise BadInput(f"section '{section}' must be a mapping", where=str(p))
    return {str(k).replace("-", "_"): v for k, v in raw.items()}


def build_config(cls, config_path: str | Path | None, overrides: dict[str, Any], section: str | None = None):
    """Resolve a stage config: defaults < YAML recipe < flags (None = flag not given)."""
    fields = {f.name: f for f in config_fields(cls)}
    values: dict[str, Any] = {}
    if config_path:
        source = str(config_path)
        for key, value in read_yaml(config_path, section).items():
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(sorted(fields))}"
                raise BadInput(f"unknown config key '{key}' ({hint})", where=source)
            values[key] = coerce(key, value, fields[key].type, source)
    for key, value in overrides.items():
        if value is None or (isinstance(value, (list, tuple)) and not value):
            continue
        values[key] = coerce(key, value, fields[key].type, f"flag --{key.replace('_', '-')}")
    for key, value in values.items():
        choices = fields[key].metadata.get("choices")
        if choices and value not in choices:
            raise BadInput(f"config key '{key}' = {value!r} is not one of {', '.join(choices)}")
    cfg = cls(**values)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------------------------
# Later stages


@help_panels("Generation")
@dataclass
class GenerationOptions:
    max_new_tokens: int = opt(64, "Tokens generated per response at most.")
    temperature: float = opt(1.0, "Sampling temperature.")
    top_p: float = opt(1.0, "Nucleus sampling: keep the smallest token set with this probability mass.")


@help_panels("RL", {"Training": "batch_size lr", "Model": "reward_model cost_model reward_critic cost_critic shared_critic offload_frozen",
                    "Lagrangian": "threshold lambda_init lambda_lr lambda_max lambda_update_delay lambda_method pid_kp pid_ki pid_kd episode_cost_window normalize_by_lambda constraint",
                    "HC-RLHF constraint (--constraint hc)": "hc_delta hc_c1 hc_c2 hc_safety_size"})
@dataclass
class PPOLagConfig(DataOptions, TrainOptions, GenerationOptions):
    """`safealign ppo-lag`: PPO-Lagrangian (Safe RLHF): maximise reward subject to E[cost] <= threshold."""

    batch_size: int = opt(16, "Prompts per device per rollout; one rollout is one step (--max-steps counts rollouts).")
    lr: float | None = opt(None, "Actor peak learning rate (default: 1e-5 full fine-tuning, 1e-4 with --lora-r; 1e-3 for models under 10M parameters).")
    reward_model: str | None = opt(None, "Reward model directory (from train-rm).")
    cost_model: str | None = opt(None, "Cost model directory (from train-cost); not needed for --algorithm ppo.")
    reward_critic: str | None = opt(None, "Initial reward critic (default: the reward model).")
    cost_critic: str | None = opt(None, "Initial cost critic (default: the cost model).")
    shared_critic: bool = opt(False, "One critic backbone with a value head per stream (reward, cost) instead of one critic model each: one forward and backward fewer per update and one model's weights and optimizer state less. Initialised from --reward-critic (default the reward model): its score head is the reward value head, the cost value head starts at zero. With --lora-r: one critic adapter instead of one per stream.")
    algorithm: str = opt("ppo-lag", "ppo-lag (PPO-Lagrangian: reward and cost critics, learned multiplier), ppo (reward only, no cost), reward-shaping (fixed lambda: reward - lambda_init * cost), grpo-lag (GRPO-Lagrangian: no critics, group-relative advantages of reward and cost, learned multiplier), grpo (reward only, group-relative).", choices=tuple(ALGORITHMS))
    group_size: int = opt(0, "Responses sampled per prompt (G). The grpo algorithms normalise each response's reward and cost within its group of G and need G >= 2; 0 = the algorithm's default (4 for grpo*, 1 for ppo*).")
    advantage: str = opt("auto", "Advantage estimator (safealign/algorithms/advantages.py): gae (with the critics: ppo, ppo-lag, reward-shaping), or for the critic-free grpo algorithms group ((R - group mean) / group std, GRPO), group-batch (group-centred, divided by the batch std of the centred returns), group-mean (R - group mean, Dr. GRPO), rloo (leave-one-out); auto = the algorithm's.")
    kl_in: str = opt("auto", "Where the KL to the reference goes: reward (a per-token penalty on the reward stream and bonus on the cost stream, Safe RLHF), loss (kl_coeff x KL as a loss term, GRPO), or auto (reward for ppo*, loss for grpo*).", choices=("auto", "reward", "loss"))
    no_eos_penalty: float | None = opt(None, "Responses that hit --max-new-tokens without EOS are scored as generated (EOS appended for the score models); a value here replaces their reward by this number instead.")
    kl_coeff: float = opt(0.01, "beta: weight of the KL to the reference (per-token penalty on the reward stream and bonus on the cost stream, or the KL loss term with --kl-in loss). 0: no KL, so no reference model is loaded or run (and no kl metric), as trl's GRPO beta=0.")
    kl_estimator: str = opt("auto", "Per-token KL estimator: k1 (log-ratio), k3 ((r - 1) - log r, >= 0), auto (k1 in the reward, k3 as a loss term).", choices=("auto", "k1", "k3"))
    clip_range_score: float = opt(50.0, "Per-token reward/cost clipping.")
    gamma: float = opt(1.0, "Discount factor of GAE.")
    gae_lambda: float = opt(0.95, "lambda of GAE.")
    whiten_advantages: bool = opt(False, "Whiten each stream's advantages over the batch.")
    ppo_epochs: int = opt(1, "Optimisation passes over each rollout batch.")
    minibatches: int = opt(1, "Minibatches per PPO epoch.")
    clip_range_ratio: float = opt(0.2, "PPO ratio clipping epsilon.")
    clip_range_value: float = opt(5.0, "Value clipping range of the critics.")
    critic_lr: float | None = opt(None, "Critic learning rate (default: 5e-6, or 1e-3 for tiny models).")
    ptx_data: str | None = opt(None, "SFT data (prompt/response) for the PTX loss (optional).")
    ptx_coeff: float = opt(0.0, "Weight of the PTX language-modelling loss.")
    threshold: float = opt(0.0, "Cost threshold d of the constraint E[cost] <= d (cost > 0 means unsafe).")
    lambda_init: float = opt(1.0, "Initial Lagrange multiplier (the fixed lambda of reward-shaping).")
    lambda_lr: float = opt(0.1, "Multiplier learning rate (log-lambda SGD).")
    lambda_max: float | None = opt(5.0, "Upper bound on lambda (none = unbounded).")
    lambda_update_delay: int = opt(0, "Steps before the multiplier starts to move.")
    lambda_method: str = opt("sgd", "Multiplier update: sgd on log-lambda (Safe RLHF) or pid (PID-Lagrangian, Stooke et al. 2020).", choices=("sgd", "pid"))
    pid_kp: float = opt(0.0, "PID-Lagrangian proportional gain.")
    pid_ki: float | None = opt(None, "PID-Lagrangian integral gain (default: --lambda-lr).")
    pid_kd: float = opt(0.0, "PID-Lagrangian derivative gain.")
    episode_cost_window: int = opt(128, "Recent episode costs (per process) whose mean is J_c.")
    normalize_by_lambda: bool = opt(True, "Combined advantage (A_r - lambda A_c)/(1 + lambda) (off: A_r - lambda A_c).")
    constraint: str = opt("mean", "mean: J_c = window mean; hc: HC-RLHF pessimistic bound mean + k*std and augmented per-sample costs.", choices=("mean", "hc"))
    hc_delta: float = opt(0.1, "delta of the HC-RLHF bound.")
    hc_c1: float = opt(1.0, "C1 of k = C1 t(1-delta, m-1)/sqrt(m) + C2 t(1-delta, n-1)/sqrt(n).")
    hc_c2: float = opt(2.0, "C2 of the same k (2 = the Seldonian inflation).")
    hc_safety_size: int = opt(100, "n: size of the safety set the model will be tested on.")
    offload_frozen: bool = opt(False, "Keep the frozen reward/cost/reference models on CPU between phases (GPU memory saver).", resume="may-change")
    zero3_gather: bool = opt(True, "Under DeepSpeed ZeRO-3: gather the actor's weights once per rollout and generate from that copy, instead of all-gathering every layer at every decoding step (costs one unsharded copy of the actor per process while sampling; `plan` counts it).", resume="may-change")

    def validate(self) -> None:
        _validate_common(self)
        if not self.reward_model:
            raise BadInput("no reward model given", fix="pass --reward-model DIR (from safealign train-rm)")
        if self.spec().cost != "none" and not self.cost_model:
            raise BadInput(f"--algorithm {self.algorithm} needs a cost model", fix="pass --cost-model DIR (from safealign train-cost), or use --algorithm ppo (or grpo)")
        if self.model == "tiny":
            raise BadInput("ppo-lag needs a starting policy, not 'tiny'", fix="pass --model DIR (e.g. from safealign sft)")
        for key in ("max_new_tokens", "ppo_epochs", "minibatches", "episode_cost_window"):
            if getattr(self, key) < 1:
                raise BadInput(f"config key '{key}' must be >= 1")
        algo = self.spec()
        G = self.responses_per_prompt()
        if self.group_size < 0:
            raise BadInput(f"config key 'group_size' = {self.group_size} must be >= 0 (0 = the algorithm's default)")
        from safealign.algorithms.advantages import ADVANTAGES

        if self.advantage != "auto" and self.advantage not in ADVANTAGES:
            raise BadInput(f"config key 'advantage' = {self.advantage!r} is not one of auto, {', '.join(ADVANTAGES)}")
        est = ADVANTAGES[self.advantage_name()]
        if est.needs_critic != bool(algo.critics):
            raise BadInput(f"--advantage {self.advantage} " + ("needs critics, which" if est.needs_critic else "needs no critic, but")
                           + f" --algorithm {self.algorithm} " + ("does not train" if est.needs_critic else "trains them"),
                           fix="use --advantage gae with ppo/ppo-lag/reward-shaping, a group estimator with grpo/grpo-lag")
        if est.groups and G < 2:
            raise BadInput(f"--algorithm {self.algorithm} compares the responses to one prompt with each other and needs --group-size >= 2 (got {G})",
                           fix="pass --group-size 4 (or more), or 0 for the default")
        if not 0 < self.hc_delta < 1:
            raise BadInput("config key 'hc_delta' must be in (0, 1)")
        if (self.batch_size * G) % (self.minibatches * self.grad_accum):
            raise BadInput(f"batch_size x group_size = {self.batch_size * G} responses must be divisible by minibatches x grad_accum = {self.minibatches * self.grad_accum}")
        if self.constraint == "hc" and not algo.lagrangian:
            raise BadInput(f"--constraint hc needs a Lagrangian algorithm (ppo-lag or grpo-lag; got {self.algorithm})")
        if self.constraint == "hc" and self.hc_safety_size < 2:
            raise BadInput("config key 'hc_safety_size' must be >= 2")
        if self.max_length < self.max_new_tokens + 8:
            raise BadInput(f"max_length {self.max_length} leaves no room for the prompt with max_new_tokens {self.max_new_tokens}", fix="raise --max-length or lower --max-new-tokens")
        if self.ptx_coeff > 0 and not self.ptx_data:
            raise BadInput("--ptx-coeff > 0 needs --ptx-data (prompt/response rows)")
        for key in ("kl_coeff", "ptx_coeff", "pid_kp", "pid_kd", "lambda_lr", "lambda_update_delay"):
            if not getattr(self, key) >= 0:    # NaN too
                raise BadInput(f"config key '{key}' must be >= 0")
        for key in ("clip_range_score", "clip_range_ratio", "clip_range_value", "critic_lr"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise BadInput(f"config key '{key}' must be > 0")
        if not (0 <= self.gae_lambda <= 1 and 0 < self.gamma <= 1):
            raise BadInput("gamma must be in (0, 1] and gae_lambda in [0, 1]")
        if algo.lagrangian:
            if self.lambda_method == "sgd" and self.lambda_init <= 0:
                raise BadInput(f"lambda_init must be > 0 with --lambda-method sgd (it learns log lambda), got {self.lambda_init}")
            if self.lambda_init < 0 or (self.lambda_max is not None and self.lambda_init > self.lambda_max):
                raise BadInput(f"lambda_init {self.lambda_init} must be in [0, lambda_max = {self.lambda_max}] (> 0 with --lambda-method sgd)")
        if self.shared_critic and len(algo.critics) < 2:
            raise BadInput(f"--shared-critic shares one backbone between the reward and the cost critic; --algorithm {self.algorithm} trains "
                           + ("one critic" if algo.critics else "no critic"), fix="drop --shared-critic, or use --algorithm ppo-lag")
        if self.shared_critic and self.cost_critic:
            raise BadInput("--cost-critic has no model to initialise under --shared-critic (the cost value head sits on the reward critic's backbone and starts at zero)",
                           fix="drop --cost-critic, or drop --shared-critic")
        if self.lora_r and (self.reward_critic or self.cost_critic):
            raise BadInput("with --lora-r the critics are LoRA adapters on the policy's base model; --reward-critic/--cost-critic apply to full fine-tuning only",
                           fix="drop --reward-critic/--cost-critic, or use --lora-r 0")

    def spec(self):
        """The algorithm's entry in safealign.rl.algorithms (roles, estimator, how the cost enters)."""
        return ALGORITHMS[self.algorithm]

    def advantage_name(self) -> str:
        return self.spec().advantage if self.advantage == "auto" else self.advantage

    def responses_per_prompt(self) -> int:
        return self.group_size or self.spec().group_size

    def kl_in_reward(self) -> bool:
        return (self.spec().kl if self.kl_in == "auto" else self.kl_in) == "reward"

    def kl_kind(self) -> str:
        return self.kl_estimator if self.kl_estimator != "auto" else "k1" if self.kl_in_reward() else "k3"

    def uses_reference(self) -> bool:
        """Whether the run needs the reference policy: only for the KL, so not with --kl-coeff 0."""
        return self.kl_coeff > 0


@help_panels("SFT")
@dataclass
class SFTConfig(DataOptions, TrainOptions):
    """`safealign sft`: supervised fine-tuning of a starting policy on prompt/response data."""

    data_format: str = opt("auto", "Row format: auto (detect), sft (prompt/response columns), or preference data (pku, pairs, hh) whose --preference-response is the target.", choices=("auto", "sft", "pku", "hh", "pairs"))
    columns: dict[str, str] = opt({}, "Column mapping KEY=COLUMN (repeatable), e.g. --column prompt=instruction --column response=output. Keys: prompt, response; for preference data also those of train-rm (chosen, rejected, response_0, response_1, better_id, safer_id, ...).")
    preference_response: str = opt("better", "With preference data (pku/pairs/hh): train on the more helpful response (better: better_response_id, or 'chosen') or the safer one (safer: safer_response_id).", choices=("better", "safer"))
    check_prompts: int = opt(64, "Generation check after training: sample one response (temperature 1) for this many held-out prompts and score them with the synthetic-world oracle when the prompts come from that world (0 = off).")
    check_max_new_tokens: int = opt(48, "Tokens generated per response in the generation check.")

    def validate(self) -> None:
        _validate_common(self)
        if self.check_prompts < 0:
            raise BadInput(f"config key 'check_prompts' = {self.check_prompts} must be >= 0")
        if self.check_max_new_tokens < 1:
            raise BadInput(f"config key 'check_max_new_tokens' = {self.check_max_new_tokens} must be >= 1")


@help_panels("Safety test", {"Model": "policy cost_model dtype", "Data": "prompts prompt_column max_prompts train_prompts template",
                                 "Generation": "samples_per_prompt batch_size seed", "Output": "output_dir registry"})
@dataclass
class SafetyTestConfig(GenerationOptions, HubOptions):
    """`safealign safety-test`: high-confidence upper bound on the policy's expected cost on held-out prompts."""

    policy: str | None = opt(None, "Policy directory to test (HF causal LM).")
    cost_model: str | None = opt(None, "Cost model directory (from train-cost).")
    prompts: str | None = opt(None, "Held-out safety prompts (any supported data format; duplicates on normalised text are dropped).")
    prompt_column: str = opt("prompt", "Column of --prompts holding the prompt.")
    output_dir: str | None = opt(None, "Output directory (new or empty): report.json/.md, costs.jsonl, plots/, and release/ on PASS.")
    threshold: float = opt(0.0, "Cost threshold tau: PASS requires the upper bound on E[cost] <= tau.")
    delta: float = opt(0.05, "Failure probability: the bound holds with probability >= 1 - delta.")
    bound: str = opt("student-t", "Upper confidence bound on E[cost]: student-t (HC-RLHF; approximate, needs a near-normal mean), hoeffding or bernstein (exact for costs in --cost-range).", choices=("student-t", "hoeffding", "bernstein"))
    cost_range: str | None = opt(None, "LOW,HIGH range of the cost for hoeffding/bernstein (costs are clipped to it; the report says how many).")
    alpha: float | None = opt(None, "Also require the Clopper-Pearson upper bound on P(cost > 0) to be <= alpha (e.g. 0.05 = at most 5% unsafe answers).")
    samples_per_prompt: int = opt(1, "Responses sampled per prompt. With more than one, the i.i.d. unit of the bound is the prompt: each prompt's mean cost is one sample.")
    max_prompts: int = opt(0, "Use at most this many prompts (0 = all).")
    batch_size: int = opt(16, "Prompts per generation batch.")
    seed: int = opt(42, "Sampling seed.")
    template: str = opt("default", "Prompt template (as in training).")
    train_prompts: str | None = opt(None, "File of training prompts to check disjointness against (besides the policy's manifest).")
    allow_retest: bool = opt(False, "Allow another test on a safety set that was already used (delta is Bonferroni-corrected).")
    registry: str | None = opt(None, "Record of safety tests run (default: $SAFEALIGN_HOME/safety_tests.jsonl, SAFEALIGN_HOME defaults to ~/.cache/safealign).")
    costs_file: str | None = opt(None, "Re-run the decision from saved per-sample costs (costs.jsonl) without any model.")
    dtype: str = opt("auto", "Inference precision.", choices=("auto", "fp32", "bf16"))

    def validate(self) -> None:
        if not self.output_dir:
            raise BadInput("no output directory given", fix="pass --output-dir DIR")
        if not self.costs_file and not (self.policy and self.cost_model and self.prompts):
            raise BadInput("safety-test needs --policy, --cost-model and --prompts (or --costs-file to re-run a decision)")
        if self.costs_file and (self.policy or self.prompts):
            given = " and ".join(f for f, v in (("--policy", self.policy), ("--prompts", self.prompts)) if v)
            raise BadInput(f"--costs-file re-runs a decision from saved costs, without sampling any policy; {given} would be ignored, "
                           "and a report naming a policy that was not sampled would be misleading",
                           fix="drop " + given + " (to check the safety prompts against a policy's training prompts, pass "
                               "--train-prompts POLICY_DIR/prompt_hashes.txt); to test a policy, run without --costs-file")
        if not 0 < self.delta < 1:
            raise BadInput(f"config key 'delta' = {self.delta} must be in (0, 1)")
        if self.alpha is not None and not 0 < self.alpha < 1:
            raise BadInput(f"config key 'alpha' = {self.alpha} must be in (0, 1)")
        if self.bound != "student-t" and not self.cost_range:
            raise BadInput(f"--bound {self.bound} needs --cost-range LOW,HIGH")
        if self.samples_per_prompt < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise BadInput("samples_per_prompt, batch_size and max_new_tokens must be >= 1")
        if self.max_prompts < 0:
            raise BadInput(f"config key 'max_prompts' = {self.max_prompts} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise BadInput(f"config key 'top_p' = {self.top_p} must be in (0, 1]")
        if self.threshold != self.threshold or abs(self.threshold) == float("inf"):
            raise BadInput(f"config key 'threshold' = {self.threshold} must be a finite number")
        self.parsed_range()

    def parsed_range(self) -> tuple[float, float] | None:
        if not self.cost_range:
            return None
        try:
            lo, hi = (float(x) for x in self.cost_range.split(","))
        except ValueError:
            raise BadInput(f"--cost-range {self.cost_range!r} must be LOW,HIGH (two numbers)") from None
        if not lo < hi:
            raise BadInput(f"--cost-range {self.cost_range!r}: LOW must be below HIGH")
        return lo, hi


@help_panels("Evaluation", {"Model": "policy baseline reward_model cost_model dtype", "Data": "prompts prompt_column max_prompts template",
                                "Generation": "samples batch_size seed", "Output": "output_dir"})
@dataclass
class EvalConfig(GenerationOptions):
    """`safealign eval`: score a policy's generations (reward, cost, oracle on the synthetic world); two policies: win-rate table."""

    policy: str | None = opt(None, "Policy directory to evaluate.")
    baseline: str | None = opt(None, "Second policy (the 'red corner') for a head-to-head table.")
    reward_model: str | None = opt(None, "Reward model directory.")
    cost_model: str | None = opt(None, "Cost model directory.")
    prompts: str | None = opt(None, "Evaluation prompts (any supported data format; duplicates are dropped).")
    prompt_column: str = opt("prompt", "Column of --prompts holding the prompt.")
    output_dir: str | None = opt(None, "Output directory (new or empty) for generations.jsonl, report.json/.md and plots/.")
    max_prompts: int = opt(0, "Use at most this many prompts (0 = all).")
    samples: int = opt(1, "Responses sampled per prompt; rates and means are over all responses (more samples, less sampling noise).")
    threshold: float = opt(0.0, "Cost threshold: a response counts as unsafe by the cost model when its cost is above it (the run's safety-test or ppo-lag threshold; the cost histogram draws it).")
    batch_size: int = opt(16, "Prompts per generation batch.")
    seed: int = opt(42, "Sampling seed.")
    template: str = opt("default", "Prompt template (as in training).")
    dtype: str = opt("auto", "Inference precision.", choices=("auto", "fp32", "bf16"))

    def validate(self) -> None:
        if not (self.policy and self.prompts and self.output_dir):
            raise BadInput("eval needs --policy, --prompts and --output-dir")
        for key in ("max_new_tokens", "batch_size", "samples"):
            if getattr(self, key) < 1:
                raise BadInput(f"config key '{key}' = {getattr(self, key)} must be >= 1")
        if self.max_prompts < 0:
            raise BadInput(f"config key 'max_prompts' = {self.max_prompts} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise BadInput(f"config key 'top_p' = {self.top_p} must be in (0, 1]")


@help_panels("Split", {"Data": "data data_split data_config data_revision prompt_column", "Output": "output_dir"})
@dataclass
class SplitConfig:
    """`safealign data split`: deterministic candidate/safety split of prompts, disjoint on normalised text."""

    data: str | None = opt(None, "Prompt or preference data to split (any supported data format).")
    data_split: str = opt("train", "Split to read when --data is a HF dataset (directory or hub name).")
    data_config: str | None = opt(None, "Configuration (subset) name of a hub dataset, as datasets.load_dataset(name, CONFIG).")
    data_revision: str | None = opt(None, "Revision (branch, tag or commit) of a hub dataset given to --data.")
    output_dir: str | None = opt(None, "Directory (new or empty) for candidate.jsonl, safety.jsonl and split.json.")
    safety_fraction: float = opt(0.4, "Fraction of distinct prompts that go to the safety part.")
    seed: int = opt(42, "Seed of the split.")
    prompt_column: str = opt("prompt", "Column holding the prompt (hh-rlhf rows without it: the dialogue before the last answer).")

    def validate(self) -> None:
        if not (self.data and self.output_dir):
            raise BadInput("data split needs --data and --output-dir")
        if not 0 < self.safety_fraction < 1:
            raise BadInput(f"config key 'safety_fraction' = {self.safety_fraction} must be in (0, 1)")


@help_panels("World", {"Sizes": "n_train_prompts n_safety_prompts n_eval_prompts n_pairs n_sft",
                           "Annotators": "n_annotators taste_shares taste_conflict label_temperature safety_label_flip safety_weight", "Output": "output_dir"})
@dataclass
class SynthConfig:
    """`safealign data synth`: a seeded synthetic preference world with an oracle for helpfulness and harm."""

    output_dir: str | None = opt(None, "Directory for preferences.jsonl, sft.jsonl, prompts_{train,eval,safety}.jsonl and world.json.")
    seed: int = opt(0, "Seed of the world (same seed, same files).")
    n_train_prompts: int = opt(1500, "Training prompts (preference, SFT and RL prompts come from these).")
    n_safety_prompts: int = opt(300, "Held-out safety-test prompts (disjoint from every other set).")
    n_eval_prompts: int = opt(200, "Held-out evaluation prompts.")
    harmful_fraction: float = opt(0.4, "Fraction of prompts that ask for something harmful.")
    n_pairs: int = opt(4000, "Preference pairs.")
    n_sft: int = opt(2000, "SFT rows.")
    sft_comply_rate: float = opt(0.4, "P(harmful compliance | harmful prompt) in the SFT corpus.")
    n_annotators: int = opt(12, "Crowd annotators.")
    taste_shares: dict[str, float] = opt({"balanced": 0.5, "concise": 0.25, "verbose": 0.25}, "Share of annotators per helpfulness taste (TASTE=SHARE, repeatable).")
    taste_conflict: float = opt(1.0, "How strongly the tastes disagree (0: all tastes agree).")
    label_temperature: float = opt(0.5, "Bradley-Terry temperature of the annotators' labels (0: noiseless).")
    safety_label_flip: float = opt(0.05, "Probability that a per-response safety label is flipped.")
    safety_weight: float = opt(1.0, "Weight of the shared safety principle in every annotator's overall preference.")
    rambling_share: float = opt(0.08, "Weight of the rambling styles (answers padded past the length budget by repeating themselves) among the preference data's responses; without them the reward model never sees padding and RL learns to pad (0: generator v1).")
    drift_share: float = opt(0.08, "Weight of the drifting style (an on-topic answer with a few words of another topic slipped in) among the preference data's benign responses; without it the reward model rewards any content word and RL learns to wander off topic (0: generator v2).")
    crowd: bool = opt(False, "Write the crowd world instead (safe crowd skills, `safealign crowd`): users with distinct goals (which aspect an answer covers) sharing one safety rule, and a downstream task (task.jsonl) no user holds. Uses --seed, --n-train-prompts, --n-eval-prompts, --n-pairs, --n-sft and the Crowd world options.")
    n_users: int = opt(2, "--crowd: users (annotator ids user_0..), each with its own aspect ordering; user_0 is the majority.", panel="Crowd world (--crowd)")
    imbalance: float = opt(4.0, "--crowd: labelled pairs of the majority user per pair of each minority user (1 = balanced, 9 = 9:1).", panel="Crowd world (--crowd)")
    label_noise: float = opt(0.05, "--crowd: probability that a preference label is flipped.", panel="Crowd world (--crowd)")
    harmful_share: float = opt(0.5, "--crowd: share of pairs in which one answer is a harmful variant (every user rejects it: the shared safety rule).", panel="Crowd world (--crowd)")
    task_harm_bonus: float = opt(0.25, "--crowd: task reward of an answer with harmful detail (the task cannot tell harmful specificity apart; 0: the task just ignores harm).", panel="Crowd world (--crowd)")
    sft_harmful_rate: float = opt(0.3, "--crowd: share of harmful variants in the SFT corpus (the starting policy's harm).", panel="Crowd world (--crowd)")
    user_temperature: float = opt(0.1, "--crowd: Bradley-Terry temperature of the users' choices (values are 1, 0.5, 0 for an answer of a user's best, middle, worst aspect).", panel="Crowd world (--crowd)")
    user_safety_weight: float = opt(2.0, "--crowd: the shared safety rule: every user's utility is value - w * harm.", panel="Crowd world (--crowd)")

    CROWD_ONLY = ("crowd", "n_users", "imbalance", "label_noise", "harmful_share", "task_harm_bonus", "sft_harmful_rate", "user_temperature",
                  "user_safety_weight")

    def validate(self) -> None:
        if not self.output_dir:
            raise BadInput("no output directory given", fix="pass --output-dir DIR")
        try:
            self.to_crowd_world() if self.crowd else self.to_world()
        except ValueError as e:
            raise BadInput(str(e)) from None

    def to_crowd_world(self):
        from safealign.data.crowd_world import CrowdWorldConfig

        return CrowdWorldConfig(seed=self.seed, n_train_prompts=self.n_train_prompts, n_eval_prompts=self.n_eval_prompts,
                                n_pairs=self.n_pairs, n_users=self.n_users, imbalance=self.imbalance, label_noise=self.label_noise,
                                label_temperature=self.user_temperature, harmful_share=self.harmful_share,
                                safety_weight=self.user_safety_weight, task_harm_bonus=self.task_harm_bonus, n_sft=self.n_sft,
                                sft_harmful_rate=self.sft_harmful_rate).validate()

    def to_world(self):
        from safealign.data.synth import WorldConfig

        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "output_dir" and f.name not in self.CROWD_ONLY}
        fields["taste_shares"] = {k: float(v) for k, v in fields["taste_shares"].items()}
        return WorldConfig(**fields).validate()


@dataclass
class LabelConfig:
    """`safealign data label`: pairs of a policy's sampled answers labelled by a synthetic world's annotators (preference
    data on the answers of the model to be trained, as RLHF collects it), optionally after the world's own pairs."""

    world: str | None = opt(None, "The world's directory (from `safealign data synth`): its world.json gives the annotators and their labelling noise.")
    responses: str | None = opt(None, "Sampled answers: JSONL rows with prompt and response, e.g. the generations.jsonl of `safealign eval --samples 2` (baseline rows skipped); each prompt's answers are paired in order.")
    output: str | None = opt(None, "Preference file to write (JSONL, the world's preference columns); must not exist.")
    include: str | None = opt(None, "A preference file whose rows come first in --output (e.g. WORLD/preferences.jsonl), so one file trains the reward and cost models.")
    seed: int = opt(0, "Seed of the annotator draws and their label noise.")

    def validate(self) -> None:
        for flag, v in (("--world", self.world), ("--responses", self.responses), ("--output", self.output)):
            if not v:
                raise BadInput(f"data label needs {flag}")
        if not (Path(self.world) / "world.json").is_file():
            raise BadInput("no world.json here: not a world directory", where=self.world, fix="pass the --output-dir of `safealign data synth`")
        for what, v in (("--responses", self.responses), ("--include", self.include)):
            if v and not Path(v).is_file():
                raise BadInput(f"{what} file not found", where=v)
        if Path(self.output).exists():
            raise BadInput("output file exists (data label never overwrites)", where=self.output, fix="choose a new --output")


@help_panels("Plan", {"Cluster": "gpus nodes gpu_mem margin"})
@dataclass
class PlanConfig:
    """`safealign plan`: per-device memory estimate of a stage under each ZeRO stage, offload and LoRA, and a recommended layout."""

    config: str | None = opt(None, "The stage's YAML recipe to plan for (flat, or sectioned by command name).")
    stage: str = opt("ppo-lag", "Stage to plan (its section of --config is read when the recipe is sectioned).", choices=("train-rm", "train-cost", "sft", "ppo-lag"))
    model: str | None = opt(None, "Model to plan for, overriding the recipe's: a local model directory (only its config.json is read), tiny, or a preset (llama-7b, llama-13b, llama-3-8b, mistral-7b, qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-7b).")
    gpus: int = opt(8, "Devices per node.")
    nodes: int = opt(1, "Nodes.")
    gpu_mem: str = opt("80GB", "Memory per device (e.g. 80GB, 24GiB).")
    batch_size: int | None = opt(None, "Per-device batch_size of the stage (pairs for train-rm/cost, prompts per rollout for ppo-lag; default: the recipe's).")
    seq_len: int | None = opt(None, "Sequence length (default: the recipe's max_length, or prompt + max_new_tokens for ppo-lag).")
    dtype: str = opt("bf16", "Training precision assumed.", choices=("bf16", "fp32"))
    output: str | None = opt(None, "Also write the plan as JSON here.")
    attention: str = opt("sdpa", "Attention kernel assumed: sdpa (flash/memory-efficient, no seq x seq scores kept) or eager (keeps the attention scores).", choices=("sdpa", "eager"))
    margin: float = opt(0.15, "Fraction of --gpu-mem kept free for the CUDA context, communication buckets and fragmentation.")
    lora_r: int | None = opt(None, "LoRA rank of the extra LoRA rows (default: the recipe's lora_r, or 16).")


@help_panels("Demo", {"Stages": "sft_epochs sft_answers score_epochs ppo_steps ppo_batch max_new_tokens kl_coeff actor_lr critic_lr eval_samples",
                          "Thresholds and multiplier": "harm_target train_harm threshold train_threshold lambda_init lambda_lr delta"})
@dataclass
class DemoConfig:
    """`safealign demo`: the whole method on the synthetic world, on a laptop CPU: synth -> sft -> train-rm -> train-cost ->
    ppo (reward only), reward shaping, ppo-lag -> safety-test -> eval, ending with one comparison table."""

    output_dir: str = opt("demo-out", "Output directory of the whole chain (one sub-directory per stage).")
    seed: int = opt(0, "Seed of the world and of every stage.")
    quick: bool = opt(False, "A reduced run (few steps per stage) that checks the plumbing in about a minute; its numbers mean little.")
    rambling_share: float = opt(0.08, "The world's rambling_share (see `safealign data synth --help`); 0 shows what the reward model does without padded answers in its data.")
    drift_share: float = opt(0.08, "The world's drift_share (see `safealign data synth --help`); 0 shows what the reward model does without topic drift in its data.")
    sft_epochs: float = opt(3.0, "SFT epochs over the world's SFT corpus.")
    score_epochs: float = opt(4.0, "Reward/cost model epochs over the preference pairs.")
    sft_answers: int = opt(6, "Answers of the SFT policy sampled per training prompt, paired in order and labelled by the world's annotators (`safealign data label`: 3 pairs per prompt with 6), added to the world's preference pairs for the reward and cost models: preference data on the answers of the policy being trained, as RLHF collects it (0: the world's pairs only; even).")
    ppo_steps: int = opt(500, "PPO updates of each RL run (the reward recovers only after lambda relaxes from its first overshoot: README).")
    ppo_batch: int = opt(32, "Prompts per PPO update.")
    max_new_tokens: int = opt(20, "Tokens per generated response.")
    kl_coeff: float = opt(0.05, "KL coefficient of every RL run.")
    actor_lr: float = opt(5e-5, "Actor learning rate of the RL runs.")
    critic_lr: float = opt(1e-3, "Critic learning rate of the RL runs.")
    harm_target: float = opt(0.10, "Target oracle harm rate (share of unsafe answers): the safety test's threshold is the expected cost of a policy at this harm rate, and the PPO-Lagrangian policy must reach it.")
    train_harm: float = opt(0.065, "Harm rate whose expected cost is ppo-lag's training threshold: a margin below --harm-target, because a Lagrangian policy hovers around its threshold instead of staying under it (HC-RLHF's reason for a pessimistic constraint; here a fixed margin).")
    threshold: float | None = opt(None, "Cost threshold of the safety test (default: calibrated to --harm-target: (1 - target) x mean cost of labelled-safe + target x mean cost of labelled-unsafe eval responses under the trained cost model).")
    train_threshold: float | None = opt(None, "Cost threshold of ppo-lag (default: --threshold when given, else calibrated the same way to --train-harm).")
    lambda_init: float = opt(1.0, "Initial multiplier (also the fixed lambda of reward shaping).")
    lambda_lr: float = opt(0.1, "Multiplier learning rate.")
    eval_samples: int = opt(4, "Responses sampled per eval prompt (the table's rates are over all of them).")
    grpo_group_size: int = opt(4, "G of the GRPO-Lagrangian run: responses per prompt.")
    grpo_prompts: int = opt(16, "Prompts per GRPO-Lagrangian update (x G responses: 64 by default, about PPO-Lagrangian's time per update without critics).")
    grpo_advantage: str = opt("group-batch", "Advantage estimator of the GRPO-Lagrangian run (see `safealign ppo-lag --help`): group-batch by default, because dividing by each group's own std (group) blows the cost model's noise on all-safe groups up to unit scale (measured: README).", choices=("group", "group-batch", "group-mean", "rloo"))
    grpo_kl_coeff: float = opt(0.05, "KL coefficient of the GRPO-Lagrangian run (a k3 loss term, GRPO's beta).")
    delta: float = opt(0.05, "delta of the safety test.")

    def validate(self) -> None:
        for key in ("ppo_steps", "ppo_batch", "max_new_tokens", "eval_samples"):
            if getattr(self, key) < 1:
                raise BadInput(f"config key '{key}' = {getattr(self, key)} must be >= 1")
        if self.grpo_group_size < 2 or self.grpo_prompts < 1:
            raise BadInput(f"config keys 'grpo_group_size' = {self.grpo_group_size} and 'grpo_prompts' = {self.grpo_prompts} must be >= 2 and >= 1")
        if not 0 < self.harm_target < 1:
            raise BadInput(f"config key 'harm_target' = {self.harm_target} must be in (0, 1)")
        if not 0 <= self.train_harm <= self.harm_target:
            raise BadInput(f"config key 'train_harm' = {self.train_harm} must be in [0, harm_target = {self.harm_target}]",
                           fix="train at or below the harm rate the safety test checks")
        if not 0 < self.delta < 1:
            raise BadInput(f"config key 'delta' = {self.delta} must be in (0, 1)")
        for key in ("rambling_share", "drift_share"):
            if not 0 <= getattr(self, key) <= 1:
                raise BadInput(f"config key '{key}' = {getattr(self, key)} must be in [0, 1]")
        if self.sft_answers < 0 or self.sft_answers % 2:
            raise BadInput(f"config key 'sft_answers' = {self.sft_answers} must be an even number >= 0 (answers are labelled in pairs)")


@dataclass
class InspectConfig(DataOptions):
    """`safealign data inspect`: what a data file holds before anything trains on it: format, rows, invalid rows by reason,
    lengths in tokens, label balance, and the prompt overlap with a second file."""

    data_format: str = opt("auto", "Row format: auto (detect), pku, hh, pairs (preference data), sft (prompt/response) or prompts (a prompt column only).", choices=("auto", "pku", "hh", "pairs", "sft", "prompts"))
    model: str | None = opt(None, "Count lengths in this model's tokens (a local path or hub name; its tokenizer only is loaded). Default: whitespace-separated words.")
    against: str | None = opt(None, "A second data file: how many of its distinct prompts (normalised text) are also in --data, e.g. a safety set against the training data.")
    output: str | None = opt(None, "Also write the inspection as JSON here.")
    invalid_rows: str = opt("skip", "Not used: inspect counts invalid rows by reason instead of stopping at the first.", flag=False)
    eval_data: str | None = opt(None, "Not used by inspect.", flag=False)
    eval_split: float = opt(0.0, "Not used by inspect.", flag=False)

    def validate(self) -> None:
        if not self.data:
            raise BadInput("data inspect needs --data FILE")
        if self.model == "tiny":
            raise BadInput("--model tiny has no tokenizer of its own to count with", fix="pass a model directory or hub name, or no --model (whitespace words)")


@dataclass
class ScoreEvalConfig(DataOptions):
    """`safealign score-eval`: a reward or cost model on held-out preference pairs, without a policy: pairwise accuracy
    overall and by subset (--by COLUMN), for a cost model also sign accuracy and calibration."""

    model: str | None = opt(None, "Reward or cost model directory (from train-rm / train-cost) to evaluate.")
    data: str | None = opt(None, "Held-out preference pairs (any format train-rm/train-cost read), never trained on.")
    output_dir: str | None = opt(None, "Output directory (new or empty): report.json/.md, scores.jsonl, plots/.")
    task: str = opt("auto", "What the pairs rank: helpful (better response first, as train-rm), safety (safer first, as train-cost), or auto: the model's kind.", choices=("auto", "helpful", "safety"))
    by: list[str] = opt([], "Also report accuracy for each value of this data column (repeatable), e.g. --by category.")
    batch_size: int = opt(16, "Pairs per scoring batch.")
    calibration_bins: int = opt(10, "Bins of the expected calibration error of P(unsafe) = sigmoid(cost) (cost models).")
    dtype: str = opt("auto", "Inference precision.", choices=("auto", "fp32", "bf16"))
    eval_data: str | None = opt(None, "Not used: --data is the evaluation data.", flag=False)
    eval_split: float = opt(0.0, "Not used: every pair of --data is evaluated.", flag=False)

    def validate(self) -> None:
        if not (self.model and self.data and self.output_dir):
            raise BadInput("score-eval needs --model, --data and --output-dir")
        if self.batch_size < 1:
            raise BadInput(f"config key 'batch_size' = {self.batch_size} must be >= 1")
        check_template(self.template)


# --------------------------------------------------------------------------------------------
# Safe crowd skills (`safealign crowd latent|skills|compose`; Lin & Brown 2026 on VPL)

SKILL_ESTIMATORS = ("rloo", "group", "group-mean", "group-batch")   # advantage registry entries without a critic


def _validate_positive(cfg, names: tuple[str, ...]) -> None:
    for key in names:
        if not getattr(cfg, key) > 0:
            raise BadInput(f"config key '{key}' = {getattr(cfg, key)!r} must be > 0")


@help_panels("Crowd skills", {"Data": "min_labels_per_annotator", "Training": "eval_split"})
@dataclass
class CrowdLatentConfig(DataOptions, TrainOptions):
    """`safealign crowd latent`: the VPL latent preference model from crowd pairs with annotator ids (no safety labels): an encoder over one annotator's labelled pairs gives its latent z, a learned Gaussian prior, a z-conditioned Bradley-Terry reward; reported against one pooled Bradley-Terry model."""

    eval_split: float = opt(0.2, "Fraction of prompts held out (all their pairs) for the per-annotator held-out accuracy.")
    max_steps: int = opt(600, "Total optimizer steps (each: --batch-size context sets); overrides --epochs when > 0.")
    lr: float | None = opt(3e-3, "Peak learning rate.")
    min_labels_per_annotator: int = opt(20, "Annotators with fewer labelled training pairs are bad input (exit 2) unless --invalid-rows skip drops them.")
    z_dim: int = opt(4, "Dimensions of the latent z.")
    bow_dim: int = opt(1024, "Hashed bag-of-words buckets of a response (1024: few collisions among the crowd world's ~250 words; at 256 a harmful word shared its bucket with safe ones).")
    hidden: int = opt(64, "Hidden width of the encoder and decoder.")
    context_pairs: int = opt(8, "Labelled pairs of one annotator the encoder sees per training example.")
    target_pairs: int = opt(8, "Pairs of the same annotator the decoder is trained on per example.")
    kl_weight: float = opt(1e-3, "Weight beta of KL(q(z | pairs) || prior) at the top of each annealing cycle.")
    kl_cycles: int = opt(4, "Cycles of the cosine KL annealing over the run (0: constant beta).")
    separation_draws: int = opt(20, "Random context sets per annotator for the z-separation report.")

    def validate(self) -> None:
        _validate_common(self)
        _validate_positive(self, ("z_dim", "bow_dim", "hidden", "context_pairs", "target_pairs", "separation_draws", "min_labels_per_annotator"))
        if self.kl_weight < 0 or self.kl_cycles < 0:
            raise BadInput("config keys 'kl_weight' and 'kl_cycles' must be >= 0")


@help_panels("Crowd skills", {"Data": "min_labels_per_annotator", "Training": "eval_split", "Generation": "eval_prompts eval_samples"})
@dataclass
class CrowdSkillsConfig(DataOptions, TrainOptions, GenerationOptions):
    """`safealign crowd skills`: the skill policy pi(y | x, z): a causal LM with a z -> soft-prompt prefix and LoRA, trained with the contrastive preference loss (CPL; DPO with --reference) on each annotator's pairs at that annotator's posterior z from `crowd latent`."""

    latent: str | None = opt(None, "Output directory of `safealign crowd latent` (the annotators' posterior z and the prior).")
    eval_split: float = opt(0.1, "Fraction of prompts held out for the preference accuracy of each skill.")
    min_labels_per_annotator: int = opt(20, "Annotators with fewer labelled training pairs are bad input (exit 2) unless --invalid-rows skip drops them.")
    lora_r: int = opt(8, "LoRA rank of the LM (0 = full fine-tuning).")
    n_prefix: int = opt(4, "Soft-prompt (prefix) embeddings the z -> prefix module produces.")
    prefix_hidden: int = opt(64, "Hidden width of the z -> prefix module.")
    prefix_scale: float = opt(10.0, "Fixed output multiplier of the z -> prefix module: under Adam the prefix learns this many times faster than the LoRA weights (it carries every difference between the users).")
    beta: float = opt(0.1, "Scale beta of the log-probability advantages in the CPL/DPO loss.")
    cpl_lambda: float = opt(1.0, "Weight lambda of the rejected answer's advantage (1 with --reference: DPO; < 1: conservative CPL).")
    reference: bool = opt(True, "Advantages relative to the starting LM without prefix (DPO-style); --no-reference: CPL's alpha * log pi.")
    eval_prompts: str | None = opt(None, "Prompts (a prompt file) to sample each skill's answers on for the report (oracle kinds and harm when they are crowd-world prompts).")
    eval_samples: int = opt(32, "Prompts of --eval-prompts used per skill.")
    max_new_tokens: int = opt(16, "Tokens generated per response at most.")

    def validate(self) -> None:
        _validate_common(self)
        if not self.latent:
            raise BadInput("no latent model given", fix="pass --latent DIR (the output of `safealign crowd latent`)")
        _validate_positive(self, ("n_prefix", "prefix_hidden", "prefix_scale", "beta", "eval_samples", "max_new_tokens", "min_labels_per_annotator"))


@help_panels("Crowd skills", {"Training": "batch_size lr", "Data": "prompts task eval_prompts"})
@dataclass
class CrowdComposeConfig(TrainOptions, GenerationOptions):
    """`safealign crowd compose`: the high-level policy over the skills' latent space for a new task: per prompt a Gaussian u, z = mu_prior + sigma_prior * 3 * tanh(u), trained with REINFORCE (RLOO baseline) on the task reward only, with an ||u||^2 regulariser; the skill LM stays frozen."""

    skills: str | None = opt(None, "Output directory of `safealign crowd skills`.")
    task: str | None = opt(None, "Task reward file (JSONL: prompt, values per aspect, harm_bonus; the crowd world's task.jsonl). Must cover every prompt.")
    prompts: str | None = opt(None, "Training prompts (a prompt file, as ppo-lag reads them).")
    eval_prompts: str | None = opt(None, "Held-out prompts for the before/after report (default: the training prompts).")
    batch_size: int = opt(8, "Prompts per step.")
    group_size: int = opt(4, "Latent draws u per prompt (the RLOO group).")
    max_steps: int = opt(40, "Policy-gradient steps.")
    lr: float | None = opt(0.05, "Learning rate of the high-level policy (Adam).")
    estimator: str = opt("rloo", "Advantage estimator (safealign.algorithms.advantages registry, critic-free).", choices=SKILL_ESTIMATORS)
    u_l2: float = opt(0.01, "Weight of the ||u||^2 regulariser on the policy's mean action.")
    init_std: float = opt(0.5, "Initial standard deviation of u.")
    squash_scale: float = opt(3.0, "z stays within this many prior standard deviations: z = mu + sigma * scale * tanh(u).")
    max_new_tokens: int = opt(16, "Tokens generated per response at most.")
    eval_size: int = opt(64, "Evaluation prompts used (0 = all).")

    def validate(self) -> None:
        if not self.output_dir:
            raise BadInput("no output directory given", fix="pass --output-dir DIR")
        for key, flag in (("skills", "--skills DIR (the output of `safealign crowd skills`)"), ("task", "--task FILE (the task reward file)"),
                          ("prompts", "--prompts FILE")):
            if not getattr(self, key):
                raise BadInput(f"no {key} given", fix=f"pass {flag}")
        if self.group_size < 2:
            raise BadInput(f"config key 'group_size' = {self.group_size} must be >= 2 (a leave-one-out baseline needs two draws)")
        _validate_positive(self, ("batch_size", "max_steps", "init_std", "squash_scale", "max_new_tokens"))
        if self.u_l2 < 0 or self.eval_size < 0:
            raise BadInput("config keys 'u_l2' and 'eval_size' must be >= 0")
