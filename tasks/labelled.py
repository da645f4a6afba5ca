"""Labelled data for task fine-tuning: loading it, deriving it from the corpus, splitting it.

Classification examples are texts with a label; NER examples are words with BIO tags.
They come from the user, as JSON-lines or Parquet files or a Hugging Face dataset (a hub
name, streamed or downloaded by ``datasets``, or a directory written by
``Dataset.save_to_disk``), with configurable column names; an integer label is read
through the names of the dataset's ``ClassLabel`` feature (or the configured names).
A bad record is reported as ``file:line`` with what is wrong.

When the user brings no labels, one task of each kind is derived from the corpus shards,
built for the pages pydoc writes (the default corpus is the Python standard library's):

- classification: which section of a page a passage comes from (the module's own
  documentation, its classes, functions or data, or a language-reference topic page),
  the ``num_labels`` most common sections, at most ``max_per_label`` passages each, so
  that the held-out documents still hold every label. With ``label_by="document"`` the
  label is the page itself (which module a passage comes from); every page is one
  document, so that split goes by passage instead of by document.
- NER: the names of the functions and classes a page documents (the ``name(`` signature
  lines of its Functions and Classes sections, ``class Name(`` lines, ``def name(``),
  tagged ``B-FUNC``/``B-CLASS`` wherever they occur in a passage of that page (a
  qualified ``module.name`` is one entity over three words); passages that mention none
  are mostly dropped.

Splits keep every example of a group (its document) on one side: held out when the
SHA-256 of the group key, read as a fraction, is below ``val_fraction`` (the tokenizer's
rule, so documents held out of pretraining stay held out here); in k-fold
cross-validation fold ``f`` holds out the groups whose hash is ``f`` mod k.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from tasks.shards import iter_records
from tasks.stage import StageInputError
from tasks.tokenize import is_validation

log = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
BIO_TAG = re.compile(r"^(O|[BI]-\S.*)$")


# ---- config fields shared by the classify and ner sections ------------------------------


def data_path_field(record: str):
    return Field("", description=f"A .jsonl or .parquet file (or a folder of .parquet files) "
                                 f"of records {record}. Empty (and no dataset) = derive the "
                                 "task from the corpus.")


def dataset_field():
    return Field("", description="A Hugging Face dataset instead of data_path: a hub name "
                                 "(read with datasets.load_dataset) or a folder written by "
                                 "Dataset.save_to_disk / DatasetDict.save_to_disk.")


def split_field():
    return Field("train", description="The split of the Hugging Face dataset to read; "
                                      "the held-out examples are cut from it.")


def streaming_field():
    return Field(True, description="Stream a hub dataset (read only the first max_examples "
                                   "rows) instead of downloading it whole.")


def id_column_field():
    return Field("", description="Column grouping examples that must stay on one side of a "
                                 "split (a document id); empty or absent = each example is "
                                 "its own group.")


def max_examples_field(default: int):
    return Field(default, ge=2, description="Read at most this many examples (train and "
                                            "held-out together).")


def val_fraction_field():
    return Field(0.2, gt=0.0, lt=1.0,
                 description="Share of the groups (documents) held out to measure the tuned "
                             "model when folds = 1, chosen by a stable hash of the group key.")


def folds_field():
    return Field(1, ge=1, le=20,
                 description="1 = one held-out split (val_fraction); k >= 2 = k-fold "
                             "cross-validation (fold f holds out the groups whose hash is f "
                             "mod k), reported as the mean and standard deviation over folds.")


# ---- examples ---------------------------------------------------------------------------


def nothing_derived(stage: str, reason: Exception) -> dict:
    """The result of a task stage whose task cannot be derived from this corpus (the user
    gave no labelled data, and the corpus has no labels of the kind the derivation looks
    for): the stage is skipped with a warning, and the pipeline goes on."""
    log.warning("%s: skipped, no task can be derived from the corpus: %s", stage, reason)
    return {"count": 0, "unit": "examples", "stats": {f"{stage}_skipped": 1},
            "artifacts": {}, "skipped_reason": str(reason)}


@dataclass
class TextExample:
    """A text and its label; ``key`` groups examples for splitting, ``where`` names the
    source record in messages."""

    key: str
    text: str
    label: str
    where: str


@dataclass
class TaggedExample:
    """Words and their BIO tags (one per word)."""

    key: str
    tokens: list[str]
    tags: list[str]
    where: str
    extra: dict = field(default_factory=dict)


# ---- reading records --------------------------------------------------------------------


def _class_names(feature: Any) -> list[str] | None:
    """The names of a ClassLabel feature, or of a sequence of ClassLabels; ``feature`` is a
    ``datasets`` feature object or its dict form (Parquet metadata)."""
    if feature is None:
        return None
    if isinstance(feature, dict):
        if isinstance(feature.get("names"), list):
            return [str(n) for n in feature["names"]]
        return _class_names(feature.get("feature"))
    names = getattr(feature, "names", None)
    if isinstance(names, list):
        return [str(n) for n in names]
    return _class_names(getattr(feature, "feature", None))


def _is_hf_saved(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in
                                 ("dataset_info.json", "state.json", "dataset_dict.json"))


def iter_jsonl(stage: str, path: Path) -> Iterator[tuple[str, dict]]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise StageInputError(stage, f"{path}:{number}: not valid JSON ({exc.msg}); "
                                             "each line must be one JSON object") from exc
            if not isinstance(record, dict):
                raise StageInputError(stage, f"{path}:{number}: expected a JSON object (one "
                                             f"per line), got {type(record).__name__}")
            yield f"{path}:{number}", record


def _parquet_files(path: Path) -> list[Path]:
    return sorted(path.rglob("*.parquet")) if path.is_dir() else [path]


def parquet_class_names(files: list[Path]) -> dict[str, list[str]]:
    """ClassLabel names from the ``huggingface`` schema metadata that ``datasets`` writes."""
    import pyarrow.parquet as pq

    if not files:
        return {}
    metadata = pq.read_schema(files[0]).metadata or {}
    try:
        features = json.loads(metadata.get(b"huggingface", b"{}"))["info"]["features"]
    except (KeyError, ValueError, TypeError):
        return {}
    return {name: names for name, feature in features.items()
            if (names := _class_names(feature))}


def iter_parquet(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    for file in _parquet_files(path):
        number = 0
        for batch in pq.ParquetFile(file).iter_batches(batch_size=512):
            for row in batch.to_pylist():
                number += 1
                yield f"{file}:{number}", row


def read_rows(stage: str, data_path: str, dataset: str, split: str, streaming: bool
              ) -> tuple[Iterator[tuple[str, dict]], dict[str, list[str]]]:
    """(where, record) pairs from the configured source, and the ClassLabel names per
    column where the source declares them."""
    if data_path:
        path = Path(data_path).expanduser()
        if not path.exists():
            raise StageInputError(stage, f"{stage}.data_path {path} does not exist; give a "
                                         ".jsonl or .parquet file, or leave it empty to derive "
                                         "the task from the corpus")
        if _is_hf_saved(path):
            return _read_hf(stage, str(path), split, streaming)
        if path.is_file() and path.suffix.lower() in JSONL_SUFFIXES:
            return iter_jsonl(stage, path), {}
        if path.suffix.lower() == ".parquet" or (path.is_dir() and _parquet_files(path)):
            files = _parquet_files(path)
            return iter_parquet(path), parquet_class_names(files)
        raise StageInputError(stage, f"{stage}.data_path {path}: not a .jsonl/.json, a "
                                     ".parquet file, a folder of .parquet files or a saved "
                                     "Hugging Face dataset")
    return _read_hf(stage, dataset, split, streaming)


def _read_hf(stage: str, dataset: str, split: str, streaming: bool
             ) -> tuple[Iterator[tuple[str, dict]], dict[str, list[str]]]:
    import datasets

    local = Path(dataset).expanduser()
    try:
        if _is_hf_saved(local):
            data = datasets.load_from_disk(str(local))
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise StageInputError(stage, f"{local} has no split {split!r}; it has "
                                                 f"{', '.join(data)} ({stage}.split)")
                data = data[split]
        else:
            data = datasets.load_dataset(dataset, split=split, streaming=streaming)
    except StageInputError:
        raise
    except Exception as exc:  # missing dataset, no network, bad split: say which
        raise StageInputError(stage, f"cannot load the Hugging Face dataset {dataset!r} "
                                     f"(split {split!r}): {type(exc).__name__}: {exc}") from exc
    features = getattr(data, "features", None) or {}
    names = {column: found for column, feature in features.items()
             if (found := _class_names(feature))}
    label = f"{dataset}[{split}]"
    return ((f"{label}:{i + 1}", dict(row)) for i, row in enumerate(data)), names


def _column(stage: str, where: str, record: dict, column: str, role: str) -> Any:
    if column not in record or record[column] is None:
        raise StageInputError(stage, f"{where}: no {role} column {column!r} (the record has "
                                     f"{', '.join(sorted(map(str, record))) or 'no columns'}); "
                                     f"set {stage}.{role}_column")
    return record[column]


def _named(stage: str, where: str, value: Any, names: list[str] | None, role: str) -> str:
    """A label as a string: a string as it is, an int through the ClassLabel names."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise StageInputError(stage, f"{where}: {role} {value!r} is neither a string nor an "
                                     "integer class id")
    if isinstance(value, str):
        if not value.strip():
            raise StageInputError(stage, f"{where}: empty {role}")
        return value.strip()
    if not names:
        raise StageInputError(stage, f"{where}: {role} {value} is an integer but the data "
                                     f"declares no class names; set {stage}.label_names")
    if not 0 <= value < len(names):
        raise StageInputError(stage, f"{where}: {role} {value} is outside the "
                                     f"{len(names)} class names")
    return names[value]


def _group(record: dict, id_column: str, where: str) -> str:
    if id_column and record.get(id_column) is not None:
        return str(record[id_column])
    return where


def load_text_examples(stage: str, config) -> list[TextExample]:
    """Classification examples from ``config.data_path`` or ``config.dataset`` (columns
    ``text_column``/``label_column``, at most ``max_examples``)."""
    rows, class_names = read_rows(stage, config.data_path, config.dataset, config.split,
                                  config.streaming)
    names = list(config.label_names) or class_names.get(config.label_column)
    allowed = set(config.labels)
    examples = []
    for where, record in rows:
        text = _column(stage, where, record, config.text_column, "text")
        if not isinstance(text, str) or not text.strip():
            raise StageInputError(stage, f"{where}: the text ({config.text_column!r}) must be "
                                         "a non-empty string")
        label = _named(stage, where, _column(stage, where, record, config.label_column,
                                             "label"), names, "label")
        if allowed and label not in allowed:
            raise StageInputError(stage, f"{where}: unknown label {label!r}; {stage}.labels "
                                         f"allows {', '.join(sorted(allowed))}")
        examples.append(TextExample(_group(record, config.id_column, where), text, label,
                                    where))
        if len(examples) >= config.max_examples:
            break
    return examples


def check_bio(stage: str, where: str, tags: list[str]) -> None:
    """Every tag is O, B-TYPE or I-TYPE (an I- after O or another type starts an entity,
    as seqeval reads it); any other scheme (IOBES's S-/E-, bare types) is an error."""
    for i, tag in enumerate(tags):
        if not BIO_TAG.match(tag):
            raise StageInputError(stage, f"{where}: tag {tag!r} (word {i + 1}) is not BIO: "
                                         "use O, B-<type> and I-<type> (convert IOBES/BILOU "
                                         "tags first)")


def load_tagged_examples(stage: str, config) -> list[TaggedExample]:
    """NER examples from ``config.data_path`` or ``config.dataset`` (columns
    ``tokens_column``: list of words, ``tags_column``: list of BIO tags or class ids)."""
    rows, class_names = read_rows(stage, config.data_path, config.dataset, config.split,
                                  config.streaming)
    names = list(config.label_names) or class_names.get(config.tags_column)
    examples = []
    for where, record in rows:
        words = _column(stage, where, record, config.tokens_column, "tokens")
        tags = _column(stage, where, record, config.tags_column, "tags")
        if not isinstance(words, (list, tuple)) or not words or \
                not all(isinstance(w, str) and w.strip() for w in words):
            raise StageInputError(stage, f"{where}: {config.tokens_column!r} must be a "
                                         "non-empty list of non-empty strings (the words)")
        if not isinstance(tags, (list, tuple)) or len(tags) != len(words):
            count = len(tags) if isinstance(tags, (list, tuple)) else "no list of"
            raise StageInputError(stage, f"{where}: {len(words)} words but {count} tags "
                                         f"({config.tags_column!r}); give one tag per word")
        tags = [_named(stage, where, tag, names, "tag") for tag in tags]
        check_bio(stage, where, tags)
        examples.append(TaggedExample(_group(record, config.id_column, where),
                                      [w.strip() for w in words], tags, where))
        if len(examples) >= config.max_examples:
            break
    return examples


# ---- derived tasks ----------------------------------------------------------------------

PYDOC_HEADINGS = ("Module Reference", "Package Contents", "Modules", "Classes", "Functions",
                  "Data", "Author", "Credits", "Version", "Date", "File")
TOPIC = "Topic"
WORD = re.compile(r"\w+|[^\w\s]")
CLASS_LINE = re.compile(r"^\s*class\s+([A-Za-z_]\w*)\s*[(:]", re.MULTILINE)
DEF_LINE = re.compile(r"^\s*def\s+([A-Za-z_]\w*)\s*\(", re.MULTILINE)
SIGNATURE_LINE = re.compile(r"^([A-Za-z_]\w*)\(", re.MULTILINE)


def stable_hash(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")


def is_topic_page(record: dict) -> bool:
    return "topic?key=" in (record.get("url") or "") or \
        (record.get("title") or "").startswith("Pydoc: TOPIC")


def pydoc_sections(record: dict) -> list[tuple[str, str]]:
    """(heading, text) of a pydoc page's sections (``Topic`` for a whole topic page); the
    header before the first heading (versions, file path) is dropped. A page without
    pydoc's headings gives none."""
    lines = (record.get("text") or "").splitlines()
    if is_topic_page(record):
        # "Python 3.x ...", the platform, "TOPIC", the topic's key, then the text
        start = next((i for i, line in enumerate(lines) if line.strip() == "TOPIC"), None)
        if start is None:
            return []
        rest = lines[start + 1:]
        while rest and not rest[0].strip():
            rest = rest[1:]
        return [(TOPIC, "\n".join(rest[1:]))]
    sections: list[tuple[str, list[str]]] = []
    for line in lines:
        if line.strip() in PYDOC_HEADINGS and line == line.strip():
            sections.append((line.strip(), []))
        elif sections:
            sections[-1][1].append(line)
    return [(name, "\n".join(body)) for name, body in sections if "".join(body).strip()]


def cut_passages(text: str, size: int, by_words: bool = False) -> list[str]:
    """Consecutive passages of about ``size`` characters (or words), cut at line ends; a
    longer line is cut on its own; a short remainder joins the passage before it."""
    passages: list[str] = []
    current: list[str] = []
    length = 0

    def measure(line: str) -> int:
        return len(WORD.findall(line)) if by_words else len(line) + 1

    def pieces(line: str) -> list[str]:
        if measure(line) <= size:
            return [line]
        if by_words:
            words = line.split()
            step = max(1, size // 2)
            return [" ".join(words[i:i + step]) for i in range(0, len(words), step)]
        return [line[i:i + size] for i in range(0, len(line), size)]

    for raw in text.splitlines():
        if not raw.strip():
            continue
        for line in pieces(raw.strip()):
            current.append(line)
            length += measure(line)
            if length >= size:
                passages.append("\n".join(current))
                current, length = [], 0
    if current:
        if passages and length < size // 3:
            passages[-1] += "\n" + "\n".join(current)
        else:
            passages.append("\n".join(current))
    return passages


def page_name(record: dict) -> str:
    """A short name for a page: the module of a pydoc page ("Pydoc: module json" ->
    json), a topic's key, else the title (or URL) cut to 40 characters."""
    title = (record.get("title") or "").strip()
    if title.startswith("Pydoc:") and title.split():
        return title.split()[-1]
    if title:
        return title[:40]
    url = (record.get("url") or "").rstrip("/")
    return (url.rsplit("/", 1)[-1] or url or str(record.get("id")))[:40]


def derived_classification(stage: str, corpus_dir: Path, config,
                           held_out: frozenset[str] | set[str] = frozenset()
                           ) -> list[TextExample]:
    """Passages of ``config.passage_chars`` characters labelled by the pydoc section they
    come from (``config.label_by="section"``) or by their page ("document"), the
    ``num_labels`` most common labels, at most ``max_per_label`` passages each (a stable
    hash picks which), shared out so that every side of the split (``val_fraction`` or
    ``folds``; ``held_out`` keys always held out) gets its share of every label."""
    by_label: dict[str, list[TextExample]] = defaultdict(list)
    label_by = config.label_by
    records = list(iter_records(corpus_dir, columns=None))
    if label_by == "section" and not any(pydoc_sections(r) for r in records):
        log.warning("%s: the corpus has no pydoc sections; labelling passages by their "
                    "document instead (classify.label_by=document)", stage)
        label_by = "document"
    for record in records:
        doc_id, url = str(record.get("id")), record.get("url") or str(record.get("id"))
        parts = pydoc_sections(record) if label_by == "section" else \
            [(page_name(record), record.get("text") or "")]
        index = 0
        for label, text in parts:
            for passage in cut_passages(text, config.passage_chars):
                if len(passage) < config.passage_chars // 3:
                    continue
                # one page per document: the page label must be split by passage
                key = doc_id if label_by == "section" else f"{doc_id}#{index}"
                by_label[label].append(TextExample(key, passage, label,
                                                   f"{url} passage {index}"))
                index += 1
    counts = Counter({label: len(items) for label, items in by_label.items()})
    kept = [label for label, _ in counts.most_common(config.num_labels)]
    if len(kept) < 2:
        raise StageInputError(stage, f"the corpus in {corpus_dir} gives {len(kept)} label(s) "
                                     f"for the derived classification task (label_by="
                                     f"{label_by}); at least 2 are needed. Give labelled data "
                                     f"({stage}.data_path or {stage}.dataset)")
    # balanced on each side of the split, so the held-out set is balanced too
    if config.folds >= 2:
        quotas = {side: -(-config.max_per_label // config.folds) for side in range(config.folds)}
    else:
        held = max(1, round(config.max_per_label * config.val_fraction))
        quotas = {0: max(1, config.max_per_label - held), 1: held}
    examples = []
    for label in kept:
        taken: Counter = Counter()
        for item in sorted(by_label[label], key=lambda e: stable_hash(f"{e.where}|{e.label}")):
            side = group_side(item.key, config.val_fraction, config.folds, held_out)
            if taken[side] < quotas[side]:
                taken[side] += 1
                examples.append(item)
    log.info("%s: derived %d passages in %d labels (%s) from %d documents", stage,
             len(examples), len(kept),
             ", ".join(f"{label} {sum(e.label == label for e in examples)}" for label in kept),
             len(records))
    return examples


def defined_names(record: dict) -> dict[str, str]:
    """name -> FUNC or CLASS for what a page documents: ``name(`` signature lines of a
    pydoc page's Functions and Classes sections, ``class Name(`` and ``def name(`` lines
    anywhere. Dunder names (``__init__``) are left out."""
    text = record.get("text") or ""
    names: dict[str, str] = {}
    for heading, body in pydoc_sections(record):
        if heading in ("Functions", "Classes"):
            for name in SIGNATURE_LINE.findall(body):
                names[name] = "FUNC"
    for name in DEF_LINE.findall(text):
        names[name] = "FUNC"
    for name in CLASS_LINE.findall(text):
        names[name] = "CLASS"
    return {n: kind for n, kind in names.items() if not (n.startswith("__") and n.endswith("__"))}


def tag_words(words: list[str], names: dict[str, str], module: str = "") -> list[str]:
    """BIO tags: B-<kind> on every word that is a defined name; ``module . name`` (the
    page's module qualifying it) is one entity over the three words."""
    tags = ["O"] * len(words)
    for i, word in enumerate(words):
        kind = names.get(word)
        if kind is None:
            continue
        if module and i >= 2 and words[i - 1] == "." and words[i - 2] == module \
                and tags[i - 2] == "O" and (i < 3 or words[i - 3] != "."):
            tags[i - 2:i + 1] = [f"B-{kind}", f"I-{kind}", f"I-{kind}"]
        else:
            tags[i] = f"B-{kind}"
    return tags


def page_body(record: dict) -> str:
    """A pydoc page without its header (versions, platform, file path); other pages whole."""
    text = record.get("text") or ""
    sections = pydoc_sections(record)
    if not sections:
        return text
    return "\n".join(body for _, body in sections)


def derived_ner(stage: str, corpus_dir: Path, config) -> list[TaggedExample]:
    """Passages of about ``config.passage_words`` words from every page that defines
    functions or classes, tagged with those names (see :func:`tag_words`); a passage with
    no entity is kept only with probability ``keep_empty_fraction``; at most
    ``max_passages`` (a stable hash picks which)."""
    examples: list[TaggedExample] = []
    documents = 0
    for record in iter_records(corpus_dir):
        names = defined_names(record)
        if not names:
            continue
        documents += 1
        doc_id, url = str(record.get("id")), record.get("url") or str(record.get("id"))
        module = page_name(record)
        for index, passage in enumerate(cut_passages(page_body(record), config.passage_words,
                                                     by_words=True)):
            words = WORD.findall(passage)[:config.passage_words + config.passage_words // 2]
            tags = tag_words(words, names, module)
            where = f"{url} passage {index}"
            if all(tag == "O" for tag in tags) and \
                    stable_hash(where) / 2**64 >= config.keep_empty_fraction:
                continue
            examples.append(TaggedExample(doc_id, words, tags, where))
    if not any(tag != "O" for e in examples for tag in e.tags):
        raise StageInputError(stage, f"no passage of the corpus in {corpus_dir} mentions a "
                                     "function or class the corpus documents, so no NER task "
                                     f"can be derived; give labelled data ({stage}.data_path "
                                     f"or {stage}.dataset)")
    if len(examples) > config.max_passages:
        examples = sorted(examples, key=lambda e: stable_hash(e.where))[:config.max_passages]
    empty = sum(all(tag == "O" for tag in e.tags) for e in examples)
    entities = sum(tag.startswith("B-") for e in examples for tag in e.tags)
    log.info("%s: derived %d passages (%d without entities) with %d entities from %d "
             "documents that define functions or classes", stage, len(examples), empty,
             entities, documents)
    return examples


# ---- splits -----------------------------------------------------------------------------


def dev_split(train: list, fraction: float) -> tuple[list, list]:
    """(train, development) from the training examples: whole groups (``key``) chosen by a
    hash, at least one on each side; with a single group, single examples by position."""
    keys = sorted({e.key for e in train}, key=lambda k: stable_hash(f"dev:{k}"))
    if len(keys) >= 2:
        chosen = set(keys[:min(len(keys) - 1, max(1, round(len(keys) * fraction)))])
        return [e for e in train if e.key not in chosen], [e for e in train if e.key in chosen]
    cut = min(len(train) - 1, max(1, round(len(train) * fraction)))
    return train[cut:], train[:cut]


def fold_of(key: str, folds: int) -> int:
    return stable_hash(key) % folds


def group_side(key: str, val_fraction: float, folds: int = 1,
               held_out: frozenset[str] | set[str] = frozenset()) -> int:
    """Where a group lands: with k folds the fold that holds it out, else 1 when it is
    held out (``val_fraction`` or ``held_out``) and 0 when it is trained on."""
    if folds >= 2:
        return fold_of(key, folds)
    return int(key in held_out or is_validation(key, val_fraction))


def split_examples(stage: str, examples: list, val_fraction: float, folds: int = 1,
                   held_out: frozenset[str] | set[str] = frozenset()
                   ) -> list[tuple[list, list]]:
    """(train, held-out) lists: one pair by ``val_fraction`` (keys in ``held_out``, the
    documents held out of pretraining, always held out; at least one group on each side),
    or one per fold for k-fold cross-validation. Examples of one key stay together."""
    keys = sorted({e.key for e in examples}, key=stable_hash)
    if folds >= 2:
        if len(keys) < folds:
            raise StageInputError(stage, f"{len(keys)} group(s) of examples cannot make "
                                         f"{folds} folds; give more data or lower "
                                         f"{stage}.folds")
        splits = []
        for fold in range(folds):
            val = [e for e in examples if fold_of(e.key, folds) == fold]
            train = [e for e in examples if fold_of(e.key, folds) != fold]
            if not val or not train:
                raise StageInputError(stage, f"fold {fold} of {folds} holds out "
                                             f"{len(val)} of {len(examples)} examples; with "
                                             f"{len(keys)} groups some fold is empty: lower "
                                             f"{stage}.folds or give more data")
            splits.append((train, val))
        return splits
    if len(keys) < 2:
        raise StageInputError(stage, f"{len(examples)} example(s) in {len(keys)} group(s); at "
                                     "least 2 groups are needed (one to train, one to "
                                     "measure)")
    val_keys = {k for k in keys if group_side(k, val_fraction, 1, held_out)}
    if not val_keys:
        val_keys.add(keys[0])
    if len(val_keys) == len(keys):
        movable = [k for k in keys if k not in held_out] or keys
        val_keys.discard(movable[-1])
    train = [e for e in examples if e.key not in val_keys]
    val = [e for e in examples if e.key in val_keys]
    return [(train, val)]
