"""Labelled data: files, Parquet and Hugging Face datasets load with their label names, bad
records are reported by file:line, the derived tasks come out of a pydoc-like corpus, and
splits keep a document's examples on one side."""

import json
import subprocess
import sys
from collections import Counter
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.classify import ClassifyConfig
from tasks.labelled import (
    WORD,
    check_bio,
    cut_passages,
    defined_names,
    derived_classification,
    derived_ner,
    load_tagged_examples,
    load_text_examples,
    pydoc_sections,
    split_examples,
    tag_words,
)
from tasks.ner import NerConfig
from tasks.shards import write_records
from tasks.stage import StageInputError


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def page(name: str, classes: list[str], functions: list[str]) -> dict:
    """A page shaped like pydoc's text output."""
    class_part = "\n".join(
        f"class {c}(builtins.object)\n{c}(value)\nA {c} holds a value for {name}.\n"
        f"Methods defined here:\n__init__(self, value)\nInitialize self.\n"
        f"update_{c.lower()}(self, other)\nMerge another {c} into this one.\n" for c in classes)
    function_part = "\n".join(
        f"{f}(path, mode='r')\nOpen the {name} resource at path and return a {classes[0]}.\n"
        f"See also {name}.{f} and {classes[0]}.\n" for f in functions)
    text = (f"Python 3.11.7 [main]\nLinux-6\n\n{name}\nindex\n/usr/lib/{name}.py\n"
            f"Module Reference\nThe {name} module reads and writes {name} files. Use "
            f"{functions[0]}() to start; it returns a {classes[0]} object.\n"
            f"Classes\n{class_part}\nFunctions\n{function_part}\nData\n"
            f"DEFAULT_MODE = 'r'\n__all__ = {functions!r}\n")
    return {"id": f"id-{name}", "url": f"http://pydoc.localhost/{name}.html",
            "title": f"Pydoc: module {name}", "text": text}


def topic(key: str) -> dict:
    body = (f"The {key.lower()} statement is described in the language reference. It "
            "evaluates an expression and then binds the result to the target list.\n")
    text = f"Python 3.11.7 [main]\nLinux-6\n\nTOPIC\n\n{key}\n" + body * 3
    return {"id": f"topic-{key}", "url": f"http://pydoc.localhost/topic?key={key}",
            "title": f"Pydoc: TOPIC {key}", "text": text}


def small_corpus(tmp_path):
    records = [page(f"mod{i}", [f"Reader{i}", f"Writer{i}"], [f"open_{i}", f"load_{i}"])
               for i in range(12)] + [topic(k) for k in ("ASSERT", "IMPORT", "LOOPING")]
    write_records(records, tmp_path / "corpus")
    return tmp_path / "corpus"


# ---- files ------------------------------------------------------------------------------


def test_jsonl_with_custom_columns_and_integer_labels(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [
        {"body": "good film", "y": 1, "doc": "a"}, {"body": "bad film", "y": 0, "doc": "a"},
        {"body": "fine", "y": "pos", "doc": "b"}])
    config = ClassifyConfig(data_path=str(path), text_column="body", label_column="y",
                            id_column="doc", label_names=["neg", "pos"])
    examples = load_text_examples("classify", config)
    assert [(e.text, e.label, e.key) for e in examples] == [
        ("good film", "pos", "a"), ("bad film", "neg", "a"), ("fine", "pos", "b")]
    assert examples[1].where == f"{path}:2"


@pytest.mark.parametrize("lines, settings, message", [
    (['{"text": "a", "label": "x"}', '{"text": "b", "label": '], {},
     r"data.jsonl:2: not valid JSON"),
    (['{"text": "a", "label": "x"}', '', '{"text": "b"}'], {},
     r"data.jsonl:3: no label column 'label'"),
    (['{"text": "a", "label": "x"}', '{"text": "b", "label": "z"}'], {"labels": ["x", "y"]},
     r"data.jsonl:2: unknown label 'z'"),
    (['{"text": "a", "label": 3}'], {},
     r"data.jsonl:1: label 3 is an integer but the data declares no class names"),
    (['{"text": "a", "label": 3}'], {"label_names": ["x", "y"]},
     r"data.jsonl:1: label 3 is outside the 2 class names"),
    (['{"text": "", "label": "x"}'], {}, r"data.jsonl:1: the text \('text'\) must be"),
    (['[1, 2]'], {}, r"data.jsonl:1: expected a JSON object"),
])
def test_bad_classification_records_name_file_and_line(tmp_path, lines, settings, message):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(StageInputError, match=message):
        load_text_examples("classify", ClassifyConfig(data_path=str(path), **settings))


def test_missing_and_unknown_files_are_input_errors(tmp_path):
    with pytest.raises(StageInputError, match="does not exist"):
        load_text_examples("classify", ClassifyConfig(data_path=str(tmp_path / "no.jsonl")))
    (tmp_path / "data.csv").write_text("text,label\n")
    with pytest.raises(StageInputError, match="not a .jsonl"):
        load_text_examples("classify", ClassifyConfig(data_path=str(tmp_path / "data.csv")))


def test_parquet_rows_are_numbered_in_messages(tmp_path):
    table = pa.table({"text": ["a", "b", "c"], "label": ["x", "y", None]})
    pq.write_table(table, tmp_path / "data.parquet")
    config = ClassifyConfig(data_path=str(tmp_path / "data.parquet"), max_examples=2)
    assert [e.label for e in load_text_examples("classify", config)] == ["x", "y"]
    with pytest.raises(StageInputError, match=r"data.parquet:3: no label column"):
        load_text_examples("classify", ClassifyConfig(data_path=str(tmp_path / "data.parquet")))


def test_hugging_face_datasets_with_class_labels_load(tmp_path):
    import datasets

    features = datasets.Features({
        "sentence": datasets.Value("string"),
        "label": datasets.ClassLabel(names=["negative", "positive"]),
        "words": datasets.Sequence(datasets.Value("string")),
        "ner_tags": datasets.Sequence(datasets.ClassLabel(names=["O", "B-PER", "I-PER"]))})
    data = datasets.Dataset.from_dict(
        {"sentence": ["I liked it", "dull"], "label": [1, 0],
         "words": [["Ann", "Lee", "came"], ["Bob", "left"]], "ner_tags": [[1, 2, 0], [1, 0]]},
        features=features)
    datasets.DatasetDict({"train": data, "test": data}).save_to_disk(tmp_path / "dict")
    data.save_to_disk(tmp_path / "single")
    data.to_parquet(tmp_path / "data.parquet")

    for source in ({"dataset": str(tmp_path / "dict"), "split": "test"},
                   {"dataset": str(tmp_path / "single")},
                   {"data_path": str(tmp_path / "data.parquet")}):
        texts = load_text_examples("classify", ClassifyConfig(text_column="sentence", **source))
        assert [(e.text, e.label) for e in texts] == [("I liked it", "positive"),
                                                      ("dull", "negative")]
        tagged = load_tagged_examples("ner", NerConfig(tokens_column="words",
                                                       tags_column="ner_tags", **source))
        assert tagged[0].tokens == ["Ann", "Lee", "came"]
        assert tagged[0].tags == ["B-PER", "I-PER", "O"] and tagged[1].tags == ["B-PER", "O"]
    with pytest.raises(StageInputError, match="has no split 'validation'"):
        load_text_examples("classify", ClassifyConfig(dataset=str(tmp_path / "dict"),
                                                      split="validation"))


def test_bio_tags_are_checked_with_file_and_line(tmp_path):
    check_bio("ner", "x", ["O", "I-PER", "I-PER", "B-LOC"])  # I- after O: seqeval's reading
    path = write_jsonl(tmp_path / "tags.jsonl", [
        {"tokens": ["Ann", "came"], "tags": ["B-PER", "O"]},
        {"tokens": ["Bob", "left"], "tags": ["S-PER", "O"]}])
    with pytest.raises(StageInputError, match=r"tags.jsonl:2: tag 'S-PER' \(word 1\) is not BIO"):
        load_tagged_examples("ner", NerConfig(data_path=str(path)))
    path = write_jsonl(tmp_path / "short.jsonl", [{"tokens": ["Ann", "came"], "tags": ["O"]}])
    with pytest.raises(StageInputError, match=r"short.jsonl:1: 2 words but 1 tags"):
        load_tagged_examples("ner", NerConfig(data_path=str(path)))


# ---- derived tasks ----------------------------------------------------------------------


def test_pydoc_pages_split_into_sections():
    sections = dict(pydoc_sections(page("csv", ["Dialect"], ["reader"])))
    assert set(sections) == {"Module Reference", "Classes", "Functions", "Data"}
    assert "Linux" not in "".join(sections.values())  # the header is dropped
    assert "class Dialect(" in sections["Classes"] and "reader(path" in sections["Functions"]
    assert pydoc_sections(topic("LISTS"))[0][0] == "Topic"
    assert pydoc_sections({"text": "plain prose\nwithout headings", "url": "http://x"}) == []


def test_passages_are_cut_at_line_ends():
    text = "\n".join(f"line number {i} of the text" for i in range(40))
    passages = cut_passages(text, 100)
    assert all(len(p) >= 100 or p is passages[-1] for p in passages)
    assert all(line.startswith("line number") for p in passages for line in p.split("\n"))
    assert "\n".join(passages) == text


def test_derived_classification_labels_sections_balanced_by_document(tmp_path):
    corpus = small_corpus(tmp_path)
    config = ClassifyConfig(passage_chars=80, num_labels=4, max_per_label=20, val_fraction=0.3)
    examples = derived_classification("classify", corpus, config)
    counts = Counter(e.label for e in examples)
    assert len(counts) == 4 and set(counts) <= {"Classes", "Functions", "Module Reference",
                                                "Data", "Topic"}
    assert all(n <= 20 for n in counts.values())
    assert all("Linux-6" not in e.text for e in examples)
    train, val = split_examples("classify", examples, 0.3)[0]
    assert train and val and not {e.key for e in train} & {e.key for e in val}
    assert {e.key for e in examples} <= {f"id-mod{i}" for i in range(12)} | \
        {f"topic-{k}" for k in ("ASSERT", "IMPORT", "LOOPING")}


def test_a_corpus_without_pydoc_sections_is_labelled_by_document(tmp_path):
    write_records([{"id": f"d{i}", "url": f"http://x/{i}", "title": f"Doc {i}",
                    "text": "\n".join(f"sentence {j} of document {i}" for j in range(30))}
                   for i in range(3)], tmp_path / "corpus")
    config = ClassifyConfig(passage_chars=60, num_labels=3, max_per_label=50)
    examples = derived_classification("classify", tmp_path / "corpus", config)
    assert {e.label for e in examples} == {"Doc 0", "Doc 1", "Doc 2"}
    assert len({e.key for e in examples}) == len(examples)  # split by passage


def test_defined_names_and_tags():
    record = page("csv", ["Dialect", "Sniffer"], ["reader", "writer"])
    names = defined_names(record)
    assert names == {"Dialect": "CLASS", "Sniffer": "CLASS", "reader": "FUNC",
                     "writer": "FUNC", "update_dialect": "FUNC", "update_sniffer": "FUNC"}
    words = WORD.findall("use csv.reader() or Dialect, not __init__ and self.writer")
    assert tag_words(words, names, "csv") == [
        "O", "B-FUNC", "I-FUNC", "I-FUNC", "O", "O", "O", "B-CLASS", "O", "O", "O", "O", "O",
        "O", "B-FUNC"]


def test_derived_ner_tags_the_names_each_page_defines(tmp_path):
    corpus = small_corpus(tmp_path)
    config = NerConfig(passage_words=30, keep_empty_fraction=0.0, max_passages=1000)
    examples = derived_ner("ner", corpus, config)
    assert examples and all(any(t != "O" for t in e.tags) for e in examples)
    assert all(e.key.startswith("id-mod") for e in examples)  # topic pages define nothing
    tagged = {(w, t) for e in examples for w, t in zip(e.tokens, e.tags, strict=True)
              if t != "O"}
    assert ("Reader3", "B-CLASS") in tagged and ("open_3", "B-FUNC") in tagged
    assert ("mod3", "B-FUNC") in tagged  # mod3 . open_3: a qualified name
    assert not any(w == "__init__" for w, _ in tagged)
    capped = derived_ner("ner", corpus, NerConfig(passage_words=30, max_passages=5))
    assert len(capped) == 5


def test_a_corpus_without_defined_names_gives_no_ner_task(tmp_path):
    write_records([{"id": "d", "url": "http://x", "text": "just words\nand more words"}],
                  tmp_path / "corpus")
    with pytest.raises(StageInputError, match="no passage .* mentions a function or class"):
        derived_ner("ner", tmp_path / "corpus", NerConfig())


# ---- splits -----------------------------------------------------------------------------


def examples_in_groups(groups: int, per_group: int = 3):
    return [SimpleNamespace(key=f"doc-{g}", label=str(g % 2)) for g in range(groups)
            for _ in range(per_group)]


def test_held_out_split_keeps_groups_together_and_honours_held_out_ids():
    examples = examples_in_groups(40)
    (train, val), = split_examples("classify", examples, 0.2, held_out={"doc-1", "doc-2"})
    assert {"doc-1", "doc-2"} <= {e.key for e in val}
    assert not {e.key for e in train} & {e.key for e in val}
    assert len(train) + len(val) == 120 and 0.1 < len(val) / 120 < 0.45
    (train, val), = split_examples("classify", examples_in_groups(2), 0.01)
    assert train and val  # a tiny set still gets both sides


def test_k_fold_holds_out_every_group_exactly_once():
    examples = examples_in_groups(30)
    splits = split_examples("classify", examples, 0.2, folds=3)
    assert len(splits) == 3
    held = [e.key for _, val in splits for e in val]
    assert sorted(held) == sorted(e.key for e in examples)
    for train, val in splits:
        assert not {e.key for e in train} & {e.key for e in val}
    with pytest.raises(StageInputError, match="cannot make 5 folds"):
        split_examples("classify", examples_in_groups(3), 0.2, folds=5)
    with pytest.raises(StageInputError, match="at least 2 groups"):
        split_examples("classify", examples_in_groups(1), 0.2)


def test_the_config_modules_import_without_torch():
    code = ("import sys, tasks.classify, tasks.ner, tasks.labelled; "
            "print(sorted(m for m in ('torch', 'lightning', 'datasets', 'seqeval', "
            "'matplotlib', 'sentencepiece', 'mlflow', 'prefect') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
