"""The per-shard runner: outputs mirror input shards, statistics merge, finished shards
are never recomputed, and one failing document never fails a stage."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest

from tasks.shard_runner import Removed, ShardStep, marker_path, run_shard, run_sharded
from tasks.shards import iter_records, shard_paths, write_records
from tasks.stage import StageInputError

SECRET = "do-not-log-this-text"


class Cfg:
    """Steps take any picklable config; these tests need none."""


class KeepEvenStep(ShardStep):
    name = "evens"
    batch_size = 3

    def apply(self, records, stats: Counter):
        stats["seen_chars"] += sum(len(r["text"]) for r in records)
        return [r if int(r["id"]) % 2 == 0 else Removed({**r, "detail": "odd"}, "odd")
                for r in records]


class FragileStep(ShardStep):
    """Fails on a batch holding the poisoned document, as Presidio did on 'x sys.::.'."""

    name = "fragile"
    batch_size = 4

    def apply(self, records, stats: Counter):
        stats["calls"] += 1
        for record in records:
            if SECRET in record["text"]:
                raise ValueError(f"cannot handle {record['text']!r}")
        return [{**r, "text": r["text"].upper()} for r in records]


def corpus(tmp_path: Path, count: int = 10, shard_size: int = 4, poison: int | None = None):
    records = [{"id": str(i), "text": f"document {i}", "url": f"http://h/{i}"}
               for i in range(count)]
    if poison is not None:
        records[poison]["text"] = f"x sys.::. {SECRET}"
    write_records(records, tmp_path / "in", shard_size=shard_size)
    return tmp_path / "in"


def test_outputs_mirror_input_shards_and_stats_are_merged(tmp_path):
    result = run_sharded(KeepEvenStep, Cfg(), corpus(tmp_path), tmp_path / "out")
    assert [p.name for p in shard_paths(tmp_path / "out" / "data")] == \
        [p.name for p in shard_paths(tmp_path / "in")]
    assert [r["id"] for r in iter_records(tmp_path / "out" / "data")] == ["0", "2", "4", "6", "8"]
    removed = list(iter_records(tmp_path / "out" / "removed"))
    assert [(r["id"], r["reason"], r["detail"]) for r in removed][:2] == \
        [("1", "odd", "odd"), ("3", "odd", "odd")]
    stats = result["stats"]
    assert stats["input_documents"] == 10 and stats["kept"] == 5 and stats["removed_odd"] == 5
    assert stats["seen_chars"] == sum(len(f"document {i}") for i in range(10))
    assert result["count"] == 5 and result["shards"] == 3 and result["shards_reused"] == 0


def test_a_finished_shard_is_not_recomputed(tmp_path):
    source = corpus(tmp_path)
    first = run_shard(KeepEvenStep, Cfg(), shard_paths(source)[0], tmp_path / "out")
    output = tmp_path / "out" / "data" / shard_paths(source)[0].name
    stamp = (output.stat().st_mtime_ns, output.stat().st_ino)
    again = run_shard(KeepEvenStep, Cfg(), shard_paths(source)[0], tmp_path / "out")
    assert not first["reused"] and again["reused"]
    assert again["stats"] == first["stats"]
    assert (output.stat().st_mtime_ns, output.stat().st_ino) == stamp
    result = run_sharded(KeepEvenStep, Cfg(), source, tmp_path / "out")
    assert result["shards_reused"] == 1 and result["stats"]["input_documents"] == 10


def test_a_shard_without_marker_is_redone(tmp_path):
    source = corpus(tmp_path)
    run_sharded(KeepEvenStep, Cfg(), source, tmp_path / "out")
    marker_path(tmp_path / "out", shard_paths(source)[1].name).unlink()  # killed before it
    result = run_sharded(KeepEvenStep, Cfg(), source, tmp_path / "out")
    assert result["shards_reused"] == 2 and result["count"] == 5


def test_one_bad_document_goes_to_removed_and_the_shard_goes_on(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    result = run_sharded(FragileStep, Cfg(), corpus(tmp_path, poison=5), tmp_path / "out")
    kept = [r["id"] for r in iter_records(tmp_path / "out" / "data")]
    assert kept == [str(i) for i in range(10) if i != 5]
    assert all(r["text"].startswith("DOCUMENT") for r in iter_records(tmp_path / "out" / "data"))
    [removed] = list(iter_records(tmp_path / "out" / "removed"))
    assert removed["id"] == "5" and removed["reason"] == "fragile_error"
    assert removed["detail"] == "ValueError"
    stats = result["stats"]
    assert stats["removed_fragile_error"] == 1 and stats["errors_ValueError"] == 1
    assert stats["kept"] == 9
    assert "ValueError" in caplog.text and SECRET not in caplog.text  # the class, never the text


def test_stage_input_errors_are_not_swallowed(tmp_path):
    class Refuses(ShardStep):
        name = "refuses"

        def apply(self, records, stats):
            raise StageInputError("refuses", "bad setting")

    with pytest.raises(StageInputError, match="bad setting"):
        run_sharded(Refuses, Cfg(), corpus(tmp_path), tmp_path / "out")


def test_missing_input_and_nothing_kept(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(StageInputError, match="no documents"):
        run_sharded(KeepEvenStep, Cfg(), tmp_path / "empty", tmp_path / "out")

    class DropsAll(ShardStep):
        name = "drops"

        def apply(self, records, stats):
            return [Removed(r, "nope") for r in records]

    with pytest.raises(StageInputError, match="no document kept out of 10"):
        run_sharded(DropsAll, Cfg(), corpus(tmp_path), tmp_path / "out2")
