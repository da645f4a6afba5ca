"""Local sources: documents from .txt, .jsonl and .parquet files instead of a crawl.

The output looks like the crawl stage's, so every later stage treats both alike: shards
with ``id``, ``text``, ``url`` plus ``source`` (the file a document came from) and
``content_type`` (always text/plain: local documents are taken to be clean text, and
the extract stage passes them through).

Files are read one at a time and .jsonl/.parquet files streamed, so memory does not grow
with the corpus; only the ids are remembered, to reject duplicates, because ids given by
the input are kept through every stage and must name one document each.
"""

from __future__ import annotations

import codecs
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from tasks.progress import progress
from tasks.shards import ShardWriter
from tasks.stage import StageInputError

log = logging.getLogger(__name__)

SUPPORTED = (".txt", ".jsonl", ".parquet")
CONTENT_TYPE = "text/plain"


class SourceConfig(BaseModel):
    """Local documents to read instead of crawling."""

    model_config = ConfigDict(extra="forbid")

    paths: list[str] = Field(
        [], description="Files or folders to read (folders are searched recursively; hidden "
                        "files and folders are skipped). .txt: one document per file, its id "
                        "the path relative to the folder. .jsonl: one JSON object per line with "
                        "'id' and 'text' (and optional 'url'). .parquet: columns id, text and "
                        "optional url. Empty: crawl instead.")
    shard_size: int = Field(1000, ge=1, description="Documents per output parquet shard.")


def _fail(message: str) -> StageInputError:
    return StageInputError("crawl", message)


def _files(path: Path) -> tuple[list[tuple[Path, str]], int]:
    """(file, id prefix base) pairs to read for one configured path, and how many files in
    a folder were ignored for their extension."""
    if not path.exists():
        raise _fail(f"source path {path} does not exist; fix source.paths")
    if path.is_file():
        if path.suffix.lower() not in SUPPORTED:
            raise _fail(f"{path} has unsupported extension {path.suffix!r}; source.paths "
                        f"accepts {', '.join(SUPPORTED)} files or folders of them")
        return [(path, path.name)], 0
    found, ignored = [], 0
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        relative = file.relative_to(path)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if file.suffix.lower() in SUPPORTED:
            found.append((file, relative.as_posix()))
        else:
            ignored += 1
    if not found:
        raise _fail(f"folder {path} has no {', '.join(SUPPORTED)} files; put documents in "
                    "it or point source.paths elsewhere")
    return found, ignored


def _document_id(value: object, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise _fail(f"{where}: 'id' must be a non-empty string or an integer, got {value!r}")
    return str(value)


def _text(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise _fail(f"{where}: 'text' must be a string, got {type(value).__name__}")
    return value


def _url(value: object, fallback: str, where: str) -> str:
    """The given url, else a file URI pointing at the line or row, so every document has
    a string url (a column that is null in some shards breaks readers of the dataset)."""
    if value is None or value == "":
        return fallback
    if not isinstance(value, str):
        raise _fail(f"{where}: 'url' must be a string, got {type(value).__name__}")
    return value


def _read_txt(file: Path, doc_id: str) -> Iterator[tuple[str, str, str]]:
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _fail(f"{file} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                    "convert it, e.g. with iconv -t UTF-8") from None
    yield doc_id, text, file.resolve().as_uri()


def _read_jsonl(file: Path) -> Iterator[tuple[str, str, str]]:
    """One document per line. Read as bytes and decoded line by line, so that text that is
    not UTF-8 is reported with its exact line (a text-mode reader fails a whole buffer)."""
    uri = file.resolve().as_uri()
    offset = 0  # of the current line's first byte in the file
    with open(file, "rb") as lines:
        for number, raw in enumerate(lines, 1):
            start, offset = offset, offset + len(raw)
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw, start = raw[len(codecs.BOM_UTF8):], start + len(codecs.BOM_UTF8)
            where = f"{file}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _fail(f"{where} is not UTF-8 text ({exc.reason} at byte "
                            f"{start + exc.start} of the file); convert the file to UTF-8, "
                            "e.g. with iconv -f LATIN1 -t UTF-8 if it is Latin-1") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise _fail(f"{where} is not valid JSON ({exc.msg}); each line must be one "
                            "JSON object with 'id' and 'text'") from None
            if not isinstance(row, dict) or "id" not in row or "text" not in row:
                raise _fail(f"{where} lacks 'id' or 'text'; each line must be one JSON "
                            "object with 'id' and 'text'")
            yield (_document_id(row["id"], where), _text(row["text"], where),
                   _url(row.get("url"), f"{uri}#L{number}", where))


def _read_parquet(file: Path) -> Iterator[tuple[str, str, str]]:
    try:
        parquet = pq.ParquetFile(file)
    except (pa.ArrowException, OSError) as exc:
        raise _fail(f"{file} is not a readable parquet file ({exc})") from None
    names = parquet.schema_arrow.names
    if "id" not in names or "text" not in names:
        raise _fail(f"{file} has columns {names}; it needs 'id' and 'text' (and optionally "
                    "'url')")
    columns = ["id", "text"] + (["url"] if "url" in names else [])
    uri, row_number = file.resolve().as_uri(), 0
    for batch in parquet.iter_batches(batch_size=1024, columns=columns):
        for row in batch.to_pylist():
            where = f"{file} row {row_number}"
            yield (_document_id(row["id"], where), _text(row["text"], where),
                   _url(row.get("url"), f"{uri}#row={row_number}", where))
            row_number += 1


def _read(file: Path, txt_id: str) -> Iterator[tuple[str, str, str]]:
    suffix = file.suffix.lower()
    if suffix == ".txt":
        return _read_txt(file, txt_id)
    if suffix == ".jsonl":
        return _read_jsonl(file)
    return _read_parquet(file)


def ingest_local(config: SourceConfig, out_dir: Path) -> dict:
    """Read ``config.paths`` into ``out_dir/data`` (columns id, text, url, source,
    content_type), keeping the given ids; see ``SourceConfig.paths`` for the formats."""
    if not config.paths:
        raise _fail("source.paths is empty; give files or folders, or crawl instead")
    started = time.perf_counter()
    plan, ignored = [], 0
    for entry in config.paths:
        files, skipped = _files(Path(entry).expanduser())
        plan += files
        ignored += skipped
    origin: dict[str, Path] = {}
    per_type: Counter[str] = Counter()
    empty = 0
    bar = progress(desc="ingest", unit="doc")
    with ShardWriter(Path(out_dir) / "data", config.shard_size) as writer:
        for file, txt_id in plan:
            source = str(file.resolve())
            for doc_id, text, url in _read(file, txt_id):
                if doc_id in origin:
                    raise _fail(f"duplicate id {doc_id!r} in {origin[doc_id]} and {file}; "
                                "ids must be unique across all source.paths")
                origin[doc_id] = file
                writer.add({"id": doc_id, "text": text, "url": url, "source": source,
                            "content_type": CONTENT_TYPE})
                per_type[file.suffix.lower().lstrip(".")] += 1
                empty += not text.strip()
                bar.update(1)
    bar.close()
    count = len(origin)
    if count == 0:
        raise _fail(f"no documents in {config.paths} (the files hold no lines or rows); "
                    "check source.paths")
    seconds = time.perf_counter() - started
    log.info("crawl: read %d documents from %d files in %.1fs (%s); %d empty, %d files "
             "ignored for their extension", count, len(plan), seconds,
             ", ".join(f"{kind}: {n}" for kind, n in sorted(per_type.items())), empty, ignored)
    stats = {"input_files": len(plan), "documents": count, "empty_documents": empty,
             "ignored_files": ignored}
    stats.update({f"{kind}_documents": per_type[kind] for kind in ("txt", "jsonl", "parquet")})
    return {"count": count, "stats": stats}
