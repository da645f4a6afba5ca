"""Dedup: remove exact and near-duplicate documents, keeping the first of each cluster.

The stage runs in four restartable steps, as datatrove's multi-stage MinHash dedup does,
so that memory is bounded by a shard or a band, never by the corpus:

1. **signatures** (one task per shard): each document's normalized words give a 64-bit
   digest of the whole text (exact duplicates) and a MinHash signature of its word
   shingles (``tasks.minhash``, vectorized), cut into LSH bands. Signatures, band hashes
   and digests are stored beside the shard in ``minhash/``.
2. **buckets** (one task per band, and one for the digests; on a corpus of more than
   ``BUCKET_DOCUMENTS`` documents, one per hash range of each): the hashes of one band are
   sorted, and each run of equal hashes gives candidate pairs (each member with the run's
   first document).
3. **clusters** (one task): candidate pairs are confirmed by their estimated Jaccard
   similarity (the fraction of equal signature values; signatures are read from disk
   for the pairs only), then union-find joins confirmed pairs and exact pairs into
   clusters. The survivor of a cluster is its first document in corpus order (shard
   order, then row order), whatever ran the tasks and in what order.
4. **filter** (one task per shard, on the shared per-shard runner): every other member
   goes to ``removed/`` with ``reason`` (exact_duplicate when its normalized text equals
   an earlier document's, else near_duplicate), ``duplicate_of`` (the survivor's
   id), ``cluster_id`` (the survivor's position in the corpus) and ``similarity`` (its
   estimated Jaccard similarity to the survivor; 1.0 for exact duplicates).

Normalization: NFKC, lower case, punctuation as a word break, single spaces; so copies
that differ only in case, spacing or punctuation are exact duplicates.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from tasks import minhash
from tasks.shard_runner import (
    Mapper,
    Removed,
    ShardStep,
    require_shards,
    run_sharded,
    serial_mapper,
)
from tasks.shards import atomic_path, write_text_atomic

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
        0.6, gt=0, lt=1, description="Jaccard similarity of shingle sets at or above which two "
                                     "documents are near-duplicates. 0.6 catches copies with "
                                     "small edits, changed boilerplate lines or a different "
                                     "footer (their similarity is 0.75-0.95), and keeps "
                                     "documents that share a third of their text (about 0.2). "
                                     "The LSH bands and rows are derived from it.")
    num_perm: int = Field(
        128, ge=16, le=1024, description="MinHash permutations: more give a sharper similarity "
                                         "estimate at proportionally more time and disk (4 "
                                         "bytes each per document, stored beside the stage's "
                                         "output in minhash/).")
    shingle_size: int = Field(
        5, ge=1, le=50, description="Words per shingle. Smaller shingles make unrelated texts "
                                    "on the same topic look alike; larger ones make small edits "
                                    "count more.")
    seed: int = Field(1, ge=0, description="Seed of the MinHash permutations; results are "
                                           "deterministic for a given seed.")



# Documents whose signatures are computed together (bounds the scratch arrays).
SIGNATURE_BATCH = 512
# Hashes one bucket task sorts at most (16 bytes each with their positions: ~64 MB).
BUCKET_DOCUMENTS = 1 << 22
EXACT = "exact"


def _save_array(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


def signature_shard(config: DedupConfig, shard: str, work: str) -> dict:
    """Step 1 for one shard: signatures, band hashes and digests into ``work/minhash``."""
    shard, folder = Path(shard), Path(work) / "minhash"
    done = folder / f"{shard.stem}.json"
    if done.exists():
        return json.loads(done.read_text(encoding="utf-8"))
    bands, rows = minhash.lsh_parameters(config.threshold, config.num_perm)
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for batch in pq.ParquetFile(shard).iter_batches(batch_size=SIGNATURE_BATCH,
                                                    columns=["text"]):
        parts.append(minhash.signatures(batch.column(0), config.shingle_size,
                                        config.num_perm, config.seed))
    if parts:
        signatures = np.concatenate([p[0] for p in parts])
        has_words = np.concatenate([p[1] for p in parts])
        digests = np.concatenate([p[2] for p in parts])
    else:
        signatures = np.zeros((0, config.num_perm), np.uint32)
        has_words, digests = np.zeros(0, bool), np.zeros(0, np.uint64)
    _save_array(folder / f"{shard.stem}.signatures.npy", signatures)
    _save_array(folder / f"{shard.stem}.bands.npy", minhash.band_hashes(signatures, bands, rows))
    _save_array(folder / f"{shard.stem}.digests.npy", digests)
    _save_array(folder / f"{shard.stem}.words.npy", has_words)
    result = {"shard": shard.name, "rows": len(signatures)}
    write_text_atomic(done, json.dumps(result))
    return result


def bucket_parts(documents: int) -> int:
    """Hash-range parts each band is split into, so that one bucket task sorts at most
    about ``BUCKET_DOCUMENTS`` hashes (a power of two: parts are ranges of the top bits)."""
    parts = 1
    while documents > parts * BUCKET_DOCUMENTS:
        parts *= 2
    return parts


def bucket_pairs(work: str, stems: list[str], offsets: list[int], band: int | str,
                 part: int = 0, parts: int = 1) -> str:
    """Step 2 for one band (or ``"exact"`` for the digests), or one hash range of it: the
    candidate pairs of documents with equal hashes, as global positions, into
    ``work/pairs``. Memory: 16 bytes per document whose hash falls in the range."""
    name = EXACT if band == EXACT else f"band-{band:03d}"
    out = Path(work) / "pairs" / f"{name}-{part:04d}.npy"
    if out.exists():
        return str(out)
    shift = np.uint64(64 - (parts.bit_length() - 1))
    hashes, index = [], []
    for stem, offset in zip(stems, offsets):
        folder = Path(work) / "minhash"
        if band == EXACT:
            values = np.load(folder / f"{stem}.digests.npy")
            keep = np.ones(len(values), bool)
        else:
            values = np.asarray(np.load(folder / f"{stem}.bands.npy", mmap_mode="r")[band])
            keep = np.load(folder / f"{stem}.words.npy")
        if parts > 1:
            keep &= (values >> shift) == part
        hashes.append(values[keep])
        index.append(np.flatnonzero(keep) + offset)
    pairs = minhash.equal_hash_pairs(np.concatenate(hashes), np.concatenate(index))
    _save_array(out, pairs)
    return str(out)


class _Signatures:
    """Random access to the stored signatures by global position (memory-mapped)."""

    def __init__(self, work: Path, stems: list[str], offsets: list[int]):
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.maps = [np.load(work / "minhash" / f"{stem}.signatures.npy", mmap_mode="r")
                     for stem in stems]

    def rows(self, positions: np.ndarray) -> np.ndarray:
        shard = np.searchsorted(self.offsets, positions, side="right") - 1
        num_perm = self.maps[0].shape[1] if self.maps else 0
        out = np.empty((len(positions), num_perm), dtype=np.uint32)
        for s in np.unique(shard):
            where = np.flatnonzero(shard == s)
            local = positions[where] - self.offsets[s]
            order = np.argsort(local)  # sorted reads from the map
            out[where[order]] = self.maps[s][local[order]]
        return out

    def similarity(self, left: np.ndarray, right: np.ndarray, chunk: int = 65536
                   ) -> np.ndarray:
        """Estimated Jaccard similarity of each (left, right) pair of documents."""
        out = np.empty(len(left), dtype=np.float64)
        for start in range(0, len(left), chunk):
            a = self.rows(left[start:start + chunk])
            b = self.rows(right[start:start + chunk])
            out[start:start + chunk] = (a == b).mean(axis=1)
        return out


def cluster_documents(config: DedupConfig, work: str, stems: list[str], offsets: list[int],
                      pair_files: list[str], ids_from: list[str]) -> dict:
    """Step 3: confirm candidates, join clusters, and write each shard's removals (global
    position of its survivor, similarity, reason) into ``work/decisions``."""
    work = Path(work)
    done = work / "decisions" / "clusters.json"
    if done.exists():
        return json.loads(done.read_text(encoding="utf-8"))
    total = offsets[-1] if offsets else 0
    signatures = _Signatures(work, stems, offsets[:-1])
    near = [np.load(f) for f in pair_files if not Path(f).stem.startswith(EXACT)]
    exact = [np.load(f) for f in pair_files if Path(f).stem.startswith(EXACT)]
    candidates = np.unique(np.concatenate(near), axis=0) if near else np.zeros((0, 2), np.int64)
    similarity = signatures.similarity(candidates[:, 0], candidates[:, 1])
    confirmed = candidates[similarity >= config.threshold]
    edges = np.concatenate([confirmed, *exact]) if exact else confirmed
    survivor = minhash.connected_components(total, edges)
    duplicates = np.flatnonzero(survivor != np.arange(total))
    digests = np.concatenate([np.load(work / "minhash" / f"{stem}.digests.npy")
                              for stem in stems]) if stems else np.zeros(0, np.uint64)
    same_text = digests[duplicates] == digests[survivor[duplicates]]
    sims = np.where(same_text, 1.0,
                    signatures.similarity(duplicates, survivor[duplicates]))
    # an exact duplicate repeats an earlier document's text (not always the survivor's)
    repeats = np.isin(duplicates, np.concatenate([e[:, 1] for e in exact])) if exact \
        else np.zeros(len(duplicates), bool)
    survivor_ids = _ids_at(np.unique(survivor[duplicates]), ids_from, offsets)
    for number, stem in enumerate(stems):
        lo, hi = offsets[number], offsets[number + 1]
        mine = (duplicates >= lo) & (duplicates < hi)
        table = pa.table({
            "row": (duplicates[mine] - lo).astype(np.int64),
            "duplicate_of": [survivor_ids[int(p)] for p in survivor[duplicates[mine]]],
            "cluster_id": survivor[duplicates[mine]].astype(np.int64),
            "similarity": np.round(sims[mine], 4),
            "reason": np.where(repeats[mine], "exact_duplicate", "near_duplicate").tolist(),
        })
        with atomic_path(work / "decisions" / f"{stem}.parquet") as tmp:
            pq.write_table(table, tmp)
    sizes = np.bincount(survivor[duplicates] if len(duplicates) else np.zeros(0, np.int64))
    result = {"candidate_pairs": len(candidates), "confirmed_pairs": len(confirmed),
              "exact_pairs": int(sum(len(e) for e in exact)),
              "duplicate_clusters": int(np.count_nonzero(sizes)),
              "largest_cluster": int(sizes.max() + 1) if len(duplicates) else 1}
    write_text_atomic(done, json.dumps(result))
    return result


def _ids_at(positions: np.ndarray, shards: list[str], offsets: list[int]) -> dict[int, str]:
    """The ids of the documents at these global positions, reading one shard at a time."""
    found: dict[int, str] = {}
    for number, shard in enumerate(shards):
        lo, hi = offsets[number], offsets[number + 1]
        wanted = positions[(positions >= lo) & (positions < hi)]
        if len(wanted):
            ids = pq.read_table(shard, columns=["id"]).column(0)
            for position in wanted:
                found[int(position)] = str(ids[int(position) - lo].as_py())
    return found


class RemovalSettings(BaseModel):
    """What step 4 needs: the stage's settings and where step 3 wrote its decisions."""

    dedup: DedupConfig
    work: str


class DedupStep(ShardStep):
    """Step 4: drop the documents step 3 found to duplicate an earlier survivor."""

    name = "dedup"
    batch_size = 1024

    def __init__(self, config: RemovalSettings):
        super().__init__(config)
        self.work = Path(config.work)

    def open_shard(self, shard: str) -> None:
        table = pq.read_table(self.work / "decisions" / f"{Path(shard).stem}.parquet")
        self.decisions = {d.pop("row"): d for d in table.to_pylist()}

    def apply(self, records: list[dict], stats: Counter) -> list[dict | Removed]:
        outcomes: list[dict | Removed] = []
        for row, record in enumerate(records, self.first_row):
            decision = self.decisions.get(row)
            if decision is None:
                outcomes.append(record)
            else:
                extra = {k: v for k, v in decision.items() if k != "reason"}
                outcomes.append(Removed({**record, **extra}, decision["reason"]))
        return outcomes

    @classmethod
    def check_result(cls, config, stats: dict) -> None:
        """Nothing to check: dedup keeps the first document of every cluster."""


def deduplicate(config: DedupConfig, input_dir: Path, out_dir: Path,
                mapper: Mapper | None = None) -> dict:
    """Keep the first document of each cluster of exact or near-duplicates (corpus order).

    Removed documents go to removed/ with ``reason``, ``duplicate_of``, ``cluster_id`` and
    ``similarity``; signatures stay in ``minhash/`` beside the output.
    """
    mapper = mapper or serial_mapper
    input_dir, out_dir = Path(input_dir), Path(out_dir)
    shards = [str(path) for path in require_shards("dedup", input_dir)]
    work = str(out_dir)
    if not (config.exact or config.near):
        log.warning("dedup: both dedup.exact and dedup.near are off; keeping every document")
    bands, rows = minhash.lsh_parameters(config.threshold, config.num_perm)
    sizes = mapper("dedup-signatures", signature_shard,
                   [(config, shard, work) for shard in shards])
    offsets = np.concatenate([[0], np.cumsum([s["rows"] for s in sizes])]).tolist()
    stems = [Path(shard).stem for shard in shards]
    buckets = ([EXACT] if config.exact else []) + (list(range(bands)) if config.near else [])
    parts = bucket_parts(offsets[-1])
    pair_files = mapper("dedup-buckets", bucket_pairs,
                        [(work, stems, offsets[:-1], band, part, parts)
                         for band in buckets for part in range(parts)])
    clusters = mapper("dedup-clusters", cluster_documents,
                      [(config, work, stems, offsets, pair_files, shards)])[0]
    result = run_sharded(DedupStep, RemovalSettings(dedup=config, work=work), input_dir,
                         out_dir, mapper)
    stats = result["stats"]
    for reason in ("exact_duplicate", "near_duplicate"):
        stats.setdefault(f"removed_{reason}", 0)
    stats.update(clusters)
    stats.update({"lsh_bands": bands, "lsh_rows": rows})
    log.info("dedup: %d exact and %d near duplicates in %d clusters (largest %d); %d "
             "candidate pairs from %d bands x %d rows, %d confirmed at Jaccard >= %.2f",
             stats["removed_exact_duplicate"], stats["removed_near_duplicate"],
             clusters["duplicate_clusters"], clusters["largest_cluster"],
             clusters["candidate_pairs"], bands, rows, clusters["confirmed_pairs"],
             config.threshold)
    return result
