"""MinHash signatures of whole shards at once, LSH banding by sorting, and union-find.

The MinHash definition is datasketch's (its default ``affine32`` scheme): a shingle's
32-bit hash goes through datasketch's MurmurHash3 finalizer, then each of ``num_perm``
permutations ``h -> a * h + b (mod 2**32)``, with ``(a, b)`` drawn by
``datasketch.MinHash(num_perm, seed)``; a document's signature is the minimum over its
shingles. What differs is how the work is done: instead of one Python call per shingle,
a whole batch of documents is hashed with numpy:

* tokens are hashed once each, vectorized (pandas' SipHash of an object array);
* a shingle's hash combines its tokens' hashes position by position (a sliding sum of
  products with fixed odd constants, then the splitmix64 finalizer), over every window of
  the batch at once; windows that cross a document boundary are dropped;
* the permutations run as (shingles x permutations) uint32 array arithmetic, and
  ``np.minimum.reduceat`` takes each document's minimum.

Near-duplicate candidates come from LSH bands the way datatrove and text-dedup find them:
per band, sort the band hashes of all documents and pair the members of each run of
equal hashes with its first member. That needs one band of one column in memory at a
time, never the signatures of the corpus.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MAX_HASH = np.uint32((1 << 32) - 1)  # datasketch's empty signature value (affine32)
# Fixed odd 64-bit multipliers, one per position of a shingle or a band: a shingle's hash
# depends on its tokens' order. (The first ones are the splitmix64/xxhash primes.)
_MIXERS = np.array([0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB,
                    0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93,
                    0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53], dtype=np.uint64)
# Rows of (shingles x permutations) computed at once: bounds the scratch memory (4 MB
# per array) while keeping numpy's calls few.
_CHUNK_ELEMENTS = 1 << 20


@lru_cache(maxsize=8)
def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's permutations ``(a, b)`` (uint32) for this number of permutations and seed."""
    from datasketch import MinHash

    a, b = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations
    return np.asarray(a, dtype=np.uint32), np.asarray(b, dtype=np.uint32)


def mixers(count: int) -> np.ndarray:
    """``count`` odd 64-bit multipliers (the fixed ones, then derived ones)."""
    if count <= len(_MIXERS):
        return _MIXERS[:count]
    extra = np.arange(count - len(_MIXERS), dtype=np.uint64) * _MIXERS[1] + _MIXERS[2]
    return np.concatenate([_MIXERS, splitmix64(extra) | np.uint64(1)])


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer: every input bit affects every output bit."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


# What dedup compares: NFKC, lower case, runs of letters, digits, marks and underscores.
_NOT_WORD = r"[^\p{L}\p{N}\p{M}_\s]+"


def normalized_tokens(texts) -> pa.ListArray:
    """Each text as its list of normalized words (punctuation is a word break), computed
    in Arrow's C++ kernels for a whole batch of texts at once."""
    array = pa.array(texts, type=pa.large_string()) if not isinstance(texts, pa.Array) \
        else texts.cast(pa.large_string())
    array = pc.fill_null(array, "")
    lowered = pc.utf8_lower(pc.utf8_normalize(array, "NFKC"))
    words = pc.utf8_trim_whitespace(pc.replace_substring_regex(lowered, _NOT_WORD, " "))
    # Arrow splits "" into [""]: a text without words becomes a null (empty) list instead
    words = pc.if_else(pc.equal(words, ""), pa.scalar(None, pa.large_string()), words)
    return pc.utf8_split_whitespace(words)


def token_hashes(tokens: pa.Array) -> np.ndarray:
    """A stable 64-bit hash per token (the same in every process and on every machine):
    distinct tokens are found by Arrow's hash table and hashed once each (SipHash)."""
    import pandas as pd

    if len(tokens) == 0:
        return np.zeros(0, dtype=np.uint64)
    encoded = pc.dictionary_encode(tokens)
    words = np.asarray(encoded.dictionary.to_pylist(), dtype=object)
    return pd.util.hash_array(words, categorize=False)[encoded.indices.to_numpy()]


def shingle_hashes(hashes: np.ndarray, size: int, doc_of: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of every ``size``-token window that stays inside one document.

    ``hashes`` are the token hashes of consecutive documents, ``doc_of`` each token's
    document (all one document when None). Returns (shingle hashes, their documents).
    """
    count = len(hashes) - size + 1
    if count <= 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    weights = mixers(size)
    with np.errstate(over="ignore"):
        combined = hashes[:count] * weights[0]
        for j in range(1, size):
            combined += hashes[j:j + count] * weights[j]
    if doc_of is None:
        return splitmix64(combined) >> np.uint64(32), np.zeros(count, np.int64)
    inside = doc_of[:count] == doc_of[size - 1:]
    return splitmix64(combined[inside]) >> np.uint64(32), doc_of[:count][inside]


def whole_hash(hashes: np.ndarray) -> np.ndarray:
    """The single shingle of a document shorter than one shingle: all its tokens."""
    with np.errstate(over="ignore"):
        combined = (hashes * mixers(len(hashes))).sum(dtype=np.uint64)
    return splitmix64(np.array([combined], dtype=np.uint64)) >> np.uint64(32)


def permuted_min(hv: np.ndarray, starts: np.ndarray, a: np.ndarray, b: np.ndarray
                 ) -> np.ndarray:
    """Per group of rows (``starts`` ascending offsets into ``hv``), the minimum over its
    shingles of datasketch's permuted hash: one signature row per group."""
    from datasketch.minhash import _fmix  # datasketch's own pre-mix, so values match it

    mixed = _fmix(hv.astype(np.uint32), 32)
    with np.errstate(over="ignore"):
        x = np.multiply.outer(mixed, a)  # wraps at 32 bits: arithmetic mod 2**32
        x += b
    return np.minimum.reduceat(x, starts, axis=0)


def signatures(texts, shingle_size: int, num_perm: int, seed: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For a batch of texts: MinHash signatures (texts x num_perm, uint32), whether each
    text has any word (an empty one keeps datasketch's empty signature and is never a
    near-duplicate), and a 64-bit digest of each normalized text (for exact duplicates)."""
    a, b = permutations(num_perm, seed)
    token_lists = normalized_tokens(texts)
    n_docs = len(token_lists)
    digests = exact_digests(token_lists)
    out = np.full((n_docs, num_perm), MAX_HASH, dtype=np.uint32)
    offsets = token_lists.offsets.to_numpy().astype(np.int64)
    lengths = np.diff(offsets)
    nonempty = lengths > 0
    flat = token_lists.values if token_lists.offset == 0 and offsets[0] == 0 \
        else token_lists.flatten()
    offsets = offsets - offsets[0]
    hashes = token_hashes(flat)
    doc_of = np.repeat(np.arange(n_docs, dtype=np.int64), lengths)
    hv, hv_doc = shingle_hashes(hashes, shingle_size, doc_of)
    short = np.flatnonzero(nonempty & (lengths < shingle_size))
    if len(short):  # texts shorter than a shingle: one shingle of all their words
        extra = np.concatenate([whole_hash(hashes[offsets[d]:offsets[d + 1]]) for d in short])
        order = np.argsort(np.concatenate([hv_doc, short]), kind="stable")
        hv = np.concatenate([hv, extra])[order]
        hv_doc = np.concatenate([hv_doc, short])[order]
    if len(hv) == 0:
        return out, nonempty, digests
    docs, starts = np.unique(hv_doc, return_index=True)
    ends = np.append(starts[1:], len(hv))
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // num_perm)
    first = 0
    while first < len(docs):
        # the documents whose shingles fit one chunk (at least one document per chunk)
        last = max(first + 1, int(np.searchsorted(ends, starts[first] + rows_per_chunk,
                                                  side="right")))
        lo, hi = starts[first], ends[last - 1]
        out[docs[first:last]] = permuted_min(hv[lo:hi], starts[first:last] - lo, a, b)
        first = last
    return out, nonempty, digests


def exact_digests(token_lists: pa.ListArray) -> np.ndarray:
    """64 bits of the SHA-1 of each normalized text (its words joined by single spaces)."""
    joined = pc.binary_join(token_lists, pa.scalar(" ", pa.large_string())).to_pylist()
    return np.fromiter(
        (int.from_bytes(hashlib.sha1((text or "").encode("utf-8")).digest()[:8], "little")
         for text in joined), dtype=np.uint64, count=len(joined))


def band_hashes(signature_rows: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One 64-bit hash per LSH band per document: shape (bands, documents)."""
    sig = signature_rows.astype(np.uint64)
    weights = mixers(rows)
    out = np.empty((bands, len(sig)), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for band in range(bands):
            block = sig[:, band * rows:(band + 1) * rows]
            out[band] = splitmix64((block * weights).sum(axis=1, dtype=np.uint64)
                                   + np.uint64(band))
    return out


def lsh_parameters(threshold: float, num_perm: int) -> tuple[int, int]:
    """Bands and rows for a similarity threshold: datasketch's optimum, weighting missed
    duplicates 4x more than false candidates (candidates are verified afterwards)."""
    from datasketch.lsh import _optimal_param

    return _optimal_param(threshold, num_perm, 0.2, 0.8)


def equal_hash_pairs(hashes: np.ndarray, index: np.ndarray) -> np.ndarray:
    """(first, other) pairs of ``index`` values sharing a hash, first the smallest index of
    its run: shape (pairs, 2). ``index`` must be ascending."""
    if len(hashes) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    order = np.argsort(hashes, kind="stable")  # ties stay in index order
    sorted_hashes, sorted_index = hashes[order], index[order]
    starts = np.concatenate([[True], sorted_hashes[1:] != sorted_hashes[:-1]])
    first = sorted_index[np.maximum.accumulate(np.where(starts, np.arange(len(order)), 0))]
    members = ~starts
    return np.stack([first[members], sorted_index[members]], axis=1)


def connected_components(count: int, pairs: np.ndarray) -> np.ndarray:
    """For each of ``count`` nodes, the smallest node of its component (union-find by
    label propagation: min-label hooking and pointer jumping until nothing changes)."""
    labels = np.arange(count, dtype=np.int64)
    if len(pairs) == 0:
        return labels
    u, v = pairs[:, 0], pairs[:, 1]
    while True:
        lu, lv = labels[u], labels[v]
        low = np.minimum(lu, lv)
        before = labels.copy()
        np.minimum.at(labels, lu, low)
        np.minimum.at(labels, lv, low)
        while True:  # pointer jumping: every node straight to its root
            jumped = labels[labels]
            if np.array_equal(jumped, labels):
                break
            labels = jumped
        if np.array_equal(labels, before):
            return labels
