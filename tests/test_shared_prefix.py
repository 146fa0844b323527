"""The shared-prefix pair forward of train-rm/train-cost (TokenScorer with prefix_ids, preference.collate_shared):
the common start of chosen and rejected runs once and both continuations attend to its keys/values.
It must give the end scores and the gradients of two full forwards, for right- and left-padded prefixes
of different lengths, pairs that differ at their last token, and a LoRA-wrapped model. Right-padded
inputs run the backbone without a mask (causal attention alone): that must equal each row run alone."""

from __future__ import annotations

import pytest
import torch

from safealign.data.encode import EncodedPair
from safealign.stages.preference import collate, collate_shared, pair_loss, shares_prefix, train_collate


def _pairs(vocab: int, eos: int) -> list[EncodedPair]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i, (pre, c, r) in enumerate([(7, 5, 9), (2, 12, 3), (15, 1, 1), (1, 4, 6), (9, 9, 2)]):
        p = torch.randint(3, vocab, (pre,), generator=g).tolist()
        ch = torch.randint(3, vocab, (c,), generator=g).tolist()
        rj = torch.randint(3, vocab, (r,), generator=g).tolist()
        if ch[0] == rj[0]:
            rj[0] = 3 if ch[0] != 3 else 4
        chosen, rejected = p + ch + [eos], p + rj + [eos]
        out.append(EncodedPair(chosen, rejected, 1 - 2 * (i % 2), 0, len(p), i))
    return out


def _scorer(lora: bool = False):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from safealign.models.score import TokenScorer

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, pad_token_id=0, eos_token_id=2, bos_token_id=1, num_labels=1)
    model = LlamaForSequenceClassification(cfg)
    if lora:
        from peft import LoraConfig, TaskType, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return TokenScorer(model)


class _Cfg:
    loss_type, regularization, gradient_checkpointing = "sequence", 0.001, False


@pytest.mark.parametrize("lora", [False, True])
def test_shared_prefix_forward_equals_full_forward(lora):
    scorer = _scorer(lora)
    batch = _pairs(40, eos=2)
    assert shares_prefix(batch)
    full, shared = collate(batch, 0), collate_shared(batch, 0)
    assert shared["prefix_ids"].shape == (5, 15) and shared["input_ids"].shape[0] == 10
    assert shared["input_ids"].shape[1] < full["input_ids"].shape[1]            # fewer tokens run
    _, end_full, _ = scorer(full["input_ids"], full["attention_mask"])
    _, end_shared, _ = scorer(shared["input_ids"], shared["attention_mask"], shared["prefix_ids"], shared["prefix_mask"])
    assert torch.allclose(end_full, end_shared, atol=1e-5), (end_full, end_shared)
    loss = pair_loss(_Cfg, "helpful")
    grads = []
    for b in (full, shared):
        scorer.zero_grad()
        value, _ = loss(scorer, b)
        value.backward()
        grads.append({n: p.grad.clone() for n, p in scorer.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4), n


def test_causal_suffices_only_for_real_tokens_then_padding():
    from safealign.models.score import causal_suffices

    assert causal_suffices(torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]]))
    assert not causal_suffices(torch.tensor([[1, 1, 1], [0, 1, 1]]))               # left padding
    assert not causal_suffices(torch.tensor([[1, 0, 1]]))                          # a hole


def test_mask_free_right_padded_forward_equals_each_row_alone_and_the_masked_path():
    from safealign.models.generation import pad

    scorer = _scorer()
    rows = [p.chosen for p in _pairs(40, eos=2)]
    alone = torch.stack([scorer(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long))[1][0] for r in rows])
    right = scorer(*pad(rows, 0))[1]                                                # no mask: causal path
    left = scorer(*pad(rows, 0, side="left"))[1]                                    # mask + positions
    assert torch.allclose(right, alone, atol=1e-5) and torch.allclose(left, alone, atol=1e-5)
    grads = []
    for side in ("right", "left"):
        scorer.zero_grad()
        scorer(*pad(rows, 0, side=side))[1].pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in scorer.named_parameters() if p.grad is not None})
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4), n


def test_left_padded_prefixes_give_the_right_padded_end_scores():
    from safealign.models.generation import pad

    scorer = _scorer()
    batch = _pairs(40, eos=2)
    shared = collate_shared(batch, 0)
    left_ids, left_mask = pad([e.chosen[:e.diverge] for e in batch], 0, side="left")
    right = scorer(shared["input_ids"], shared["attention_mask"], shared["prefix_ids"], shared["prefix_mask"])[1]
    left = scorer(shared["input_ids"], shared["attention_mask"], left_ids, left_mask)[1]
    assert torch.allclose(right, left, atol=1e-5)


def test_training_batches_use_the_shared_form_only_where_exact():
    batch = _pairs(40, eos=2)
    assert "prefix_ids" in train_collate(_Cfg, 0)(batch)
    token = type("C", (_Cfg,), {"loss_type": "token"})
    ckpt = type("C", (_Cfg,), {"gradient_checkpointing": True})
    assert "prefix_ids" not in train_collate(token, 0)(batch)        # the token-wise loss reads the shared part's scores
    assert "prefix_ids" not in train_collate(ckpt, 0)(batch)         # checkpointing drops the key/value cache
    batch[0].diverge = 0                                             # nothing shared: the plain form
    assert "prefix_ids" not in train_collate(_Cfg, 0)(batch)
