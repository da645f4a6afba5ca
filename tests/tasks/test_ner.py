"""NER stage: entity F1 after tuning beats the untuned model and the all-O majority, with a
causal decoder and with an encoder; k-fold works; tags sit on the right sub-tokens; the
derived task runs on a pydoc-like corpus; bad tags are reported by file:line."""

import json
import random

import pytest

from models.checkpoint import load_model, save_model
from models.heads import encode_words, label_positions, load_classifier
from models.llama import IGNORE_INDEX, Llama, ModelConfig
from tasks.labelled import TaggedExample
from tasks.ner import NerConfig, ner, ner_scores, tag_labels
from tasks.pretrain import PretrainConfig, pretrain
from tasks.shards import write_records
from tasks.stage import StageInputError
from tasks.tokenize import TokenizeConfig, tokenize_corpus

PEOPLE = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank"]
CITIES = [["New", "York"], ["San", "Diego"], ["Los", "Angeles"], ["Buenos", "Aires"]]
FILLER = ["the", "a", "met", "in", "and", "today", "visited", "with", "later", "went", "of"]
FAST = {"max_steps": 100, "batch_size": 16, "warmup_steps": 5, "val_every_steps": 20,
        "log_every_steps": 10, "learning_rate": 6e-3, "max_length": 48, "val_fraction": 0.3,
        "num_threads": 1}


def tagged_sentences(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        words = [rng.choice(FILLER) for _ in range(rng.randint(5, 8))]
        tags = ["O"] * len(words)
        city = rng.choice(CITIES)
        at = rng.randrange(len(words) + 1)
        words[at:at] = city
        tags[at:at] = ["B-LOC", "I-LOC"]
        at = rng.randrange(len(words) + 1)
        words.insert(at, rng.choice(PEOPLE))
        tags.insert(at, "B-PER")
        rows.append({"tokens": words, "tags": tags})
    return rows


def pydoc_page(i: int) -> dict:
    text = (f"Python 3.11.7\nLinux\n\nmod{i}\nindex\nModule Reference\nThe mod{i} module opens "
            f"files with open_{i}() and wraps them in Reader{i}.\nClasses\n"
            f"class Reader{i}(builtins.object)\nReader{i}(path)\nMethods defined here:\n"
            f"read(self, size=-1)\nRead at most size bytes.\nFunctions\n"
            f"open_{i}(path, mode='r')\nOpen path and return a Reader{i}; see mod{i}.open_{i}.\n"
            "Data\nDEFAULT = 1\n")
    return {"id": f"page-{i}", "url": f"http://pydoc.localhost/mod{i}.html",
            "title": f"Pydoc: module mod{i}", "text": text}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ner")
    rng = random.Random(0)
    sentences = [" ".join(r["tokens"]) + "." for r in tagged_sentences(200, seed=5)]
    records = [pydoc_page(i) for i in range(30)] + [
        {"id": f"s{i}", "url": f"http://x/{i}", "text": "\n".join(rng.sample(sentences, 10))}
        for i in range(20)]
    write_records(records, root / "corpus")
    tokenize_corpus(TokenizeConfig(vocab_size=400), root / "corpus", root / "tokens")
    pretrain(PretrainConfig(d_model=32, n_layers=2, n_heads=4, context_length=64, batch_size=8,
                            max_steps=30, warmup_steps=3, val_every_steps=30, val_batches=1,
                            num_threads=1),
             root / "tokens", root / "pretrained")
    decoder = load_model(root / "pretrained" / "model.pt")
    encoder = Llama(ModelConfig.from_dict({**decoder.config.to_dict(), "causal": False}))
    encoder.load_state_dict(decoder.state_dict())
    save_model(root / "encoder" / "model.pt", encoder)
    data = root / "tags.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in tagged_sentences(160, seed=1)))
    return root


def run(setup, out, model="pretrained", **overrides):
    config = NerConfig(**{"data_path": str(setup / "tags.jsonl"), **FAST, **overrides})
    return ner(config, setup / "tokens", setup / model, setup / "corpus", out)


def assert_tuning_wins(stats, margin=0.4):
    assert stats["ner_f1"] >= stats["ner_untuned_f1"] + margin, stats
    assert stats["ner_f1"] >= stats["ner_majority_f1"] + margin, stats
    assert stats["ner_majority_f1"] == 0.0  # every word O finds no entity


@pytest.mark.parametrize("model, label_next", [("pretrained", True), ("encoder", False)])
def test_tuning_beats_untuned_and_majority(setup, tmp_path, model, label_next):
    result = run(setup, tmp_path, model=model)
    stats = result["stats"]
    assert_tuning_wins(stats)
    assert stats["ner_precision"] > 0.5 and stats["ner_recall"] > 0.5
    assert stats["ner_examples_train"] + stats["ner_examples_dev"] \
        + stats["ner_examples_val"] == 160
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert set(saved["per_type"]) >= {"PER", "LOC"}
    assert saved["per_type"]["LOC"]["support"] > 0
    classifier, info = load_classifier(tmp_path / "classifier.pt")
    assert info["labels"] == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    assert info["label_next"] is label_next and classifier.config.causal is label_next
    assert all((tmp_path / p).is_file() for p in result["artifacts"].values())


def test_three_fold_ner(setup, tmp_path):
    result = run(setup, tmp_path, folds=3, max_steps=30)
    assert [f["fold"] for f in result["folds"]] == [0, 1, 2]
    assert {"ner_f1_std", "ner_precision_std", "ner_recall_std"} <= set(result["stats"])
    values = [f["metrics"]["ner_f1"] for f in result["folds"]]
    assert result["stats"]["ner_f1"] == pytest.approx(sum(values) / 3, abs=1e-4)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert len(saved["folds"]) == 3 and 0 < saved["pooled"]["f1"] <= 1
    assert result["count"] == 160


def test_tags_sit_on_the_first_sub_token_or_after_the_word():
    pieces = {"New": [10, 11], "York": [12], "is": [13]}
    encode = pieces.__getitem__
    ids, labels, fitted = encode_words(encode, ["New", "York", "is"], [1, 2, 0], 16, eos_id=2)
    assert ids == [2, 10, 11, 12, 13, 2] and fitted == 3
    assert labels == [IGNORE_INDEX, 1, IGNORE_INDEX, 2, 0, IGNORE_INDEX]
    ids, labels, _ = encode_words(encode, ["New", "York", "is"], [1, 2, 0], 16, eos_id=2,
                                  label_next=True)
    # New's tag after its last piece (on York), York's on "is", the last word's on EOS
    assert labels == [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 1, 2, 0]
    assert [labels[i] for i in label_positions(labels)] == [1, 2, 0]
    ids, labels, fitted = encode_words(encode, ["New", "York", "is"], [1, 2, 0], 5, eos_id=2)
    assert fitted == 2 and ids == [2, 10, 11, 12, 2]  # "is" did not fit


def test_entity_scores_follow_seqeval():
    examples = [TaggedExample("a", ["Ann", "Lee", "in", "Rome"], ["B-PER", "I-PER", "O", "B-LOC"],
                              "x:1"),
                TaggedExample("b", ["Bob", "ran"], ["B-PER", "O"], "x:2")]
    labels = tag_labels(examples)
    assert labels == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    index = {tag: i for i, tag in enumerate(labels)}
    # Ann Lee right, Rome missed, Bob cut off by truncation (predicted O)
    predicted = [[index[t] for t in ["B-PER", "I-PER", "O", "O"]], []]
    scores, details = ner_scores(examples, predicted, labels)
    assert scores["precision"] == 1.0 and scores["recall"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx(0.5) and scores["word_accuracy"] == pytest.approx(4 / 6)
    assert details["per_type"]["PER"]["support"] == 2


def test_the_derived_task_runs_on_a_pydoc_corpus(setup, tmp_path):
    config = NerConfig(**{**FAST, "max_steps": 10, "passage_words": 20})
    result = ner(config, setup / "tokens", setup / "pretrained", setup / "corpus", tmp_path)
    assert result["derived"] is True
    assert set(result["labels"]) == {"O", "B-CLASS", "I-CLASS", "B-FUNC", "I-FUNC"}
    assert result["stats"]["ner_examples_val"] > 0


def test_bad_tags_are_reported_by_file_and_line(setup, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"tokens": ["Ann"], "tags": ["B-PER"]}\n{"tokens": ["Bob"], "tags": ["PER"]}\n')
    with pytest.raises(StageInputError, match=r"bad.jsonl:2: tag 'PER' \(word 1\) is not BIO"):
        run(setup, tmp_path / "out", data_path=str(bad))
    none = tmp_path / "none.jsonl"
    none.write_text('{"tokens": ["a", "b"], "tags": ["O", "O"]}\n' * 3)
    with pytest.raises(StageInputError, match="hold no entity"):
        run(setup, tmp_path / "out", data_path=str(none))


def test_a_corpus_with_nothing_to_derive_skips_the_stage(setup, tmp_path):
    """Without labelled data the task is derived from the corpus; a corpus that documents no
    function or class gives no task, and the stage is skipped (the pipeline goes on)."""
    write_records([{"id": f"p{i}", "url": f"http://x/{i}", "title": "Notes",
                    "text": "Plain prose about the weather and nothing else at all. " * 5}
                   for i in range(12)], tmp_path / "prose")
    result = ner(NerConfig(**FAST), setup / "tokens", setup / "pretrained", tmp_path / "prose",
                 tmp_path / "out")
    assert result["count"] == 0 and result["stats"] == {"ner_skipped": 1}
    assert "no passage" in result["skipped_reason"]
