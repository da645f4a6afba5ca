"""MinHash signatures per core, from text to signature: forgeline against datasketch.

Both compute the same MinHash (datasketch's affine32 permutations, 5-word shingles,
128 permutations, seed 1) of the same seeded English-like documents (325 words from a
Faker-made vocabulary), in this one process:

* baseline: the usual datasketch loop, per document: NFKC, lower case, punctuation to
  spaces, split; every 5-word shingle joined by spaces, utf-8 encoded and passed to
  ``MinHash.update`` (one Python call per shingle). Timed on a subset (``--baseline-docs``).
* forgeline: ``tasks.minhash.signatures`` over batches of 512 texts, all ``--docs``.

Sanity check: for near-duplicate pairs (a document and a copy with some words replaced)
both estimates of the Jaccard similarity must agree with each other and with the exact
Jaccard of the shingle sets, up to MinHash's sampling error (about 0.04 at 128
permutations).

    .venv/bin/python benchmarks/minhash_throughput.py
    .venv/bin/python benchmarks/minhash_throughput.py --docs 20000 --baseline-docs 2000

The last line of standard output is one JSON object (``ratio`` = forgeline / baseline
documents per second).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _corpus import Corpus

from tasks.minhash import signatures

SHINGLE, NUM_PERM, SEED, BATCH = 5, 128, 1, 512


def shingles(text: str) -> set[bytes]:
    words = re.sub(r"[^\w\s]+", " ", unicodedata.normalize("NFKC", text).lower()).split()
    return {" ".join(words[i:i + SHINGLE]).encode("utf-8")
            for i in range(max(1, len(words) - SHINGLE + 1))}


def datasketch_minhash(text: str):
    from datasketch import MinHash

    words = re.sub(r"[^\w\s]+", " ", unicodedata.normalize("NFKC", text).lower()).split()
    m = MinHash(num_perm=NUM_PERM, seed=SEED)
    for i in range(max(1, len(words) - SHINGLE + 1)):
        m.update(" ".join(words[i:i + SHINGLE]).encode("utf-8"))
    return m


def forgeline_signatures(texts: list[str]) -> np.ndarray:
    return np.concatenate([signatures(texts[i:i + BATCH], SHINGLE, NUM_PERM, SEED)[0]
                           for i in range(0, len(texts), BATCH)])


def jaccard_check(texts: list[str], pairs: int, seed: int) -> dict:
    """Both estimates of the Jaccard similarity of near-duplicate pairs, against the
    exact one; edits from 2 to 80 words give similarities over the whole range."""
    rng = random.Random(seed)
    vocab = sorted({w for t in texts[:50] for w in t.split()})
    left, right = [], []
    for number in range(pairs):
        words = texts[number].split()
        for _ in range((2, 8, 20, 40, 80)[number % 5]):
            words[rng.randrange(len(words))] = rng.choice(vocab)
        left.append(texts[number])
        right.append(" ".join(words))
    exact = np.array([len(shingles(a) & shingles(b)) / len(shingles(a) | shingles(b))
                      for a, b in zip(left, right)])
    base = np.array([datasketch_minhash(a).jaccard(datasketch_minhash(b))
                     for a, b in zip(left, right)])
    ours = (forgeline_signatures(left) == forgeline_signatures(right)).mean(axis=1)
    return {"pairs": pairs, "exact_jaccard_range": [round(exact.min(), 3), round(exact.max(), 3)],
            "mean_abs_difference": round(float(np.abs(base - ours).mean()), 4),
            "baseline_vs_exact": round(float(np.abs(base - exact).mean()), 4),
            "forgeline_vs_exact": round(float(np.abs(ours - exact).mean()), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=4000, help="documents for forgeline")
    parser.add_argument("--baseline-docs", type=int, default=1000,
                        help="documents for the (slow) datasketch loop")
    parser.add_argument("--words", type=int, default=325, help="words per document")
    parser.add_argument("--pairs", type=int, default=20, help="near-duplicate pairs checked")
    parser.add_argument("--seed", type=int, default=0, help="seed of the corpus")
    args = parser.parse_args()

    corpus = Corpus(max(args.docs, args.baseline_docs, args.pairs), seed=args.seed,
                    min_words=args.words, max_words=args.words, exact=0, near=0,
                    sentences=True)
    texts = corpus.texts(0, corpus.docs).to_pylist()
    datasketch_minhash(texts[0])  # imports and first calls outside the timings
    forgeline_signatures(texts[:BATCH])

    started = time.perf_counter()
    for text in texts[:args.baseline_docs]:
        datasketch_minhash(text)
    baseline = args.baseline_docs / (time.perf_counter() - started)
    print(f"baseline (datasketch, {args.baseline_docs} docs): {baseline:10.1f} docs/s")

    started = time.perf_counter()
    forgeline_signatures(texts[:args.docs])
    forgeline = args.docs / (time.perf_counter() - started)
    print(f"forgeline ({args.docs} docs):           {forgeline:10.1f} docs/s")
    print(f"ratio: {forgeline / baseline:.1f}x (target >= 15)")

    check = jaccard_check(texts, args.pairs, args.seed)
    print(f"Jaccard of {check['pairs']} near-duplicate pairs (exact "
          f"{check['exact_jaccard_range'][0]}-{check['exact_jaccard_range'][1]}): mean |baseline"
          f" - forgeline| = {check['mean_abs_difference']}; vs exact: baseline "
          f"{check['baseline_vs_exact']}, forgeline {check['forgeline_vs_exact']}")
    print(json.dumps({"baseline_docs_per_second": round(baseline, 1),
                      "forgeline_docs_per_second": round(forgeline, 1),
                      "ratio": round(forgeline / baseline, 2), "docs": args.docs,
                      "baseline_docs": args.baseline_docs, "words_per_doc": args.words,
                      "num_perm": NUM_PERM, "jaccard_check": check}))


if __name__ == "__main__":
    main()
