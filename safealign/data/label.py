"""`safealign data label`: a policy's sampled answers, paired and labelled by a synthetic world's annotators.

The world's own preference pairs come from its style generator. A reward model trained only on
them has never seen the mistakes of the policy it will judge (on some worlds the tiny SFT policy
slips words of another topic into its answers, and the reward model pays for them: RL then learns
to wander off topic). RLHF collects preference labels on the answers of the model being trained;
this command does that inside the synthetic world, with the same annotators and label noise.
"""

from __future__ import annotations

import json
from pathlib import Path

from safealign.errors import BadInput


def read_samples(path: str) -> list[dict]:
    """Rows of a JSONL file of sampled answers, each with a string ``prompt`` and ``response``."""
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadInput(f"line {i} is not JSON ({e.msg})", where=path) from None
            if not isinstance(r, dict) or not isinstance(r.get("prompt"), str) or not isinstance(r.get("response"), str):
                raise BadInput(f"line {i} has no string 'prompt' and 'response'", where=path,
                               fix="give the generations.jsonl of `safealign eval --samples 2`, or rows {\"prompt\": ..., \"response\": ...}")
            rows.append(r)
    return rows


def world_config(world: str):
    """The WorldConfig a world directory was generated with; refused when its vocabulary is not this version's
    (its oracle would score other words)."""
    from safealign.data import synth

    meta = json.loads((Path(world) / "world.json").read_text())
    if meta.get("vocab_sha256") != synth.vocab_sha256():
        raise BadInput(f"the world's vocabulary ({meta.get('vocab_version')}) is not this safealign's ({synth.VOCAB_VERSION})",
                       where=world, fix="generate the world again with this version's `safealign data synth`")
    return synth.WorldConfig.from_dict(meta["config"])


def label_file(world: str, responses: str, output: str, *, include: str | None = None, seed: int = 0) -> dict:
    """Write ``output``: the rows of ``include`` (verbatim) followed by the labelled pairs of ``responses``."""
    from safealign.data import synth
    from safealign.runtime.io import atomic_write_text, writing

    cfg = world_config(world)
    rows = synth.label_responses(cfg, read_samples(responses), seed=seed)
    if not rows:
        raise BadInput("no prompt has two different answers to pair", where=responses,
                       fix="sample at least two answers per prompt (`safealign eval --samples 2`)")
    head = Path(include).read_text(encoding="utf-8") if include else ""
    if head and not head.endswith("\n"):
        head += "\n"
    with writing("the preference file", output):
        atomic_write_text(output, head + "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in rows))
    n_inc = sum(1 for line in head.splitlines() if line.strip())
    agree = synth.annotator_agreement(rows)["all"]
    return {"pairs": len(rows), "included": n_inc, "output": str(output), "better_agree": agree["better_agree"],
            "headline": f"{output}: {len(rows)} labelled pairs of sampled answers"
                        + (f" after {n_inc} rows of {include}" if include else "")
                        + f" (labels agree with the oracle's better answer on {100 * agree['better_agree']:.1f}% of them)"}
