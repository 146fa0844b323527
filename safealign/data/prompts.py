"""Reading prompts: the one rule every stage uses (ppo-lag, safety-test, eval, data split).

A prompt is a string (one user turn) or a list of dialogue turns ``[user, assistant, ..., user]``;
``data.templates.format_prompt`` turns either into the text the model sees. A row gives its
prompt by

1. its prompt column (``--prompt-column`` / ``--column prompt=NAME``): a non-empty string, or a
   list of non-empty strings (a list of one is that string);
2. without that column, an hh-rlhf ``chosen`` dialogue: every turn before the last assistant turn;
3. (``read_prompts(..., preference_fallback=True)``) without either, the prompts of preference
   rows (PKU-SafeRLHF, prompt/chosen/rejected pairs) as train-rm reads them.

Identity: ``prompt_text(p)`` joins the turns with newlines; ``prompt_key``/``prompt_hash`` of that
text (lower-cased, whitespace collapsed: ``records.normalize_prompt``) de-duplicate prompts and
check that safety prompts were never trained on.
"""

from __future__ import annotations

from typing import Union

from safealign.data.records import normalize_prompt, parse_hh_dialogue, prompt_hash
from safealign.errors import BadInput

Prompt = Union[str, list]


def prompt_text(prompt: Prompt) -> str:
    """The prompt as one text: turns joined by newlines."""
    return prompt if isinstance(prompt, str) else "\n".join(prompt)


def prompt_key(prompt: Prompt) -> str:
    """Normalised text: equal keys are the same prompt."""
    return normalize_prompt(prompt_text(prompt))


def hash_of(prompt: Prompt) -> str:
    """The prompt's hash as recorded in prompt_hashes.txt."""
    return prompt_hash(prompt_text(prompt))


def row_prompt(row: dict, column: str = "prompt", *, where: str, index: int) -> Prompt:
    """The prompt of one row (rules 1 and 2 of the module docstring), or BadInput naming the row."""
    if column in row:
        value = row[column]
        if isinstance(value, (list, tuple)):
            if not value or not all(isinstance(t, str) and t.strip() for t in value):
                raise BadInput(f"row {index}: column '{column}' must be text or a list of non-empty dialogue turns", where=where,
                               fix="remove the row or fill in its prompt")
            return value[0] if len(value) == 1 else list(value)
        if not isinstance(value, str):
            raise BadInput(f"row {index}: column '{column}' must be text, got {type(value).__name__}", where=where)
        if not value.strip():
            raise BadInput(f"row {index}: column '{column}' is empty", where=where, fix="remove the row or fill in its prompt")
        return value
    if isinstance(row.get("chosen"), str):
        turns = parse_hh_dialogue(row["chosen"])
        if len(turns) >= 2 and turns[-1][0] == "assistant" and turns[0][0] == "user":
            head = [t for _, t in turns[:-1]]
            return head[0] if len(head) == 1 else head
    raise BadInput(f"row {index} has no column '{column}' (it has {sorted(row)})", where=where,
                   fix="name the prompt column with --prompt-column (or --column prompt=NAME)")


def dedupe(prompts: list) -> tuple[list, int]:
    """(distinct prompts in first-seen order, how many duplicates were dropped)."""
    seen, out = set(), []
    for p in prompts:
        key = prompt_key(p)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out, len(prompts) - len(out)


def read_prompts(source: str, *, column: str = "prompt", split: str = "train", config: str | None = None, revision: str | None = None,
                 invalid_rows: str = "error",
                 max_prompts: int = 0, preference_fallback: bool = False, data_format: str = "auto",
                 columns: dict | None = None) -> tuple[list, dict]:
    """(distinct prompts of ``source``, stats; ``split``/``config``/``revision`` as data.readers.read_rows). ``invalid_rows="skip"`` skips rows without a usable
    prompt (counted) instead of stopping; ``max_prompts`` keeps the first N distinct prompts."""
    from safealign.data.readers import read_rows

    rows = read_rows(source, split, config=config, revision=revision)
    if not rows:
        raise BadInput("no rows", where=source)
    has_prompts = all(column in r or isinstance(r.get("chosen"), str) for r in rows)
    raw, skipped = [], 0
    if has_prompts or not preference_fallback:
        for i, r in enumerate(rows, start=1):
            try:
                raw.append(row_prompt(r, column, where=source, index=i))
            except BadInput:
                if invalid_rows != "skip":
                    raise
                skipped += 1
    else:
        from safealign.data.records import rows_to_pairs

        try:
            pairs, _ = rows_to_pairs(rows, source=source, task="helpful", fmt=data_format, columns=columns or {}, invalid_rows=invalid_rows)
        except BadInput as e:
            raise BadInput(f"no '{column}' column, and not readable as preference data ({e})", where=source,
                           fix=f"give prompt data with a '{column}' column (or --column prompt=NAME)") from None
        raw = [p.prompt[0] if len(p.prompt) == 1 else list(p.prompt) for p in pairs]
    prompts, dropped = dedupe(raw)
    if not prompts:
        raise BadInput("no usable prompts", where=source, fix="check the prompt column (or pass --invalid-rows error to see the first bad row)")
    stats = {"rows": len(rows), "distinct_prompts": len(prompts), "duplicates_dropped": dropped}
    if skipped:
        stats["invalid_rows_skipped"] = skipped
    if max_prompts:
        prompts = prompts[:max_prompts]
    stats["prompts_used"] = len(prompts)
    return prompts, stats
