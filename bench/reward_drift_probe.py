"""Does a demo's reward model pay for words of another topic? (the seed-2 diagnosis of the README)

For every answer of a policy to a benign eval prompt (a finished demo's eval/POLICY/generations.jsonl)
that holds informative words of another topic, score it and the same answer without those words
under the reward model: how often the reward model prefers the drifting answer, its mean gain, and
the oracle's mean gain (negative: the words make the answer worse).

    python bench/reward_drift_probe.py --demo demo-out --policy ppo_lag [--reward-model DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, required=True, help="a finished demo's output directory")
    ap.add_argument("--policy", default="ppo_lag", help="whose eval answers (sft, ppo, ppo_lag, grpo_lag, ...)")
    ap.add_argument("--reward-model", type=Path, help="default: the demo's rm/")
    args = ap.parse_args()

    from safealign.data import synth
    from safealign.models.generation import load_scorer, score_texts

    scorer, tok = load_scorer(str(args.reward_model or args.demo / "rm"))
    prompts, drifting, clean, gain = [], [], [], []
    for line in (args.demo / "eval" / args.policy / "generations.jsonl").read_text().splitlines():
        r = json.loads(line)
        topic, harmful = synth.parse_prompt(r["prompt"])
        if r["policy"] != "policy" or harmful:
            continue
        words = r["response"].split()
        keep = [w for w in words if not (synth._ROLE.get(w, ("", ""))[0] == "helpful" and synth._ROLE[w][1] != topic)]
        if len(keep) == len(words):
            continue
        prompts.append(r["prompt"])
        drifting.append(r["response"])
        clean.append(" ".join(keep))
        gain.append(synth.oracle(r["prompt"], r["response"]).helpfulness - synth.oracle(r["prompt"], clean[-1]).helpfulness)
    a = score_texts(scorer, tok, prompts, drifting, template="auto")
    b = score_texts(scorer, tok, prompts, clean, template="auto")
    print(json.dumps({"answers_with_other_topic_words": len(prompts), "reward_model_prefers_drifting": round(float((a > b).float().mean()), 3),
                      "reward_model_mean_gain": round(float((a - b).mean()), 3), "oracle_mean_gain": round(sum(gain) / len(gain), 3)}))


if __name__ == "__main__":
    main()
