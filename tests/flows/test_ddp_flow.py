"""`forgeline run` with pretraining on two CPU processes (DDP over gloo): one pipeline run,
one pretrain run, one model, one set of metrics, and the loss curve of one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tasks.pretrain import PretrainConfig, pretrain
from tasks.training import checkpoint_files

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SETTINGS = ["--set", "pretrain.accelerator=cpu", "--set", "pretrain.num_threads=1",
            "--set", "pretrain.max_steps=40", "--set", "pretrain.log_every_steps=5",
            "--set", "pretrain.val_every_steps=20", "--set", "pretrain.checkpoint_every_steps=10"]


def test_ddp_pretraining_inside_the_flow_runs_the_pipeline_once(corpus, tmp_path):
    env = {**os.environ, "FORGELINE_PROGRESS": "0", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    work = tmp_path / "work"
    command = [str(BIN / "forgeline"), "run", "--config", str(ROOT / "configs" / "tiny.yaml"),
               "--workdir", str(work), "--until", "pretrain", "--json",
               "--set", f"source.paths=[{corpus}]", *SETTINGS,
               "--set", "pretrain.strategy=ddp", "--set", "pretrain.devices=2"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600,
                         check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "starting 2 training processes" in run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    stage = result["stages"]["pretrain"]
    assert stage["count"] == 40

    # one pipeline run and one pretrain run: the command line did not run again
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("forgeline-test")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.run_id for r in parents] == [result["mlflow_run_id"]]
    pretrain_runs = [r for r in runs if r.data.tags.get("forgeline.stage") == "pretrain"]
    assert [r.info.run_id for r in pretrain_runs] == [stage["mlflow_run_id"]]
    assert pretrain_runs[0].data.tags["mlflow.parentRunId"] == result["mlflow_run_id"]
    assert pretrain_runs[0].info.status == "FINISHED"

    # metrics from rank zero only: each logged step once
    curve = client.get_metric_history(stage["mlflow_run_id"], "train_loss")
    assert sorted(m.step for m in curve) == [1, 5, 10, 15, 20, 25, 30, 35, 40]
    val = client.get_metric_history(stage["mlflow_run_id"], "val_loss")
    assert sorted(m.step for m in val if m.step) == [20, 40]

    # one model, written by rank zero, and no leftovers
    out = Path(stage["output"])
    assert list((work / "stages").rglob("model.pt")) == [out / "model.pt"]
    assert not list((work / "stages").glob(".partial-*"))
    assert not checkpoint_files(out) and not list(out.rglob("*.tmp"))
    assert json.loads((out / "config.json").read_text())["resolved"]["world_size"] == 2

    # the same settings on one process, on the same tokens: the same shape of loss curve
    tokens = Path(result["stages"]["tokenize"]["output"])
    config = json.loads((out / "config.json").read_text())["training"]
    single: dict[int, float] = {}
    pretrain(PretrainConfig(**{**config, "strategy": "auto", "devices": 1}), tokens,
             tmp_path / "single", on_metrics=lambda metrics, step: single.update(
                 {step: metrics["train_loss"]} if "train_loss" in metrics else {}))
    ddp = {m.step: m.value for m in curve}
    assert sorted(single) == sorted(ddp)
    assert ddp[1] == pytest.approx(single[1], abs=0.1)  # the same initial model
    for losses in (single, ddp):
        assert losses[40] < losses[1] - 0.8  # both learn
        assert losses[20] < losses[5] and losses[40] < losses[20]
    assert ddp[40] == pytest.approx(single[40], abs=0.3)

