"""`safealign data split`: a deterministic candidate/safety split that no prompt straddles.

The Seldonian recipe (research/hc-rlhf.md §2) splits the data once into *candidate* data, used
for everything that trains or selects the model, and *safety* data, used only by the final
high-confidence test. The test's guarantee needs the two to be independent, so the split is made
on **distinct prompts** (normalised text, ``data.records.normalize_prompt``): every row whose
prompt normalises to the same text goes to the same side, and no prompt lands in both.

Determinism: the distinct prompt hashes are sorted, shuffled with ``random.Random(seed)`` and the
first ``round(N * safety_fraction)`` go to the safety part (at least 1, at most N - 1). The result
depends only on the *set* of prompts, the fraction and the seed, not on the order of the rows.
Rows are written unchanged (a preference file stays a preference file), in their original order.

Outputs: ``candidate.jsonl``, ``safety.jsonl``, ``split.json`` (counts, seed, fraction, the
source fingerprint, a manifest, and ``safety_set_id``: the same identity of the safety set that
``safealign safety-test`` records when it is tested on) and ``report.json`` + ``report.md``.
"""

from __future__ import annotations

import hashlib
import json
import random

from safealign.config import SplitConfig
from safealign.data.prompts import hash_of, row_prompt
from safealign.data.readers import read_data
from safealign.errors import BadInput
from safealign.runtime import report
from safealign.runtime.io import atomic_write_json, atomic_write_text, check_output_dir, manifest, whole_output_dir


def set_id(hashes) -> str:
    """Identity of a prompt set: sha256 of its sorted distinct normalised-prompt hashes (first 32 hex)."""
    return hashlib.sha256("\n".join(sorted(set(hashes))).encode()).hexdigest()[:32]


def assign(hashes: list[str], safety_fraction: float, seed: int) -> set[str]:
    """The distinct prompt hashes that go to the safety part (deterministic in set, fraction, seed)."""
    order = sorted(set(hashes))
    random.Random(seed).shuffle(order)
    n_safety = min(max(round(len(order) * safety_fraction), 1), len(order) - 1)
    return set(order[:n_safety])


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows)


def run(cfg: SplitConfig) -> dict:
    from safealign.runtime.dist import one_process

    one_process("data split")
    out = check_output_dir(cfg.output_dir, resume=False, resumable=False)
    rows = read_data(cfg, cfg.data)
    if not rows:
        raise BadInput("the data has no rows", where=cfg.data)
    hashes = [hash_of(row_prompt(r, cfg.prompt_column, where=cfg.data, index=i)) for i, r in enumerate(rows, start=1)]
    distinct = set(hashes)
    if len(distinct) < 2:
        raise BadInput(f"only {len(distinct)} distinct prompt(s) in {len(rows)} rows: nothing to split", where=cfg.data)
    safety = assign(hashes, cfg.safety_fraction, cfg.seed)
    cand_rows = [r for r, h in zip(rows, hashes) if h not in safety]
    safe_rows = [r for r, h in zip(rows, hashes) if h in safety]

    summary = {
        "stage": "split", "source": str(cfg.data), "seed": cfg.seed, "safety_fraction": cfg.safety_fraction,
        "rows": len(rows), "distinct_prompts": len(distinct), "duplicate_rows": len(rows) - len(distinct),
        "candidate": {"rows": len(cand_rows), "prompts": len(distinct) - len(safety), "file": str(out / "candidate.jsonl")},
        "safety": {"rows": len(safe_rows), "prompts": len(safety), "file": str(out / "safety.jsonl")},
        "safety_set_id": set_id(safety),
        "source_fingerprint": hashlib.sha256("\n".join(hashes).encode()).hexdigest(),
        "disjoint": True,
    }
    with whole_output_dir(out, "the split") as d:
        atomic_write_text(d / "candidate.jsonl", _jsonl(cand_rows))
        atomic_write_text(d / "safety.jsonl", _jsonl(safe_rows))
        atomic_write_json(d / "split.json", {**summary, "manifest": manifest("split", seed=cfg.seed, data_fingerprint=summary["source_fingerprint"])})
        report.write(d, summary, title="safealign data split",
                     intro="Candidate rows train and select the model; safety rows are only for `safealign safety-test`.")
    summary["headline"] = (f"split {len(distinct)} distinct prompts ({len(rows)} rows): {summary['candidate']['prompts']} candidate, "
                           f"{len(safety)} safety (disjoint on normalised text; safety set {summary['safety_set_id'][:12]})")
    summary["output_dir"] = str(out)
    return summary
