"""Prompt templates: dialogue turns -> the text the model sees before its answer.

``default`` is the Safe RLHF template (``BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:``);
``chat`` uses the tokenizer's chat template; ``raw`` passes the text through; any other string
must contain ``{prompt}``. The response is appended after the prompt text and followed by EOS
(the token where scores are read, see DESIGN.md).
"""

from __future__ import annotations

from safealign.errors import BadInput

DEFAULT_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"


def format_prompt(turns: list[str] | str, template: str, tokenizer=None) -> str:
    """Text of the prompt for dialogue ``turns`` (user, assistant, ..., user)."""
    if isinstance(turns, str):
        turns = [turns]
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise BadInput("--template chat needs a tokenizer with a chat template, and this one has none",
                           fix="use --template default (or a custom string with {prompt})")
        messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if template == "raw":
        return "\n".join(turns)
    if template == "default":
        text = "BEGINNING OF CONVERSATION:"
        for i, t in enumerate(turns):
            text += f" USER: {t.strip()} ASSISTANT:" if i % 2 == 0 else f" {t.strip()}"
        return text
    history = "\n".join(turns[:-1])
    return (history + "\n" if history else "") + template.replace("{prompt}", turns[-1])


def format_response(response: str, template: str) -> str:
    """The response text as appended after the prompt (a leading space except after chat templates)."""
    return response if template == "chat" else " " + response.strip()


# --------------------------------------------------------------------------------------------
# The format travels with the model: a chat template + safealign.json

FORMAT_FILE = "safealign.json"


def effective_template(template: str, tokenizer=None) -> str:
    """The template to use for ``tokenizer``'s model: the one a safealign-saved model records
    (``safealign.json``, attached by ``load_tokenizer``) when ``template`` is the default, else ``template``."""
    recorded = (getattr(tokenizer, "safealign_format", None) or {}).get("template")
    return recorded if template == "default" and recorded else template


def _lit(text: str) -> str:
    """A Jinja expression printing ``text`` literally (JSON escapes are valid Jinja string escapes)."""
    import json

    return "{{ " + json.dumps(text) + " }}" if text else ""


def chat_template_for(template: str) -> str | None:
    """A Jinja chat template whose ``apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``
    is exactly :func:`format_prompt` of the messages' contents (None for ``chat``: the tokenizer's own)."""
    if template == "chat":
        return None
    if template == "default":
        return ("BEGINNING OF CONVERSATION:{% for m in messages %}{% if loop.index0 is even %} USER: {{ m['content'] | trim }}"
                "{% if not loop.last or add_generation_prompt %} ASSISTANT:{% endif %}{% else %} {{ m['content'] | trim }}{% endif %}{% endfor %}")
    if template == "raw":
        return "{% for m in messages %}{% if not loop.first %}" + _lit("\n") + "{% endif %}{{ m['content'] }}{% endfor %}"
    parts = template.split("{prompt}")
    last = "{{ messages[-1]['content'] }}".join(_lit(p) for p in parts)
    return "{% for m in messages[:-1] %}{{ m['content'] }}" + _lit("\n") + "{% endfor %}" + last


def format_record(template: str, tokenizer, kind: str, max_length: int | None = None) -> dict:
    """What ``safealign.json`` says: how safealign turns (prompt, response) into the model's input."""
    rec = {
        "format": "safealign prompt format, version 1",
        "template": template,
        "template_text": DEFAULT_TEMPLATE if template == "default" else None if template in ("raw", "chat") else template,
        "prompt": "tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), tokenized with the "
                  "tokenizer's special tokens (an EOS the tokenizer itself appends is dropped)",
        "response": "tokenized separately without special tokens, as given" if template == "chat"
                    else "' ' + response.strip(), tokenized separately without special tokens",
        "append_eos": True,
        "eos_token": tokenizer.eos_token, "eos_token_id": tokenizer.eos_token_id,
        "pad_token": tokenizer.pad_token, "pad_token_id": tokenizer.pad_token_id,
        "kind": kind,
    }
    if kind in ("reward", "cost", "critic"):
        rec["score"] = "the logit at the appended EOS (the last non-padding token): AutoModelForSequenceClassification's logits[:, 0]"
    if kind == "cost":
        rec["cost_sign"] = "higher = more harmful; cost > 0 unsafe, cost < 0 safe"
    if kind == "policy":
        rec["generation"] = "the response ends at the first EOS"
    if max_length:
        rec["max_length"] = max_length
    return rec


def read_format(model_dir) -> dict | None:
    """The ``safealign.json`` of a model directory (None when absent or unreadable)."""
    import json
    from pathlib import Path

    p = Path(model_dir) / FORMAT_FILE
    if not p.is_file():
        return None
    try:
        rec = json.loads(p.read_text())
    except ValueError:
        raise BadInput(f"{FORMAT_FILE} is not valid JSON", where=str(p), fix="restore it from the run, or delete it (the model then uses --template)") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("template"), str):
        raise BadInput(f"{FORMAT_FILE} has no 'template'", where=str(p), fix="restore it from the run, or delete it (the model then uses --template)")
    return rec
