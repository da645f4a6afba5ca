"""Synthetic English-like corpora for the benchmarks: seeded, vectorized, streamable.

Words come from a Faker-made vocabulary (its English lorem words, then first and last
names) with English function words first, drawn with Zipf-like frequencies. Every word
of every document is a pure function of (seed, document, position) through a
counter-based hash, so any document can be (re)made on its own: a corpus of any size is
written batch by batch, and a planted duplicate is rebuilt from its source document's
number instead of kept in memory.

Each document is an original, an exact copy of an earlier original, or a near copy (the
same words with ``edits`` of them replaced). ``kinds`` and ``sources`` hold that ground
truth for every document (9 bytes a document).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ORIGINAL, EXACT, NEAR = 0, 1, 2
KIND_NAMES = ("original", "exact", "near")
FUNCTION_WORDS = ["the", "of", "and", "to", "a", "in", "is", "that", "for", "it", "with", "as",
                  "was", "on", "be", "have", "by", "at", "this", "from", "or", "an", "are",
                  "not", "but", "his", "they", "which", "you", "one", "all", "were", "her",
                  "she", "there", "can", "we", "their", "has", "been", "more", "if", "will",
                  "would", "who", "so"]
_SALT = {"length": 1, "word": 2, "kind": 3, "source": 4, "edit_at": 5, "edit_word": 6,
         "end": 7, "paragraph": 8, "pii": 9, "pii_pick": 10}


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def vocabulary(size: int = 3000, seed: int = 0) -> list[str]:
    """``size`` distinct lower-case words, function words first (the most frequent)."""
    from faker import Faker

    fake = Faker("en_US")
    fake.seed_instance(seed)
    pool = list(fake.get_words_list())
    for make in (fake.job, fake.catch_phrase, fake.bs, fake.last_name, fake.first_name,
                 fake.color_name, fake.street_name):
        pool += [w for _ in range(3000) for w in re.findall(r"[a-z]+", make().lower())]
    pool = [w for w in dict.fromkeys(pool) if len(w) > 1 and w not in FUNCTION_WORDS]
    np.random.default_rng(seed).shuffle(pool)
    words = FUNCTION_WORDS + pool[:size - len(FUNCTION_WORDS)]
    if len(words) < size:
        raise ValueError(f"Faker gave only {len(words)} distinct words, fewer than {size}")
    return words


class Corpus:
    """``docs`` documents of ``min_words``..``max_words`` words, with planted duplicates.

    ``sentences`` adds capitals, full stops and paragraph breaks (prose that passes the
    quality filter); ``pii`` is the fraction of source documents that end with a sentence
    naming a Faker email address and phone number.
    """

    def __init__(self, docs: int, seed: int = 0, min_words: int = 100, max_words: int = 150,
                 exact: float = 0.05, near: float = 0.10, edits: int = 2,
                 sentences: bool = False, pii: float = 0.0, vocab_size: int = 3000):
        self.docs, self.seed, self.edits, self.pii = docs, seed, edits, pii
        self.min_words, self.max_words = min_words, max_words
        words = vocabulary(vocab_size, seed)
        self.vocab_size = len(words)
        weights = 1.0 / (np.arange(len(words)) + 2.7)
        self.cdf = np.cumsum(weights) / weights.sum()
        # token variants: plain, Capitalized, plain., Capitalized. (then a paragraph break)
        variants = [words, [w.capitalize() for w in words]]
        variants += [[w + "." for w in v] for v in variants]
        seps = [" "] * 4 + ["\n\n"] * 2 if sentences else [" "] * 2
        variants = variants + variants[2:] if sentences else variants[:1]
        self.sentences = sentences
        self.tokens = pa.array([w + s for v, s in zip(variants, seps) for w in v])
        number = np.arange(docs, dtype=np.uint64)
        u = self._uniform("kind", number)
        self.kinds = np.where(u < exact, EXACT, np.where(u < exact + near, NEAR, ORIGINAL))
        self.kinds = self.kinds.astype(np.int8)
        self.kinds[0] = ORIGINAL
        originals = np.flatnonzero(self.kinds == ORIGINAL)
        before = np.searchsorted(originals, np.arange(docs), side="left")
        pick = (self._uniform("source", number) * before).astype(np.int64)
        self.sources = np.where(self.kinds == ORIGINAL, np.arange(docs),
                                originals[np.minimum(pick, len(originals) - 1)])
        if pii:
            from faker import Faker

            fake = Faker("en_US")
            fake.seed_instance(seed)
            self.pii_sentences = [f"\n\nTo reach {fake.name()}, write to {fake.email()} or "
                                  f"call {fake.phone_number()}." for _ in range(500)]

    def _uniform(self, stream: str, keys: np.ndarray) -> np.ndarray:
        salt = np.uint64((self.seed * 1_000_003 + _SALT[stream]) << 40)
        return (_splitmix64(keys.astype(np.uint64) ^ salt) >> np.uint64(11)) * 2.0 ** -53

    def lengths(self, contents: np.ndarray) -> np.ndarray:
        span = self.max_words - self.min_words + 1
        return self.min_words + (self._uniform("length", contents) * span).astype(np.int64)

    def texts(self, start: int, stop: int) -> pa.StringArray:
        """The texts of documents ``start..stop`` (vectorized; Arrow strings)."""
        number = np.arange(start, stop, dtype=np.int64)
        contents = self.sources[start:stop].astype(np.uint64)
        lengths = self.lengths(contents)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        doc = np.repeat(np.arange(len(number)), lengths)
        position = np.arange(offsets[-1]) - offsets[doc]
        keys = (contents[doc] << np.uint64(20)) + position.astype(np.uint64)
        rank = np.searchsorted(self.cdf, self._uniform("word", keys), side="right")
        rank = np.minimum(rank, self.vocab_size - 1)
        near = np.flatnonzero(self.kinds[start:stop] == NEAR)
        for edit in range(self.edits):  # near copies: replace words at hashed positions
            key = number[near].astype(np.uint64) * np.uint64(64) + np.uint64(edit)
            at = offsets[near] + (self._uniform("edit_at", key) * lengths[near]).astype(np.int64)
            rank[at] = (self._uniform("edit_word", key) * self.vocab_size).astype(np.int64)
        if self.sentences:  # ~1 sentence end in 12 words, ~1 paragraph in 5 sentences
            end = self._uniform("end", keys) < 1 / 12
            end[offsets[1:] - 1] = True
            capital = np.concatenate([[True], end[:-1]])
            capital[offsets[:-1]] = True
            paragraph = end & (self._uniform("paragraph", keys) < 0.2)
            rank = rank + self.vocab_size * (capital + 2 * end + 2 * paragraph)
        lists = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()),
                                         self.tokens.take(pa.array(rank)))
        text = pc.utf8_rtrim_whitespace(pc.binary_join(lists, ""))
        if self.pii:
            has = self._uniform("pii", contents) < self.pii
            pick = (self._uniform("pii_pick", contents) * len(self.pii_sentences)).astype(int)
            suffix = pa.array([self.pii_sentences[p] if h else "" for p, h in zip(pick, has)])
            text = pc.binary_join_element_wise(text, suffix, "")
        return text

    def ids(self, start: int, stop: int) -> list[str]:
        return [f"{KIND_NAMES[k][0]}{n:08d}" for n, k in
                zip(range(start, stop), self.kinds[start:stop])]

    def table(self, start: int, stop: int) -> pa.Table:
        ids = self.ids(start, stop)
        return pa.table({"id": ids, "text": self.texts(start, stop),
                         "url": [f"https://example.org/doc/{i}" for i in ids]})

    def write_parquet(self, directory: str | Path, shard_size: int = 1000) -> list[Path]:
        """Shards ``shard-00000.parquet``... of ``shard_size`` documents, one in memory at
        a time."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = []
        for number, start in enumerate(range(0, self.docs, shard_size)):
            paths.append(directory / f"shard-{number:05d}.parquet")
            pq.write_table(self.table(start, min(start + shard_size, self.docs)), paths[-1])
        return paths

    def planted_ids(self) -> set[str]:
        """The ids of every exact or near copy (what dedup should remove)."""
        planted = np.flatnonzero(self.kinds != ORIGINAL)
        return {f"{KIND_NAMES[self.kinds[n]][0]}{n:08d}" for n in planted}
