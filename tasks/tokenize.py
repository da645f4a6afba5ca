"""Tokenize stage: train a sentencepiece tokenizer on the cleaned corpus and write token bins.

The corpus is split by document into train and validation, deterministically from a hash
of each document's id, so the same document lands on the same side in every run and the
validation set never leaks into the tokenizer or the model. Every document is encoded and
followed by EOS, and the ids are concatenated into flat ``train.bin`` / ``val.bin`` arrays
(nanoGPT's format) that training reads through a memmap without loading them.

Besides the usual unk/bos/eos/pad, the vocabulary holds a ``<mask>`` control symbol for
masked-LM pretraining; its id is ``mask_id`` in meta.json. Text never encodes to it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import chain
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from tasks.shard_runner import Mapper, serial_mapper
from tasks.shards import (
    atomic_path,
    count_records,
    iter_records,
    shard_paths,
    write_text_atomic,
)
from tasks.stage import StageInputError

log = logging.getLogger(__name__)

STAGE = "tokenize"
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
# masked-LM pretraining's mask token: a control symbol (id 4, after the four above), so it
# has an id of its own but text never encodes to it (a literal "<mask>" stays plain text)
MASK_PIECE = "<mask>"
ENCODE_BATCH = 256  # documents per sentencepiece call: big enough to use every thread


class TokenizeConfig(BaseModel):
    """Tokenizer training and the train/validation token files."""

    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(
        4096, ge=64, le=1_000_000,
        description="Number of tokens in the vocabulary. 4096 suits a corpus of a few MB; "
                    "a small corpus cannot support a large vocabulary.")
    model_type: Literal["bpe", "unigram"] = Field(
        "bpe", description="Sentencepiece algorithm: byte-pair encoding or unigram LM.")
    character_coverage: float = Field(
        0.9995, gt=0.0, le=1.0,
        description="Share of characters the vocabulary must cover; rarer characters become "
                    "bytes (with byte_fallback) or <unk>.")
    byte_fallback: bool = Field(
        True, description="Encode characters outside the vocabulary as UTF-8 bytes instead of "
                          "<unk>, so any text round-trips.")
    val_fraction: float = Field(
        0.05, gt=0.0, lt=1.0,
        description="Share of documents held out for validation, chosen by a hash of the "
                    "document id (stable across runs).")
    max_sentence_length: int = Field(
        4192, ge=64,
        description="Longest line, in bytes, used to train the tokenizer; longer lines are cut "
                    "into pieces of this size.")
    input_sentence_size: int = Field(
        1_000_000, ge=0,
        description="At most this many lines (a random sample) train the tokenizer; 0 = all. "
                    "Bounds tokenizer training time and memory on big corpora.")
    seed: int = Field(0, description="Seed for the tokenizer's line sampling.")


def is_validation(doc_id: str, val_fraction: float) -> bool:
    """A document is held out when the hash of its id, read as a number in [0, 1), is small."""
    digest = hashlib.sha256(str(doc_id).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def split_ids(input_dir: Path, val_fraction: float
              ) -> tuple[set[str], int, dict[str, bool]]:
    """Validation ids, the number of documents, and the id forced into training (if any).

    One validation document is forced if the hash picked none, so a small corpus still
    gets a validation set; and one training document if the hash picked them all."""
    val_ids: set[str] = set()
    total, smallest = 0, None
    for record in iter_records(input_dir, columns=["id"]):
        doc_id = str(record["id"])
        total += 1
        if is_validation(doc_id, val_fraction):
            val_ids.add(doc_id)
        key = hashlib.sha256(doc_id.encode("utf-8")).digest()
        if smallest is None or key < smallest[0]:
            smallest = (key, doc_id)
    if total < 2:
        raise StageInputError(STAGE, f"the corpus in {input_dir} has {total} document(s); at least "
                                     "2 are needed for a train and a validation split. Check that "
                                     "the earlier stages kept documents (see their removed/ folders)")
    forced_train: dict[str, bool] = {}
    if not val_ids:
        val_ids.add(smallest[1])
    if len(val_ids) == total:
        val_ids.discard(smallest[1])
        forced_train[smallest[1]] = False
    return val_ids, total, forced_train


def training_lines(text: str, max_bytes: int):
    """The non-empty lines of a document, each cut to at most ``max_bytes`` UTF-8 bytes,
    because sentencepiece silently skips longer lines."""
    for line in text.splitlines():
        if not line.strip():
            continue
        data = line.encode("utf-8")
        for start in range(0, len(data), max_bytes):
            yield data[start:start + max_bytes].decode("utf-8", errors="ignore")


VAL_IDS = "val_ids.json"


def read_val_ids(tokenized_dir: Path) -> set[str]:
    """The ids of the documents in val.bin (held out of pretraining)."""
    path = Path(tokenized_dir) / VAL_IDS
    return set(json.loads(path.read_text(encoding="utf-8"))) if path.exists() else set()


def write_training_text(input_dir: Path, val_ids: set[str], path: Path,
                        max_bytes: int) -> tuple[int, int]:
    """Stream the training documents' lines to ``path``; returns (lines, characters)."""
    lines = chars = 0
    with open(path, "w", encoding="utf-8") as fh:
        for record in iter_records(input_dir, columns=["id", "text"]):
            if str(record["id"]) in val_ids or not record["text"]:
                continue
            for line in training_lines(record["text"], max_bytes):
                fh.write(line + "\n")
                lines += 1
                chars += len(line)
    return lines, chars


def train_tokenizer(config: TokenizeConfig, text_path: Path, model_prefix: Path,
                    lines: int, chars: int) -> None:
    """Train sentencepiece, turning its 'vocabulary too large' failure into advice."""
    import sentencepiece as spm

    spm.set_random_generator_seed(config.seed)
    try:
        spm.SentencePieceTrainer.train(
            input=str(text_path), model_prefix=str(model_prefix),
            vocab_size=config.vocab_size, model_type=config.model_type,
            character_coverage=config.character_coverage, byte_fallback=config.byte_fallback,
            max_sentence_length=config.max_sentence_length,
            input_sentence_size=config.input_sentence_size,
            shuffle_input_sentence=True, seed_sentencepiece_size=1_000_000,
            num_threads=os.cpu_count() or 1,
            # keep text exactly as written: code indentation and newlines matter here
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
            user_defined_symbols=["\n"], control_symbols=[MASK_PIECE],
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
            minloglevel=2,
        )
    except RuntimeError as exc:
        message = str(exc)
        needed = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
        if needed:  # every character kept (and the 256 byte pieces) needs a piece of its own
            raise StageInputError(
                STAGE, f"tokenize.vocab_size={config.vocab_size} is too small for the "
                       f"{needed.group(2)} pieces this text needs at least (its characters"
                       f"{' and the 256 byte pieces' if config.byte_fallback else ''}); raise "
                       f"tokenize.vocab_size above {needed.group(2)} or lower "
                       "tokenize.character_coverage") from exc
        if "Vocabulary size" in message or "vocab_size" in message:
            raise StageInputError(
                STAGE, f"the training text ({lines} lines, {chars} characters) is too small for "
                       f"tokenize.vocab_size={config.vocab_size} ({message.strip()}); lower "
                       "tokenize.vocab_size or provide more text") from exc
        raise StageInputError(STAGE, f"sentencepiece could not train a tokenizer on {lines} "
                                     f"lines: {message.strip()}") from exc


def _file_version(path: str) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=4)
def _processor(model_file: str, size: int, mtime_ns: int):
    """One loaded tokenizer per model file (and version of it) per process: a worker
    encoding many shards loads it once. Encoding from several threads at once is safe."""
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=model_file)


def encode_shard(model_file: str, shard: str, parts_dir: str, val_fraction: float,
                 exceptions: dict[str, bool], dtype: str) -> dict[str, int]:
    """The per-shard half of the stage: encode one shard's documents (+ EOS each) into
    ``parts/<shard>.train.bin`` and ``.val.bin``; its token, document and byte counts.

    A document is held out by the hash of its id (``is_validation``), except the ids in
    ``exceptions`` (id -> held out), which keep a tiny corpus from having no validation
    document. The counts file is the shard's completion marker: a finished shard is kept.
    """
    import numpy as np

    shard, parts = Path(shard), Path(parts_dir)
    done = parts / f"{shard.stem}.json"
    if done.exists():
        return json.loads(done.read_text(encoding="utf-8"))
    sp = _processor(model_file, *_file_version(model_file))
    counts = {"train_tokens": 0, "val_tokens": 0, "train_documents": 0, "val_documents": 0,
              "train_bytes": 0, "val_bytes": 0}
    threads = os.cpu_count() or 1

    def write(encoded: list[list[int]], held_out: list[bool], sizes: np.ndarray,
              sources: tuple[list[str], np.ndarray]) -> None:
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        names, codes = sources  # tokens and documents per source (the data report's mix)
        tokens = np.bincount(codes, weights=lengths, minlength=len(names))
        documents = np.bincount(codes, minlength=len(names))
        for name, n_tokens, n_documents in zip(names, tokens, documents):
            for key, value in (("tokens", n_tokens), ("documents", n_documents)):
                counts[f"source.{name}.{key}"] = counts.get(f"source.{name}.{key}", 0) + \
                    int(value)
        # each side's documents (each ending in EOS) as one flat array: the lists are split
        # by side first, so no per-token mask is built, and numpy converts the ids in C
        held = np.array(held_out, dtype=bool)
        for side, wanted in (("train", False), ("val", True)):
            docs = held == wanted
            if not docs.any():
                continue
            lists = [ids for ids, h in zip(encoded, held_out) if h is wanted] \
                if held.any() else encoded
            count = int(lengths[docs].sum())
            files[side].write(np.fromiter(chain.from_iterable(lists), dtype=dtype,
                                          count=count).tobytes())
            counts[f"{side}_tokens"] += count
            counts[f"{side}_documents"] += int(docs.sum())
            counts[f"{side}_bytes"] += int(sizes[docs].sum())

    parquet = pq.ParquetFile(shard, memory_map=True)
    with_source = "source" in parquet.schema_arrow.names

    def batches() -> Iterator[tuple[list[bytes], list[bool], np.ndarray, tuple]]:
        for batch in parquet.iter_batches(batch_size=ENCODE_BATCH, columns=[
                "id", "text", *(["source"] if with_source else [])]):
            text = pc.fill_null(batch.column("text"), "")
            # sentencepiece reads UTF-8 bytes as they are: no decoding into str and back
            texts = text.cast(pa.large_binary() if pa.types.is_large_string(text.type)
                              else pa.binary()).to_pylist()
            sizes = pc.binary_length(text).to_numpy()
            ids = map(str, batch.column("id").to_pylist())
            held_out = [exceptions[doc_id] if doc_id in exceptions
                        else is_validation(doc_id, val_fraction) for doc_id in ids] \
                if val_fraction > 0 or exceptions else [False] * batch.num_rows
            if with_source:
                encoded = pc.fill_null(batch.column("source"), "crawl").dictionary_encode()
                sources = (encoded.dictionary.to_pylist(), encoded.indices.to_numpy())
            else:  # the crawl's pages (as the data stages count them)
                sources = (["crawl"], np.zeros(batch.num_rows, dtype=np.int64))
            yield texts, held_out, sizes, sources

    # sentencepiece lets go of the GIL while it encodes: one batch per core is encoded at
    # a time, each on a thread of its own (busier cores than one batch split over them),
    # while this thread reads the next batches and writes the finished ones out in order
    with atomic_path(parts / f"{shard.stem}.train.bin") as train_tmp, \
            atomic_path(parts / f"{shard.stem}.val.bin") as val_tmp, \
            open(train_tmp, "wb") as train_fh, open(val_tmp, "wb") as val_fh, \
            ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tokenize") as encoder:
        files = {"train": train_fh, "val": val_fh}
        in_flight: deque = deque()
        for texts, *rest in batches():
            in_flight.append((encoder.submit(sp.encode, texts, num_threads=1, add_eos=True),
                              rest))
            if len(in_flight) > threads:  # the oldest batch, written out in order
                future, rest = in_flight.popleft()
                write(future.result(), *rest)
        while in_flight:
            future, rest = in_flight.popleft()
            write(future.result(), *rest)
    write_text_atomic(done, json.dumps(counts))
    return counts


def join_parts(parts_dir: Path, stems: list[str], out_dir: Path) -> None:
    """Concatenate the shards' token files, in shard order, into train.bin and val.bin."""
    for side in ("train", "val"):
        with atomic_path(out_dir / f"{side}.bin") as tmp, open(tmp, "wb") as out:
            for stem in stems:
                with open(parts_dir / f"{stem}.{side}.bin", "rb") as part:
                    shutil.copyfileobj(part, out, 1 << 20)


def train_and_save_tokenizer(config: TokenizeConfig, input_dir: Path, out_dir: Path,
                             val_ids: set, total: int) -> None:
    """Train the tokenizer on the training documents' lines into out_dir."""
    with tempfile.TemporaryDirectory(prefix="forgeline-tokenize-") as tmp:
        text_path = Path(tmp) / "train.txt"
        lines, chars = write_training_text(input_dir, val_ids, text_path,
                                           config.max_sentence_length)
        if lines == 0:
            raise StageInputError(STAGE, f"the {total - len(val_ids)} training documents in "
                                         f"{input_dir} contain no text")
        log.info("tokenize: training a %s tokenizer (vocab %d) on %d lines, %d characters",
                 config.model_type, config.vocab_size, lines, chars)
        train_tokenizer(config, text_path, Path(tmp) / "tokenizer", lines, chars)
        for suffix in (".model", ".vocab"):
            with atomic_path(out_dir / f"tokenizer{suffix}") as dest:
                shutil.copyfile(Path(tmp) / f"tokenizer{suffix}", dest)


def reuse_tokenizer(tokenizer: Path, out_dir: Path) -> None:
    """Encode with an existing sentencepiece model: copy it, with its vocabulary listing."""
    import sentencepiece as spm

    if not tokenizer.is_file():
        raise StageInputError(STAGE, f"no tokenizer at {tokenizer}")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    except (OSError, RuntimeError) as exc:
        raise StageInputError(STAGE, f"{tokenizer} is not a sentencepiece model "
                                     f"({type(exc).__name__})") from exc
    log.info("tokenize: encoding with the given tokenizer %s (vocab %d); none is trained",
             tokenizer, sp.get_piece_size())
    with atomic_path(out_dir / "tokenizer.model") as dest:
        shutil.copyfile(tokenizer, dest)
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n"
                    for i in range(sp.get_piece_size()))
    write_text_atomic(out_dir / "tokenizer.vocab", vocab)


def mask_token_id(sp) -> int | None:
    """The id of the tokenizer's ``<mask>`` control symbol, or None when it has none (a
    tokenizer trained before there was one, such as an older run's given as init_from)."""
    piece_id = sp.piece_to_id(MASK_PIECE)
    if piece_id == sp.unk_id() or not sp.is_control(piece_id):
        return None
    return piece_id


def fallback_mask_id(meta: dict, source: str) -> int:
    """A special id that never occurs in the token files, to stand for the mask when the
    tokenizer has no ``<mask>``: BOS (documents are encoded with EOS only), else PAD."""
    for name in ("bos_id", "pad_id"):
        if meta.get(name, -1) >= 0:
            log.info("%s has no %s token: masked-LM training masks with the unused %s "
                     "(id %d) instead", source, MASK_PIECE, name.removesuffix("_id").upper(),
                     meta[name])
            return meta[name]
    raise StageInputError(STAGE, f"{source} has no {MASK_PIECE} token and neither a BOS nor "
                                 "a PAD id to mask with; retrain the tokenizer (drop "
                                 "pretrain.init_from)")


def resolve_mask_id(meta: dict, source: str = "the tokenizer") -> int:
    """The id masked-LM training masks with: meta.json's ``mask_id``, or for a tokenize
    output written before there was one, the fallback special id."""
    if meta.get("mask_id") is not None:
        return int(meta["mask_id"])
    return fallback_mask_id(meta, source)


def sp_model_type(path: Path) -> str:
    """'bpe', 'unigram', ... as the sentencepiece model file says."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    return sentencepiece_model_pb2.TrainerSpec.ModelType.Name(
        proto.trainer_spec.model_type).lower()


def tokenize_corpus(config: TokenizeConfig, input_dir: Path, out_dir: Path,
                    mapper: Mapper | None = None, tokenizer: Path | None = None) -> dict:
    """Train the tokenizer on the training documents and write the token bins and meta.json.

    The tokenizer is trained once, on the training documents' lines; the shards are then
    encoded one task per shard (``mapper``) and joined in shard order. With ``tokenizer``
    (the sentencepiece model of a model that training continues from) that one encodes
    the corpus instead, and none is trained."""
    import numpy as np
    import sentencepiece as spm

    started = time.perf_counter()
    input_dir, out_dir = Path(input_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if count_records(input_dir) == 0:
        raise StageInputError(STAGE, f"no documents in {input_dir}: the corpus is empty. Check "
                                     "the earlier stages' counts (filter/dedup may have removed "
                                     "everything)")
    val_ids, total, forced_train = split_ids(input_dir, config.val_fraction)

    if tokenizer is not None:
        reuse_tokenizer(Path(tokenizer), out_dir)
    else:
        train_and_save_tokenizer(config, input_dir, out_dir, val_ids, total)

    sp = spm.SentencePieceProcessor(model_file=str(out_dir / "tokenizer.model"))
    vocab_size = sp.get_piece_size()
    dtype = np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)
    # the ids whose side is not the one their hash gives (a corpus too small for the hash
    # to pick any validation document, or to leave any training document)
    exceptions = {doc_id: True for doc_id in val_ids
                  if not is_validation(doc_id, config.val_fraction)}
    exceptions.update(forced_train)
    shards = shard_paths(input_dir)
    parts = (mapper or serial_mapper)(
        "tokenize", encode_shard,
        [(str(out_dir / "tokenizer.model"), str(shard), str(out_dir / "parts"),
          config.val_fraction, exceptions, dtype.name) for shard in shards])
    join_parts(out_dir / "parts", [shard.stem for shard in shards], out_dir)
    shutil.rmtree(out_dir / "parts")  # the joined files hold the same tokens
    totals: dict[str, int] = {}
    for part in parts:
        for key, value in part.items():
            totals[key] = totals.get(key, 0) + value
    per_source = {k: v for k, v in sorted(totals.items()) if k.startswith("source.")}
    counts = {k: v for k, v in totals.items() if not k.startswith("source.")}
    meta = {"dtype": dtype.name, "vocab_size": vocab_size, "bos_id": sp.bos_id(),
            "eos_id": sp.eos_id(), "pad_id": sp.pad_id(), "unk_id": sp.unk_id(),
            "mask_id": mask_token_id(sp),
            "model_type": sp_model_type(out_dir / "tokenizer.model"), **counts}
    if meta["mask_id"] is None:  # a reused tokenizer from before the mask token existed
        meta["mask_id"] = fallback_mask_id(meta, f"the tokenizer {tokenizer}")
    write_text_atomic(out_dir / VAL_IDS, json.dumps(sorted(val_ids)))
    write_text_atomic(out_dir / "meta.json", json.dumps(meta, indent=2))

    tokens = counts["train_tokens"] + counts["val_tokens"]
    bytes_per_token = (counts["train_bytes"] + counts["val_bytes"]) / max(tokens, 1)
    log.info("tokenize: %d train tokens (%d docs), %d val tokens (%d docs), %.2f bytes/token, "
             "%.1fs", counts["train_tokens"], counts["train_documents"], counts["val_tokens"],
             counts["val_documents"], bytes_per_token, time.perf_counter() - started)
    return {
        "count": tokens,
        "unit": "tokens",
        "stats": {"vocab_size": vocab_size, "train_tokens": counts["train_tokens"],
                  "val_tokens": counts["val_tokens"], "train_documents": counts["train_documents"],
                  "val_documents": counts["val_documents"],
                  "bytes_per_token": round(bytes_per_token, 4), **per_source},
        "artifacts": {"tokenizer_model": "tokenizer.model", "tokenizer_vocab": "tokenizer.vocab",
                      "meta": "meta.json"},
    }
