"""Held-out texts and bits per byte of a model directory: the data is exactly what the
tokenize stage held out, the score is exact for a model that predicts uniformly, does not
depend on batching, and a trained model beats an untrained one."""

import json
import math
import random
import shutil

import pytest
import sentencepiece as spm
import torch

from models.checkpoint import save_model
from models.llama import Llama, ModelConfig
from tasks.heldout import heldout_texts, score_model
from tasks.pretrain import PretrainConfig, pretrain
from tasks.shards import iter_records, write_records
from tasks.stage import StageInputError
from tasks.tokenize import TokenizeConfig, tokenize_corpus
from tests.flows.conftest import synthetic_document


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A corpus of synthetic prose (some non-ASCII), tokenized with a fifth held out, and a
    model pretrained on it briefly."""
    root = tmp_path_factory.mktemp("heldout")
    rng = random.Random(3)
    records = [{"id": f"d{i:02d}", "url": "", "text": synthetic_document(rng, 6)
                + (" Café naïve — déjà vu." if i % 3 == 0 else "")} for i in range(60)]
    write_records(records, root / "corpus", shard_size=25)
    tokenize_corpus(TokenizeConfig(vocab_size=400, val_fraction=0.2), root / "corpus",
                    root / "tokens")
    pretrain(PretrainConfig(d_model=32, n_layers=2, n_heads=4, context_length=48, batch_size=8,
                            max_steps=40, warmup_steps=3, val_every_steps=40, val_batches=1,
                            learning_rate=3e-3), root / "tokens", root / "trained")
    return root


def uniform_model(directory, vocab_size, context_length=32):
    """A model whose logits are all zero: every token has probability 1/vocab_size."""
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=vocab_size, context_length=context_length, d_model=32,
                              n_layers=2, n_heads=4, tie_embeddings=False))
    with torch.no_grad():
        model.head.weight.zero_()
    directory.mkdir(parents=True, exist_ok=True)
    save_model(directory / "model.pt", model)
    return directory


def test_texts_are_the_held_out_documents_in_corpus_order(setup):
    held = set(json.loads((setup / "tokens" / "val_ids.json").read_text()))
    expected = [r["text"] for r in iter_records(setup / "corpus") if r["id"] in held]
    assert 3 <= len(expected) < 30
    assert heldout_texts(setup / "tokens", setup / "corpus", 0, 0) == expected
    cut = heldout_texts(setup / "tokens", setup / "corpus", max_documents=2, max_chars=50)
    assert cut == [t[:50] for t in expected[:2]]


def test_missing_or_foreign_inputs_are_named(setup, tmp_path):
    with pytest.raises(StageInputError, match="val_ids.json is missing"):
        heldout_texts(tmp_path, setup / "corpus")
    other = tmp_path / "other"
    write_records([{"id": "x1", "url": "", "text": "unrelated"}], other)
    with pytest.raises(StageInputError, match="has text in .*other"):
        heldout_texts(setup / "tokens", other)
    with pytest.raises(StageInputError, match="no model.pt or tokenizer.model"):
        score_model(tmp_path, ["text"])


@pytest.mark.parametrize("vocab", [400, 600])
def test_uniform_model_scores_exactly_its_entropy_per_byte(setup, tmp_path, vocab):
    """log2(V) bits per token, every target (each document's closing EOS too) scored once,
    over several windows and a shorter last one, whatever the batch size."""
    texts = heldout_texts(setup / "tokens", setup / "corpus")
    model_dir = uniform_model(tmp_path / "m", vocab)
    shutil.copyfile(setup / "tokens" / "tokenizer.model", model_dir / "tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    targets = sum(len(ids) + 1 for ids in sp.encode(texts))
    num_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert num_bytes > sum(map(len, texts))  # the non-ASCII characters count as bytes
    assert targets % 32 != 0 and targets > 3 * 32
    scores = [score_model(model_dir, texts, batch_size=b, device="cpu") for b in (1, 3, 64)]
    for score in scores:
        assert score["tokens"] == targets and score["bytes"] == num_bytes
        assert score["bits_per_byte"] == pytest.approx(targets * math.log2(vocab) / num_bytes,
                                                       rel=1e-6)
        assert score["loss_per_byte"] == pytest.approx(score["bits_per_byte"] * math.log(2))
        assert score["loss_per_token"] == pytest.approx(math.log(vocab), rel=1e-6)


def test_trained_model_scores_fewer_bits_per_byte_than_untrained(setup, tmp_path):
    texts = heldout_texts(setup / "tokens", setup / "corpus")
    trained = score_model(setup / "trained", texts, device="cpu")
    untrained_dir = tmp_path / "untrained"
    untrained_dir.mkdir()
    torch.manual_seed(0)
    config = json.loads((setup / "trained" / "config.json").read_text())["model"]
    save_model(untrained_dir / "model.pt", Llama(ModelConfig.from_dict(config)))
    shutil.copyfile(setup / "tokens" / "tokenizer.model", untrained_dir / "tokenizer.model")
    untrained = score_model(untrained_dir, texts, device="cpu")
    assert untrained["bits_per_byte"] > 1.0  # ~log2(400) bits per token, ~3 bytes a token
    assert trained["bits_per_byte"] < untrained["bits_per_byte"] - 0.5


def test_an_encoder_is_refused(setup, tmp_path):
    model_dir = tmp_path / "encoder"
    model_dir.mkdir()
    save_model(model_dir / "model.pt", Llama(ModelConfig(vocab_size=400, context_length=16,
                                                         d_model=32, n_layers=1, n_heads=2,
                                                         causal=False)))
    shutil.copyfile(setup / "tokens" / "tokenizer.model", model_dir / "tokenizer.model")
    with pytest.raises(StageInputError, match="masked-LM encoder"):
        score_model(model_dir, ["some text"], device="cpu")
