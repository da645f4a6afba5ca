"""Finetune stage: the held-out response loss falls, prompts are not trained on, bad files
are reported by line."""

import json
import random

import pytest

from models.data import Pair
from tasks.finetune import FinetuneConfig, document_title, finetune, split_pairs
from tasks.pretrain import PretrainConfig, pretrain
from tasks.shards import write_records
from tasks.stage import StageInputError
from tasks.tokenize import TokenizeConfig, is_validation, tokenize_corpus

NAMES = ["json", "socket", "pathlib", "csv", "zipfile", "random", "string", "struct"]
FAST = {"max_steps": 40, "batch_size": 8, "warmup_steps": 3, "val_every_steps": 20,
        "log_every_steps": 5, "response_chars": 60, "val_fraction": 0.25}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A corpus whose pages open by restating their title, a tokenizer and a small model."""
    root = tmp_path_factory.mktemp("finetune")
    rng = random.Random(1)
    records = []
    for i in range(80):
        name = rng.choice(NAMES)
        title = f"{name} {i}"
        body = " ".join(rng.choice(NAMES) + " module" for _ in range(12))
        records.append({"id": f"d{i}", "url": f"http://x/{name}/{i}", "title": title,
                        "text": f"{title} reference\nThe {name} module. {body}"})
    write_records(records, root / "corpus")
    tokenize_corpus(TokenizeConfig(vocab_size=300), root / "corpus", root / "tokens")
    pretrain(PretrainConfig(d_model=32, n_layers=2, n_heads=4, context_length=48, batch_size=8,
                            max_steps=30, warmup_steps=3, val_every_steps=30, val_batches=1),
             root / "tokens", root / "pretrained")
    return root


def run(setup, out, **overrides):
    metrics = []
    result = finetune(FinetuneConfig(**{**FAST, **overrides}), setup / "tokens",
                      setup / "pretrained", setup / "corpus", out,
                      on_metrics=lambda m, step: metrics.append((step, m)))
    return result, metrics


def test_finetuning_lowers_the_held_out_response_loss(setup, tmp_path):
    result, metrics = run(setup, tmp_path)
    stats = result["stats"]
    assert stats["val_loss_after"] < stats["val_loss_before"] - 0.3
    assert stats["train_loss_final"] < stats["train_loss_first"]
    assert stats["pairs_train"] + stats["pairs_val"] == 80 and stats["pairs_val"] >= 5
    assert result["count"] == 40 and result["unit"] == "steps"
    assert any("val_loss" in m for _, m in metrics) and any("train_loss" in m for _, m in metrics)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["finetune"]["max_steps"] == 40
    assert all((tmp_path / p).is_file() for p in result["artifacts"].values())


def test_pairs_from_a_jsonl_file(setup, tmp_path):
    path = tmp_path / "pairs.jsonl"
    lines = [json.dumps({"prompt": f"Q: {n}?\nA:", "response": f" the {n} module"})
             for n in NAMES * 3]
    path.write_text("\n".join(lines) + "\n")
    result, _ = run(setup, tmp_path / "out", data_path=str(path), max_steps=10)
    assert result["stats"]["pairs_train"] + result["stats"]["pairs_val"] == 24


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a", "response": "b"}\n{"prompt": "a"\n', r"pairs.jsonl:2: not valid JSON"),
    ('{"prompt": "a", "response": "b"}\n\n{"prompt": "a", "response": ""}\n',
     r"pairs.jsonl:3: expected an object"),
])
def test_bad_records_are_reported_with_file_and_line(setup, tmp_path, content, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(content)
    with pytest.raises(StageInputError, match=message):
        run(setup, tmp_path / "out", data_path=str(path))


def test_missing_data_file_is_an_input_error(setup, tmp_path):
    with pytest.raises(StageInputError, match="does not exist"):
        run(setup, tmp_path / "out", data_path=str(tmp_path / "nope.jsonl"))


def test_title_falls_back_to_first_line_then_url():
    assert document_title({"title": " json ", "text": "x"}) == "json"
    assert document_title({"title": "", "text": "\n  First line\nmore"}) == "First line"
    assert document_title({"text": "", "url": "http://h/library/json.html"}) == \
        "library/json.html"


def test_documents_held_out_of_pretraining_are_never_fine_tuned_on():
    pairs = [(f"doc-{i}", Pair(f"Title {i}:", f" text {i}")) for i in range(40)]
    trained_by_hash = [k for k, _ in pairs if not is_validation(k, 0.1)]
    held_out = set(trained_by_hash[:3])  # held out by the tokenizer's forced pick, say
    train, val = split_pairs(pairs, 0.1, held_out)
    by_key = dict(pairs)
    assert all(by_key[k] in val and by_key[k] not in train for k in held_out)
    assert len(train) + len(val) == 40 and train
    with pytest.raises(StageInputError, match="held out of pretraining"):
        split_pairs(pairs[:2], 0.1, {"doc-0", "doc-1"})
