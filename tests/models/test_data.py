"""Token windows, fine-tuning rows and the learning-rate schedule."""

import itertools

import numpy as np
import pytest
import sentencepiece as spm
import torch

from models.data import (
    Pair,
    RandomWindows,
    SFTDataset,
    StridedWindows,
    collate_trimmed,
    encode_pair,
)
from models.lightning import lr_factor


@pytest.fixture()
def token_file(tmp_path):
    path = tmp_path / "train.bin"
    np.arange(100, dtype=np.uint16).tofile(path)
    return path


def test_random_windows_are_shifted_pairs_fixed_by_the_seed(token_file):
    data = RandomWindows(token_file, "uint16", 8, num_samples=20, seed=3)
    x, y = data[0]
    assert x.shape == y.shape == (8,)
    assert torch.equal(y[:-1], x[1:])  # targets are the next tokens
    again = RandomWindows(token_file, "uint16", 8, num_samples=20, seed=3)
    other = RandomWindows(token_file, "uint16", 8, num_samples=20, seed=4)
    assert [int(again[i][0][0]) for i in range(20)] == [int(data[i][0][0]) for i in range(20)]
    assert [int(other[i][0][0]) for i in range(20)] != [int(data[i][0][0]) for i in range(20)]
    assert max(int(data[i][1][-1]) for i in range(20)) <= 99


def test_random_windows_refuse_a_file_shorter_than_a_window(token_file):
    with pytest.raises(ValueError, match="fewer than one context window"):
        RandomWindows(token_file, "uint16", 100, num_samples=1)


def test_strided_windows_score_every_target_once(token_file):
    data = StridedWindows(token_file, "uint16", 10)
    assert len(data) == 9 and data.num_targets == 90
    targets = torch.cat([data[i][1] for i in range(len(data))])
    assert torch.equal(targets, torch.arange(1, 91))
    spread = StridedWindows(token_file, "uint16", 10, max_windows=3)
    assert [int(spread[i][0][0]) for i in range(3)] == [0, 40, 80]


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sp")
    (folder / "text.txt").write_text("\n".join(f"the cat {i} sat on the mat" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(folder / "text.txt"), model_prefix=str(folder / "m"),
                                   vocab_size=40, pad_id=3, minloglevel=2)
    return spm.SentencePieceProcessor(model_file=str(folder / "m.model"))


def test_sft_mask_covers_the_response_and_its_eos_only(sp):
    pair = Pair("the cat", " sat on the mat")
    ids, mask = encode_pair(sp, pair, context_length=32, eos_id=2)
    prompt_len = 1 + len(sp.encode(pair.prompt))
    assert ids[0] == 2 and ids[-1] == 2
    assert mask == [False] * prompt_len + [True] * (len(ids) - prompt_len)

    data = SFTDataset([pair], sp, context_length=32, eos_id=2, pad_id=3)
    x, y, m = data[0]
    assert x.shape == y.shape == m.shape == (32,)
    assert sp.decode(y[m].tolist()[:-1]) == pair.response.strip() or \
        sp.decode(y[m].tolist()[:-1]) == pair.response
    assert y[m][-1] == 2 and not m[len(ids) - 1:].any()  # padding is never scored


def test_sft_skips_prompts_that_fill_the_context_and_collate_trims(sp):
    data = SFTDataset([Pair("the cat " * 20, "mat"), Pair("cat", "mat")], sp, 8, 2, 3)
    assert data.skipped == 1 and len(data) == 1
    x, _, m = collate_trimmed([data[0]])
    assert x.shape[1] == int(m[0].nonzero()[-1]) + 1 < 8


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    factors = [lr_factor(s, 10, 100, 0.1) for s in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))
    assert factors[100] == pytest.approx(0.1)
