"""Masked-LM pieces: BERT's 80/10/10 masking that never touches special tokens, masks
fixed by (seed, index), a loss on the masked positions only, and the baseline by hand."""

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from models.llama import IGNORE_INDEX, Llama, ModelConfig
from models.masked_lm import (
    MaskedLM,
    MaskedWindows,
    Masking,
    evaluate_masked,
    mask_tokens,
    masked_baseline,
)

SPECIALS, MASK, VOCAB = (0, 1, 2, 3), 4, 500


def corpus_ids(rows=100, length=1000):
    ids = torch.randint(5, VOCAB, (rows, length), generator=torch.Generator().manual_seed(1))
    ids[:, ::9] = 2  # EOS, PAD, BOS and UNK scattered through the rows
    ids[:, 5::50], ids[:, 3::77], ids[:, 7::101] = 3, 1, 0
    return ids


def test_mask_tokens_chooses_the_rate_and_splits_80_10_10_without_touching_specials():
    ids = corpus_ids()
    inputs, labels = mask_tokens(ids, 0.15, MASK, VOCAB, SPECIALS,
                                 torch.Generator().manual_seed(0))
    chosen, ordinary = labels != IGNORE_INDEX, ids >= 5
    assert not chosen[~ordinary].any()  # specials are never chosen ...
    assert torch.equal(inputs[~chosen], ids[~chosen])  # ... and nothing unchosen changes
    assert torch.equal(labels[chosen], ids[chosen])
    assert chosen[ordinary].float().mean().item() == pytest.approx(0.15, abs=0.005)
    n = chosen.sum().item()
    assert n > 10_000
    masked = chosen & (inputs == MASK)
    kept = chosen & (inputs == ids)
    replaced = chosen & ~masked & ~kept
    assert masked.sum().item() / n == pytest.approx(0.8, abs=0.015)
    # a random draw equals the original token 1 time in 495: counted as kept
    assert replaced.sum().item() / n == pytest.approx(0.1 * (1 - 1 / 495), abs=0.01)
    assert kept.sum().item() / n == pytest.approx(0.1 + 0.1 / 495, abs=0.01)
    # random replacements are ordinary tokens, drawn over the whole ordinary vocabulary
    assert not torch.isin(inputs[replaced], torch.tensor([*SPECIALS, MASK])).any()
    assert inputs[replaced].min() < 30 and inputs[replaced].max() > VOCAB - 30
    assert (inputs == MASK).sum() == masked.sum()


def test_the_replacement_shares_are_settings():
    ids = corpus_ids(rows=20)
    g = torch.Generator().manual_seed(0)
    inputs, labels = mask_tokens(ids, 0.3, MASK, VOCAB, SPECIALS, g, mask_token_ratio=0.0,
                                 random_token_ratio=0.0)
    assert torch.equal(inputs, ids) and (labels != IGNORE_INDEX).float().mean() > 0.2
    inputs, labels = mask_tokens(ids, 0.3, MASK, VOCAB, SPECIALS, g, mask_token_ratio=1.0,
                                 random_token_ratio=0.0)
    assert torch.equal(inputs == MASK, labels != IGNORE_INDEX)


def test_every_row_with_ordinary_tokens_gets_a_masked_token():
    ids = torch.randint(5, VOCAB, (2000, 3))
    ids[:10] = 2  # rows of EOS only: nothing to mask
    inputs, labels = mask_tokens(ids, 0.05, MASK, VOCAB, SPECIALS,
                                 torch.Generator().manual_seed(0))
    scored = (labels != IGNORE_INDEX).sum(dim=1)
    assert (scored[:10] == 0).all() and (scored[10:] >= 1).all()
    assert torch.equal(inputs[:10], ids[:10])


def test_windows_are_masked_by_index_whatever_the_reading_order():
    rows = [(torch.randint(5, VOCAB, (32,)), None) for _ in range(20)]
    masking = Masking(MASK, VOCAB, SPECIALS)
    first = MaskedWindows(rows, masking, seed=7, stream=0)
    again = MaskedWindows(rows, masking, seed=7, stream=0)
    backwards = [again[i] for i in reversed(range(20))][::-1]
    for (a_in, a_lab), (b_in, b_lab) in zip([first[i] for i in range(20)], backwards):
        assert torch.equal(a_in, b_in) and torch.equal(a_lab, b_lab)
    other_stream = MaskedWindows(rows, masking, seed=7, stream=1)
    other_seed = MaskedWindows(rows, masking, seed=8, stream=0)
    assert not all(torch.equal(first[i][1], other_stream[i][1]) for i in range(20))
    assert not all(torch.equal(first[i][1], other_seed[i][1]) for i in range(20))
    assert not all(torch.equal(first[0][1], first[i][1]) for i in range(1, 20))


def encoder(**overrides):
    torch.manual_seed(0)
    return Llama(ModelConfig(vocab_size=64, context_length=16, d_model=32, n_layers=2,
                             n_heads=2, causal=False, **overrides))


def test_the_loss_counts_the_masked_positions_only():
    model = encoder()
    module = MaskedLM(model, 1e-3, 0.0, 1, 10, 0.1)
    ids = torch.randint(5, 64, (4, 16))
    inputs, labels = mask_tokens(ids, 0.3, MASK, 64, SPECIALS, torch.Generator().manual_seed(3))
    logits = model(inputs)[0]
    scored = labels != IGNORE_INDEX
    expected = F.cross_entropy(logits[scored], labels[scored])
    assert module.compute_loss((inputs, labels)).item() == pytest.approx(expected.item(),
                                                                          rel=1e-5)
    # scoring every position instead would give another loss
    everywhere = F.cross_entropy(logits.flatten(0, 1), ids.flatten())
    assert abs(everywhere.item() - expected.item()) > 1e-3
    with pytest.raises(ValueError, match="encoder"):
        MaskedLM(Llama(ModelConfig(vocab_size=64, context_length=16, d_model=32, n_layers=1,
                                   n_heads=2)), 1e-3, 0.0, 1, 10, 0.1)


def test_evaluation_is_weighted_by_masked_tokens_not_batches():
    model = encoder().eval()
    rows = [(torch.randint(5, 64, (16,)), None) for _ in range(7)]
    data = MaskedWindows(rows, Masking(MASK, 64, SPECIALS, mask_rate=0.3), seed=0, stream=1)
    one, all_at_once = evaluate_masked(model, data, 1), evaluate_masked(model, data, 7)
    assert one.loss == pytest.approx(all_at_once.loss, rel=1e-5)
    assert one.accuracy == all_at_once.accuracy and one.masked_tokens == all_at_once.masked_tokens
    labels = torch.cat([data[i][1] for i in range(7)])
    assert one.masked_tokens == int((labels != IGNORE_INDEX).sum())
    assert one.label_counts.sum() == one.masked_tokens


def test_the_baseline_answers_the_most_frequent_ordinary_token():
    train = np.array([0, 0, 50, 0, 0, 10, 30, 20])  # EOS (2) is the most frequent, but special
    labels = np.array([0, 0, 0, 0, 0, 2, 5, 3])
    baseline = masked_baseline(train, labels, (0, 1, 2, 3, 4))
    assert baseline["token"] == 6 and baseline["accuracy"] == pytest.approx(0.5)
    # add-one unigram over the ordinary ids 5, 6, 7: (11, 31, 21) / 63
    by_hand = -(2 * math.log(11 / 63) + 5 * math.log(31 / 63) + 3 * math.log(21 / 63)) / 10
    assert baseline["loss"] == pytest.approx(by_hand)
