"""Continued pretraining: a pipeline run starts from a registered model, encodes with its
tokenizer, lowers the validation loss further and records its parent in MLflow."""

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows.config import load_config
from flows.model_registry import ModelReferenceError
from flows.model_tools import FRESH, fetch_init_model
from flows.pipeline import pipeline
from tasks.pretrain import PretrainConfig, pretrain
from tasks.stage import StageInputError

TINY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def run(workdir, overrides):
    config = load_config(TINY_CONFIG, overrides)
    return pipeline(config=config, workdir=str(workdir), until="pretrain")


@pytest.mark.slow
def test_continued_pretraining_from_a_registered_model(prefect_server, corpus, tmp_path):
    work = tmp_path / "work"
    source = [f"source.paths=[{corpus}]", "registry.model_name=continued"]
    first = run(work, source)
    assert first["registered_model"]["model_uri"] == "models:/continued/1"

    second = run(work, [*source, "pretrain.init_from=models:/continued/latest"])
    before = first["stages"]["pretrain"]["stats"]["val_loss"]
    after = second["stages"]["pretrain"]["stats"]["val_loss"]
    assert after < before - 0.05, (before, after)  # more training of the same model
    # the corpus is encoded with the parent's tokenizer, not a new one
    tokenizers = [Path(r["stages"]["tokenize"]["output"]) / "tokenizer.model"
                  for r in (first, second)]
    assert tokenizers[0].read_bytes() == tokenizers[1].read_bytes()
    assert second["stages"]["tokenize"]["output"] != first["stages"]["tokenize"]["output"]

    client = MlflowClient(second["tracking_uri"])
    parent = client.get_run(second["mlflow_run_id"])
    assert parent.data.tags["forgeline.parent_model"] == "models:/continued/1"  # resolved
    stage_run = client.get_run(second["stages"]["pretrain"]["mlflow_run_id"])
    assert stage_run.data.tags["forgeline.parent_model"] == "models:/continued/1"
    assert stage_run.data.params["pretrain.init_from"] == "models:/continued/latest"
    assert second["registered_model"]["model_uri"] == "models:/continued/2"

    # continuing again from version 2 is a new stage (another parent), not a reuse
    third = run(work, [*source, "pretrain.init_from=models:/continued/2"])
    assert not third["stages"]["pretrain"]["reused"]
    assert third["stages"]["pretrain"]["stats"]["val_loss"] < after


def test_a_missing_registered_model_stops_or_starts_fresh_as_configured(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(ModelReferenceError, match="init_if_missing=fresh"):
        fetch_init_model("models:/nothing/latest", "error", tmp_path, uri)
    assert fetch_init_model("models:/nothing/latest", "fresh", tmp_path, uri) is None
    # only "no version yet" starts fresh: a named version or alias that is not there stops
    for ref in ("models:/nothing/3", "models:/nothing@champion"):
        with pytest.raises(ModelReferenceError, match="nothing"):
            fetch_init_model(ref, "fresh", tmp_path, uri)
    # a retry follows its first attempt, which started fresh
    assert fetch_init_model("models:/nothing/latest", "error", tmp_path, uri,
                            pinned=FRESH) is None


def test_a_corpus_encoded_with_another_tokenizer_is_refused(tmp_path):
    """pretrain itself checks the tokenizer when it is given a model to continue."""
    import random

    from tasks.shards import write_records
    from tasks.tokenize import TokenizeConfig, tokenize_corpus

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota",
             "kappa", "lambda", "mu"]
    write_records([{"id": f"d{i}", "url": f"http://x/{i}",
                    "text": " ".join(rng.choice(words) for _ in range(200))}
                   for i in range(40)], tmp_path / "corpus")
    for name, size in (("a", 300), ("b", 320)):
        tokenize_corpus(TokenizeConfig(vocab_size=size, val_fraction=0.2), tmp_path / "corpus",
                        tmp_path / f"tokens-{name}")
    config = PretrainConfig(d_model=16, n_layers=1, n_heads=2, context_length=16,
                            batch_size=4, max_steps=2, val_every_steps=2, val_batches=1)
    pretrain(config, tmp_path / "tokens-a", tmp_path / "model-a")
    with pytest.raises(StageInputError, match="encoded with another tokenizer"):
        pretrain(config, tmp_path / "tokens-b", tmp_path / "model-b",
                 init_model=tmp_path / "model-a")
    # with the model's own tokenizer it continues, keeping the model's shape
    result = pretrain(config.model_copy(update={"d_model": 64}), tmp_path / "tokens-a",
                      tmp_path / "model-c", init_model=tmp_path / "model-a")
    assert result["continued_from"]
    assert result["stats"]["params"] == pretrain(config, tmp_path / "tokens-a",
                                                 tmp_path / "model-d")["stats"]["params"]
