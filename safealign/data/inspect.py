"""`safealign data inspect`: what a data file holds, read the way the training stages read it.

* **format**: the row format detected (pku, pairs, hh: preference data; sft: prompt/response;
  prompts: a prompt column only), after ``--column`` renames;
* **invalid rows by reason**: as train-rm and train-cost would count them with ``--invalid-rows
  skip`` (identical responses, empty text, wrong types, ...; train-cost also contradictory safety
  labels), and sft for prompt/response data;
* **lengths**: percentiles of the formatted prompt, the response and the whole sequence (prompt +
  response + EOS) in the tokens of ``--model``'s tokenizer, else in whitespace words, and how many
  sequences ``--max-length`` would truncate;
* **label balance**: which response is better/safer, the share of responses labelled unsafe, how
  often the better response is also the safer one, labels per annotator;
* **prompt overlap** with ``--against FILE`` (distinct normalised prompts in both).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from safealign.data.readers import read_rows
from safealign.data.records import detect_format, rows_to_pairs
from safealign.data.templates import format_prompt, format_response
from safealign.errors import BadInput

PERCENTILES = (50, 90, 99)


def detect(rows: list[dict], fmt: str, columns: dict[str, str]) -> str:
    """The row format of ``rows`` (``fmt`` unless it is auto)."""
    if fmt != "auto":
        return fmt
    present = set().union(*(r.keys() for r in rows[:50]))
    renamed = {k: columns.get(k, k) for k in ("prompt", "chosen", "rejected", "response_0", "response_1", "response")}
    have = {k for k, v in renamed.items() if v in present}
    found = detect_format(have - {"response"})
    if found != "unknown":
        return found
    if {"prompt", "response"} <= have:
        return "sft"
    return "prompts" if "prompt" in have else "unknown"


def percentiles(values: list[int]) -> dict:
    if not values:
        return {}
    a = np.asarray(values)
    return {"mean": float(a.mean()), **{f"p{q}": float(np.percentile(a, q)) for q in PERCENTILES}, "max": int(a.max())}


class Lengths:
    """Length in tokens (a tokenizer) or whitespace words (none)."""

    def __init__(self, tok):
        self.tok = tok
        self.unit = "tokens" if tok is not None else "whitespace words"

    def __call__(self, text: str, special: bool) -> int:
        if self.tok is None:
            return len(text.split())
        return len(self.tok(text, add_special_tokens=special)["input_ids"])


def _prompts_of(rows: list[dict], column: str, source: str) -> tuple[set[str], int]:
    """Distinct prompt hashes of rows (data.prompts: the rule every stage reads prompts by), and the rows without a usable prompt."""
    from safealign.data.prompts import hash_of, row_prompt

    hashes, bad = set(), 0
    for i, row in enumerate(rows, start=1):
        try:
            hashes.add(hash_of(row_prompt(row, column, where=source, index=i)))
        except BadInput:
            bad += 1
    return hashes, bad


def _pair_report(rows: list[dict], cfg, fmt: str, count: Lengths, tok) -> dict:
    out: dict = {"invalid_rows": {}, "usable": {}}
    pairs_by_task = {}
    for task, stage in (("helpful", "train-rm"), ("safety", "train-cost")):
        try:
            pairs, st = rows_to_pairs(rows, source=cfg.data, task=task, fmt=fmt, columns=cfg.columns, invalid_rows="skip",
                                      inconsistent="skip" if task == "safety" else "keep", max_samples=cfg.max_samples)
        except BadInput as e:
            out["usable"][stage] = f"not usable: {e}"
            continue
        out["usable"][stage] = f"{st.kept} of {st.rows} rows"
        out["invalid_rows"][stage] = dict(st.skipped)
        pairs_by_task[task] = pairs
    pairs = pairs_by_task.get("helpful") or pairs_by_task.get("safety") or []
    if pairs:
        prompt_len, resp_len, seq_len, over = [], [], [], 0
        for p in pairs:
            pl = count(format_prompt(p.prompt, cfg.template, tok), True)
            for r in (p.chosen, p.rejected):
                rl = count(format_response(r, cfg.template), False)
                resp_len.append(rl)
                seq_len.append(pl + rl + 1)
                over += int(pl + rl + 1 > cfg.max_length)
            prompt_len.append(pl)
        out["lengths"] = _lengths(count, cfg, prompt_len, resp_len, seq_len)
    out["labels"] = _balance(rows, fmt, cfg.columns, pairs_by_task)
    return out


def _balance(rows: list[dict], fmt: str, columns: dict[str, str], pairs_by_task: dict) -> dict:
    lab: dict = {}
    col = lambda key, default: columns.get(key, default)  # noqa: E731
    if fmt == "pku":
        for key, default in (("better_id", "better_response_id"), ("safer_id", "safer_response_id")):
            c = Counter(str(r.get(col(key, default))) for r in rows if r.get(col(key, default)) is not None)
            if c:
                lab[f"{default} (share of rows)"] = {k: v / sum(c.values()) for k, v in sorted(c.items())}
        both = [(r.get(col("better_id", "better_response_id")), r.get(col("safer_id", "safer_response_id"))) for r in rows]
        both = [(b, s) for b, s in both if b is not None and s is not None]
        if both:
            lab["better response is also the safer one"] = sum(str(b) == str(s) for b, s in both) / len(both)
    safety = pairs_by_task.get("safety") or []
    flags = [u for p in safety for u in (p.chosen_unsafe, p.rejected_unsafe) if u is not None]
    if flags:
        lab["responses labelled unsafe"] = sum(flags) / len(flags)
        kinds = Counter(("safer unsafe" if p.chosen_unsafe else "safer safe") + " / " + ("other unsafe" if p.rejected_unsafe else "other safe")
                        for p in safety if p.chosen_unsafe is not None and p.rejected_unsafe is not None)
        lab["pairs by safety labels"] = dict(sorted(kinds.items()))
    elif safety:
        lab["responses labelled unsafe"] = "no per-response safety labels (train-cost: ranking-only mode)"
    ann = Counter(p.annotator for p in (pairs_by_task.get("helpful") or safety) if p.annotator is not None)
    if ann:
        per = sorted(ann.values())
        lab["annotators"] = {"count": len(ann), "labels per annotator (min / median / max)": f"{per[0]} / {per[len(per) // 2]} / {per[-1]}"}
    return lab


def _sft_report(rows: list[dict], cfg, count: Lengths, tok) -> dict:
    from safealign.stages.sft import rows_to_examples

    try:
        ex, st = rows_to_examples(rows, source=cfg.data, fmt="sft", columns=cfg.columns, invalid_rows="skip",
                                  preference_response="better", max_samples=cfg.max_samples)
    except BadInput as e:
        return {"usable": {"sft": f"not usable: {e}"}}
    pl = [count(format_prompt(e.prompt, cfg.template, tok), True) for e in ex]
    rl = [count(format_response(e.response, cfg.template), False) for e in ex]
    seq = [a + b + 1 for a, b in zip(pl, rl)]
    return {"usable": {"sft": f"{st['kept']} of {st['rows']} rows"}, "invalid_rows": {"sft": st["skipped"]},
            "lengths": _lengths(count, cfg, pl, rl, seq)}


def _lengths(count: "Lengths", cfg, prompt: list[int], response: list[int] | None = None, sequence: list[int] | None = None) -> dict:
    out = {"unit": count.unit, "prompt": percentiles(prompt)}
    if response is not None:
        out.update(response=percentiles(response), sequence=percentiles(sequence or []), max_length=cfg.max_length,
                   over_max_length=sum(s > cfg.max_length for s in sequence or []))
    return out


def inspect(cfg) -> dict:
    """The inspection of ``cfg.data`` (see the module docstring) as a dict."""
    rows = read_rows(cfg.data, cfg.data_split)
    if not rows:
        raise BadInput("the data has no rows", where=cfg.data)
    tok = None
    if cfg.model:
        from safealign.models.loading import load_tokenizer

        tok = load_tokenizer(cfg.model)
    count = Lengths(tok)
    fmt = detect(rows, cfg.data_format, cfg.columns)
    present = sorted(set().union(*(r.keys() for r in rows[:50])))
    out: dict = {"data": str(cfg.data), "format": fmt, "rows": len(rows), "columns": present,
                 "template": cfg.template, "length_unit": count.unit + (f" of {cfg.model}" if cfg.model else "")}
    if fmt in ("pku", "pairs", "hh"):
        out.update(_pair_report(rows, cfg, fmt, count, tok))
    elif fmt == "sft":
        out.update(_sft_report(rows, cfg, count, tok))
    elif fmt == "unknown":
        out["usable"] = {"any stage": f"not usable: cannot tell the row format from the columns {present}; map them with --column KEY=COLUMN"}
    pcol = cfg.columns.get("prompt", "prompt")
    hashes, bad = _prompts_of(rows, pcol, cfg.data)
    out["prompts"] = {"distinct": len(hashes), "rows_without_prompt": bad, "rows_repeating_a_prompt": len(rows) - bad - len(hashes)}
    if fmt == "prompts":
        lens = [count(format_prompt(r[pcol], cfg.template, tok), True) for r in rows if isinstance(r.get(pcol), str) and r[pcol].strip()]
        out["lengths"] = _lengths(count, cfg, lens)
    if cfg.against:
        other_rows = read_rows(cfg.against, cfg.data_split)
        other, _ = _prompts_of(other_rows, pcol, cfg.against)
        both = hashes & other
        out["overlap"] = {"against": str(cfg.against), "distinct_prompts": len(other), "shared": len(both),
                          "share_of_theirs": len(both) / len(other) if other else None,
                          "share_of_ours": len(both) / len(hashes) if hashes else None}
    out["headline"] = _headline(out)
    return out


def _headline(o: dict) -> str:
    parts = [f"{o['data']}: {o['format']} format, {o['rows']} rows, {o['prompts']['distinct']} distinct prompts"]
    for stage, inv in (o.get("invalid_rows") or {}).items():
        parts.append(f"{stage}: {sum(inv.values())} invalid" + (f" ({', '.join(f'{k} {v}' for k, v in inv.items())})" if inv else ""))
    if "overlap" in o:
        v = o["overlap"]
        parts.append(f"{v['shared']} of the {v['distinct_prompts']} prompts of {v['against']} are also in --data")
    return "; ".join(parts)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def markdown(o: dict) -> str:
    """The inspection as Markdown (what the command prints)."""
    from safealign.runtime.report import cell, table

    p = o["prompts"]
    lines = [f"# data inspect: {o['data']}", "",
             f"**{o['format']}** format, {o['rows']} rows, {p['distinct']} distinct prompts (normalised text; {p['rows_repeating_a_prompt']} rows "
             f"repeat an earlier row's prompt, {p['rows_without_prompt']} have none). Columns: {', '.join(o['columns'])}.", ""]
    if o.get("usable"):
        rows = [[stage, use, ", ".join(f"{k} {v}" for k, v in (o.get("invalid_rows") or {}).get(stage, {}).items()) or "none"]
                for stage, use in o["usable"].items()]
        lines += ["Read as the stages read it (`--invalid-rows skip`):", ""] + table(["stage", "usable rows", "invalid rows by reason"], rows) + [""]
    L = o.get("lengths")
    if L:
        keys = [k for k in ("prompt", "response", "sequence") if L.get(k)]
        names = {"prompt": "prompt (formatted)", "response": "response", "sequence": "prompt + response + EOS"}
        lines += [f"Lengths in {o['length_unit']} (template `{o['template']}`):", ""]
        lines += table(["", "mean", "p50", "p90", "p99", "max"], [[names[k]] + [L[k][c] for c in ("mean", "p50", "p90", "p99", "max")] for k in keys])
        if "over_max_length" in L:
            lines += ["", f"{L['over_max_length']} sequences are longer than --max-length {L['max_length']} (truncated in training, never dropped)."]
        lines += [""]
    lab = o.get("labels") or {}
    if lab:
        lines += ["Labels:", ""]
        for k, v in lab.items():
            text = ", ".join(f"{a} {_pct(b) if isinstance(b, float) else b}" for a, b in v.items()) if isinstance(v, dict) else \
                (_pct(v) if isinstance(v, float) else cell(v))
            lines.append(f"- {k}: {text}")
        lines += [""]
    if "overlap" in o:
        v = o["overlap"]
        lines += [f"Prompt overlap: {v['shared']} of the {v['distinct_prompts']} distinct prompts of `{v['against']}` ({_pct(v['share_of_theirs'])}) "
                  f"are also in this file ({_pct(v['share_of_ours'])} of its prompts).", ""]
    return "\n".join(lines)
