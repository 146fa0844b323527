"""Tokenisation of prompt/response pairs: prompt + response + EOS, truncated (never dropped)."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from safealign.data.records import Pair, normalize_prompt
from safealign.data.templates import effective_template, format_prompt, format_response


@dataclass
class Encoded:
    ids: list[int]
    prompt_len: int
    truncated: bool


def encode(tok, prompt_text: str, response_text: str, max_length: int) -> Encoded:
    """ids = prompt_ids + response_ids + [eos], at most ``max_length`` tokens.

    Over-long sequences lose prompt tokens from the left first (down to a quarter of the budget),
    then response tokens from the right; the EOS is always kept, so the end score is always read
    at an EOS the model has seen in training.
    """
    return encode_responses(tok, prompt_text, [response_text], max_length)[0]


def encode_responses(tok, prompt_text: str, response_texts: list[str], max_length: int) -> list[Encoded]:
    """:func:`encode` for several responses to one prompt, with one prompt cut for all of them: the cut
    the longest response needs. Every response is then judged after the same context, and the two
    sides of a pair keep their common start (which the shared-prefix forward runs once); cut per side,
    an over-long pair would start at different tokens and share nothing."""
    p = tok(prompt_text, add_special_tokens=True)["input_ids"]
    if p and p[-1] == tok.eos_token_id:
        p = p[:-1]
    rs = [tok(r, add_special_tokens=False)["input_ids"] for r in response_texts]
    budget = max_length - 1
    longest = max(len(r) for r in rs)
    keep_p = len(p) if len(p) + longest <= budget else max(budget - longest, min(len(p), budget // 4))
    kept = p[len(p) - keep_p:]
    room = budget - keep_p
    return [Encoded(kept + r[:room] + [tok.eos_token_id], keep_p, keep_p < len(p) or len(r) > room) for r in rs]


@dataclass
class EncodedPair:
    chosen: list[int]
    rejected: list[int]
    chosen_sign: int      # cost sign of the chosen response: +1 unsafe, -1 safe, 0 unknown
    rejected_sign: int
    diverge: int          # first position where the two token sequences differ
    row: int


def _sign(unsafe: bool | None) -> int:
    return 0 if unsafe is None else (1 if unsafe else -1)


def encode_pair_sides(tok, pair: Pair, template: str, max_length: int) -> tuple[Encoded, Encoded]:
    """Chosen and rejected of one pair after its formatted prompt, one prompt cut for both
    (:func:`encode_responses`). ``template``: an effective template (:func:`effective_template`)."""
    prompt = format_prompt(pair.prompt, template, tok)
    return tuple(encode_responses(tok, prompt, [format_response(pair.chosen, template), format_response(pair.rejected, template)], max_length))


def encode_pairs(tok, pairs: list[Pair], template: str, max_length: int) -> tuple[list[EncodedPair], Counter]:
    """Encode pairs; counts truncations, and drops (counting) pairs made identical by truncation."""
    template = effective_template(template, tok)
    out, counts = [], Counter()
    for pair in pairs:
        c, r = encode_pair_sides(tok, pair, template, max_length)
        counts["truncated_pairs"] += int(c.truncated or r.truncated)
        if c.ids == r.ids:
            counts["identical_after_truncation"] += 1
            continue
        n = min(len(c.ids), len(r.ids))
        diverge = next((i for i in range(n) if c.ids[i] != r.ids[i]), n - 1)
        out.append(EncodedPair(c.ids, r.ids, _sign(pair.chosen_unsafe), _sign(pair.rejected_unsafe), diverge, pair.row))
    return out, counts


def split_by_prompt(pairs: list[Pair], fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Hold out ``fraction`` of the distinct prompts (all their pairs) for evaluation, seeded."""
    if fraction <= 0:
        return pairs, []
    key = [normalize_prompt(" ".join(p.prompt)) for p in pairs]
    keys = sorted(set(key))
    random.Random(seed).shuffle(keys)
    n_eval = min(max(1, round(len(keys) * fraction)), len(keys) - 1)  # at least one prompt on each side
    held = set(keys[:n_eval])
    train = [p for p, k in zip(pairs, key) if k not in held]
    evals = [p for p, k in zip(pairs, key) if k in held]
    return train, evals


def tokenizer_corpus(pairs: list[Pair], template: str) -> list[str]:
    """Texts to train the tiny tokenizer on: formatted prompts and responses."""
    texts = []
    for p in pairs:
        texts.append(format_prompt(p.prompt, template))
        texts.append(format_response(p.chosen, template))
        texts.append(format_response(p.rejected, template))
    return texts
