"""Shard files: atomic, readable with datasets, bounded batches."""

import datasets
import pytest

from tasks.shards import ShardWriter, atomic_path, count_records, iter_records, shard_paths


def test_writer_splits_into_shards_readable_by_datasets(tmp_path):
    out = tmp_path / "data"
    with ShardWriter(out, shard_size=3) as writer:
        for i in range(7):
            writer.add({"id": f"doc-{i}", "text": f"text {i}", "url": f"http://x/{i}"})
    assert writer.count == 7
    assert [p.name for p in shard_paths(out)] == [
        "shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    assert count_records(out) == 7
    assert [r["id"] for r in iter_records(out, columns=["id"])] == [f"doc-{i}" for i in range(7)]
    loaded = datasets.load_dataset("parquet", data_dir=str(out), split="train")
    assert sorted(loaded["id"]) == sorted(f"doc-{i}" for i in range(7))


def test_shard_without_required_columns_is_refused(tmp_path):
    with pytest.raises(ValueError, match="url"), ShardWriter(tmp_path, shard_size=1) as writer:
        writer.add({"id": "a", "text": "b"})
    assert shard_paths(tmp_path) == []


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "file.bin"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
