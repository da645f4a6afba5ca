"""Vectorized MinHash against datasketch, banding by sorting, and union-find."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
from datasketch import MinHash

from tasks import minhash

VOCABULARY = [f"w{i}" for i in range(3000)] + ["Éte", "naïve,", "don't", "x.y", "ﬁne"]


def texts(count: int, seed: int = 0) -> list[str | None]:
    rng = random.Random(seed)
    lengths = [0, 1, 3, 4, 5, 6, 40, 300]
    return [" ".join(rng.choice(VOCABULARY) for _ in range(rng.choice(lengths)))
            for _ in range(count)] + [None, "!!! ...", "  \n "]


def test_signatures_equal_datasketch_given_the_same_shingle_hashes():
    batch = texts(200)
    signatures, has_words, _ = minhash.signatures(batch, 5, 64, seed=3)
    for words, row in zip(minhash.normalized_tokens(batch).to_pylist(), signatures):
        reference = MinHash(num_perm=64, seed=3, hashfunc=int)  # datasketch's own math
        if words:
            hashes = minhash.token_hashes(pa.array(words))
            shingles = (minhash.whole_hash(hashes) if len(words) < 5
                        else minhash.shingle_hashes(hashes, 5)[0])
            reference.update_batch([int(h) for h in shingles])
        assert np.array_equal(reference.hashvalues.astype(np.uint32), row)
    assert has_words.tolist() == [bool(w) for w in minhash.normalized_tokens(batch).to_pylist()]
    assert not has_words[-3:].any()  # None, punctuation only, whitespace only


def test_normalization_ignores_case_spacing_and_punctuation():
    sig, _, digests = minhash.signatures(["Hello, World! The end.", "hello world   the END",
                                          "hello world the start"], 5, 32, 1)
    assert digests[0] == digests[1] != digests[2]
    assert np.array_equal(sig[0], sig[1]) and not np.array_equal(sig[0], sig[2])
    # compatibility forms (the ligature) and composed/decomposed accents compare equal
    same = minhash.normalized_tokens(["\ufb01ne Na\u00efve", "fine nai\u0308ve"]).to_pylist()
    assert same[0] == same[1] and same[0][0] == "fine"


def test_estimated_similarity_tracks_jaccard():
    rng = random.Random(5)
    base = [rng.choice(VOCABULARY) for _ in range(400)]
    edited = list(base)
    for position in rng.sample(range(400), 12):  # 3% of words: ~15% of 5-shingles change
        edited[position] = "zzz"
    sig, _, _ = minhash.signatures([" ".join(base), " ".join(edited)], 5, 256, 1)

    def shingle_set(words):
        return {tuple(words[i:i + 5]) for i in range(len(words) - 4)}

    a, b = shingle_set(base), shingle_set(edited)
    assert abs((sig[0] == sig[1]).mean() - len(a & b) / len(a | b)) < 0.08


def test_lsh_parameters_follow_the_threshold():
    bands, rows = minhash.lsh_parameters(0.6, 128)
    assert bands * rows <= 128
    looser, stricter = minhash.lsh_parameters(0.4, 128), minhash.lsh_parameters(0.9, 128)
    assert looser[1] < rows < stricter[1]  # fewer rows per band: similar-looking pairs meet


def test_equal_hash_pairs_point_at_the_first_member():
    hashes = np.array([7, 3, 7, 9, 3, 7], dtype=np.uint64)
    index = np.array([10, 11, 12, 13, 14, 15])
    pairs = sorted(map(tuple, minhash.equal_hash_pairs(hashes, index).tolist()))
    assert pairs == [(10, 12), (10, 15), (11, 14)]
    assert minhash.equal_hash_pairs(hashes[:1], index[:1]).shape == (0, 2)


def test_connected_components_label_each_node_with_its_smallest_member():
    pairs = np.array([[5, 9], [1, 5], [7, 8], [9, 3]])
    assert minhash.connected_components(10, pairs).tolist() == [0, 1, 2, 1, 4, 1, 6, 7, 7, 1]
    chain = np.array([[i, i + 1] for i in range(999)])[::-1]  # a long chain, reversed
    assert (minhash.connected_components(1000, chain) == 0).all()
