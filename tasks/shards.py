"""Parquet shards and atomic file writes: how every data stage reads and writes documents.

A data stage's output directory holds ``shard-00000.parquet, shard-00001.parquet, ...``,
each with at least the columns ``id``, ``text`` and ``url``; it can be read back with
``datasets.load_dataset("parquet", data_dir=<dir>)``. Shards are written to a temporary
name and renamed, so a reader never sees a half-written file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Self

import pyarrow as pa
import pyarrow.parquet as pq

REQUIRED_COLUMNS = ("id", "text", "url")
SHARD_GLOB = "shard-*.parquet"


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def shard_paths(directory: str | os.PathLike) -> list[Path]:
    """The shards of a stage's data directory, in order."""
    return sorted(Path(directory).glob(SHARD_GLOB))


def write_shard(records: list[dict], path: str | os.PathLike) -> int:
    """Write one shard atomically; returns the number of rows.

    Records may lack some columns that others have (a removed document that failed
    carries ``detail`` where the others carry the rule's numbers): missing ones are null.
    """
    columns = list(dict.fromkeys(key for record in records for key in record))
    table = pa.Table.from_pylist([{c: record.get(c) for c in columns} for record in records])
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"shard {path} lacks required column(s) {missing}")
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return table.num_rows


class ShardWriter:
    """Collects records and writes a shard every ``shard_size`` of them.

    >>> with ShardWriter(out_dir, shard_size=1000) as writer:
    ...     for doc in docs:
    ...         writer.add(doc)
    """

    def __init__(self, directory: str | os.PathLike, shard_size: int = 1000):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.count = 0
        self.paths: list[Path] = []
        self._buffer: list[dict] = []

    def add(self, record: dict) -> None:
        self._buffer.append(record)
        if len(self._buffer) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        path = self.directory / f"shard-{len(self.paths):05d}.parquet"
        self.count += write_shard(self._buffer, path)
        self.paths.append(path)
        self._buffer = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.flush()


def iter_records(directory: str | os.PathLike, columns: list[str] | None = None,
                 batch_size: int = 256) -> Iterator[dict]:
    """Yield the rows of every shard in ``directory`` as dicts, one batch in memory at a time."""
    for path in shard_paths(directory):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=columns):
            yield from batch.to_pylist()


def count_records(directory: str | os.PathLike) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in shard_paths(directory))


def write_records(records: Iterable[dict], directory: str | os.PathLike,
                  shard_size: int = 1000) -> int:
    with ShardWriter(directory, shard_size) as writer:
        for record in records:
            writer.add(record)
    return writer.count


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hash_tree(directory: str | os.PathLike) -> str:
    """A content hash of every file under ``directory`` (names and bytes), for cache keys."""
    root = Path(directory)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.name == "manifest.json":
            continue
        digest.update(path.relative_to(root).as_posix().encode())
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
