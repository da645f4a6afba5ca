"""Task fine-tuning inside the pipeline: user-labelled data, 3-fold cross-validation with
each fold as an MLflow run nested in the stage's run, the mean and spread on the parent."""

import json
import random
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows.config import load_config
from flows.pipeline import pipeline

pytestmark = pytest.mark.slow
TINY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
TOPICS = {"sports": ["goal", "match", "team", "score", "player", "ball"],
          "food": ["bread", "soup", "apple", "cheese", "salad", "rice"],
          "weather": ["rain", "cloud", "wind", "storm", "sunny", "snow"]}
FILLER = ["the", "a", "and", "with", "today", "very", "some", "of"]


def labelled(path: Path, count: int = 120) -> Path:
    rng = random.Random(3)
    rows = []
    for i in range(count):
        label = sorted(TOPICS)[i % 3]
        words = rng.sample(TOPICS[label], 3) + [rng.choice(FILLER) for _ in range(4)]
        rng.shuffle(words)
        rows.append({"id": f"ex-{i}", "text": " ".join(words), "label": label})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_three_folds_are_nested_runs_with_a_mean_and_spread(prefect_server, corpus, tmp_path):
    data = labelled(tmp_path / "topics.jsonl")
    config = load_config(TINY_CONFIG, [
        f"source.paths=[{corpus}]", f"classify.data_path={data}", "classify.id_column=id",
        "classify.folds=3", "classify.max_steps=60", "classify.learning_rate=0.003",
        "classify.val_every_steps=10",
        "ner.enabled=false", "finetune.enabled=false", "dpo.enabled=false"])
    result = pipeline(config=config, workdir=str(tmp_path / "work"), until="finetune")
    stats = result["stages"]["classify"]["stats"]
    assert stats["classify_folds"] == 3
    assert {"classify_accuracy", "classify_accuracy_std", "classify_macro_f1",
            "classify_macro_f1_std"} <= set(stats)

    client = MlflowClient(result["tracking_uri"])
    stage_run = client.get_run(result["stages"]["classify"]["mlflow_run_id"])
    folds = client.search_runs([stage_run.info.experiment_id], filter_string=(
        f"tags.`mlflow.parentRunId` = '{stage_run.info.run_id}'"))
    assert sorted(r.data.tags["forgeline.fold"] for r in folds) == ["0", "1", "2"] or \
        sorted(r.data.tags["forgeline.fold"] for r in folds) == ["1", "2", "3"]
    accuracies = [r.data.metrics["classify_accuracy"] for r in folds]
    assert all(r.info.status == "FINISHED" for r in folds)
    assert stats["classify_accuracy"] == pytest.approx(sum(accuracies) / 3, abs=1e-4)
    # the folds' accuracies are the ones the mean and spread summarise
    mean = sum(accuracies) / 3
    spread = (sum((a - mean) ** 2 for a in accuracies) / 2) ** 0.5
    assert stats["classify_accuracy_std"] == pytest.approx(spread, abs=1e-4)
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.data.metrics["classify_accuracy"] == pytest.approx(mean, abs=1e-4)
    assert "classify_accuracy_std" in parent.data.metrics
    # the tuned classifier beats the majority class on every fold's held-out examples
    majority = [r.data.metrics["classify_majority_accuracy"] for r in folds
                if "classify_majority_accuracy" in r.data.metrics]
    assert len(majority) == 3, accuracies
    assert all(a > m for a, m in zip(accuracies, majority, strict=True)), (accuracies, majority)


def test_a_masked_lm_run_tunes_heads_and_skips_the_generative_modes(prefect_server, corpus,
                                                                     tmp_path):
    data = labelled(tmp_path / "topics.jsonl")
    config = load_config(TINY_CONFIG, [
        f"source.paths=[{corpus}]", "pretrain.objective=masked", "dpo.enabled=false",
        f"classify.data_path={data}", "ner.enabled=false"])
    result = pipeline(config=config, workdir=str(tmp_path / "work"))
    stages = result["stages"]
    assert {"finetune", "fewshot"}.isdisjoint(stages)  # an encoder does not generate
    assert {"pretrain", "classify", "evaluate"} <= set(stages)
    assert result["metrics"]["mlm_accuracy"] > 0 and "classify_accuracy" in result["metrics"]
    assert "val_perplexity" not in result["metrics"]
    assert result["registered_model"] is None and result["champion"] is None
