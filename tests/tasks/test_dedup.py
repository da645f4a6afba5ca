"""Dedup stage: exact and MinHash near-duplicates with real datasketch."""

from __future__ import annotations

import random

import datasets
import pytest
from pydantic import ValidationError

from tasks.dedup import DedupConfig, deduplicate
from tasks.shards import iter_records, write_records
from tasks.stage import StageInputError

VOCABULARY = [f"w{i}" for i in range(5000)]


def random_text(seed: int, words: int = 200) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(VOCABULARY) for _ in range(words))


def one_word_changed(text: str, position: int = 100) -> str:
    words = text.split()
    words[position] = "changed"
    return " ".join(words)


def run(tmp_path, texts: dict[str, str], shard_size: int = 2, **config):
    records = [{"id": doc_id, "url": f"http://h/{doc_id}", "text": text, "source": "test"}
               for doc_id, text in texts.items()]
    write_records(records, tmp_path / "in", shard_size=shard_size)
    result = deduplicate(DedupConfig(**config), tmp_path / "in", tmp_path / "out")
    kept = [r["id"] for r in iter_records(tmp_path / "out" / "data")]
    removed = {r["id"]: r for r in iter_records(tmp_path / "out" / "removed")}
    return result, kept, removed


def test_exact_duplicates_differing_in_case_whitespace_and_punctuation(tmp_path):
    base = random_text(1)
    variant = "  " + base.upper().replace(" ", "\n\t ", 10) + " !!"
    result, kept, removed = run(tmp_path, {"a": base, "b": random_text(2), "c": variant})
    assert kept == ["a", "b"]
    assert removed["c"]["reason"] == "exact_duplicate"
    assert removed["c"]["duplicate_of"] == "a" and removed["c"]["similarity"] == 1.0
    stats = result["stats"]
    assert {k: stats[k] for k in ("input_documents", "kept", "removed_exact_duplicate",
                                  "removed_near_duplicate", "duplicate_clusters")} == {
        "input_documents": 3, "kept": 2, "removed_exact_duplicate": 1,
        "removed_near_duplicate": 0, "duplicate_clusters": 1}


def test_near_duplicate_points_at_the_first_copy(tmp_path):
    base = random_text(1)
    texts = {"first": base, "other": random_text(2), "edited": one_word_changed(base),
             "edited-again": one_word_changed(base, 50)}
    result, kept, removed = run(tmp_path, texts)
    assert kept == ["first", "other"]
    for doc_id in ("edited", "edited-again"):
        assert removed[doc_id]["reason"] == "near_duplicate"
        assert removed[doc_id]["duplicate_of"] == "first"
        assert 0.8 <= removed[doc_id]["similarity"] < 1.0
    assert removed["edited"]["source"] == "test" and removed["edited"]["url"] == "http://h/edited"
    assert result["count"] == 2 and result["stats"]["removed_near_duplicate"] == 2


def test_distinct_documents_are_all_kept_with_their_ids(tmp_path):
    texts = {f"doc-{i:03d}": random_text(i) for i in range(30)}
    result, kept, removed = run(tmp_path, texts, shard_size=7)
    assert kept == sorted(texts) and removed == {} and result["count"] == 30
    ds = datasets.load_dataset("parquet", data_dir=str(tmp_path / "out" / "data"),
                               split="train")
    assert ds["id"] == sorted(texts) and ds["text"] == [texts[i] for i in sorted(texts)]


def test_loosely_similar_documents_are_kept(tmp_path):
    base = random_text(1).split()
    half_rewritten = " ".join(base[:100] + random_text(9).split()[:100])  # Jaccard ~ 0.3
    _, kept, _ = run(tmp_path, {"a": " ".join(base), "b": half_rewritten})
    assert kept == ["a", "b"]


def test_exact_copy_of_a_near_duplicate_names_the_kept_document(tmp_path):
    base = random_text(1)
    edited = one_word_changed(base)
    _, kept, removed = run(tmp_path, {"a": base, "b": edited, "c": edited.upper()})
    assert kept == ["a"]
    assert removed["b"]["reason"] == "near_duplicate"
    assert removed["c"]["reason"] == "exact_duplicate" and removed["c"]["duplicate_of"] == "a"


def test_disabling_exact_leaves_copies_to_the_near_pass(tmp_path):
    base = random_text(1)
    result, kept, removed = run(tmp_path, {"a": base, "b": base.upper()}, exact=False)
    assert kept == ["a"] and removed["b"]["reason"] == "near_duplicate"
    assert result["stats"]["removed_exact_duplicate"] == 0


def test_disabling_near_keeps_edited_copies(tmp_path):
    base = random_text(1)
    result, kept, removed = run(tmp_path, {"a": base, "b": one_word_changed(base), "c": base},
                                near=False)
    assert kept == ["a", "b"] and removed["c"]["reason"] == "exact_duplicate"
    assert result["stats"]["removed_near_duplicate"] == 0


def test_disabling_both_keeps_everything(tmp_path):
    base = random_text(1)
    _, kept, _ = run(tmp_path, {"a": base, "b": base}, exact=False, near=False)
    assert kept == ["a", "b"]


def test_short_and_empty_documents(tmp_path):
    _, kept, removed = run(tmp_path, {"a": "hello world", "b": "Hello, world!", "c": "",
                                      "d": "", "e": "something else"})
    assert kept == ["a", "c", "e"]
    assert removed["b"]["duplicate_of"] == "a" and removed["d"]["duplicate_of"] == "c"


def test_same_result_on_a_rerun(tmp_path):
    texts = {"a": random_text(1), "b": one_word_changed(random_text(1)), "c": random_text(3)}
    first = run(tmp_path / "1", texts)[:2]
    second = run(tmp_path / "2", texts)[:2]
    assert first == second


def test_config_validation_and_empty_input(tmp_path):
    with pytest.raises(ValidationError):
        DedupConfig(threshold=1.0)
    with pytest.raises(ValidationError):
        DedupConfig(nearr=True)
    assert all(f.description for f in DedupConfig.model_fields.values())
    (tmp_path / "in").mkdir()
    with pytest.raises(StageInputError, match="no shard"):
        deduplicate(DedupConfig(), tmp_path / "in", tmp_path / "out")
