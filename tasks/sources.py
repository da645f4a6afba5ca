"""Sources: documents from local files, web archives and Hugging Face datasets, several
named sources in one run, mixed by weight.

* Files (``source.paths``, and more named sets of files in ``source.files``): .txt,
  .jsonl and .parquet documents (taken to be clean text: extract passes them through),
  and WARC/WET archives (``.warc``, ``.warc.gz``, ``.wet``, ``.wet.gz``, see
  ``tasks.warc``: HTML responses go on to extract, WET text skips it). Paths may be
  folders (searched recursively) or globs.
* Hugging Face datasets (``source.datasets``): by hub name or local path, streamed, with
  the text, id and url columns named in config.

The output looks like the crawl stage's, so every later stage treats both alike: shards
with ``id``, ``text``, ``url``, ``source`` (the source's name), ``source_file`` (the file
or dataset a document came from), ``content_type``, and the archive's ``warc_record_id``
and ``fetched_at`` (empty for documents that did not come from an archive).

With a ``weight`` on every source, the sources are mixed in those proportions (by
documents), deterministically: the largest mix the available documents allow, each
source keeping its share (rounded down), chosen by a hash of (seed, source, id); the rest
go to
``removed/`` (reason ``mix``), so nothing is lost.

Files are read one at a time, and .jsonl/.parquet/archive files and datasets streamed;
what is kept per document is 8 bytes of its id's hash (16 when mixing), to reject a
repeated id at the end, because ids given by the input are kept through every stage and
must name one document each.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import itertools
import json
import logging
import re
import shutil
import time
from array import array
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks.progress import progress
from tasks.shards import ShardWriter, iter_records
from tasks.stage import StageInputError
from tasks.warc import SKIPPED as WARC_SKIPPED
from tasks.warc import SUFFIXES as ARCHIVE_SUFFIXES
from tasks.warc import is_archive, read_archive

log = logging.getLogger(__name__)

SUPPORTED = (".txt", ".jsonl", ".parquet", *ARCHIVE_SUFFIXES)
CONTENT_TYPE = "text/plain"
COLUMNS = ("id", "text", "url", "source", "source_file", "content_type", "warc_record_id",
           "fetched_at")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_NAME_RULE = "letters, digits, '_', '.' or '-', starting with a letter or digit"


def _weight_field():
    return Field(None, gt=0, description=(
        "This source's share of the mix (relative to the other sources' weights). Set it on "
        "every source to mix them in those proportions (by documents); unset on all: every "
        "document is kept."))


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"source name {name!r} must be {_NAME_RULE}")
    return name


class FilesSource(BaseModel):
    """A named set of files: documents and archives, as in ``source.paths``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., description=f"The source's name ({_NAME_RULE}), kept in each "
                                       "document's 'source' column.")
    paths: list[str] = Field(..., min_length=1, description="Files, folders or globs.")
    weight: float | None = _weight_field()

    _name = field_validator("name")(_check_name)


class DatasetSource(BaseModel):
    """A Hugging Face dataset: by hub name (needs the network, or the local cache) or by
    local path (a folder of data files, or one written by ``Dataset.save_to_disk``)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., description=f"The source's name ({_NAME_RULE}), kept in each "
                                       "document's 'source' column.")
    dataset: str = Field(..., min_length=1, description="Hub name (e.g. 'HuggingFaceFW/"
                                                        "fineweb') or local path.")
    subset: str | None = Field(None, description="The dataset's configuration (subset) name.")
    split: str = Field("train", description="Split to read.")
    revision: str | None = Field(None, description="Hub revision (a tag or commit) to pin.")
    text_column: str = Field("text", description="Column holding the document text.")
    id_column: str | None = Field(
        "id", description="Column holding a unique document id; empty: '<name>-<row>'.")
    url_column: str | None = Field(None, description="Column holding the document URL, if any.")
    streaming: bool = Field(True, description="Stream the rows instead of downloading and "
                                              "preparing the whole dataset first.")
    max_documents: int = Field(0, ge=0, description="Read at most this many rows; 0: all.")
    weight: float | None = _weight_field()

    _name = field_validator("name")(_check_name)


class CrawlSource(BaseModel):
    """The crawl stage's pages as one more source (``source.include_crawl``)."""

    name: str = "crawl"
    weight: float | None = None


class SourceConfig(BaseModel):
    """Documents to read instead of (or, with a weight on each, mixed with) a crawl."""

    model_config = ConfigDict(extra="forbid")

    paths: list[str] = Field(
        [], description="Files, folders or globs to read (folders are searched recursively; "
                        "hidden files and folders are skipped). .txt: one document per file, "
                        "its id the path relative to the folder. .jsonl: one JSON object per "
                        "line with 'id' and 'text' (and optional 'url'). .parquet: columns id, "
                        "text and optional url. .warc, .warc.gz, .wet, .wet.gz: web archives "
                        "(HTML responses are extracted, WET text is used as it is). Empty "
                        "(and no files or datasets below): crawl instead.")
    name: str = Field("local", description="The name of the source that 'paths' make up.")
    weight: float | None = _weight_field()
    files: list[FilesSource] = Field(
        [], description="More named sources of files (name, paths, weight).")
    datasets: list[DatasetSource] = Field(
        [], description="Hugging Face datasets to read (name, dataset, subset, split, "
                        "text_column, id_column, url_column, streaming, max_documents, weight).")
    shard_size: int = Field(1000, ge=1, description="Documents per output parquet shard.")
    max_record_bytes: int = Field(
        10_000_000, ge=1, description="A web archive record whose payload is larger is skipped "
                                      "(counted as warc_too_large) without being read whole.")
    include_crawl: bool = Field(
        False, description="Also crawl (crawl.seeds, or the embedded Python docs when empty) "
                           "and add its pages as the source named 'crawl', mixed with the "
                           "sources above by crawl_weight.")
    crawl_weight: float | None = Field(
        None, gt=0, description="The crawl's share of the mix (with include_crawl), like the "
                                "other sources' weight.")
    mix_seed: int = Field(0, description="Seed of the hash that picks which documents a "
                                         "weighted mix keeps.")

    _name = field_validator("name")(_check_name)

    @model_validator(mode="after")
    def _sources(self) -> SourceConfig:
        names = [s.name for s in self.sources()]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"source names must be unique; repeated: {repeated}")
        weighted = [s.name for s in self.sources() if s.weight is not None]
        if weighted and len(weighted) != len(names):
            unweighted = [n for n in names if n not in weighted]
            raise ValueError(f"sources {weighted} have a weight and {unweighted} do not; give "
                             "every source a weight to mix them (the crawl's is "
                             "source.crawl_weight), or none")
        return self

    def sources(self) -> list[FilesSource | DatasetSource | CrawlSource]:
        """Every configured source: ``paths`` (as the source ``name``), files, datasets, and
        the crawl (with ``include_crawl``)."""
        found: list = []
        if self.paths:
            found.append(FilesSource(name=self.name, paths=self.paths, weight=self.weight))
        found += list(self.files) + list(self.datasets)
        if self.include_crawl:
            found.append(CrawlSource(weight=self.crawl_weight))
        return found

    @property
    def enabled(self) -> bool:
        return bool(self.paths or self.files or self.datasets)


def _fail(message: str) -> StageInputError:
    return StageInputError("crawl", message)


def _is_supported(path: Path) -> bool:
    return path.name.lower().endswith(SUPPORTED)


def _files(entry: str) -> tuple[list[tuple[Path, str]], int]:
    """(file, id prefix base) pairs to read for one configured path or glob, and how many
    files in a folder were ignored for their extension."""
    if glob.has_magic(entry):
        pattern = Path(entry).expanduser()
        matches = sorted(Path(p) for p in glob.glob(str(pattern), recursive=True))
        files = [p for p in matches if p.is_file() and _is_supported(p)]
        if not files:
            raise _fail(f"the glob {entry!r} matches no {', '.join(SUPPORTED)} file; fix "
                        "source.paths")
        # ids relative to the part of the pattern before its first wildcard, as for a folder
        root = Path(*[part for part in itertools.takewhile(
            lambda part: not glob.has_magic(part), pattern.parts)])
        return ([(f, f.relative_to(root).as_posix()) for f in files],
                len([p for p in matches if p.is_file()]) - len(files))
    path = Path(entry).expanduser()
    if not path.exists():
        raise _fail(f"source path {path} does not exist; fix source.paths")
    if path.is_file():
        if not _is_supported(path):
            raise _fail(f"{path} has unsupported extension {path.suffix!r}; source.paths "
                        f"accepts {', '.join(SUPPORTED)} files or folders of them")
        return [(path, path.name)], 0
    found, ignored = [], 0
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        relative = file.relative_to(path)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if _is_supported(file):
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


def _read(file: Path, txt_id: str, stats: Counter, max_bytes: int) -> Iterator[dict]:
    if is_archive(file):
        return read_archive(file, stats, max_bytes)
    suffix = file.suffix.lower()
    rows = (_read_txt(file, txt_id) if suffix == ".txt" else
            _read_jsonl(file) if suffix == ".jsonl" else _read_parquet(file))
    return ({"id": doc_id, "text": text, "url": url, "content_type": CONTENT_TYPE}
            for doc_id, text, url in rows)


def _file_kind(file: Path) -> str:
    name = file.name.lower()
    for suffix in (".warc.gz", ".wet.gz", ".warc", ".wet"):
        if name.endswith(suffix):
            return suffix.split(".")[1]
    return file.suffix.lower().lstrip(".")


def _read_files(source: FilesSource, stats: Counter, max_bytes: int) -> Iterator[dict]:
    plan: dict[Path, str] = {}  # a file named twice (a folder and a glob) is read once
    for entry in source.paths:
        files, skipped = _files(entry)
        for file, txt_id in files:
            plan.setdefault(file.resolve(), txt_id)
        stats["ignored_files"] += skipped
    stats["input_files"] += len(plan)
    for file, txt_id in plan.items():
        kind = _file_kind(file)
        resolved = str(file)
        for row in _read(file, txt_id, stats, max_bytes):
            stats[f"{kind}_documents"] += 1
            yield {**row, "source_file": resolved}


def _open_dataset(source: DatasetSource):
    import datasets

    path = Path(source.dataset).expanduser()
    if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        loaded = datasets.load_from_disk(str(path))  # written by save_to_disk: memory-mapped
        if isinstance(loaded, datasets.DatasetDict):
            if source.split not in loaded:
                raise _fail(f"source {source.name!r}: {path} has splits {list(loaded)}, not "
                            f"{source.split!r}; set its split")
            loaded = loaded[source.split]
        return loaded.to_iterable_dataset() if source.streaming else loaded
    return datasets.load_dataset(str(path) if path.exists() else source.dataset,
                                 source.subset, split=source.split, revision=source.revision,
                                 streaming=source.streaming)


def _read_dataset(source: DatasetSource, stats: Counter) -> Iterator[dict]:
    try:
        rows = _open_dataset(source)
    except StageInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds for a bad name/path
        raise _fail(f"source {source.name!r}: could not open dataset {source.dataset!r} "
                    f"(split {source.split!r}): {type(exc).__name__}: {exc}") from None
    columns = getattr(rows, "column_names", None) or []
    for wanted in (source.text_column, source.id_column, source.url_column):
        if wanted and columns and wanted not in columns:
            raise _fail(f"source {source.name!r}: dataset {source.dataset!r} has columns "
                        f"{columns}, not {wanted!r}; set text_column/id_column/url_column")
    stats["input_datasets"] += 1
    for index, row in enumerate(rows):
        if source.max_documents and index >= source.max_documents:
            break
        where = f"dataset {source.dataset!r} row {index}"
        if source.text_column not in row:
            raise _fail(f"source {source.name!r}: {where} has no column "
                        f"{source.text_column!r}; set its text_column")
        if source.id_column and source.id_column not in row:
            raise _fail(f"source {source.name!r}: {where} has no column {source.id_column!r}; "
                        "set its id_column (empty: ids made from the row number)")
        doc_id = (_document_id(row.get(source.id_column), where) if source.id_column
                  else f"{source.name}-{index}")
        url = row.get(source.url_column) if source.url_column else None
        stats["dataset_documents"] += 1
        yield {"id": doc_id, "text": _text(row[source.text_column], where),
               "url": _url(url, f"hf://{source.dataset}/{source.split}#{index}", where),
               "content_type": CONTENT_TYPE, "source_file": f"hf://{source.dataset}"}


CRAWL_COLUMNS = ("id", "text", "url", "content_type", "fetched_at", "warc_record_id")


def _read_crawl(crawled: Path, stats: Counter) -> Iterator[dict]:
    """The crawl stage's pages (raw bodies: HTML goes on to extract)."""
    for record in iter_records(crawled):
        stats["crawl_documents"] += 1
        yield {**{k: record.get(k) for k in CRAWL_COLUMNS}, "source_file": record.get("seed")}


def _mix_key(seed: int, source: str, doc_id: str) -> float:
    digest = hashlib.sha256(f"{seed}\0{source}\0{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def mix_counts(counts: dict[str, int], weights: dict[str, float]) -> dict[str, int]:
    """Documents each source keeps in the largest mix in the weights' proportions that the
    available documents allow (the scarcest source, for its weight, keeps all)."""
    total_weight = sum(weights.values())
    shares = {name: weights[name] / total_weight for name in weights}
    size = min(counts[name] / shares[name] for name in shares)  # the mix's total documents
    return {name: min(counts[name], int(shares[name] * size + 1e-9)) for name in shares}


def _mix(config: SourceConfig, everything: Path, out_dir: Path, keys: dict[str, array],
         stats: Counter) -> int:
    """Keep each source's share: its documents with the smallest mix keys; the others go
    to removed/ (reason 'mix')."""
    import numpy as np

    weights = {s.name: s.weight for s in config.sources()}
    wanted = mix_counts({name: len(keys[name]) for name in weights}, weights)
    cutoff = {}
    for name, k in wanted.items():
        values = np.frombuffer(keys[name], dtype=np.float64)
        cutoff[name] = -1.0 if k == 0 else float(np.partition(values, k - 1)[k - 1])
    kept = 0
    with ShardWriter(out_dir / "data", config.shard_size) as writer, \
            ShardWriter(out_dir / "removed", config.shard_size) as removed:
        for record in iter_records(everything):
            name = record["source"]
            if _mix_key(config.mix_seed, name, record["id"]) <= cutoff[name]:
                writer.add(record)
                kept += 1
                stats[f"source.{name}.documents"] += 1
            else:
                removed.add({**record, "reason": "mix"})
                stats["removed_mix"] += 1
    for name in wanted:
        stats.setdefault(f"source.{name}.documents", 0)
    return kept


def _id_hash(doc_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(),
                          "little")


def _check_unique_ids(id_hashes: array, written: Path) -> None:
    """Fail on a repeated id, naming it and where it came from: the ids' 8-byte hashes are
    sorted (not a set of every id), and only a repeated hash sends us back to the shards."""
    import numpy as np

    hashes = np.sort(np.frombuffer(id_hashes, dtype=np.uint64))
    repeated = set(hashes[1:][hashes[1:] == hashes[:-1]].tolist())
    if not repeated:
        return
    seen: dict[str, str] = {}
    for record in iter_records(written, columns=["id", "source", "source_file"]):
        if _id_hash(record["id"]) not in repeated:
            continue
        where = record["source_file"] or record["source"]
        if record["id"] in seen:
            raise _fail(f"duplicate id {record['id']!r} in {seen[record['id']]} and {where}; "
                        "ids must be unique across all sources")
        seen[record["id"]] = where


def ingest_local(config: SourceConfig, out_dir: Path, crawled: Path | None = None) -> dict:
    """Read every configured source into ``out_dir/data`` (columns ``COLUMNS``), keeping
    the given ids; mixed by weight when the sources have weights. ``crawled``: the crawl's
    data folder, the source 'crawl' with ``include_crawl``."""
    if config.include_crawl and crawled is None:
        raise ValueError("source.include_crawl needs the crawl's output (crawled)")
    if not config.enabled:
        raise _fail("source.paths, source.files and source.datasets are empty; give files, "
                    "folders or datasets, or crawl instead")
    started = time.perf_counter()
    out_dir = Path(out_dir)
    for folder in ("all", "data", "removed"):  # a rerun into a partial output starts over
        shutil.rmtree(out_dir / folder, ignore_errors=True)
    sources = config.sources()
    mixing = len(sources) > 1 and all(s.weight is not None for s in sources)
    target = out_dir / ("all" if mixing else "data")
    id_hashes = array("Q")  # 8 bytes a document, for the duplicate-id check at the end
    stats: Counter = Counter()
    counts: Counter = Counter()
    keys: dict[str, array] = {s.name: array("d") for s in sources}  # mix keys, when mixing
    empty = 0
    bar = progress(desc="ingest", unit="doc")
    with ShardWriter(target, config.shard_size) as writer:
        for source in sources:
            rows = (_read_dataset(source, stats) if isinstance(source, DatasetSource) else
                    _read_crawl(crawled, stats) if isinstance(source, CrawlSource) else
                    _read_files(source, stats, config.max_record_bytes))
            for row in rows:
                doc_id = row["id"]
                id_hashes.append(_id_hash(doc_id))
                record = {column: row.get(column) or "" for column in COLUMNS}
                record["source"] = source.name
                writer.add(record)
                counts[source.name] += 1
                if mixing:
                    keys[source.name].append(_mix_key(config.mix_seed, source.name, doc_id))
                empty += not row["text"].strip()
                bar.update(1)
    bar.close()
    read = len(id_hashes)
    if read == 0:
        skipped = ", ".join(f"{k}: {stats[k]}" for k in WARC_SKIPPED if stats[k])
        raise _fail(f"no documents in {[s.name for s in sources]} (the files hold no lines, "
                    f"rows or text records{'; skipped ' + skipped if skipped else ''}); check "
                    "the sources")
    _check_unique_ids(id_hashes, target)
    for source in sources:
        stats[f"source.{source.name}.read"] = counts[source.name]
    count = read
    if mixing:
        empty_sources = [s.name for s in sources if not counts[s.name]]
        if empty_sources:
            raise _fail(f"source(s) {empty_sources} have no documents, so a mix in the "
                        "weights' proportions would keep nothing; fix those sources or drop "
                        "them (or their weights)")
        count = _mix(config, target, out_dir, keys, stats)
        shutil.rmtree(target)
        if count < read / 10:
            log.warning("crawl: the weighted mix keeps %d of %d documents read (%s); the "
                        "scarcest source for its weight limits the mix", count, read,
                        ", ".join(f"{n}: {stats[f'source.{n}.documents']}/{counts[n]}"
                                  for n in counts))
    else:
        for source in sources:
            stats[f"source.{source.name}.documents"] = counts[source.name]
    seconds = time.perf_counter() - started
    log.info("crawl: read %d documents from %d sources (%s) in %.1fs; %d empty%s",
             read, len(sources), ", ".join(f"{n}: {c}" for n, c in counts.items()),
             seconds, empty, f"; mixed by weight to {count}" if mixing else "")
    if stats["undecodable_documents"]:
        log.info("crawl: %d documents had bytes no charset could decode (replaced by U+FFFD)",
                 stats["undecodable_documents"])
    stats.update({"documents": count, "empty_documents": empty})
    for kind in ("txt", "jsonl", "parquet", "warc", "wet"):
        stats.setdefault(f"{kind}_documents", 0)
    stats.setdefault("ignored_files", 0)
    stats.setdefault("input_files", 0)
    return {"count": count, "stats": dict(stats)}
