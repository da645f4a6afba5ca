"""The forgeline pipeline: a Prefect flow of three subflows (data, train, evaluate).

Every stage output lives in a directory keyed by its config and inputs, so a rerun of
the flow (or a Prefect retry of a failed flow run) reuses each finished stage and
redoes only what failed or changed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.runtime import flow_run

from flows import forward_stage_logs
from flows.config import DATA_STAGES, STAGES, PipelineConfig, StageName, config_yaml, flatten
from flows.engine import api_url_for_workers, describe, task_runner
from flows.model_registry import log_and_register
from flows.model_tools import FRESH, fetch_init_model
from flows.report import data_report
from flows.stages import (
    DATA_STAGE_TASKS,
    Manifest,
    RunContext,
    crawl_stage,
    evaluate_stage,
    finetune_stage,
    pretrain_stage,
    tokenize_stage,
)
from flows.tracking import FLOW_RUN_TAG, Tracker, display_uri, tracking_uri, ui_command
from tasks.shards import write_text_atomic


def _reached(stage: str, until: str | None) -> bool:
    """True once ``stage`` is past ``until`` (nothing after ``until`` runs)."""
    return until is not None and STAGES.index(stage) > STAGES.index(until)


@flow(name="forgeline-data")
def data_flow(config: PipelineConfig, ctx: RunContext,
              until: StageName | None = None) -> dict[str, Manifest]:
    """crawl -> extract -> filter -> dedup -> pii; a disabled stage passes its input on.

    Each shard of extract, filter, dedup and pii is a task run on this flow's task runner
    (``execution`` in the config picks it)."""
    forward_stage_logs()
    get_run_logger().info("data stages run on %s", describe(config.execution))
    manifests: dict[str, Manifest] = {"crawl": crawl_stage(config, ctx)}
    current = manifests["crawl"]
    for name in DATA_STAGES[1:]:
        if _reached(name, until):
            break
        section = getattr(config, name)
        if not section.enabled:
            get_run_logger().info("%s: disabled (%s.enabled=false); passing %d documents on",
                                  name, name, current["count"])
            manifests[name] = {"stage": name, "skipped": True, "output": current["output"],
                               "count": current["count"], "dir": current["dir"]}
            continue
        current = DATA_STAGE_TASKS[name](section, current, ctx)
        manifests[name] = current
    return manifests


@flow(name="forgeline-train")
def train_flow(config: PipelineConfig, ctx: RunContext, corpus: Manifest,
               until: StageName | None = None) -> dict[str, Manifest]:
    """tokenize -> pretrain -> finetune. Tokenize encodes each shard as a task run on this
    flow's task runner (``execution``); training runs in this process."""
    forward_stage_logs()
    init = None
    if config.pretrain.init_from:  # continued pretraining: its model and tokenizer
        tracker = Tracker(ctx.tracking_uri.get_secret_value(), ctx.experiment)
        # a retried flow run continues from what its first attempt resolved
        pinned = tracker.client.get_run(ctx.parent_run_id).data.tags.get(
            "forgeline.parent_model")
        init = fetch_init_model(config.pretrain.init_from, config.pretrain.init_if_missing,
                                ctx.workdir, ctx.tracking_uri.get_secret_value(), pinned)
        tracker.set_tags(ctx.parent_run_id,
                         {"forgeline.parent_model": init["resolved"] if init else FRESH})
    out = {"tokenize": tokenize_stage(config, corpus, ctx, init)}
    if _reached("pretrain", until):
        return out
    out["pretrain"] = pretrain_stage(config, out["tokenize"], ctx, init)
    if _reached("finetune", until) or not config.finetune.enabled:
        return out
    out["finetune"] = finetune_stage(config, out["tokenize"], out["pretrain"], corpus, ctx)
    return out


@flow(name="forgeline-evaluate")
def evaluate_flow(config: PipelineConfig, ctx: RunContext,
                  trained: dict[str, Manifest]) -> dict[str, Manifest]:
    """Perplexity and bits per byte against a unigram baseline, and samples."""
    forward_stage_logs()
    return {"evaluate": evaluate_stage(config, trained["tokenize"], trained["pretrain"],
                                       trained.get("finetune"), ctx)}


def _stage_summary(manifest: Manifest) -> dict[str, Any]:
    keys = ("output", "count", "unit", "reused", "seconds", "skipped", "mlflow_run_id", "stats")
    return {k: manifest[k] for k in keys if k in manifest}


HEADLINE = {  # parent-run metric -> (stage, stat)
    "val_perplexity": ("evaluate", "pretrained_val_perplexity"),
    "unigram_perplexity": ("evaluate", "unigram_val_perplexity"),
    "val_bits_per_byte": ("evaluate", "pretrained_bits_per_byte"),
    "unigram_bits_per_byte": ("evaluate", "unigram_bits_per_byte"),
    "ppl_ratio_vs_unigram": ("evaluate", "ppl_ratio_vs_unigram"),
    "finetuned_val_perplexity": ("evaluate", "finetuned_val_perplexity"),
    "finetune_train_loss_first": ("finetune", "train_loss_first"),
    "finetune_train_loss_final": ("finetune", "train_loss_final"),
    "finetune_val_loss_before": ("finetune", "val_loss_before"),
    "finetune_val_loss_after": ("finetune", "val_loss_after"),
    "pretrain_val_loss": ("pretrain", "val_loss"),
}


def headline_metrics(stages: dict[str, Manifest]) -> dict[str, float]:
    metrics = {f"documents_after_{n}": m["count"] for n, m in stages.items()
               if n in DATA_STAGES and not m.get("skipped")}
    if "tokenize" in stages:
        metrics["tokens"] = stages["tokenize"]["count"]
    for name, (stage, stat) in HEADLINE.items():
        value = stages.get(stage, {}).get("stats", {}).get(stat)
        if value is not None:
            metrics[name] = value
    return metrics


def _log_run_artifacts(tracker: Tracker, run_id: str, stages: dict[str, Manifest]) -> None:
    """The parent run carries what people open first: tokenizer, checkpoint, reports."""
    wanted = {"tokenize": ("tokenizer_model",), "pretrain": ("model", "loss_curve"),
              "finetune": ("model", "loss_curve"), "evaluate": ("eval_report", "samples")}
    for stage, names in wanted.items():
        artifacts = stages.get(stage, {}).get("artifacts", {})
        for name in names:
            if name in artifacts:
                tracker.log_artifact(run_id, artifacts[name], artifact_path=stage)


def register_final_model(config: PipelineConfig, uri: str, parent_id: str,
                         stages: dict[str, Manifest], metrics: dict[str, float]
                         ) -> dict[str, Any] | None:
    """Log the final model (fine-tuned if fine-tuning ran, else pretrained) on the
    pipeline's MLflow run as an MLflow model and register it as a new version of
    ``registry.model_name``, with the headline metrics. None when no training ran or
    ``registry.enabled`` is false.

    Every pipeline run that trains, or reuses finished training, registers a version of its
    own (its tags name the stage run the weights come from); a retry of the same flow run
    reuses the version its earlier attempt registered."""
    logger = get_run_logger()
    candidates = ("finetune", "pretrain") if config.registry.stage == "final" else ("pretrain",)
    stage = next((name for name in candidates
                  if name in stages and not stages[name].get("skipped")), None)
    if stage is None:
        return None
    if not config.registry.enabled:
        logger.info("registry.enabled is false: the %s model is not logged to MLflow's "
                    "Model Registry", stage)
        return None
    manifest = stages[stage]
    prompts = config.evaluate.sample_prompts
    try:
        registered = log_and_register(
            Path(manifest["output"]), uri, parent_id, config.registry.model_name, stage=stage,
            stage_run_id=manifest.get("mlflow_run_id"), metrics=metrics,
            example_prompt=prompts[0] if prompts else "The ")
    except Exception as exc:
        logger.error("logging the %s model to MLflow failed (%s); registry.enabled=false "
                     "skips this step", stage, type(exc).__name__)
        raise
    label = "fine-tuned" if stage == "finetune" else "pretrained"
    logger.info("registered model %s version %s (%s), the %s model%s", registered.name,
                registered.version, registered.model_uri, label,
                "; the version registered by an earlier attempt of this run"
                if registered.reused else "")
    return registered.to_dict()


def _summary_markdown(result: dict[str, Any], ui: str, run_url: str | None) -> str:
    lines = ["# forgeline run", "", "| stage | result | seconds | reused |", "|---|---|---:|---|"]
    for name, s in result["stages"].items():
        if s.get("skipped"):
            lines.append(f"| {name} | skipped | | |")
        else:
            lines.append(f"| {name} | {s['count']} {s.get('unit', '')} | "
                         f"{s.get('seconds', 0):.1f} | {'yes' if s.get('reused') else 'no'} |")
    lines += ["", "| metric | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.4g} |" for k, v in result["metrics"].items()]
    where = f"[{result['mlflow_run_id']}]({run_url})" if run_url else \
        f"`{result['mlflow_run_id']}` in `{result['tracking_uri']}` (open with `{ui}`)"
    lines += ["", f"MLflow run: {where}"]
    if result.get("registered_model"):
        registered = result["registered_model"]
        lines += ["", (f"Registered model: `{registered['model_uri']}` "
                       f"(from the {registered['stage']} stage)")]
    return "\n".join(lines)


@flow(name="forgeline-pipeline")
def pipeline(config: PipelineConfig = PipelineConfig(),  # noqa: B008 (the UI form's defaults)
             workdir: str | None = None,
             until: StageName | None = None) -> dict[str, Any]:
    """Raw web text to a trained, evaluated small language model.

    Args:
        config: every stage's settings; see configs/default.yaml for what each one does.
        workdir: where stage outputs, reports and (by default) the MLflow store live;
            empty means $FORGELINE_WORKDIR, or ./work.
        until: stop after this stage (crawl, extract, filter, dedup, pii, tokenize,
            pretrain, finetune, evaluate).
    """
    forward_stage_logs()
    logger = get_run_logger()
    work = Path(workdir or os.environ.get("FORGELINE_WORKDIR") or "work").resolve()
    work.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(work)
    tracker = Tracker(uri, config.experiment, artifact_root=work / "mlartifacts")
    flow_run_id = flow_run.get_id() or ""
    parent_id = tracker.start_parent(
        name=f"pipeline-{flow_run.get_name() or 'local'}",
        params=flatten(config.model_dump(mode="json")),
        tags={FLOW_RUN_TAG: flow_run_id, "prefect.flow_run_name": flow_run.get_name() or "",
              "forgeline.until": until or "evaluate", "forgeline.workdir": str(work)})
    logger.info("MLflow run %s in %s", parent_id, display_uri(uri))
    reports = work / "reports" / parent_id
    write_text_atomic(reports / "config.yaml", config_yaml(config))
    tracker.log_artifact(parent_id, reports / "config.yaml")
    ctx = RunContext(workdir=str(work), tracking_uri=uri, experiment=config.experiment,
                     parent_run_id=parent_id)

    stages: dict[str, Manifest] = {}
    try:
        with api_url_for_workers():
            stages.update(data_flow.with_options(task_runner=task_runner(config.execution))(
                config, ctx, until))
        report = data_report(stages, reports)
        for path in report.values():
            tracker.log_artifact(parent_id, path, artifact_path="data_report")
        corpus = next(m for m in reversed(stages.values()) if not m.get("skipped"))
        if not _reached("tokenize", until):
            with api_url_for_workers():
                stages.update(train_flow.with_options(task_runner=task_runner(
                    config.execution))(config, ctx, corpus, until))
        if not _reached("evaluate", until):
            stages.update(evaluate_flow(config, ctx, stages))
        metrics = headline_metrics(stages)
        tracker.log_metrics(parent_id, metrics)
        registered = register_final_model(config, uri, parent_id, stages, metrics)
        if registered:
            tracker.set_tags(parent_id, {"forgeline.registered_model": registered["model_uri"]})
        tracker.set_tags(parent_id, {"forgeline.reused_stages": ",".join(
            n for n, m in stages.items() if m.get("reused"))})
        _log_run_artifacts(tracker, parent_id, stages)
        result = {"mlflow_run_id": parent_id, "tracking_uri": display_uri(uri), "workdir": str(work),
                  "data_report": str(report["report"]), "metrics": metrics,
                  "registered_model": registered,
                  "stages": {n: _stage_summary(m) for n, m in stages.items()}}
        ui = ui_command(uri, work)
        run_url = tracker.run_url(parent_id)
        create_markdown_artifact(markdown=_summary_markdown(result, ui, run_url),
                                 key="forgeline-summary", description="forgeline run summary")
        if run_url:
            create_link_artifact(link=run_url, link_text="MLflow run", key="forgeline-mlflow-run")
    except BaseException:
        tracker.finish(parent_id, ok=False)
        raise
    tracker.finish(parent_id)
    return result
