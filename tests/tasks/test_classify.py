"""Classify stage: tuning beats the untuned model and the majority class, k-fold reports
every fold with a mean and spread, a saved classifier reloads, an encoder works too, the
derived task runs on a pydoc-like corpus, and bad input is reported by file:line."""

import json
import math
import random

import pytest

from models.checkpoint import load_model, save_model
from models.heads import encode_text, load_classifier
from models.llama import Llama, ModelConfig
from tasks.classify import ClassifyConfig, classification_scores, classify
from tasks.pretrain import PretrainConfig, pretrain
from tasks.shards import write_records
from tasks.stage import StageInputError
from tasks.tokenize import TokenizeConfig, tokenize_corpus

TOPICS = {"sports": ["goal", "match", "team", "score", "player", "ball"],
          "food": ["bread", "soup", "apple", "cheese", "salad", "rice"],
          "weather": ["rain", "cloud", "wind", "storm", "sunny", "snow"]}
FILLER = ["the", "a", "and", "with", "today", "very", "some", "of", "module", "value"]
FAST = {"max_steps": 60, "batch_size": 16, "warmup_steps": 5, "val_every_steps": 20,
        "log_every_steps": 10, "learning_rate": 3e-3, "max_length": 40, "val_fraction": 0.3,
        "num_threads": 1}


def pydoc_page(i: int, rng: random.Random) -> dict:
    name = f"mod{i}"
    cls, func = f"Reader{i}", f"open_{i}"
    prose = " ".join(rng.choice(FILLER + ["file", "data", "reads", "writes"]) for _ in range(40))
    text = (f"Python 3.11.7\nLinux\n\n{name}\nindex\n/usr/lib/{name}.py\nModule Reference\n"
            f"The {name} module {prose}.\nClasses\nclass {cls}(builtins.object)\n{cls}(path)\n"
            f"Methods defined here:\n__init__(self, path)\nInitialize self.\n"
            f"read(self, size=-1)\nRead at most size bytes.\nFunctions\n{func}(path, mode='r')\n"
            f"Open path and return a {cls}.\nclose_{i}(handle)\nClose the handle.\n"
            f"Data\nDEFAULT = 1\n")
    return {"id": f"page-{i}", "url": f"http://pydoc.localhost/{name}.html",
            "title": f"Pydoc: module {name}", "text": text}


def topic_page(i: int) -> dict:
    text = ("Python 3.11.7\nLinux\n\nTOPIC\n\nLOOP\n"
            + f"The loop statement number {i} repeats the suite while the test is true.\n" * 4)
    return {"id": f"topic-{i}", "url": f"http://pydoc.localhost/topic?key=L{i}",
            "title": f"Pydoc: TOPIC L{i}", "text": text}


def labelled_texts(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    labels = sorted(TOPICS)
    rows = []
    for i in range(count):
        label = labels[i % len(labels)]
        words = rng.sample(TOPICS[label], 3) + [rng.choice(FILLER) for _ in range(5)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A pydoc-like corpus, a tokenizer, a small pretrained decoder, the same weights as an
    encoder, and a labelled JSONL file."""
    root = tmp_path_factory.mktemp("classify")
    rng = random.Random(0)
    write_records([pydoc_page(i, rng) for i in range(30)] + [topic_page(i) for i in range(8)],
                  root / "corpus")
    tokenize_corpus(TokenizeConfig(vocab_size=400), root / "corpus", root / "tokens")
    pretrain(PretrainConfig(d_model=32, n_layers=2, n_heads=4, context_length=64, batch_size=8,
                            max_steps=30, warmup_steps=3, val_every_steps=30, val_batches=1, num_threads=1),
             root / "tokens", root / "pretrained")
    decoder = load_model(root / "pretrained" / "model.pt")
    encoder = Llama(ModelConfig.from_dict({**decoder.config.to_dict(), "causal": False}))
    encoder.load_state_dict(decoder.state_dict())
    save_model(root / "encoder" / "model.pt", encoder)
    data = root / "topics.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in labelled_texts(180, seed=1)))
    return root


def run(setup, out, model="pretrained", **overrides):
    metrics = []
    config = ClassifyConfig(**{"data_path": str(setup / "topics.jsonl"), **FAST, **overrides})
    result = classify(config, setup / "tokens", setup / model, setup / "corpus", out,
                      on_metrics=lambda m, step: metrics.append((step, m)))
    return result, metrics


def assert_tuning_wins(stats, margin=0.3):
    for name in ("accuracy", "macro_f1"):
        tuned = stats[f"classify_{name}"]
        assert tuned >= stats[f"classify_untuned_{name}"] + margin, (name, stats)
        assert tuned >= stats[f"classify_majority_{name}"] + margin, (name, stats)


def test_tuning_beats_untuned_and_majority_and_the_classifier_reloads(setup, tmp_path):
    result, metrics = run(setup, tmp_path)
    stats = result["stats"]
    assert_tuning_wins(stats)
    assert stats["classify_examples_train"] + stats["classify_examples_dev"] \
        + stats["classify_examples_val"] == 180
    assert stats["classify_examples_dev"] >= 1  # the checkpoint is chosen on these
    assert result["count"] == stats["classify_examples_val"] and "folds" not in result
    assert any("train_loss" in m for _, m in metrics) and any("val_loss" in m for _, m in metrics)
    assert set(result["artifacts"]) >= {"classifier", "metrics", "confusion_matrix",
                                        "loss_curve", "tokenizer_model", "config"}
    assert all((tmp_path / p).is_file() for p in result["artifacts"].values())
    assert (tmp_path / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert set(saved["per_label"]) == set(TOPICS)
    assert sum(map(sum, saved["confusion_matrix"])) == stats["classify_examples_val"]
    assert not list((tmp_path / "checkpoints").glob("step-*.ckpt"))

    import sentencepiece as spm
    import torch

    model, info = load_classifier(tmp_path / "classifier.pt")
    assert info["labels"] == sorted(TOPICS) and model.config.causal
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    texts = {label: " ".join(words[:4]) + " the value" for label, words in TOPICS.items()}
    ids = [encode_text(sp.encode, text, info["max_length"], info["eos_id"])
           for text in texts.values()]
    length = max(map(len, ids))
    batch = torch.tensor([row + [info["pad_id"]] * (length - len(row)) for row in ids])
    mask = torch.tensor([[True] * len(row) + [False] * (length - len(row)) for row in ids])
    with torch.no_grad():
        predicted = model(batch, mask)[0].argmax(-1).tolist()
    assert [info["labels"][i] for i in predicted] == list(texts)


def test_an_encoder_backbone_is_tuned_too(setup, tmp_path):
    result, _ = run(setup, tmp_path, model="encoder")
    assert_tuning_wins(result["stats"])
    model, _ = load_classifier(tmp_path / "classifier.pt")
    assert not model.config.causal


def test_three_fold_cross_validation_reports_each_fold_and_the_spread(setup, tmp_path):
    result, metrics = run(setup, tmp_path, folds=3, max_steps=20)
    folds, stats = result["folds"], result["stats"]
    assert [f["fold"] for f in folds] == [0, 1, 2]
    accuracies = [f["metrics"]["classify_accuracy"] for f in folds]
    mean = sum(accuracies) / 3
    std = math.sqrt(sum((a - mean) ** 2 for a in accuracies) / 2)
    assert stats["classify_accuracy"] == pytest.approx(mean, abs=1e-4)
    assert stats["classify_accuracy_std"] == pytest.approx(std, abs=1e-4)
    assert "classify_macro_f1_std" in stats and stats["classify_folds"] == 3
    assert stats["classify_examples_val"] == 180 == result["count"]  # each example once
    assert_tuning_wins(stats, margin=0.2)
    for fold in folds:
        assert (tmp_path / fold["dir"]).is_dir() and fold["dir"] == f"fold-{fold['fold']}"
        assert all((tmp_path / p).is_file() for p in fold["artifacts"].values())
        assert fold["history"]["val_loss"]
    matrix = json.loads((tmp_path / "metrics.json").read_text())["confusion_matrix"]
    assert sum(map(sum, matrix)) == 180
    assert {k for _, m in metrics for k in m} >= {"fold0_train_loss", "fold2_val_loss"}
    assert (tmp_path / "classifier.pt").is_file() and result["saved_fold"] in (0, 1, 2)


def test_the_derived_section_task_runs_on_a_pydoc_corpus(setup, tmp_path):
    config = ClassifyConfig(**{**FAST, "max_steps": 10, "passage_chars": 100,
                               "max_per_label": 40, "num_labels": 3})
    result = classify(config, setup / "tokens", setup / "pretrained", setup / "corpus", tmp_path)
    assert result["derived"] is True
    assert len(result["labels"]) == 3
    assert set(result["labels"]) <= {"Module Reference", "Classes", "Functions", "Data", "Topic"}
    assert result["stats"]["classify_examples_val"] > 0


def test_bad_input_is_reported(setup, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "goal match", "label": "sports"}\n{"text": "rain"}\n')
    with pytest.raises(StageInputError, match=r"bad.jsonl:2: no label column 'label'"):
        run(setup, tmp_path / "out", data_path=str(bad))
    one = tmp_path / "one.jsonl"
    one.write_text('{"text": "goal", "label": "sports"}\n{"text": "ball", "label": "sports"}\n')
    with pytest.raises(StageInputError, match="at least 2 labels"):
        run(setup, tmp_path / "out", data_path=str(one))
    with pytest.raises(StageInputError, match="model.pt is missing"):
        run(setup, tmp_path / "out", model="nowhere")


def test_scores_follow_the_usual_definitions():
    labels = ["a", "b", "c"]
    scores, details = classification_scores([0, 0, 1, 1], [0, 1, 1, 1], labels)
    assert scores["accuracy"] == 0.75
    # a: P 1, R .5 -> F1 2/3; b: P 2/3, R 1 -> F1 .8; c absent from gold and predictions
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert details["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]
