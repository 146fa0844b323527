"""`safealign score-eval`: a reward or cost model on held-out preference pairs, without a policy.

The pairs are read, encoded and scored exactly as train-rm / train-cost evaluate their held-out
split (data.records.rows_to_pairs, data.encode.encode_pairs, stages.preference.score_pairs and
eval_metrics), so the numbers are comparable with a training report's ``eval/`` metrics:

* accuracy: the better response scores higher (reward model, ``--task helpful``), or the less safe
  one costs more (cost model, ``--task safety``), over all pairs and for each value of every
  ``--by`` column (e.g. a harm category or the annotator);
* cost models with per-response labels: sign accuracy (cost > 0 exactly for unsafe responses), the
  expected calibration error of P(unsafe) = sigmoid(cost) and the mean cost by label.

Rows whose safety labels contradict the safer label are kept and counted (they are evaluation
labels too). Outputs: report.json/.md, scores.jsonl (one line per pair), plots/, config.yaml,
manifest.json.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from safealign.config import ScoreEvalConfig, to_dict
from safealign.errors import BadInput


def model_task(path: str, task: str) -> str:
    """The task of ``--task``, or (auto) the one the model was trained for (config ``safealign_score_type``)."""
    from safealign.models.loading import check_model_dir

    kind = None
    cfg_file = Path(path) / "config.json"
    if cfg_file.is_file():
        kind = json.loads(cfg_file.read_text()).get("safealign_score_type")
    check_model_dir(path, f"{kind or 'score'} model", "--model", kind)
    from safealign.data.templates import read_format

    if kind is None and (read_format(path) or {}).get("kind") == "policy":
        raise BadInput("this is a policy, not a reward or cost model", where=path,
                       fix="pass a model from safealign train-rm or train-cost (score a policy's answers with safealign eval)")
    if task != "auto":
        return task
    if kind not in ("reward", "cost"):
        raise BadInput("cannot tell whether this is a reward or a cost model (its config.json has no safealign_score_type)",
                       where=path, fix="pass --task helpful (a reward model) or --task safety (a cost model)")
    return "helpful" if kind == "reward" else "safety"


def by_column(rows: list[dict], examples, correct: list[bool], columns: list[str]) -> dict:
    """Accuracy for each value of each column of the source rows (the row of every encoded pair)."""
    out: dict = {}
    for col in columns:
        groups: dict[str, list[bool]] = defaultdict(list)
        for e, ok in zip(examples, correct):
            groups[str(rows[e.row - 1].get(col))].append(ok)
        out[col] = [{"value": v, "pairs": len(g), "accuracy": sum(g) / len(g)} for v, g in sorted(groups.items())]
    return out


def run(cfg: ScoreEvalConfig) -> dict:
    import torch

    from safealign.data.encode import encode_pairs
    from safealign.data.readers import read_rows
    from safealign.data.records import rows_to_pairs
    from safealign.models.generation import load_scorer
    from safealign.runtime import plots, report
    from safealign.runtime.dist import make_accelerator
    from safealign.runtime.io import atomic_write_json, atomic_write_text, check_output_dir, manifest, whole_output_dir, write_config
    from safealign.stages.preference import eval_metrics, score_pairs

    # ---- every input is checked before anything is written ------------------------------------
    out = check_output_dir(cfg.output_dir, resume=False, resumable=False)
    task = model_task(cfg.model, cfg.task)
    rows = read_rows(cfg.data, cfg.data_split)
    pairs, stats = rows_to_pairs(rows, source=cfg.data, task=task, fmt=cfg.data_format, columns=cfg.columns,
                                 invalid_rows=cfg.invalid_rows, inconsistent="keep", max_samples=cfg.max_samples)
    present = set().union(*(r.keys() for r in rows[:50]))
    missing = [c for c in cfg.by if c not in present]
    if missing:
        raise BadInput(f"--by column(s) {', '.join(missing)} not in the data (it has {sorted(present)})", where=cfg.data)
    scorer, tok = load_scorer(cfg.model, dtype=cfg.dtype)
    examples, counts = encode_pairs(tok, pairs, cfg.template, cfg.max_length)
    if not examples:
        raise BadInput("no pairs left after tokenisation", where=cfg.data)
    inconsistent = sum(1 for p in pairs if task == "safety" and p.chosen_unsafe is True and p.rejected_unsafe is False)

    acc = make_accelerator(dtype="fp32")
    scorer.to(acc.device)
    with torch.no_grad():
        scores = score_pairs(acc, scorer, examples, tok.pad_token_id, cfg.batch_size * 2)
    metrics, extras = eval_metrics(task, scores, cfg.calibration_bins)
    c, r = scores["chosen"], scores["rejected"]
    correct = (c > r).tolist() if task == "helpful" else (r > c).tolist()
    summary: dict = {}
    if acc.is_main_process:
        name = "reward" if task == "helpful" else "cost"
        summary = {
            "stage": "score-eval", "model": cfg.model, "task": task, "output_dir": str(out),
            "data": {"source": cfg.data, **stats.to_dict(), "pairs": len(examples), "truncated_pairs": counts["truncated_pairs"],
                     "dropped_identical_after_truncation": counts["identical_after_truncation"],
                     **({"inconsistent_safety_labels_kept": inconsistent} if task == "safety" else {})},
            "metrics": {k.removeprefix("eval/"): v for k, v in metrics.items()},
            "by": by_column(rows, examples, correct, cfg.by),
        }
        m = summary["metrics"]
        summary["headline"] = (f"score-eval ({name} model): accuracy {100 * m['accuracy']:.1f}% on {m['pairs']} pairs"
                               + (f", sign accuracy {100 * m['sign_accuracy']:.1f}%" if "sign_accuracy" in m else ""))
        with whole_output_dir(out, "the score evaluation") as d:
            write_config(d / "config.yaml", to_dict(cfg))
            atomic_write_json(d / "manifest.json", manifest("score-eval", seed=0, extra={"pairs": len(examples)}))
            lines = [json.dumps({"row": e.row, "chosen_score": float(a), "rejected_score": float(b), "correct": bool(ok),
                                 **{col: rows[e.row - 1].get(col) for col in cfg.by}}, default=str)
                     for e, a, b, ok in zip(examples, c.tolist(), r.tolist(), correct)]
            atomic_write_text(d / "scores.jsonl", "\n".join(lines) + "\n")
            names = ("more helpful", "less helpful") if task == "helpful" else ("safer", "less safe")
            plots.histogram({names[0]: c.tolist(), names[1]: r.tolist()}, d / "plots" / "scores_by_preference.png",
                            f"{name} by preference on {cfg.data}", xlabel=name, ylabel="responses",
                            vlines={"zero (cost > 0: unsafe)": 0.0} if task == "safety" else None)
            if extras.get("reliability"):
                plots.reliability(extras["reliability"], d / "plots" / "reliability.png", "calibration of P(unsafe)")
            report.write(d, {k: v for k, v in summary.items() if k != "headline"}, title="safealign score-eval", intro=f"**{summary['headline']}**")
    return summary
