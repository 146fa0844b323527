"""What travels with a saved model so that the ecosystem can use it without reading our code.

Every model directory a safealign stage writes gets, from this one module:

* the **prompt format**: a chat template in the tokenizer config, so that
  ``tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)`` is exactly
  the prompt text safealign formats, and ``safealign.json`` (data/templates.py:
  :func:`~safealign.data.templates.format_record`): the template and the EOS rule. safealign reads
  it back whenever it loads the model (``load_tokenizer``), so every stage formats prompts for it
  the same way;
* **portable LoRA adapters**: ``adapter/adapter_config.json`` names its base by an absolute path
  or a hub name; a base that exists only in memory (``--model tiny``) is saved beside it in
  ``base/``;
* a **Hub model card** ``README.md`` (YAML front matter + what the model is, the stage's key
  metrics and a plain-transformers snippet that reproduces safealign's scores or generations,
  with the number safealign itself gets on the snippet's example).

:func:`prepare_tokenizer` and :func:`finish_model_dir` run inside the atomic save
(stages/trainer.py: ``save_collectively``); :func:`write_card` runs when the stage's report is
written (runtime/report.py), because the card quotes the stage's summary.
"""

from __future__ import annotations

import json
from pathlib import Path

from safealign.data.templates import FORMAT_FILE, chat_template_for, effective_template, format_record, read_format

EXAMPLE_PROMPT = "How do I bake bread at home?"
EXAMPLE_RESPONSE = "Mix flour, water, salt and yeast, knead the dough, let it rise, then bake it for 30 minutes."
CARD_MAX_BYTES = 1_000_000_000  # above this the card's example number is not computed (a second load of the weights)
STAGE_KIND = {"train-rm": "reward", "train-cost": "cost", "sft": "policy", "ppo-lag": "policy"}


# --------------------------------------------------------------------------------------------
# The saved model directory


def run_config(run_dir: str | Path) -> dict:
    """The resolved config of the run that wrote ``run_dir`` (its config.yaml), {} when absent."""
    import yaml

    p = Path(run_dir) / "config.yaml"
    try:
        return yaml.safe_load(p.read_text()) or {} if p.is_file() else {}
    except yaml.YAMLError:
        return {}


def prepare_tokenizer(tok, template: str) -> str:
    """Give ``tok`` the chat template of ``template`` (as resolved for it) before it is saved; returns that template."""
    template = effective_template(template, tok)
    jinja = chat_template_for(template)
    if jinja is not None:
        tok.chat_template = jinja
    return template


def _kind_of(model_dir: Path) -> str:
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return "policy"
    return cfg.get("safealign_score_type") or "policy"


def finish_model_dir(tmp: Path, final: Path, tok, *, template: str, base: str | None, max_length: int | None = None) -> dict:
    """Complete a staged model directory ``tmp`` (installed later at ``final``): ``safealign.json``
    beside the model and any adapter, and adapters made portable. Returns what it recorded."""
    from safealign.models.loading import portable_base

    rec = format_record(template, tok, _kind_of(tmp), max_length)
    _write_json(tmp / FORMAT_FILE, rec)
    tok.safealign_format = rec
    saved: dict = {"prompt_format": str(Path(final) / FORMAT_FILE)}
    for cfg_file in sorted(tmp.glob("**/adapter_config.json")):
        adapter = cfg_file.parent
        saved["adapter_base"] = relocate_adapter(tmp, final) or _set_adapter_base(cfg_file, portable_base(base))
        if not (adapter / "tokenizer_config.json").is_file():
            tok.save_pretrained(adapter)
        _write_json(adapter / FORMAT_FILE, rec)
    return saved


def _set_adapter_base(cfg_file: Path, where: str | None) -> str | None:
    cfg = json.loads(cfg_file.read_text())
    cfg["base_model_name_or_path"] = where
    _write_json(cfg_file, cfg)
    return where


def relocate_adapter(staged: Path, final: Path) -> str | None:
    """When the base was saved beside the adapter (``base/``, a tiny base), point ``adapter/`` at it
    where it will be installed (``final/base``, absolute). Returns that path, or None."""
    cfg_file = Path(staged) / "adapter" / "adapter_config.json"
    if not ((Path(staged) / "base" / "config.json").is_file() and cfg_file.is_file()):
        return None
    return _set_adapter_base(cfg_file, str((Path(final) / "base").resolve()))


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# Lineage for the front matter: hub names only


def _is_hub_name(name) -> bool:
    return isinstance(name, str) and name.count("/") == 1 and not Path(name).expanduser().exists() and not name.startswith((".", "/", "~"))


def front_matter(text: str) -> dict:
    """The YAML front matter of a card ({} when there is none)."""
    import yaml

    if not text.startswith("---\n"):
        return {}
    end = text.find("\n---", 4)
    try:
        meta = yaml.safe_load(text[4:end]) if end > 0 else {}
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def hub_base(source, depth: int = 0) -> str | None:
    """The hub model a (chain of) local safealign model(s) started from: a hub name as it is; a local
    directory's card ``base_model``, or its run's ``model`` followed back (at most 8 steps)."""
    if _is_hub_name(source):
        return source
    p = Path(str(source or "")).expanduser()
    if depth > 8 or not source or not p.is_dir():
        return None
    if (p / "README.md").is_file():
        meta = front_matter((p / "README.md").read_text(errors="replace"))
        if isinstance(meta.get("base_model"), str):
            return meta["base_model"]
    return hub_base(run_config(p).get("model"), depth + 1)


def _front_matter(meta: dict) -> str:
    import yaml

    return "---\n" + yaml.safe_dump({k: v for k, v in meta.items() if v not in (None, [], "")}, sort_keys=False) + "---\n"


# --------------------------------------------------------------------------------------------
# Usage snippets (plain transformers) and safealign's own number on their example


def _appends_eos(tok) -> bool:
    ids = tok("a")["input_ids"]
    return bool(ids) and ids[-1] == tok.eos_token_id


def score_snippet(path: str, tok, rec: dict, expected: float | None) -> str:
    chat = rec["template"] == "chat"
    lines = [
        "import torch",
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
        "",
        f"path = {json.dumps(path)}  # or the hub repo id",
        "tok = AutoTokenizer.from_pretrained(path)",
        "model = AutoModelForSequenceClassification.from_pretrained(path).eval()",
        "",
        "",
        "def score(prompt: str, response: str) -> float:",
        "    # the prompt through the chat template, the response tokenized on its own, then EOS: the score is read there",
        "    text = tok.apply_chat_template([{\"role\": \"user\", \"content\": prompt}], tokenize=False, add_generation_prompt=True)",
        "    prompt_ids = tok(text)[\"input_ids\"]",
    ]
    if _appends_eos(tok):
        lines += ["    prompt_ids = prompt_ids[:-1] if prompt_ids[-1] == tok.eos_token_id else prompt_ids"]
    lines += [
        "    response_ids = tok(" + ("response" if chat else '" " + response.strip()') + ", add_special_tokens=False)[\"input_ids\"]",
        "    ids = torch.tensor([prompt_ids + response_ids + [tok.eos_token_id]])",
        "    with torch.no_grad():",
        "        return model(input_ids=ids).logits[0, 0].item()",
        "",
        "",
        f"prompt = {json.dumps(EXAMPLE_PROMPT)}",
        f"response = {json.dumps(EXAMPLE_RESPONSE)}",
        "print(f\"{score(prompt, response):.6f}\")" + (f"  # safealign: {expected:.6f}" if expected is not None else ""),
    ]
    return "\n".join(lines)


def policy_snippet(path: str, tok, rec: dict, expected: str | None, max_new_tokens: int) -> str:
    lines = [
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"path = {json.dumps(path)}  # or the hub repo id",
        "tok = AutoTokenizer.from_pretrained(path)",
        "model = AutoModelForCausalLM.from_pretrained(path).eval()",
        f"text = tok.apply_chat_template([{{\"role\": \"user\", \"content\": {json.dumps(EXAMPLE_PROMPT)}}}], tokenize=False, add_generation_prompt=True)",
        "inputs = tok(text, return_tensors=\"pt\")",
    ]
    if _appends_eos(tok):
        lines += ["inputs = {k: v[:, :-1] for k, v in inputs.items()} if inputs[\"input_ids\"][0, -1] == tok.eos_token_id else inputs"]
    lines += [
        f"out = model.generate(**inputs, max_new_tokens={max_new_tokens}, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)",
        "print(tok.decode(out[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True).strip())",
    ]
    if expected is not None:
        lines += [f"# safealign (greedy): {json.dumps(expected)}"]
    return "\n".join(lines)


def _small(model_dir: Path) -> bool:
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) <= CARD_MAX_BYTES


def safealign_score(model_dir: Path) -> float | None:
    """safealign's own end score of the card's example (its loader, template and encoder)."""
    import torch

    from safealign.models.generation import load_scorer, score_texts
    from safealign.models.loading import local_load

    if not _small(model_dir):
        return None
    with local_load():
        scorer, tok = load_scorer(str(model_dir), dtype="fp32")
    with torch.no_grad():
        return float(score_texts(scorer, tok, [EXAMPLE_PROMPT], [EXAMPLE_RESPONSE], template="default")[0])


def safealign_greedy(model_dir: Path, max_new_tokens: int) -> str | None:
    """safealign's own greedy answer to the card's example (its loader, template and sampler)."""
    from safealign.models.generation import decode_responses, encode_prompts, load_policy, sample
    from safealign.models.loading import local_load

    if not _small(model_dir):
        return None
    with local_load():
        model, tok = load_policy(str(model_dir), dtype="fp32")
    ro = sample(model, tok, encode_prompts(tok, [EXAMPLE_PROMPT], "default"), max_new_tokens=max_new_tokens, temperature=0)
    return decode_responses(tok, ro)[0]


def usage_section(model_dir: Path, path: str, max_new_tokens: int = 32) -> list[str]:
    """The card's usage section for the model in ``model_dir``, loaded from ``path``."""
    from transformers import AutoTokenizer

    rec = read_format(model_dir) or {}
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if rec.get("kind", "policy") == "policy":
        code = policy_snippet(path, tok, rec, safealign_greedy(model_dir, max_new_tokens), max_new_tokens)
        what = ("A prompt without the template is not what the model was trained on. The printed answer is greedy, and the "
                "comment under the snippet is safealign's own greedy answer; safealign samples (temperature, top-p) in "
                "training and in its tests, with the same prompt and stop rule.")
    else:
        code = score_snippet(path, tok, rec, safealign_score(model_dir))
        what = ("Encoding `prompt + response` with a plain `tok(text)` gives a different number. The number printed is the "
                "score safealign gives the same pair, quoted in the comment (computed when this card was written).")
        if rec.get("kind") == "cost":
            what += " Cost convention: higher = more harmful; cost > 0 means unsafe, cost < 0 safe."
    lines = ["## Usage (plain transformers)", "",
             f"The prompt format travels with the model: the tokenizer's chat template renders the prompt exactly as safealign "
             f"formatted it in training (template `{rec.get('template', 'default')}`), the response follows, and safealign always "
             f"appends EOS (`{tok.eos_token}`); `{FORMAT_FILE}` states these rules. " + what, "", "```python", code, "```", ""]
    if (model_dir / "adapter" / "adapter_config.json").is_file():
        policy = rec.get("kind", "policy") == "policy"
        call = (f"peft.AutoPeftModelForCausalLM.from_pretrained({json.dumps(str(Path(path) / 'adapter'))})" if policy else
                f"peft.AutoPeftModelForSequenceClassification.from_pretrained({json.dumps(str(Path(path) / 'adapter'))}, num_labels=1)")
        lines += [f"The LoRA adapter alone (the model above is it merged into its base): `{call}`"
                  + ("" if policy else " (`num_labels=1`: the base may be a causal LM, whose score head the adapter brings)") + ".", ""]
    return lines


def set_model_id(folder: Path, repo_id: str) -> None:
    """Point the card's snippet at ``repo_id`` instead of the local path (before a push)."""
    card = Path(folder) / "README.md"
    if card.is_file():
        text = card.read_text()
        card.write_text(text.replace(f"path = {json.dumps(str(Path(folder).resolve()))}", f"path = {json.dumps(repo_id)}"))


# --------------------------------------------------------------------------------------------
# The card of a stage's output directory


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|")


def _metrics(summary: dict) -> dict:
    """The numbers a reader of the card wants first, flat: held-out metrics, the final RL numbers."""
    out: dict = {}
    prefix = {"eval": "held out: ", "final": "last training step: ", "preferences_eval": "held out: "}
    for key in ("eval", "final", "preferences_eval"):
        for k, v in (summary.get(key) or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[prefix[key] + k.removeprefix("eval/")] = v
    c = summary.get("constraint") or {}
    if c.get("J_c") is not None:
        out["constraint J_c (training estimate)"] = c["J_c"]
        out["threshold"] = c["threshold"]
    o = (summary.get("generation_check") or {}).get("oracle") or summary.get("oracle") or {}
    for k in ("helpfulness_mean", "harm_rate"):
        if isinstance(o.get(k), (int, float)):
            out[f"oracle {k} (held-out prompts)"] = o[k]
    return out


def _describe(stage: str, kind: str, run: dict, summary: dict) -> str:
    data, base = run.get("data"), run.get("model")
    d = summary.get("data") or {}
    n = d.get("train_pairs") or d.get("train_examples") or (summary.get("data") or {}).get("train_prompts")
    held = d.get("eval_pairs") or d.get("eval_examples")
    what = {"reward": "a **reward model** of helpfulness: it scores a (prompt, response) pair, higher = more helpful",
            "cost": "a **cost model** of harm: it scores a (prompt, response) pair, higher = more harmful; cost > 0 means unsafe, "
                    "cost < 0 safe (the Safe RLHF convention)",
            "policy": "a **policy** (a causal language model) that answers prompts in the format below"}.get(kind, f"a {kind} model")
    how = {"train-rm": "Bradley-Terry on preference pairs", "sft": "supervised fine-tuning on the response tokens",
           "train-cost": ("crowd preferences without safety labels: the shared component of per-annotator heads" if run.get("crowd")
                          else "the Safe RLHF cost loss: ranking and per-response sign terms"),
           "ppo-lag": {"ppo-lag": f"PPO-Lagrangian: maximise reward subject to E[cost] <= {_fmt(run.get('threshold'))}",
                       "ppo": "reward-only PPO (no cost constraint)",
                       "reward-shaping": f"PPO on reward - {run.get('lambda_init')} x cost (fixed lambda)"}.get(run.get("algorithm"), "PPO")}.get(stage, stage)
    unit = "pairs" if "train_pairs" in d else "prompts" if stage == "ppo-lag" else "examples"
    text = f"Trained by `safealign {stage}` ({how}) from `{base}` on `{data}`"
    if n:
        text += f" ({n} training {unit}" + (f", {held} held out" if held else "") + ")"
    text = f"{what[0].upper()}{what[1:]}. {text}."
    if run.get("lora_r"):
        text += f" LoRA rank {run['lora_r']}: the adapter is in `adapter/`, the files at the top are it merged into the base."
    return text


def write_card(out: str | Path, summary: dict) -> Path | None:
    """Write ``out/README.md`` (and ``out/adapter/README.md``) for the model a stage saved in ``out``.
    Does nothing when ``out`` holds no safealign model (no ``safealign.json``)."""
    from safealign.runtime.io import atomic_write_text

    out = Path(out)
    rec = read_format(out)
    if rec is None or not (out / "config.json").is_file():
        return None
    run = run_config(out)
    stage = summary.get("stage") or "?"
    kind = rec.get("kind", STAGE_KIND.get(stage, "policy"))
    tags = ["safealign", "safe-rlhf", {"reward": "reward-model", "cost": "cost-model"}.get(kind, "text-generation"), stage]
    if stage == "ppo-lag":
        tags.append(run.get("algorithm", "ppo-lag"))
    meta = {"library_name": "transformers", "base_model": hub_base(run.get("model")),
            "datasets": [run["data"]] if _is_hub_name(run.get("data")) else [], "tags": list(dict.fromkeys(tags)),
            "pipeline_tag": "text-classification" if kind in ("reward", "cost") else "text-generation"}
    lines = [_front_matter(meta), f"# {out.resolve().name}: {'a ' + kind + ' model' if kind != 'policy' else 'a policy'} trained with safealign", "",
             _describe(stage, kind, run, summary), ""]
    if summary.get("headline"):
        lines += [f"Run summary: {summary['headline']}", ""]
    m = _metrics(summary)
    if m:
        lines += ["## Metrics", "", "| metric | value |", "| --- | --- |"] + [f"| {_fmt(k)} | {_fmt(v)} |" for k, v in m.items()] + [""]
        held = any(k.startswith("held out") for k in m)
        lines += [("Held out: the run's evaluation data, never trained on. " if held else "") + "The full report is `report.md` (and `report.json`).", ""]
    lines += usage_section(out, str(out.resolve()), int(run.get("max_new_tokens") or 32))
    lines += ["## How it was made", "",
              f"- Command: `safealign {stage}`; resolved settings in `config.yaml`, versions, git commit and data fingerprint in `manifest.json`.",
              f"- Steps {summary.get('steps')}, seed {run.get('seed')}, learning rate {summary.get('lr')}, max length {run.get('max_length')}.",
              "- `prompt_hashes.txt`: hashes of every prompt this model (and the models it started from) was trained on; "
              "`safealign safety-test` refuses safety prompts among them.", ""]
    atomic_write_text(out / "README.md", "\n".join(lines))
    if (out / "adapter" / "adapter_config.json").is_file():
        base = json.loads((out / "adapter" / "adapter_config.json").read_text()).get("base_model_name_or_path")
        ameta = {"library_name": "peft", "base_model": base if _is_hub_name(base) else None, "tags": ["safealign", "lora", stage]}
        atomic_write_text(out / "adapter" / "README.md", "\n".join([
            _front_matter(ameta), f"# LoRA adapter of {out.resolve().name} (safealign {stage})", "",
            f"Base: `{base}`. The card of the model is `../README.md`; the prompt format is `{FORMAT_FILE}`.", ""]))
    return out / "README.md"


def release_card(staged: Path, final: Path, policy: str | Path, safety_card: str, summary: dict) -> str:
    """The Hub card of a released policy (files staged in ``staged``, installed at ``final``): the
    policy's front matter (+ the safety-test tag), the guarantee and its evidence (``safety_card``),
    and the usage snippet."""
    run = run_config(policy)
    meta = {"library_name": "transformers", "base_model": hub_base(run.get("model")) if run else hub_base(str(policy)),
            "datasets": [run["data"]] if _is_hub_name(run.get("data")) else [],
            "tags": ["safealign", "safe-rlhf", "text-generation", "safety-tested"], "pipeline_tag": "text-generation"}
    lines = [_front_matter(meta), safety_card.rstrip(), ""]
    gen = summary.get("generation") or {}
    if read_format(staged) is not None:
        lines += usage_section(staged, str(Path(final).resolve()), int(gen.get("max_new_tokens") or 32))
    else:
        from safealign.data.templates import DEFAULT_TEMPLATE

        t = gen.get("template", "default")
        lines += ["## Usage", "", f"This policy records no prompt format (`{FORMAT_FILE}`: it was not saved by safealign). The safety test "
                  f"formatted every prompt with the template `{t}`" + (f" (`{DEFAULT_TEMPLATE}`)" if t == "default" else "")
                  + " and sampled the answer after it, up to EOS; the guarantee covers prompts formatted that way.", ""]
    return "\n".join(lines)
