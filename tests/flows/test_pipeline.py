"""The pipeline flow end to end on a tiny configuration, with a real Prefect test server
and a real MLflow store."""

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from flows.config import DATA_STAGES, STAGES, load_config
from flows.pipeline import pipeline
from tasks.shards import iter_records
from tasks.stage import StageInputError

pytestmark = pytest.mark.slow
TINY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def run(workdir, overrides, until=None):
    config = load_config(TINY_CONFIG, overrides)
    return pipeline(config=config, workdir=str(workdir), until=until)


def texts_by_id(directory):
    return {r["id"]: r["text"] for r in iter_records(directory, ["id", "text"])}


def children_of(client, run):
    return client.search_runs(
        [run.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'")


def test_full_run_is_tracked_and_a_rerun_reuses_every_stage(prefect_server, corpus, tmp_path,
                                                            capsys):
    work = tmp_path / "work"
    first = run(work, [f"source.paths=[{corpus}]"])
    assert list(first["stages"]) == [*STAGES[:8], "dpo", "classify", "ner", "evaluate",
                                     "fewshot"]
    assert not any(s["reused"] for s in first["stages"].values())

    cleaned = texts_by_id(first["stages"]["pii"]["output"])
    assert "doc-001" in cleaned and "doc-dup" not in cleaned  # ids kept, duplicate removed
    assert "<EMAIL_ADDRESS>" in cleaned["doc-001"]
    assert "jane.roe@example.com" not in cleaned["doc-001"]

    client = MlflowClient(first["tracking_uri"])
    parent = client.get_run(first["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["prefect.flow_run_id"]
    assert parent.data.params["pretrain.d_model"] == str(load_config(TINY_CONFIG).pretrain.d_model)
    for metric in ("val_perplexity", "unigram_perplexity", "documents_after_pii", "tokens"):
        assert metric in parent.data.metrics
    children = children_of(client, parent)
    assert sorted(c.data.tags["forgeline.stage"] for c in children) == sorted(first["stages"])
    pretrain_run = next(c for c in children if c.data.tags["forgeline.stage"] == "pretrain")
    curve = client.get_metric_history(pretrain_run.info.run_id, "train_loss")
    assert len(curve) > 1  # a training curve, not a single number
    logged = client.get_run(pretrain_run.info.run_id).data.metrics
    assert {"tokens_per_second", "flops_per_second", "step_time_seconds"} <= set(logged)
    assert any(name.startswith("system/") for name in logged)  # MLflow's system metrics
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"config.yaml", "data_report", "tokenize", "evaluate"} <= artifacts
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "data_report")}
    assert {"data_report/data_report.md", "data_report/data_funnel.png"} <= report
    evaluate_run = next(c for c in children if c.data.tags["forgeline.stage"] == "evaluate")
    assert {"pretrained_val_perplexity", "unigram_val_perplexity", "pretrained_bits_per_byte",
            "finetuned_val_perplexity"} <= set(evaluate_run.data.metrics)
    # the final model (preference-tuned after fine-tuning), logged on the parent run and
    # registered with its metrics; the first version becomes the champion
    assert first["registered_model"]["model_uri"] == "models:/forgeline/1"
    assert first["registered_model"]["stage"] == "dpo"
    version = client.get_model_version("forgeline", "1")
    final_run = next(c for c in children if c.data.tags["forgeline.stage"] == "dpo")
    assert version.run_id == parent.info.run_id
    assert version.tags["forgeline.stage_run_id"] == final_run.info.run_id
    assert parent.data.tags["champion_decision"] == "first"
    assert "challenger_score" in parent.data.metrics
    assert str(client.get_model_version_by_alias("forgeline", "champion").version) == "1"
    for metric in ("dpo_preference_accuracy", "fewshot_accuracy_k0", "fewshot_accuracy_k3"):
        assert metric in parent.data.metrics, metric
    evaluation = {a.path for a in client.list_artifacts(parent.info.run_id, "eval_report")}
    assert "eval_report/eval_report.md" in evaluation
    assert float(version.tags["val_perplexity"]) == pytest.approx(
        parent.data.metrics["val_perplexity"], rel=1e-5)
    assert parent.data.tags["forgeline.registered_model"] == "models:/forgeline/1"

    second = run(work, [f"source.paths=[{corpus}]"])
    assert all(s["reused"] for s in second["stages"].values())
    assert second["mlflow_run_id"] != first["mlflow_run_id"]
    assert second["stages"]["pii"]["output"] == first["stages"]["pii"]["output"]
    assert children_of(client, client.get_run(second["mlflow_run_id"]))  # still one per stage
    assert second["registered_model"]["version"] == "2"  # every pipeline run registers one
    # the same weights score the same: the champion is kept (a tie never promotes)
    assert client.get_run(second["mlflow_run_id"]).data.tags["champion_decision"] == "kept"
    assert second["champion"]["champion_score"] == pytest.approx(
        second["champion"]["challenger_score"])

    # the model leaves the pipeline: `forgeline export` takes the newest run's fine-tuned
    # model, and `forgeline generate` samples the registered version and the export alike
    from transformers import AutoModelForCausalLM

    from flows.cli import main
    from models.checkpoint import load_model

    assert main(["export", "--out", str(tmp_path / "hf"), "--workdir", str(work)]) == 0
    assert second["mlflow_run_id"] in capsys.readouterr().out  # the newest run's model
    finetuned = load_model(Path(second["stages"]["dpo"]["output"]) / "model.pt")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True)
    idx = torch.randint(0, finetuned.config.vocab_size, (1, 16))
    with torch.no_grad():
        assert (exported(idx).logits - finetuned(idx)[0]).abs().max().item() < 1e-4
    texts = []
    for model in ("models:/forgeline/2", str(tmp_path / "hf")):
        assert main(["generate", "--model", model, "--prompt", "The ", "--temperature", "0",
                     "--max-new-tokens", "8", "--workdir", str(work)]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1]


def test_until_stops_and_disabled_stage_passes_documents_on(prefect_server, corpus, tmp_path):
    result = run(tmp_path / "work", [f"source.paths=[{corpus}]", "dedup.enabled=false"],
                 until="pii")
    assert list(result["stages"]) == list(DATA_STAGES)
    assert result["stages"]["dedup"]["skipped"]
    assert "doc-dup" in texts_by_id(result["stages"]["pii"]["output"])  # nothing deduplicated
    assert "val_perplexity" not in result["metrics"]
    assert result["registered_model"] is None  # nothing trained, nothing registered


def test_failed_stage_is_redone_alone_after_the_cause_is_fixed(prefect_server, corpus, tmp_path):
    work = tmp_path / "work"
    pairs = tmp_path / "pairs.jsonl"
    overrides = [f"source.paths=[{corpus}]", f"finetune.data_path={pairs}"]
    with pytest.raises(StageInputError, match="finetune"):
        run(work, overrides)
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    failed = client.search_runs(
        [client.get_experiment_by_name("forgeline-test").experiment_id],
        filter_string="tags.`forgeline.kind` = 'pipeline'")
    assert failed[0].info.status == "FAILED"

    pairs.write_text("".join(json.dumps({"prompt": f"Say {w}:", "response": f" {w} {w}."}) + "\n"
                             for w in ["river", "stone", "apple", "music", "bread"] * 8))
    result = run(work, overrides)
    reused = {n for n, s in result["stages"].items() if s["reused"]}
    assert reused == {"crawl", "extract", "filter", "dedup", "pii", "tokenize", "pretrain"}
    assert result["stages"]["finetune"]["count"] > 0
