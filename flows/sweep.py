"""Hyperparameter sweeps: many trials of the training stages, the best one reported.

A sweep is one Prefect flow run and one MLflow run (``forgeline.kind`` = ``sweep``):

1. Every trial's settings are built and validated first (the base config with the trial's
   overrides, validated like ``--set``), so a bad key or value fails before any work,
   naming it.
2. What the trials share runs once, as in the pipeline: the data flow, then the training
   stages before the first swept stage (finished stage output is reused as always).
3. Each trial is a Prefect task run on the configured task runner (``execution``: local
   processes or Dask), at most ``max_parallel`` at a time, and a nested MLflow run under
   the sweep run (``forgeline.kind`` = ``trial``) with the trial's settings as params and
   the objective as a metric; its stage runs are nested under it. A trial runs the stages
   from the first swept one up to the one that yields the metric, through the pipeline's
   own stage functions, so a trial whose settings match a finished stage reuses it.
4. The best trial gets the tag ``best_trial=true`` (the others ``false``); the sweep run
   gets ``best_trial_run_id``, the best settings as params and tags (``best.<key>``) and
   the best value as the metrics ``best_objective`` and ``<metric>``; a markdown table of
   the trials and a plot of the metric per trial are a Prefect artifact
   (``forgeline-sweep``) and MLflow artifacts (``sweep/``).

Two trials that run at the same time never build the same stage directory: trials share a
stage only when they agree on every swept setting up to it, and then they agree on the
first swept stage's settings too, so trials with equal first-stage settings are never run
at once (the one that waits then reuses what the other built). Stages before the first
swept stage are the shared prefix, built once before any trial starts.

Sampling: ``grid`` runs every combination of the candidate lists, in order; ``optuna``
runs ``trials`` trials proposed by Optuna's TPE sampler (seeded), from lists (categorical)
or ranges (``{low, high, log, step}``: integers for integer settings).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from flows import forward_stage_logs
from flows.config import (
    DATA_STAGES,
    ConfigError,
    PipelineConfig,
    config_yaml,
    describe_validation_error,
    flatten,
)
from flows.engine import RETRIES, api_url_for_workers, describe, task_runner, worker_count
from flows.stages import Manifest, RunContext

log = logging.getLogger(__name__)

# The stages a trial may run, in order; the data stages run once for all trials.
TRIAL_STAGES = ("tokenize", "pretrain", "domain", "finetune", "dpo", "classify", "ner",
                "evaluate", "fewshot")
LEAVES = frozenset({"classify", "ner"})  # no later stage reads their output
# the stages whose output each stage reads (those switched off pass their input on)
READS = {"tokenize": (), "pretrain": ("tokenize",), "domain": ("pretrain",),
         "finetune": ("domain", "pretrain"), "dpo": ("finetune", "domain", "pretrain"),
         "classify": ("domain", "pretrain"), "ner": ("domain", "pretrain"),
         "evaluate": ("dpo", "finetune", "domain", "pretrain"),
         "fewshot": ("dpo", "finetune", "domain", "pretrain")}


def upstream(stage: str) -> set[str]:
    """``stage`` and every stage whose output reaches it."""
    seen, todo = set(), [stage]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(READS[name])
    return seen
SECTION_STAGE = {"source": "crawl"}  # config section -> the stage it configures
FIXED = {"pretrain.init_from", "pretrain.init_if_missing"}  # resolved once per sweep
KIND_TAG = "forgeline.kind"
TRIAL_TAG = "forgeline.trial"


class ParamRange(BaseModel):
    """A range for Optuna to sample from."""

    model_config = ConfigDict(extra="forbid")

    low: int | float = Field(description="Smallest value.")
    high: int | float = Field(description="Largest value.")
    log: bool = Field(False, description="Sample on a log scale (low must be above 0).")
    step: int | float | None = Field(
        None, description="Sample multiples of step from low; empty = any value.")

    @model_validator(mode="after")
    def _ordered(self) -> ParamRange:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")
        if self.log and self.step is not None:
            raise ValueError("a range is either log or stepped, not both")
        return self


class SweepConfig(BaseModel):
    """Which settings a sweep varies, how it picks them and what it optimizes."""

    model_config = ConfigDict(extra="forbid")

    parameters: dict[str, list[Any] | ParamRange] = Field(
        description="Dotted settings of the pipeline config (as for --set) -> candidate "
                    "values (a list) or, with sampler=optuna, a range {low, high, log, "
                    "step}. E.g. {finetune.learning_rate: [1e-4, 5e-4], "
                    "finetune.weight_decay: [0.0, 0.1]}. Settings of tokenize, pretrain, "
                    "finetune and evaluate can be swept.")
    sampler: Literal["grid", "optuna"] = Field(
        "grid", description="'grid': every combination of the lists, in order; 'optuna': "
                            "`trials` trials proposed by Optuna's TPE sampler (seeded).")
    trials: int = Field(8, ge=1, le=1000,
                        description="Trials to run with sampler=optuna (grid runs them all).")
    metric: str = Field(
        "finetune.val_loss_after",
        description="What to optimize: a stage's stat as '<stage>.<stat>' (e.g. "
                    "finetune.val_loss_after, evaluate.finetuned_val_perplexity) or a "
                    "headline metric of the pipeline run (e.g. val_perplexity).")
    direction: Literal["minimize", "maximize"] = Field(
        "minimize", description="Whether the best trial has the lowest or highest metric.")
    max_parallel: int = Field(
        2, ge=1, description="Trials that run at the same time at most (each a task run on "
                             "the task runner of `execution`).")
    seed: int = Field(0, description="Seed of Optuna's sampler.")

    @model_validator(mode="after")
    def _consistent(self) -> SweepConfig:
        if not self.parameters:
            raise ValueError("parameters is empty: name at least one setting to sweep")
        for key, values in self.parameters.items():
            if isinstance(values, list) and not values:
                raise ValueError(f"parameters.{key}: no candidate values")
            if isinstance(values, ParamRange) and self.sampler == "grid":
                raise ValueError(f"parameters.{key} is a range, which sampler=grid cannot "
                                 "enumerate: give a list of values, or set sampler=optuna")
        return self


# settings of one trial ------------------------------------------------------------------
def _get(data: dict, key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def _set(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"sweep parameter {key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(config: PipelineConfig, overrides: dict[str, Any],
                    origin: str = "sweep settings") -> PipelineConfig:
    """``config`` with dotted ``overrides`` applied, validated as a whole (ConfigError
    naming the setting, with a did-you-mean for unknown ones)."""
    data = config.model_dump()
    for key, value in overrides.items():
        try:
            current = _get(data, key)
        except KeyError:
            current = None
        if isinstance(current, dict):
            raise ConfigError(f"sweep parameter {key} is a section, not a setting; name one "
                              f"of its settings, e.g. {key}.{next(iter(current), '...')}")
        _set(data, key, value)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, origin)) from None


def _stage_of(key: str) -> str:
    section = key.split(".")[0]
    return SECTION_STAGE.get(section, section)


def metric_stage(metric: str) -> str:
    """The stage whose output yields ``metric``."""
    from flows.pipeline import HEADLINE

    if metric in HEADLINE:
        return HEADLINE[metric][0]
    stage, dot, stat = metric.partition(".")
    if dot and stat and stage in TRIAL_STAGES:
        return stage
    raise ConfigError(f"sweep metric {metric!r}: expected '<stage>.<stat>' with a stage of "
                      f"{', '.join(TRIAL_STAGES)} (e.g. finetune.val_loss_after), or a "
                      f"headline metric: {', '.join(HEADLINE)}")


class Plan(BaseModel):
    """A validated sweep: which stages are shared, which each trial runs."""

    first: str  # the first swept stage
    stages: list[str]  # what a trial runs, in order
    values: dict[str, list[Any]]  # list candidates, as the validated config holds them
    ranges: dict[str, ParamRange]
    integer: dict[str, bool]  # range key -> the setting is an integer
    grid: list[dict[str, Any]]  # grid: every trial's overrides


def plan_sweep(config: PipelineConfig, sweep: SweepConfig) -> Plan:
    """Check every key, value and combination against the pipeline config; raises
    ConfigError naming the first problem."""
    base = config.model_dump()
    stages = set()
    for key in sweep.parameters:
        stage = _stage_of(key)
        if key in FIXED:
            raise ConfigError(f"sweep parameter {key}: the model that pretraining continues "
                              "from is resolved once per sweep and cannot be swept")
        if stage in DATA_STAGES:
            raise ConfigError(f"sweep parameter {key}: the data stages run once for all "
                              f"trials; sweep settings of {', '.join(TRIAL_STAGES)}")
        if stage not in TRIAL_STAGES:
            apply_overrides(config, {key: _get_or(base, key)})  # an unknown key: did you mean
            raise ConfigError(f"sweep parameter {key}: {key.split('.')[0]!r} is not a stage "
                              f"that a trial runs; sweep settings of "
                              f"{', '.join(TRIAL_STAGES)}")
        stages.add(stage)
    first = min(stages, key=TRIAL_STAGES.index)
    last = metric_stage(sweep.metric)
    if TRIAL_STAGES.index(last) < TRIAL_STAGES.index(first):
        raise ConfigError(f"sweep metric {sweep.metric!r} comes from the {last} stage, which "
                          f"runs before the first swept stage ({first}): every trial would "
                          "score the same")
    from flows.pipeline import HEADLINE

    stat = HEADLINE[sweep.metric][1] if sweep.metric in HEADLINE else \
        sweep.metric.partition(".")[2]
    # the pretrained model's (and the unigram baseline's) scores do not read fine-tuning
    source = "pretrain" if last == "evaluate" and stat.startswith(("pretrained_", "unigram_")) \
        else last
    if not stages & upstream(source):
        raise ConfigError(f"sweep metric {sweep.metric!r} comes from the {source} stage, which "
                          f"does not read the output of the swept stage(s) "
                          f"({', '.join(sorted(stages))}): every trial would score the same")
    trial_stages = [name for name in
                    TRIAL_STAGES[TRIAL_STAGES.index(first):TRIAL_STAGES.index(last) + 1]
                    if name not in LEAVES or name in stages or name == last]

    values: dict[str, list[Any]] = {}
    ranges: dict[str, ParamRange] = {}
    integer: dict[str, bool] = {}
    for key, candidates in sweep.parameters.items():
        if isinstance(candidates, ParamRange):
            current = _get_or(base, key)
            is_int = isinstance(current, int) and not isinstance(current, bool)
            if is_int and not all(float(v).is_integer() for v in (
                    candidates.low, candidates.high, candidates.step or 1)):
                raise ConfigError(f"sweep parameter {key} is an integer setting: its range "
                                  "needs integer low, high and step")
            for end in (candidates.low, candidates.high):
                apply_overrides(config, {key: int(end) if is_int else end})
            ranges[key], integer[key] = candidates, is_int
            continue
        normalized = []
        for value in candidates:
            checked = apply_overrides(config, {key: value}).model_dump(mode="json")
            value = _get(checked, key)
            if value in normalized:
                raise ConfigError(f"sweep parameter {key}: the value {value!r} is given twice")
            normalized.append(value)
        if sweep.sampler == "optuna" and not all(
                v is None or isinstance(v, (bool, int, float, str)) for v in normalized):
            raise ConfigError(f"sweep parameter {key}: Optuna chooses among numbers, strings "
                              "and booleans only; use sampler=grid for other values")
        values[key] = normalized

    grid = []
    if sweep.sampler == "grid":
        keys = list(values)
        grid = [dict(zip(keys, combo)) for combo in itertools.product(*values.values())]
        for overrides in grid:
            trial = apply_overrides(config, overrides)
            _check_runs_metric(trial, last, sweep.metric, overrides)
    else:
        _check_runs_metric(config, last, sweep.metric, {})
    return Plan(first=first, stages=trial_stages, values=values, ranges=ranges,
                integer=integer, grid=grid)


def _get_or(data: dict, key: str) -> Any:
    try:
        return _get(data, key)
    except KeyError:
        return None


def _check_runs_metric(config: PipelineConfig, stage: str, metric: str,
                       overrides: dict) -> None:
    if stage == "finetune" and not config.finetune.enabled:
        where = f" (with {overrides})" if overrides else ""
        raise ConfigError(f"sweep metric {metric!r} comes from fine-tuning, but "
                          f"finetune.enabled is false{where}")


# MLflow runs ------------------------------------------------------------------------------
def _start_sweep_run(tracker, config: PipelineConfig, sweep: SweepConfig, work: Path) -> str:
    """The sweep's MLflow run; a retried Prefect flow run continues its own."""
    from prefect.runtime import flow_run

    from flows.tracking import FLOW_RUN_TAG

    flow_run_id = flow_run.get_id() or ""
    if flow_run_id:
        previous = tracker.client.search_runs(
            [tracker.experiment_id],
            filter_string=f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}' and "
                          f"tags.`{KIND_TAG}` = 'sweep'", max_results=1)
        if previous:
            run_id = previous[0].info.run_id
            tracker.client.update_run(run_id, status="RUNNING")
            return run_id
    run = tracker.client.create_run(
        tracker.experiment_id, run_name=f"sweep-{flow_run.get_name() or 'local'}",
        tags={KIND_TAG: "sweep", FLOW_RUN_TAG: flow_run_id, "forgeline.workdir": str(work),
              "prefect.flow_run_name": flow_run.get_name() or ""})
    run_id = run.info.run_id
    params = flatten(config.model_dump(mode="json"))
    params.update({f"sweep.{k}": v for k, v in flatten(
        sweep.model_dump(mode="json", exclude={"parameters"})).items()})
    params["sweep.parameters"] = json.dumps(sweep.model_dump(mode="json")["parameters"])
    tracker.log_params(run_id, params)
    return run_id


def _earlier_trials(tracker, sweep_run_id: str) -> dict[str, Any]:
    """Trial runs an earlier attempt of this flow run left under the sweep run, by their
    settings (JSON)."""
    runs = tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{sweep_run_id}' and "
                      f"tags.`{KIND_TAG}` = 'trial'", max_results=1000)
    return {r.data.tags.get("forgeline.trial_settings", ""): r for r in runs}


def _key(overrides: dict[str, Any]) -> str:
    return json.dumps(overrides, sort_keys=True, default=str)


# one trial --------------------------------------------------------------------------------
def run_stage(name: str, config: PipelineConfig, ctx: RunContext, done: dict[str, Manifest],
              init: dict | None) -> Manifest | None:
    """One training stage of a trial, through the pipeline's own stage function (the
    stage's MLflow run nested under ``ctx.parent_run_id``); None when it is disabled."""
    from flows.pipeline import final_model
    from flows.stages import (
        classify_stage,
        domain_stage,
        dpo_stage,
        evaluate_stage,
        fewshot_stage,
        finetune_stage,
        ner_stage,
        pretrain_stage,
        tokenize_stage,
    )

    if name == "tokenize":
        return tokenize_stage(config, done["corpus"], ctx, init)
    if name == "pretrain":
        return pretrain_stage(config, done["tokenize"], ctx, init)
    section = getattr(config, name)
    if not getattr(section, "enabled", True):
        return None
    tokens, corpus = done["tokenize"], done["corpus"]
    backbone = done.get("domain") or done["pretrain"]
    if name == "domain":
        return domain_stage(section, tokens, done["pretrain"], corpus, ctx)
    if name == "finetune":
        return finetune_stage(section, tokens, backbone, corpus, ctx)
    if name == "dpo":
        return dpo_stage(section, tokens, done.get("finetune") or backbone, corpus, ctx)
    if name in ("classify", "ner"):
        stage = classify_stage if name == "classify" else ner_stage
        return stage(section, tokens, backbone, corpus, ctx)
    final = final_model(done)
    if name == "evaluate":
        return evaluate_stage(config, tokens, done["pretrain"],
                              done[final] if final not in (None, "pretrain") else None, ctx)
    if name == "fewshot":
        return fewshot_stage(config, tokens, done[final], corpus, ctx)
    raise ValueError(f"a sweep trial cannot run the {name} stage")


def objective_value(metric: str, stages: dict[str, Manifest]) -> float:
    """The metric of a trial's stages: '<stage>.<stat>' or a headline metric."""
    from flows.pipeline import HEADLINE, headline_metrics

    if metric in HEADLINE:
        found = headline_metrics(stages).get(metric)
        where = f"the headline metrics ({HEADLINE[metric][0]}.{HEADLINE[metric][1]})"
    else:
        stage, _, stat = metric.partition(".")
        stats = stages.get(stage, {}).get("stats", {})
        found = stats.get(stat)
        where = f"the {stage} stage's stats ({', '.join(sorted(stats)) or 'none'})"
    if found is None:
        raise ConfigError(f"sweep metric {metric!r} is not among {where}")
    return float(found)


@task(name="sweep-trial", **RETRIES)
def trial_task(config: PipelineConfig, ctx: RunContext, shared: dict[str, Manifest],
               stages: list[str], metric: str, init: dict | None,
               threads: int = 0) -> dict[str, Any]:
    """Run one trial's stages (``ctx.parent_run_id`` is the trial's MLflow run); returns
    the objective and each stage's summary."""
    forward_stage_logs()
    if threads:  # parallel trials share the cores (a config's num_threads still wins)
        import torch

        torch.set_num_threads(threads)
    done = dict(shared)
    for name in stages:
        manifest = run_stage(name, config, ctx, done, init)
        if manifest is not None:
            done[name] = manifest
    ran = {n: m for n, m in done.items() if n in stages}
    return {"objective": objective_value(metric, {**done}),
            "stages": {n: {k: m[k] for k in ("output", "count", "unit", "reused", "stats",
                                              "mlflow_run_id") if k in m}
                       for n, m in ran.items()}}


# the sweep --------------------------------------------------------------------------------
class _Sampler:
    """Hands out trials' overrides (grid order, or Optuna's asks) and takes results."""

    def __init__(self, sweep: SweepConfig, plan: Plan):
        self.sweep, self.plan = sweep, plan
        self.study = None
        self.pending: dict[int, Any] = {}
        self.asked = 0
        if sweep.sampler == "optuna":
            import optuna
            from optuna.distributions import (
                CategoricalDistribution,
                FloatDistribution,
                IntDistribution,
            )

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            self.study = optuna.create_study(
                direction=sweep.direction, sampler=optuna.samplers.TPESampler(seed=sweep.seed))
            self.distributions = {k: CategoricalDistribution(v) for k, v in plan.values.items()}
            for key, r in plan.ranges.items():
                if plan.integer[key]:
                    self.distributions[key] = IntDistribution(
                        int(r.low), int(r.high), log=r.log, step=int(r.step or 1))
                else:
                    self.distributions[key] = FloatDistribution(
                        float(r.low), float(r.high), log=r.log,
                        step=float(r.step) if r.step is not None else None)
        self.total = len(plan.grid) if sweep.sampler == "grid" else sweep.trials

    def next(self) -> tuple[int, dict[str, Any]] | None:
        if self.asked >= self.total:
            return None
        number = self.asked
        self.asked += 1
        if self.study is None:
            return number, dict(self.plan.grid[number])
        trial = self.study.ask(self.distributions)
        self.pending[number] = trial
        ordered = {k: trial.params[k] for k in self.sweep.parameters}
        return number, ordered

    def tell(self, number: int, value: float | None) -> None:
        if self.study is None:
            return
        from optuna.trial import TrialState

        trial = self.pending.pop(number)
        if value is None:
            self.study.tell(trial, state=TrialState.FAIL)
        else:
            self.study.tell(trial, value)


def _resolve_init(config: PipelineConfig, ctx: RunContext, tracker) -> dict | None:
    """The model pretraining continues from (pretrain.init_from), pinned on the sweep run
    as the pipeline pins it on its run."""
    from flows.model_tools import FRESH, fetch_init_model

    if not config.pretrain.init_from:
        return None
    pinned = tracker.client.get_run(ctx.parent_run_id).data.tags.get("forgeline.parent_model")
    init = fetch_init_model(config.pretrain.init_from, config.pretrain.init_if_missing,
                            ctx.workdir, ctx.tracking_uri.get_secret_value(), pinned)
    tracker.set_tags(ctx.parent_run_id,
                     {"forgeline.parent_model": init["resolved"] if init else FRESH})
    return init


@flow(name="forgeline-sweep-trials")
def trials_flow(config: PipelineConfig, sweep: SweepConfig, plan: Plan, ctx: RunContext,
                shared: dict[str, Manifest], init: dict | None = None) -> list[dict[str, Any]]:
    """Submit the trials to this flow's task runner, at most ``max_parallel`` at a time and
    never two with the same settings of the first swept stage at once; record each as a
    nested MLflow run."""
    from prefect.futures import as_completed

    from flows.pipeline import headline_metrics
    from flows.tracking import Tracker

    forward_stage_logs()
    logger = get_run_logger()
    tracker = Tracker(ctx.tracking_uri.get_secret_value(), ctx.experiment)
    earlier = _earlier_trials(tracker, ctx.parent_run_id)
    first_keys = [k for k in sweep.parameters if _stage_of(k) == plan.first]
    parallel = min(sweep.max_parallel, worker_count(config.execution)) \
        if config.execution.engine == "local" else sweep.max_parallel
    independent = [name for name in plan.stages if plan.first not in upstream(name)]
    if independent and parallel > 1:
        # two trials differing only in the first swept stage's settings would build the
        # same output of these stages at once, in one directory
        logger.info("sweep: trials run one at a time: %s does not read the %s stage's "
                    "output, so parallel trials could build it twice at once",
                    ", ".join(independent), plan.first)
        parallel = 1
    threads = max(1, worker_count(config.execution) // parallel) if parallel > 1 else 0
    sampler = _Sampler(sweep, plan)
    results: list[dict[str, Any]] = []
    running: dict[Any, dict[str, Any]] = {}  # future -> trial

    def group(overrides: dict[str, Any]) -> str:
        return _key({k: overrides[k] for k in first_keys})

    def finish(trial: dict[str, Any], value: float | None, error: str | None,
               stages: dict | None = None) -> None:
        run_id = trial["run_id"]
        if value is not None and not math.isfinite(value):
            error, value = f"the metric is {value}", None
        trial.update(value=value, error=error, stages=stages or {},
                     state="finished" if value is not None else "failed")
        if value is not None:
            metrics = {sweep.metric: value, "objective": value}
            metrics.update(headline_metrics(stages or {}))
            tracker.log_metrics(run_id, metrics)
        if error:
            tracker.set_tags(run_id, {"error": error[:5000]})
        tracker.finish(run_id, ok=value is not None)
        sampler.tell(trial["number"], value)
        results.append(trial)
        logger.info("trial %d %s: %s = %s%s", trial["number"], _describe(trial["overrides"]),
                    sweep.metric, "-" if value is None else f"{value:.5g}",
                    f" (failed: {error})" if error else "")

    def start(number: int, overrides: dict[str, Any]) -> Any:
        trial_config = apply_overrides(config, overrides)
        settings = _key(overrides)
        before = earlier.get(settings)
        if before is not None and before.info.status == "FINISHED" and \
                "objective" in before.data.metrics:
            logger.info("trial %d %s: finished by an earlier attempt of this flow run "
                        "(MLflow run %s)", number, _describe(overrides), before.info.run_id)
            trial = {"number": number, "overrides": overrides, "run_id": before.info.run_id,
                     "reused": True}
            value = before.data.metrics["objective"]
            trial.update(value=value, error=None, stages={}, state="finished")
            sampler.tell(number, value)
            results.append(trial)
            return None
        if before is not None and before.info.status == "RUNNING":
            tracker.finish(before.info.run_id, ok=False)  # left by a killed attempt
        run = tracker.client.create_run(
            tracker.experiment_id, run_name=f"trial-{number:03d}",
            tags={"mlflow.parentRunId": ctx.parent_run_id, KIND_TAG: "trial",
                  TRIAL_TAG: str(number), "forgeline.trial_settings": settings})
        tracker.log_params(run.info.run_id, overrides)
        trial = {"number": number, "overrides": overrides, "run_id": run.info.run_id,
                 "reused": False}
        trial_ctx = ctx.model_copy(update={"parent_run_id": run.info.run_id})
        future = trial_task.with_options(task_run_name=f"trial-{number:03d}").submit(
            trial_config, trial_ctx, shared, plan.stages, sweep.metric, init, threads)
        running[future] = trial
        return future

    def wait(futures: list) -> Any:
        future = next(iter(as_completed(futures)))
        trial = running.pop(future)
        try:
            outcome = future.result()
        except Exception as exc:  # noqa: BLE001 - a failed trial is recorded, others go on
            trial["exception"] = exc
            finish(trial, None, f"{type(exc).__name__}: {exc}")
        else:
            finish(trial, outcome["objective"], None, outcome["stages"])
        return future

    schedule(sampler.next, start, wait, parallel, group)
    return sorted(results, key=lambda t: t["number"])


def schedule(next_item: Callable[[], tuple[int, dict[str, Any]] | None],
             start: Callable[[int, dict[str, Any]], Any],
             wait: Callable[[list], Any], parallel: int,
             group: Callable[[dict[str, Any]], str]) -> None:
    """Run every item ``next_item`` hands out (None: no more), at most ``parallel`` at once
    and never two of the same ``group`` at once; an item of a busy group waits while later
    ones go ahead. ``start(number, overrides)`` returns a handle, or None when the item
    finished at once; ``wait(handles)`` blocks until one of them is done and returns it.
    New items are asked for only when a slot is free (Optuna proposes each trial knowing
    the results so far), at most ``4 * parallel`` of them waiting."""
    lookahead = 4 * parallel
    running: dict[Any, str] = {}  # handle -> group
    waiting: list[tuple[int, dict[str, Any]]] = []
    exhausted = False

    def launch(item: tuple[int, dict[str, Any]]) -> None:
        handle = start(*item)
        if handle is not None:
            running[handle] = group(item[1])

    while True:
        for item in list(waiting):  # the oldest waiting first, once their group is free
            if len(running) < parallel and group(item[1]) not in running.values():
                waiting.remove(item)
                launch(item)
        # ask for more while there is room, looking past waiting items a little way so
        # that another group's trial can use a free slot
        while not exhausted and len(running) < parallel and len(waiting) < lookahead:
            item = next_item()
            if item is None:
                exhausted = True
            elif group(item[1]) in running.values():
                waiting.append(item)
            else:
                launch(item)
        if not running:
            if waiting:
                continue
            return
        running.pop(wait(list(running)))


def _describe(overrides: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in overrides.items())


def best_trial(trials: list[dict[str, Any]], direction: str) -> dict[str, Any] | None:
    """The finished trial with the lowest (minimize) or highest metric; the earliest wins
    a tie."""
    finished = [t for t in trials if t.get("value") is not None]
    if not finished:
        return None
    sign = 1 if direction == "minimize" else -1
    return min(finished, key=lambda t: (sign * t["value"], t["number"]))


def sweep_markdown(sweep: SweepConfig, trials: list[dict[str, Any]],
                   best: dict[str, Any] | None, run_id: str) -> str:
    keys = list(sweep.parameters)
    lines = [f"# forgeline sweep: {sweep.metric} ({sweep.direction})", "",
             (f"{len(trials)} trials ({sweep.sampler} sampler), "
              f"{sum(t.get('value') is not None for t in trials)} finished. MLflow run "
              f"`{run_id}`."), "",
             "| trial | " + " | ".join(f"`{k}`" for k in keys) + f" | {sweep.metric} | |",
             "|---:|" + "---|" * len(keys) + "---:|---|"]
    for t in trials:
        value = "failed" if t.get("value") is None else f"{t['value']:.5g}"
        mark = "**best**" if best is not None and t["number"] == best["number"] else ""
        if t.get("error"):
            mark = t["error"].splitlines()[0][:80].replace("|", "/")
        lines.append(f"| {t['number']} | " + " | ".join(str(t["overrides"][k]) for k in keys)
                     + f" | {value} | {mark} |")
    if best is not None:
        lines += ["", (f"Best: trial {best['number']} ({_describe(best['overrides'])}), "
                      f"{sweep.metric} = {best['value']:.5g}, MLflow run `{best['run_id']}`.")]
    return "\n".join(lines)


def plot_trials(path: Path, sweep: SweepConfig, trials: list[dict[str, Any]],
                best: dict[str, Any] | None) -> None:
    """The metric of each finished trial, the best one marked, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tasks.shards import atomic_path

    done = [t for t in trials if t.get("value") is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([t["number"] for t in done], [t["value"] for t in done], "o", label="trial")
    if best is not None:
        ax.plot([best["number"]], [best["value"]], "*", markersize=16, color="tab:red",
                label=f"best (trial {best['number']})")
    failed = [t["number"] for t in trials if t.get("value") is None]
    for number in failed:
        ax.axvline(number, color="gray", alpha=0.3, linestyle=":")
    ax.set_xlabel("trial")
    ax.set_ylabel(sweep.metric)
    ax.set_title(f"{sweep.metric} per trial ({sweep.direction})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _shared_prefix(config: PipelineConfig, plan: Plan, ctx: RunContext,
                   init: dict | None) -> dict[str, Manifest]:
    """The data flow and the training stages before the first swept one, run once."""
    from flows.pipeline import data_flow, train_flow

    with api_url_for_workers():
        stages = data_flow.with_options(task_runner=task_runner(config.execution))(config, ctx)
    corpus = next(m for m in reversed(stages.values()) if not m.get("skipped"))
    shared: dict[str, Manifest] = {"corpus": corpus}
    before = [name for name in TRIAL_STAGES[:TRIAL_STAGES.index(plan.first)]
              if name not in LEAVES]
    phase = [name for name in before if name in ("tokenize", "pretrain")]
    if phase:
        with api_url_for_workers():
            trained = train_flow.with_options(task_runner=task_runner(config.execution))(
                config, ctx, corpus, phase[-1])
        shared.update(trained)
    for name in before[len(phase):]:  # the fine-tuning modes the trials build on
        manifest = run_stage(name, config, ctx, shared, init)
        if manifest is not None:
            shared[name] = manifest
    return shared


@flow(name="forgeline-sweep")
def sweep_flow(config: PipelineConfig, sweep: SweepConfig,
               workdir: str | None = None) -> dict[str, Any]:
    """A hyperparameter sweep: trials of the training stages with settings varied as
    ``sweep`` says, each a Prefect task run and a nested MLflow run; the best marked.

    Args:
        config: the base settings of every trial (as for the pipeline).
        sweep: what varies, the sampler, the metric and its direction.
        workdir: stage outputs, reports and (by default) the MLflow store; empty means
            $FORGELINE_WORKDIR, or ./work.
    """
    from prefect.artifacts import create_markdown_artifact

    from flows.tracking import Tracker, display_uri, tracking_uri
    from tasks.shards import write_text_atomic

    forward_stage_logs()
    logger = get_run_logger()
    plan = plan_sweep(config, sweep)  # every trial's settings, before any work
    work = Path(workdir or os.environ.get("FORGELINE_WORKDIR") or "work").resolve()
    work.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(work)
    tracker = Tracker(uri, config.experiment, artifact_root=work / "mlartifacts")
    run_id = _start_sweep_run(tracker, config, sweep, work)
    total = len(plan.grid) if sweep.sampler == "grid" else sweep.trials
    logger.info("sweep: %d trials (%s) of %s, optimizing %s (%s); MLflow run %s in %s; "
                "trials on %s, %d at a time", total, sweep.sampler, " -> ".join(plan.stages),
                sweep.metric, sweep.direction, run_id, display_uri(uri),
                describe(config.execution), sweep.max_parallel)
    reports = work / "reports" / run_id
    write_text_atomic(reports / "config.yaml", config_yaml(config))
    tracker.log_artifact(run_id, reports / "config.yaml")
    ctx = RunContext(workdir=str(work), tracking_uri=uri, experiment=config.experiment,
                     parent_run_id=run_id)
    started = time.perf_counter()
    try:
        init = _resolve_init(config, ctx, tracker) if "tokenize" in plan.stages or \
            "pretrain" in plan.stages else None
        shared = _shared_prefix(config, plan, ctx, init)
        runner = task_runner(config.execution)
        if config.execution.engine == "local":
            from prefect.task_runners import ProcessPoolTaskRunner

            runner = ProcessPoolTaskRunner(
                max_workers=min(sweep.max_parallel, worker_count(config.execution)))
        with api_url_for_workers():
            trials = trials_flow.with_options(task_runner=runner)(
                config, sweep, plan, ctx, shared, init)
        best = best_trial(trials, sweep.direction)
        for trial in trials:
            if trial.get("value") is not None:
                tracker.set_tags(trial["run_id"], {
                    "best_trial": "true" if trial is best else "false"})
        markdown = sweep_markdown(sweep, trials, best, run_id)
        write_text_atomic(reports / "sweep_report.md", markdown)
        plot_trials(reports / "sweep_trials.png", sweep, trials, best)
        rows = [{k: t.get(k) for k in ("number", "overrides", "value", "state", "error",
                                       "run_id", "reused")} for t in trials]
        write_text_atomic(reports / "sweep_trials.json", json.dumps(rows, indent=2,
                                                                    default=str))
        for name in ("sweep_report.md", "sweep_trials.png", "sweep_trials.json"):
            tracker.log_artifact(run_id, reports / name, artifact_path="sweep")
        tracker.log_metrics(run_id, {"trials": len(trials), "trials_finished": sum(
            t.get("value") is not None for t in trials)})
        if best is None:
            failures = [t["exception"] for t in trials if "exception" in t]
            if failures:
                raise failures[0]
            raise RuntimeError(f"every trial of the sweep failed; see {reports}")
        tracker.set_tags(run_id, {"best_trial_run_id": best["run_id"],
                                  "best_trial": str(best["number"]),
                                  **{f"best.{k}": v for k, v in best["overrides"].items()}})
        tracker.log_params(run_id, {f"best.{k}": v for k, v in best["overrides"].items()})
        tracker.log_metrics(run_id, {"best_objective": best["value"], sweep.metric: best["value"]})
        create_markdown_artifact(markdown=markdown, key="forgeline-sweep",
                                 description="forgeline sweep: trials and the best one")
        logger.info("sweep: best trial %d (%s): %s = %.5g, in %.0fs", best["number"],
                    _describe(best["overrides"]), sweep.metric, best["value"],
                    time.perf_counter() - started)
    except BaseException:
        tracker.finish(run_id, ok=False)
        raise
    tracker.finish(run_id)
    return {"mlflow_run_id": run_id, "tracking_uri": display_uri(uri), "workdir": str(work),
            "metric": sweep.metric, "direction": sweep.direction, "report": str(
                reports / "sweep_report.md"),
            "best": {k: best.get(k) for k in ("number", "overrides", "value", "run_id")},
            "trials": rows, "shared": sorted(n for n in shared if n != "corpus")}
