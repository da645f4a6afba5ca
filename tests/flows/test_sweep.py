"""Hyperparameter sweeps: settings validated before any work, the scheduler never runs two
trials that share a stage at once, and a real sweep flow (Prefect test server, MLflow
SQLite store, the tiny config on a local corpus) records its trials as nested runs with the
best one marked."""

import json
import math
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows.config import ConfigError, load_config
from flows.sweep import ParamRange, SweepConfig, apply_overrides, plan_sweep, schedule

ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = ROOT / "configs" / "tiny.yaml"
GRID = {"finetune.learning_rate": [1e-5, 3e-3], "finetune.weight_decay": [0.0, 0.1]}


def tiny(corpus, *overrides):
    return load_config(TINY_CONFIG, [f"source.paths=[{corpus}]", *overrides])


def test_plan_validates_every_trial_before_any_work(corpus):
    config = tiny(corpus)
    plan = plan_sweep(config, SweepConfig(parameters=GRID))
    assert plan.first == "finetune" and plan.stages == ["finetune"]
    assert len(plan.grid) == 4 and {json.dumps(g, sort_keys=True) for g in plan.grid} == {
        json.dumps({"finetune.learning_rate": lr, "finetune.weight_decay": wd}, sort_keys=True)
        for lr in GRID["finetune.learning_rate"] for wd in GRID["finetune.weight_decay"]}
    plan = plan_sweep(config, SweepConfig(parameters={"pretrain.max_steps": ["20", 30]},
                                          metric="val_perplexity"))
    # every mode that builds on pretraining (those switched off are skipped when a trial
    # runs them); the task heads (classify, ner) are leaves no metric here depends on
    assert plan.stages == ["pretrain", "domain", "finetune", "dpo", "evaluate"]
    assert plan.values["pretrain.max_steps"] == [20, 30]  # as the validated config holds them
    for parameters, message in [
        ({"finetune.learning_rat": [1e-4]}, "did you mean 'learning_rate'"),
        ({"finetune.learning_rate": [1e-4, -1]}, r"finetune.learning_rate: .*greater than 0"),
        ({"dedup.threshold": [0.5, 0.9]}, "data stages run once"),
        ({"registry.enabled": [True, False]}, "not a stage"),
        ({"pretrain.init_from": ["models:/x/1"]}, "cannot be swept"),
    ]:
        with pytest.raises(ConfigError, match=message):
            plan_sweep(config, SweepConfig(parameters=parameters))
    for metric in ("val_perplexity", "classify.classify_accuracy"):  # finetune cannot move them
        with pytest.raises(ConfigError, match="does not read the output of the swept"):
            plan_sweep(config, SweepConfig(parameters=GRID, metric=metric))
    with pytest.raises(ConfigError, match="runs before the first swept stage"):
        plan_sweep(config, SweepConfig(parameters=GRID, metric="pretrain.val_loss"))
    with pytest.raises(ConfigError, match="finetune.enabled is false"):
        plan_sweep(tiny(corpus, "finetune.enabled=false"), SweepConfig(parameters=GRID))
    with pytest.raises(ValueError, match="sampler=grid cannot"):
        SweepConfig(parameters={"finetune.learning_rate": {"low": 1e-5, "high": 1e-3}})
    with pytest.raises(ConfigError, match="integer setting"):
        plan_sweep(config, SweepConfig(sampler="optuna", parameters={
            "finetune.max_steps": ParamRange(low=1.5, high=4)}))
    assert apply_overrides(config, {"finetune.weight_decay": 0.1}).finetune.weight_decay == 0.1
    plan = plan_sweep(config, SweepConfig(parameters={"classify.learning_rate": [1e-3, 3e-3]},
                                          metric="classify.classify_accuracy",
                                          direction="maximize"))
    assert plan.first == "classify" and plan.stages == ["classify"]


def test_scheduler_never_runs_two_trials_of_one_group_at_once():
    """A pretrain x finetune grid: trials with the same pretrain settings share the
    pretrain stage directory, so they must not overlap; others run side by side."""
    items = [(n, {"pretrain.max_steps": p, "finetune.learning_rate": f})
             for n, (p, f) in enumerate([(p, f) for p in (10, 20) for f in (1, 2, 3)])]
    handed = iter(items)
    lock, active, overlaps, peak, done = threading.Lock(), [], [], [0], []
    threads: dict[int, threading.Thread] = {}

    def work(item):
        with lock:
            if any(other["pretrain.max_steps"] == item[1]["pretrain.max_steps"]
                   for _, other in active):
                overlaps.append(item[0])
            active.append(item)
            peak[0] = max(peak[0], len(active))
        time.sleep(0.05)
        with lock:
            active.remove(item)

    def start(number, overrides):
        thread = threading.Thread(target=work, args=((number, overrides),))
        threads[number] = thread
        thread.start()
        return number

    def wait(handles):
        while True:
            for number in handles:
                if not threads[number].is_alive():
                    done.append(number)
                    return number
            time.sleep(0.005)

    schedule(lambda: next(handed, None), start, wait, 3,
             lambda o: str(o["pretrain.max_steps"]))
    assert sorted(done) == list(range(6)) and not overlaps
    assert peak[0] == 2  # one trial of each pretrain setting at a time, both groups at once


def test_cli_explains_itself_and_refuses_bad_input_with_exit_2(tmp_path, capsys,
                                                               monkeypatch):
    from flows.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as shown:
        main(["sweep", "--help"])
    assert shown.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--param", "--range", "--sampler", "--trials", "--metric", "--direction",
                 "--max-parallel", "--workdir", "--json", "finetune.val_loss_after"):
        assert flag in out
    assert main(["sweep", "--param", "finetune.learning_rate=1e-4,-1",
                 "--param", "finetune.weight_decay=0"]) == 2
    err = capsys.readouterr().err
    assert "finetune.learning_rate" in err and "greater than 0" in err
    assert main(["sweep", "--range", "finetune.learning_rate=1e-5"]) == 2
    assert "KEY=LOW:HIGH" in capsys.readouterr().err
    assert main(["sweep", "--sampler", "optuna", "--trials", "0",
                 "--param", "finetune.weight_decay=0,0.1"]) == 2
    assert "trials" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()  # nothing ran


def children(client, run_id, kind=None):
    experiment = client.get_run(run_id).info.experiment_id
    query = f"tags.`mlflow.parentRunId` = '{run_id}'"
    if kind:
        query += f" and tags.`forgeline.kind` = '{kind}'"
    return client.search_runs([experiment], filter_string=query, max_results=100)


@pytest.mark.slow
def test_grid_and_optuna_sweeps_record_nested_trials_and_the_best(prefect_server, corpus,
                                                                  tmp_path):
    from flows.sweep import sweep_flow

    work = tmp_path / "work"
    config = tiny(corpus)
    result = sweep_flow(config=config, sweep=SweepConfig(parameters=GRID, max_parallel=2),
                        workdir=str(work))
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    sweep_run = client.get_run(result["mlflow_run_id"])
    assert sweep_run.info.status == "FINISHED"
    assert sweep_run.data.tags["forgeline.kind"] == "sweep"
    shared = {r.data.tags["forgeline.stage"] for r in children(client, sweep_run.info.run_id,
                                                              "stage")}
    assert shared == {"crawl", "extract", "filter", "dedup", "pii", "tokenize", "pretrain"}

    trials = children(client, sweep_run.info.run_id, "trial")
    assert len(trials) == 4 and all(t.info.status == "FINISHED" for t in trials)
    metric = "finetune.val_loss_after"
    values = {}
    for trial in trials:
        params = trial.data.params
        settings = (float(params["finetune.learning_rate"]),
                    float(params["finetune.weight_decay"]))
        values[trial.info.run_id] = trial.data.metrics[metric]
        assert math.isfinite(values[trial.info.run_id])
        assert trial.data.metrics["objective"] == values[trial.info.run_id]
        stages = children(client, trial.info.run_id, "stage")  # its stage run, nested
        assert [s.data.tags["forgeline.stage"] for s in stages] == ["finetune"]
        assert stages[0].data.params["finetune.learning_rate"] == params[
            "finetune.learning_rate"]
        values[settings] = values[trial.info.run_id]
    assert len({k for k in values if isinstance(k, tuple)}) == 4  # every combination
    marked = [t for t in trials if t.data.tags.get("best_trial") == "true"]
    assert len(marked) == 1
    best_id = min((k for k in values if isinstance(k, str)), key=values.get)
    assert marked[0].info.run_id == best_id == result["best"]["run_id"]
    assert sweep_run.data.tags["best_trial_run_id"] == best_id
    assert float(sweep_run.data.params["best.finetune.learning_rate"]) == float(
        marked[0].data.params["finetune.learning_rate"])
    assert sweep_run.data.metrics["best_objective"] == pytest.approx(values[best_id])
    # a learning rate of 1e-5 barely moves the model in 10 steps: 3e-3 must win
    assert float(marked[0].data.params["finetune.learning_rate"]) == 3e-3
    artifacts = {a.path for a in client.list_artifacts(sweep_run.info.run_id, "sweep")}
    assert {"sweep/sweep_report.md", "sweep/sweep_trials.png"} <= artifacts
    report = Path(result["report"]).read_text()
    assert report.count("**best**") == 1 and "finetune.weight_decay" in report

    # Optuna's TPE sampler over a log range and a choice: 4 more trials, the shared
    # stages reused
    optuna = SweepConfig(sampler="optuna", trials=4, seed=3, max_parallel=2, parameters={
        "finetune.learning_rate": {"low": 1e-5, "high": 3e-3, "log": True},
        "finetune.weight_decay": [0.0, 0.1]})
    second = sweep_flow(config=config, sweep=optuna, workdir=str(work))
    run = client.get_run(second["mlflow_run_id"])
    trials = children(client, run.info.run_id, "trial")
    assert len(trials) == 4
    rates = [float(t.data.params["finetune.learning_rate"]) for t in trials]
    assert all(1e-5 <= r <= 3e-3 for r in rates) and len(set(rates)) == 4
    best = min(trials, key=lambda t: t.data.metrics[metric])
    assert [t.info.run_id for t in trials if t.data.tags.get("best_trial") == "true"] == \
        [best.info.run_id]
    assert run.data.tags["best_trial_run_id"] == best.info.run_id
    assert all(r.data.tags["reused"] == "True"
               for r in children(client, run.info.run_id, "stage"))
