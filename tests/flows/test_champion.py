"""Champion/challenger in a real MLflow Model Registry (SQLite store, real registered
models): two real tiny models, one genuinely better than the other, each scored on the same
held-out documents through its own tokenizer; the alias moves only when the challenger
wins by the margin, and the decision is on the versions and the parent run."""

import random
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from pydantic import ValidationError

from flows.champion import (
    ChampionConfig,
    ChampionError,
    challenge,
    decision_markdown,
    heldout_scorer,
    record_decision,
)
from flows.model_registry import log_and_register
from flows.tracking import Tracker
from tasks.pretrain import PretrainConfig, pretrain
from tasks.shards import write_records
from tasks.tokenize import TokenizeConfig, tokenize_corpus
from tests.flows.conftest import synthetic_document

TINY = {"d_model": 32, "n_layers": 2, "n_heads": 4, "context_length": 48, "batch_size": 8,
        "warmup_steps": 2, "val_batches": 1, "learning_rate": 3e-3}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A weak model (2 steps, its own 350-token vocabulary) and a strong one (20 steps,
    450 tokens) on the same corpus, and the score function a pipeline run would use."""
    root = tmp_path_factory.mktemp("champion-models")
    rng = random.Random(5)
    write_records([{"id": f"d{i:02d}", "url": "", "text": synthetic_document(rng, 8)}
                   for i in range(60)], root / "corpus")
    for vocab in (350, 450):
        tokenize_corpus(TokenizeConfig(vocab_size=vocab, val_fraction=0.2), root / "corpus",
                        root / f"tokens{vocab}")
    pretrain(PretrainConfig(**TINY, max_steps=2, val_every_steps=2), root / "tokens350",
             root / "weak")
    pretrain(PretrainConfig(**TINY, max_steps=20, val_every_steps=20), root / "tokens450",
             root / "strong")
    calls = []
    scorer = heldout_scorer(ChampionConfig(max_documents=20, accelerator="cpu"),
                            root / "tokens450", root / "corpus")

    def score(model_dir: Path) -> dict:
        calls.append(Path(model_dir))
        return scorer(model_dir)

    weak, strong = scorer(root / "weak"), scorer(root / "strong")
    return {"root": root, "weak": root / "weak", "strong": root / "strong", "score": score,
            "calls": calls, "scores": {"weak": weak["bits_per_byte"],
                                       "strong": strong["bits_per_byte"]}}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store (each test registers a model name of its own)."""
    root = tmp_path_factory.mktemp("champion-store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    return {"uri": uri, "root": root,
            "tracker": Tracker(uri, "champion-test", artifact_root=root / "mlartifacts")}


def register(store, model_dir, name="forgeline"):
    """A pipeline-like parent run with the model registered as the next version."""
    tracker = store["tracker"]
    parent = tracker.start_parent(f"pipeline-{model_dir.name}", {}, {})
    registered = log_and_register(model_dir, store["uri"], parent, name, stage="pretrain")
    return parent, registered.version


def alias_version(store, name="forgeline"):
    return str(MlflowClient(store["uri"]).get_model_version_by_alias(name, "champion").version)


def test_models_differ_genuinely(models):
    weak, strong = models["scores"]["weak"], models["scores"]["strong"]
    assert strong < weak - 0.3, (strong, weak)


def test_first_then_promoted_then_kept_recorded_on_versions_and_runs(models, store):
    config = ChampionConfig()
    client, tracker, score = MlflowClient(store["uri"]), store["tracker"], models["score"]
    weak, strong = models["scores"]["weak"], models["scores"]["strong"]

    run1, v1 = register(store, models["weak"])
    first = challenge(store["uri"], "forgeline", v1, models["weak"], score, config)
    assert (first.decision, first.champion_score, first.champion_version_before) == \
        ("first", None, None)
    assert first.challenger_score == pytest.approx(weak)
    assert alias_version(store) == v1 == "1"
    record_decision(tracker, run1, first)
    parent = client.get_run(run1).data
    assert parent.tags["champion_decision"] == "first"
    assert parent.metrics["challenger_score"] == pytest.approx(weak)
    assert "champion_score" not in parent.metrics

    # the better model takes the alias; the champion was fetched from the registry and
    # scored with its own (350-token) tokenizer
    run2, v2 = register(store, models["strong"])
    models["calls"].clear()
    promoted = challenge(store["uri"], "forgeline", v2, models["strong"], score, config)
    assert len(models["calls"]) == 2 and models["calls"][1] != models["weak"]
    assert promoted.decision == "promoted" and alias_version(store) == v2 == "2"
    assert promoted.champion_score == pytest.approx(weak)
    assert promoted.challenger_score == pytest.approx(strong)
    assert promoted.improvement == pytest.approx(weak - strong)
    assert (promoted.champion_version_before, promoted.champion_version_after) == ("1", "2")
    record_decision(tracker, run2, promoted)
    parent = client.get_run(run2).data
    assert parent.tags["champion_decision"] == "promoted"
    assert parent.tags["champion_version"] == "2" and parent.tags["challenger_version"] == "2"
    assert parent.metrics["champion_score"] == pytest.approx(weak)
    assert parent.metrics["challenger_score"] == pytest.approx(strong)
    tags2 = client.get_model_version("forgeline", "2").tags
    assert tags2["forgeline.champion_decision"] == "promoted"
    assert tags2["forgeline.compared_with"] == "1"
    assert float(tags2["forgeline.challenger_score"]) == pytest.approx(strong, rel=1e-5)
    assert float(tags2["forgeline.champion_score"]) == pytest.approx(weak, rel=1e-5)
    tags1 = client.get_model_version("forgeline", "1").tags
    assert tags1["forgeline.dethroned_by"] == "2"
    assert tags1["forgeline.last_challenge"] == "version 2: promoted"
    markdown = decision_markdown(promoted)
    assert "promoted" in markdown and f"{strong:.4f}" in markdown and f"{weak:.4f}" in markdown

    # the worse model does not: the alias stays
    run3, v3 = register(store, models["weak"])
    kept = challenge(store["uri"], "forgeline", v3, models["weak"], score, config)
    assert kept.decision == "kept" and alias_version(store) == "2"
    assert kept.improvement == pytest.approx(strong - weak) and kept.improvement < 0
    assert (kept.champion_version_before, kept.champion_version_after) == ("2", "2")
    record_decision(tracker, run3, kept)
    parent = client.get_run(run3).data
    assert parent.tags["champion_decision"] == "kept" and parent.tags["champion_version"] == "2"
    assert parent.metrics["champion_score"] == pytest.approx(strong)
    assert client.get_model_version("forgeline", "2").tags["forgeline.last_challenge"] == \
        "version 3: kept"
    assert "dethroned_by" not in client.get_model_version("forgeline", "2").tags
    assert "keeps `@champion`" in decision_markdown(kept)

    # a retried flow run gets the recorded decision back without scoring again
    models["calls"].clear()
    again = challenge(store["uri"], "forgeline", v3, models["weak"], score, config)
    assert again.reused and again.decision == "kept" and not models["calls"]
    assert again.champion_score == pytest.approx(strong, rel=1e-5)


def test_min_delta_is_respected_both_ways(models, store):
    gap = models["scores"]["weak"] - models["scores"]["strong"]
    score, uri = models["score"], store["uri"]
    _, v1 = register(store, models["weak"], "forgeline-margin")
    assert challenge(uri, "forgeline-margin", v1, models["weak"], score,
                     ChampionConfig()).decision == "first"
    _, v2 = register(store, models["strong"], "forgeline-margin")
    short = challenge(uri, "forgeline-margin", v2, models["strong"], score,
                      ChampionConfig(min_delta=gap + 0.05))
    assert short.decision == "kept" and short.margin == pytest.approx(gap + 0.05)
    assert alias_version(store, "forgeline-margin") == v1
    _, v3 = register(store, models["strong"], "forgeline-margin")
    enough = challenge(uri, "forgeline-margin", v3, models["strong"], score,
                       ChampionConfig(min_delta=gap - 0.05))
    assert enough.decision == "promoted" and alias_version(store, "forgeline-margin") == v3
    # an equal score never takes the alias, even with no margin
    _, v4 = register(store, models["strong"], "forgeline-margin")
    tie = challenge(uri, "forgeline-margin", v4, models["strong"], score, ChampionConfig())
    assert tie.decision == "kept" and tie.improvement == pytest.approx(0.0, abs=1e-9)
    assert alias_version(store, "forgeline-margin") == v3


def test_a_champion_that_cannot_be_fetched_fails_or_is_replaced(models, store):
    client, uri, score = MlflowClient(store["uri"]), store["uri"], models["score"]
    _, v1 = register(store, models["strong"], "forgeline-broken")
    challenge(uri, "forgeline-broken", v1, models["strong"], score, ChampionConfig())
    location = client.get_model_version_download_uri("forgeline-broken", v1)
    shutil.rmtree(Path(location.removeprefix("file://")) / "artifacts")  # its files are gone
    _, v2 = register(store, models["weak"], "forgeline-broken")
    with pytest.raises(ChampionError, match=r"version 1 .*on_champion_error=replace"):
        challenge(uri, "forgeline-broken", v2, models["weak"], score, ChampionConfig())
    assert alias_version(store, "forgeline-broken") == v1
    replaced = challenge(uri, "forgeline-broken", v2, models["weak"], score,
                         ChampionConfig(on_champion_error="replace"))
    assert replaced.decision == "promoted" and replaced.champion_score is None
    assert "could not be fetched or scored" in replaced.note
    assert alias_version(store, "forgeline-broken") == v2
    assert "could not be scored" in decision_markdown(replaced)


def test_a_metric_needs_a_direction():
    with pytest.raises(ValidationError, match="no known direction"):
        ChampionConfig(metric="accuracy")
    config = ChampionConfig(metric="accuracy", greater_is_better=True)
    assert config.higher_is_better()
    assert not ChampionConfig().higher_is_better()
