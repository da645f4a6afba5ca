"""Dedup: remove exact and near-duplicate documents, keeping the first of each group.

Documents are read once, in shard order. Each is first compared exactly (a SHA-1 of its
normalized text: lowercase, no punctuation, single spaces, so copies that differ only in
case or spacing match), then approximately: a MinHash signature of its word shingles is
looked up in an LSH index of the documents kept so far, and candidates are confirmed by
their estimated Jaccard similarity. Only digests and signatures stay in memory, never
texts, so memory grows by about ``4 * num_perm`` bytes per kept document.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
import unicodedata
from pathlib import Path

import numpy as np
from datasketch import MinHash, MinHashLSH
from pydantic import BaseModel, ConfigDict, Field

from tasks.progress import progress
from tasks.shards import ShardWriter, count_records, iter_records, shard_paths
from tasks.stage import StageInputError

log = logging.getLogger(__name__)


class DedupConfig(BaseModel):
    """Which duplicates to remove and how similar near-duplicates must be."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Run this stage; when off, every document is kept.")
    exact: bool = Field(
        True, description="Remove documents whose text equals an earlier one after lowercasing, "
                          "dropping punctuation and collapsing whitespace (exact_duplicate).")
    near: bool = Field(
        True, description="Remove documents whose word shingles overlap an earlier kept one by "
                          "at least `threshold` (Jaccard similarity, estimated with MinHash "
                          "LSH) (near_duplicate).")
    threshold: float = Field(
        0.8, gt=0, lt=1, description="Jaccard similarity of shingle sets above which two "
                                     "documents are near-duplicates. 0.8 catches copies with "
                                     "small edits (a changed word, a different footer).")
    num_perm: int = Field(
        128, ge=16, le=1024, description="MinHash permutations: more give a sharper similarity "
                                         "estimate at proportionally more time and memory "
                                         "(4 bytes each per kept document).")
    shingle_size: int = Field(
        5, ge=1, le=50, description="Words per shingle. Smaller shingles make unrelated texts "
                                    "on the same topic look alike; larger ones make small edits "
                                    "count more.")
    seed: int = Field(1, ge=0, description="Seed of the MinHash permutations; results are "
                                           "deterministic for a given seed.")
    shard_size: int = Field(1000, ge=1, description="Documents per output parquet shard.")


_NOT_WORD = re.compile(r"[^\w\s]+")


def normalized_tokens(text: str) -> list[str]:
    """Lowercase words without punctuation: what both comparisons look at."""
    text = unicodedata.normalize("NFKC", text).lower()
    return _NOT_WORD.sub(" ", text).split()


def exact_digest(tokens: list[str]) -> bytes:
    return hashlib.sha1(" ".join(tokens).encode("utf-8")).digest()


def shingles(tokens: list[str], size: int) -> set[bytes]:
    """Word n-grams; a text shorter than one shingle is its own single shingle."""
    if len(tokens) <= size:
        return {" ".join(tokens).encode("utf-8")} if tokens else set()
    return {" ".join(tokens[i:i + size]).encode("utf-8") for i in range(len(tokens) - size + 1)}


class NearDuplicateIndex:
    """MinHash LSH over the kept documents, with candidates confirmed by estimated Jaccard.

    LSH alone also returns some pairs below the threshold (its banding is a soft cut-off);
    comparing the stored signatures removes those false positives.
    """

    def __init__(self, threshold: float, num_perm: int, seed: int):
        self.threshold = threshold
        self._template = MinHash(num_perm=num_perm, seed=seed)
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._signatures: list[np.ndarray] = []
        self._ids: list[str] = []

    def signature(self, shingle_set: set[bytes]) -> MinHash:
        minhash = self._template.copy()
        minhash.update_batch(sorted(shingle_set))
        return minhash

    def best_match(self, minhash: MinHash) -> tuple[str, float] | None:
        """The most similar kept document at or above the threshold (earliest on ties)."""
        best: tuple[float, int] | None = None
        for key in self._lsh.query(minhash):
            similarity = float(np.mean(self._signatures[key] == minhash.hashvalues))
            if similarity >= self.threshold and (
                    best is None or (similarity, -key) > (best[0], -best[1])):
                best = (similarity, key)
        return None if best is None else (self._ids[best[1]], best[0])

    def add(self, doc_id: str, minhash: MinHash) -> None:
        key = len(self._ids)
        self._lsh.insert(key, minhash)
        self._signatures.append(minhash.hashvalues.copy())
        self._ids.append(doc_id)


class Deduplicator:
    """Decides, document by document in corpus order, whether it repeats an earlier one."""

    def __init__(self, config: DedupConfig):
        self.config = config
        # digest -> id of the kept document that text resolves to, so that duplicate_of
        # always names a kept document even when the first copy was itself a near-duplicate
        self._digests: dict[bytes, str] = {}
        self._index = NearDuplicateIndex(config.threshold, config.num_perm, config.seed)

    def check(self, doc_id: str, text: str) -> tuple[str, str, float] | None:
        """(reason, duplicate_of, similarity) for a duplicate; None (and remember it) if new."""
        tokens = normalized_tokens(text)
        digest = exact_digest(tokens)
        if self.config.exact and digest in self._digests:
            return "exact_duplicate", self._digests[digest], 1.0
        minhash = None
        if self.config.near and tokens:
            minhash = self._index.signature(shingles(tokens, self.config.shingle_size))
            match = self._index.best_match(minhash)
            if match is not None:
                self._remember(digest, match[0])
                return "near_duplicate", match[0], round(match[1], 4)
        self._remember(digest, doc_id)
        if minhash is not None:
            self._index.add(doc_id, minhash)
        return None

    def _remember(self, digest: bytes, kept_id: str) -> None:
        if self.config.exact:
            self._digests.setdefault(digest, kept_id)


def deduplicate(config: DedupConfig, input_dir: Path, out_dir: Path) -> dict:
    """Keep the first document of each exact or near-duplicate group, in shard order.

    Removed documents go to removed/ with ``reason`` (exact_duplicate or near_duplicate),
    ``duplicate_of`` (the id of the kept document they duplicate) and ``similarity``
    (estimated Jaccard similarity; 1.0 for exact duplicates).
    """
    input_dir, out_dir = Path(input_dir), Path(out_dir)
    if not shard_paths(input_dir):
        raise StageInputError("dedup", f"no shard-*.parquet files in {input_dir}; run the "
                                       "filter stage first")
    total = count_records(input_dir)
    if total == 0:
        raise StageInputError("dedup", f"the input {input_dir} holds no documents; check the "
                                       "earlier stages' removed/ folders")
    if not (config.exact or config.near):
        log.warning("dedup: both dedup.exact and dedup.near are off; copying all documents")
    started = time.perf_counter()
    deduplicator = Deduplicator(config)
    stats = {"input_documents": 0, "kept": 0, "removed_exact_duplicate": 0,
             "removed_near_duplicate": 0}
    with ShardWriter(out_dir / "data", config.shard_size) as kept, \
            ShardWriter(out_dir / "removed", config.shard_size) as removed:
        for record in progress(iter_records(input_dir), desc="dedup", unit="doc", total=total):
            stats["input_documents"] += 1
            duplicate = deduplicator.check(str(record["id"]), record.get("text") or "")
            if duplicate is None:
                stats["kept"] += 1
                kept.add(record)
                continue
            reason, duplicate_of, similarity = duplicate
            stats[f"removed_{reason}"] += 1
            removed.add({**record, "reason": reason, "duplicate_of": duplicate_of,
                         "similarity": similarity})
    log.info("dedup: kept %d of %d documents in %.1fs; removed %d exact and %d near "
             "duplicates (threshold %.2f, %d-word shingles)", stats["kept"],
             stats["input_documents"], time.perf_counter() - started,
             stats["removed_exact_duplicate"], stats["removed_near_duplicate"], config.threshold,
             config.shingle_size)
    return {"count": stats["kept"], "stats": stats}
