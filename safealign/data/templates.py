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
