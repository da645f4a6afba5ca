"""Local sources: .txt/.jsonl/.parquet files become shards with the ids the user gave."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.shards import count_records, iter_records, shard_paths
from tasks.sources import SourceConfig, ingest_local
from tasks.stage import StageInputError


def ingest(tmp_path, *paths, shard_size=1000):
    result = ingest_local(SourceConfig(paths=[str(p) for p in paths], shard_size=shard_size),
                          tmp_path / "out")
    return result, {r["id"]: r for r in iter_records(tmp_path / "out" / "data")}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_txt_folder_is_read_recursively_with_relative_ids(tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.txt").write_text("alpha text")
    (docs / "sub" / "b.txt").write_text("beta text")
    (docs / "notes.md").write_text("ignored: not a supported extension")
    (docs / ".hidden").mkdir()
    (docs / ".hidden" / "c.txt").write_text("hidden folders are skipped")

    result, docs_by_id = ingest(tmp_path, docs)

    assert result["count"] == 2
    assert set(docs_by_id) == {"a.txt", "sub/b.txt"}
    beta = docs_by_id["sub/b.txt"]
    assert beta["text"] == "beta text"
    assert beta["url"] == (docs / "sub" / "b.txt").resolve().as_uri()
    assert beta["source_file"] == str((docs / "sub" / "b.txt").resolve())
    assert beta["source"] == "local"  # the source's name (source.name)
    assert beta["warc_record_id"] == "" and beta["fetched_at"] == ""
    assert beta["content_type"] == "text/plain"
    assert result["stats"]["ignored_files"] == 1 and result["stats"]["txt_documents"] == 2


def test_a_single_txt_file_gets_its_name_as_id(tmp_path):
    path = tmp_path / "story.txt"
    path.write_text("\ufeffonce upon a time")  # a BOM is not part of the text
    _, docs = ingest(tmp_path, path)
    assert docs["story.txt"]["text"] == "once upon a time"


def test_jsonl_keeps_given_ids_and_fills_missing_urls(tmp_path):
    path = write_jsonl(tmp_path / "corpus.jsonl", [
        {"id": "doc-1", "text": "first", "url": "https://example.org/1", "lang": "en"},
        "",
        {"id": 7, "text": "second"},
    ])
    result, docs = ingest(tmp_path, path)
    assert result["count"] == 2 and set(docs) == {"doc-1", "7"}
    assert docs["doc-1"]["url"] == "https://example.org/1"
    assert docs["7"]["url"] == path.resolve().as_uri() + "#L3"
    assert "lang" not in docs["doc-1"]


def test_parquet_with_and_without_url_column(tmp_path):
    pq.write_table(pa.table({"id": ["p1", "p2"], "text": ["one", "two"],
                             "url": ["https://a.example/1", None]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"id": [10], "text": ["ten"], "extra": [1.5]}),
                   tmp_path / "b.parquet")
    result, docs = ingest(tmp_path, tmp_path / "a.parquet", tmp_path / "b.parquet")
    assert set(docs) == {"p1", "p2", "10"}
    assert docs["p1"]["url"] == "https://a.example/1"
    assert docs["p2"]["url"].endswith("a.parquet#row=1")
    assert docs["10"]["text"] == "ten" and "extra" not in docs["10"]
    assert result["stats"]["parquet_documents"] == 3


def test_output_is_sharded_by_shard_size(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"id": f"d{i}", "text": "x"} for i in range(25)])
    result, _ = ingest(tmp_path, path, shard_size=10)
    assert result["count"] == 25
    assert len(shard_paths(tmp_path / "out" / "data")) == 3
    assert count_records(tmp_path / "out" / "data") == 25


@pytest.mark.parametrize("make, expected", [
    (lambda d: d / "missing", "missing does not exist"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "has no .txt, .jsonl, .parquet, .warc"),
    (lambda d: (d / "table.csv").write_text("a,b") and d / "table.csv", "unsupported extension"),
    (lambda d: write_jsonl(d / "bad.jsonl", [{"id": 1, "text": "ok"}, "{not json"]),
     "bad.jsonl:2 is not valid JSON"),
    (lambda d: write_jsonl(d / "notext.jsonl", [{"id": "x", "body": "no text"}]),
     "notext.jsonl:1 lacks 'id' or 'text'"),
    (lambda d: write_jsonl(d / "noid.jsonl", [{"text": "no id"}]), "noid.jsonl:1 lacks"),
    (lambda d: write_jsonl(d / "blank.jsonl", ["", "  "]), "no documents"),
])
def test_unusable_input_is_named_in_the_error(tmp_path, make, expected):
    path = make(tmp_path)
    with pytest.raises(StageInputError, match="crawl: ") as error:
        ingest(tmp_path, path)
    assert expected in str(error.value)


def test_duplicate_ids_across_files_name_the_id_and_both_files(tmp_path):
    first = write_jsonl(tmp_path / "first.jsonl", [{"id": "same", "text": "a"}])
    second = write_jsonl(tmp_path / "second.jsonl", [{"id": "same", "text": "b"}])
    with pytest.raises(StageInputError) as error:
        ingest(tmp_path, first, second)
    message = str(error.value)
    assert "'same'" in message and "first.jsonl" in message and "second.jsonl" in message


def test_non_utf8_jsonl_names_the_file_line_and_byte(tmp_path):
    path = tmp_path / "latin1.jsonl"
    rows = [{"id": "a", "text": "plain"}, {"id": "b", "text": "ascii"},
            {"id": "c", "text": "café au lait"}]
    path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
                     .encode("latin-1"))
    with pytest.raises(StageInputError, match="crawl: ") as error:
        ingest(tmp_path, path)
    message = str(error.value)
    offset = path.read_bytes().index("é".encode("latin-1"))
    assert f"{path}:3 is not UTF-8" in message
    assert f"byte {offset} of the file" in message
    assert "convert" in message and "UTF-8" in message
    assert not (tmp_path / "out" / "data").exists() or not shard_paths(tmp_path / "out" / "data")


def test_jsonl_with_bom_and_crlf_line_endings_is_read(tmp_path):
    path = tmp_path / "windows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"id": "w1", "text": "caf\xc3\xa9"}\r\n\r\n'
                     + b'{"id": "w2", "text": "two"}\r\n')
    result, docs = ingest(tmp_path, path)
    assert result["count"] == 2 and docs["w1"]["text"] == "café"
    assert docs["w2"]["url"] == path.resolve().as_uri() + "#L3"
