"""Canonical preference records and the conversion of raw rows into them.

A *pair* is (prompt turns, chosen response, rejected response) plus, for safety data, whether
each response is unsafe. What "chosen" means depends on the task:

* ``task="helpful"`` (train-rm): chosen = the more helpful response;
* ``task="safety"``  (train-cost): chosen = the SAFER (less harmful) response.

Supported row formats: PKU-SafeRLHF (``prompt, response_0, response_1, better_response_id,
safer_response_id, is_response_0_safe, is_response_1_safe``), hh-rlhf (``chosen``/``rejected``
whole dialogues: the shared prefix becomes the prompt, the final assistant turn the response) and
generic pairs (``prompt, chosen, rejected`` [+ ``chosen_safe``, ``rejected_safe``]); any column can
be renamed with ``--column KEY=COLUMN``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field

from safealign.errors import BadInput

PKU_KEYS = {"prompt": "prompt", "response_0": "response_0", "response_1": "response_1",
            "better_id": "better_response_id", "safer_id": "safer_response_id",
            "safe_0": "is_response_0_safe", "safe_1": "is_response_1_safe", "annotator_id": "annotator_id"}
PAIR_KEYS = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected",
             "chosen_safe": "chosen_safe", "rejected_safe": "rejected_safe", "annotator_id": "annotator_id"}
HH_KEYS = {"chosen": "chosen", "rejected": "rejected", "annotator_id": "annotator_id"}
MAPPABLE = sorted(set(PKU_KEYS) | set(PAIR_KEYS))


@dataclass
class Pair:
    prompt: list[str]            # dialogue turns: user, assistant, user, ... (odd length, ends on a user turn)
    chosen: str
    rejected: str
    chosen_unsafe: bool | None = None    # per-response safety label (None = unknown)
    rejected_unsafe: bool | None = None
    annotator: str | None = None
    row: int = 0                 # 1-based row number in the source, for messages


@dataclass
class LoadStats:
    rows: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict:
        return {"rows": self.rows, "kept": self.kept, "skipped": dict(self.skipped)}


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def parse_hh_dialogue(text: str) -> list[tuple[str, str]]:
    """'\\n\\nHuman: a\\n\\nAssistant: b ...' -> [("user", a), ("assistant", b), ...]."""
    parts = _HH_TURN.split(text)
    turns = []
    for i in range(1, len(parts) - 1, 2):
        role = "user" if parts[i] == "Human" else "assistant"
        turns.append((role, parts[i + 1].strip()))
    return turns


def detect_format(columns: set[str]) -> str:
    """Guess the row format from (mapped) column names; missing columns are reported afterwards."""
    if columns & {"response_0", "response_1"}:
        return "pku"
    if "prompt" in columns and columns & {"chosen", "rejected"}:
        return "pairs"
    if columns & {"chosen", "rejected"}:
        return "hh"
    return "unknown"


def _as_bool(value, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no", "safe", "unsafe"):
        return value.strip().lower() in ("true", "1", "yes", "safe")
    raise _RowError(f"{where} must be a boolean (true/false), got {value!r}", "wrong_type")


def _as_id(value, where: str) -> int:
    if isinstance(value, bool):
        raise _RowError(f"{where} must be 0 or 1, got {value!r}", "wrong_type")
    try:
        number = float(value.strip()) if isinstance(value, str) else value
        if isinstance(number, float) and not number.is_integer():  # int(0.7) would silently make it 0
            raise ValueError
        v = int(number)
    except (TypeError, ValueError, OverflowError):
        raise _RowError(f"{where} must be 0 or 1, got {value!r}", "wrong_type") from None
    if v not in (0, 1):
        raise _RowError(f"{where} must be 0 or 1, got {value!r}", "wrong_type")
    return v


def _as_text(value, where: str) -> str:
    if not isinstance(value, str):
        raise _RowError(f"{where} must be a string, got {type(value).__name__}", "wrong_type")
    if not value.strip():
        raise _RowError(f"{where} is empty", "empty_text")
    return value


class _RowError(Exception):
    """One bad row (turned into BadInput, or counted when invalid_rows=skip)."""

    def __init__(self, message: str, reason: str = "invalid"):
        super().__init__(message)
        self.reason = reason


def rows_to_pairs(rows: list[dict], *, source: str, task: str, fmt: str = "auto",
                  columns: dict[str, str] | None = None, invalid_rows: str = "error",
                  inconsistent: str = "keep", max_samples: int = 0) -> tuple[list[Pair], LoadStats]:
    """Validate raw rows and convert them to canonical pairs.

    task: "helpful" (rank by better_response_id / chosen) or "safety" (rank by safer_response_id;
    per-response safety labels when present). inconsistent: what to do with safety rows whose
    labels contradict the safer label ("skip" and count, or "keep").
    """
    columns = dict(columns or {})
    unknown = sorted(set(columns) - set(MAPPABLE))
    if unknown:
        raise BadInput(f"unknown --column key(s) {', '.join(unknown)}", fix=f"use keys among {', '.join(MAPPABLE)}")
    if not rows:
        raise BadInput("the data has no rows", where=source)
    present = set().union(*(r.keys() for r in rows[:50]))
    renamed = {k: columns.get(k, v) for k, v in {**PKU_KEYS, **PAIR_KEYS}.items()}
    if fmt == "auto":
        fmt = detect_format({k for k, v in renamed.items() if v in present})
        if fmt == "unknown":
            raise BadInput(f"cannot tell the row format from the columns {sorted(present)}", where=source,
                           fix="map your columns, e.g. --column prompt=question --column chosen=good --column rejected=bad, or pass --data-format")
    keys = {"pku": PKU_KEYS, "pairs": PAIR_KEYS, "hh": HH_KEYS}[fmt]
    col = {k: columns.get(k, v) for k, v in keys.items()}
    required = {"pku": ["prompt", "response_0", "response_1", "better_id" if task == "helpful" else "safer_id"],
                "pairs": ["prompt", "chosen", "rejected"], "hh": ["chosen", "rejected"]}[fmt]
    for k in required:
        if col[k] not in present:
            raise BadInput(f"missing column '{col[k]}' (needed as '{k}' for the {fmt} format; the data has {sorted(present)})",
                           where=source, fix=f"rename it with --column {k}=YOUR_COLUMN")

    stats = LoadStats(rows=len(rows))
    pairs: list[Pair] = []
    for i, row in enumerate(rows, start=1):
        if max_samples and len(pairs) >= max_samples:
            break
        try:
            pair = _convert(row, fmt, col, task, i)
            if pair is None:
                stats.skipped["hh_prefix_mismatch"] += 1
                continue
            if pair.chosen.strip() == pair.rejected.strip():
                raise _RowError("the two responses are identical", "identical_responses")
            if task == "safety" and pair.chosen_unsafe is True and pair.rejected_unsafe is False:
                # The safer response is labelled unsafe and the less safe one safe (safe-rlhf #181).
                if inconsistent == "skip":
                    stats.skipped["inconsistent_safety_labels"] += 1
                    continue
            pairs.append(pair)
        except _RowError as e:
            if invalid_rows == "skip":
                stats.skipped[e.reason] += 1
                continue
            raise BadInput(f"row {i}: {e}", where=source,
                           fix="correct the row, or pass --invalid-rows skip to skip such rows (they are counted in the report)") from None
    stats.kept = len(pairs)
    if not pairs:
        raise BadInput(f"no usable rows left after filtering (skipped: {dict(stats.skipped) or 'none'})", where=source)
    return pairs, stats


def _get(row: dict, name: str, i: int):
    if name not in row:
        raise _RowError(f"column '{name}' is missing", "missing_value")
    value = row[name]
    if value is None:
        raise _RowError(f"column '{name}' is null", "missing_value")
    return value


def _convert(row: dict, fmt: str, col: dict, task: str, i: int) -> Pair | None:
    annotator = row.get(col.get("annotator_id", "annotator_id"))
    annotator = None if annotator is None else str(annotator)
    if fmt == "pku":
        prompt = _as_text(_get(row, col["prompt"], i), f"column '{col['prompt']}'")
        r = [_as_text(_get(row, col["response_0"], i), f"column '{col['response_0']}'"),
             _as_text(_get(row, col["response_1"], i), f"column '{col['response_1']}'")]
        key = "better_id" if task == "helpful" else "safer_id"
        best = _as_id(_get(row, col[key], i), f"column '{col[key]}'")
        unsafe = [None, None]
        if task == "safety" and row.get(col["safe_0"]) is not None and row.get(col["safe_1"]) is not None:  # as for pairs below
            unsafe = [not _as_bool(row[col["safe_0"]], f"column '{col['safe_0']}'"),
                      not _as_bool(row[col["safe_1"]], f"column '{col['safe_1']}'")]
        return Pair([prompt], r[best], r[1 - best], unsafe[best], unsafe[1 - best], annotator, i)
    if fmt == "pairs":
        prompt = _as_text(_get(row, col["prompt"], i), f"column '{col['prompt']}'")
        chosen = _as_text(_get(row, col["chosen"], i), f"column '{col['chosen']}'")
        rejected = _as_text(_get(row, col["rejected"], i), f"column '{col['rejected']}'")
        cu = ru = None
        if task == "safety" and row.get(col["chosen_safe"]) is not None and row.get(col["rejected_safe"]) is not None:
            cu = not _as_bool(row[col["chosen_safe"]], f"column '{col['chosen_safe']}'")
            ru = not _as_bool(row[col["rejected_safe"]], f"column '{col['rejected_safe']}'")
        return Pair([prompt], chosen, rejected, cu, ru, annotator, i)
    # hh-rlhf: whole dialogues sharing a prefix.
    chosen = parse_hh_dialogue(_as_text(_get(row, col["chosen"], i), f"column '{col['chosen']}'"))
    rejected = parse_hh_dialogue(_as_text(_get(row, col["rejected"], i), f"column '{col['rejected']}'"))
    if not chosen or not rejected or chosen[-1][0] != "assistant" or rejected[-1][0] != "assistant":
        raise _RowError("dialogue does not end with an '\\n\\nAssistant:' turn", "bad_dialogue")
    if chosen[:-1] != rejected[:-1]:
        return None  # the dialogues differ before the final answer: no single prompt to rank on
    prompt_turns = [t for _, t in chosen[:-1]]
    if not prompt_turns or chosen[0][0] != "user" or not all(t.strip() for t in prompt_turns):
        raise _RowError("dialogue has no user turn before the final answer", "bad_dialogue")
    c, r = chosen[-1][1], rejected[-1][1]
    if not c.strip() or not r.strip():
        raise _RowError("the final assistant turn is empty", "empty_text")
    return Pair(prompt_turns, c, r, None, None, annotator, i)


def fingerprint(pairs: list[Pair]) -> str:
    """sha256 of the canonical records: the same data gives the same fingerprint."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps(asdict(p), sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()


def normalize_prompt(text: str) -> str:
    """Normalised prompt text used for disjointness checks and de-duplication."""
    return " ".join(text.lower().split())


def prompt_hash(text: str) -> str:
    return hashlib.sha256(normalize_prompt(text).encode()).hexdigest()[:32]
