"""The forgeline pipeline: a Prefect flow of three subflows (data, train, evaluate), then
the registration of the final model and the champion/challenger decision.

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
from flows.champion import run_champion
from flows.config import DATA_STAGES, STAGES, PipelineConfig, StageName, config_yaml, flatten
from flows.engine import api_url_for_workers, describe, task_runner
from flows.model_registry import log_and_register
from flows.model_tools import FRESH, fetch_init_model
from flows.report import data_report
from flows.stages import (
    DATA_STAGE_TASKS,
    Manifest,
    RunContext,
    classify_stage,
    crawl_stage,
    domain_stage,
    dpo_stage,
    evaluate_stage,
    fewshot_stage,
    finetune_stage,
    lm_eval_stage,
    ner_stage,
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


GENERATIVE_MODES = ("domain", "finetune", "dpo")  # each continues the one before


def final_model(stages: dict[str, Manifest]) -> str | None:
    """The stage whose model is the run's final one: the last generative mode that ran."""
    return next((name for name in (*GENERATIVE_MODES[::-1], "pretrain")
                 if name in stages and not stages[name].get("skipped")), None)


def _is_encoder(config: PipelineConfig) -> bool:
    # a model continued (pretrain.init_from) with the masked objective becomes one too
    return config.pretrain.objective == "masked"


@flow(name="forgeline-train")
def train_flow(config: PipelineConfig, ctx: RunContext, corpus: Manifest,
               until: StageName | None = None) -> dict[str, Manifest]:
    """tokenize -> pretrain -> fine-tuning: domain (continued pretraining on a subset) ->
    finetune (prompt/response) -> dpo (preferences), each building on the model before it;
    classify and ner put task heads on the pretrained (or domain-tuned) model. Tokenize
    encodes each shard as a task run on this flow's task runner (``execution``); training
    runs in this process."""
    forward_stage_logs()
    logger = get_run_logger()
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
    if _reached("finetune", until):
        return out
    tokens, model = out["tokenize"], out["pretrain"]
    for name in GENERATIVE_MODES:
        section = getattr(config, name)
        if not section.enabled:
            continue
        if _is_encoder(config):
            logger.info("%s: skipped, the masked-LM encoder does not generate text "
                        "(pretrain.objective=masked)", name)
            continue
        stage = {"domain": domain_stage, "finetune": finetune_stage, "dpo": dpo_stage}[name]
        out[name] = model = stage(section, tokens, model, corpus, ctx)
    backbone = out.get("domain", out["pretrain"])
    for name, stage in (("classify", classify_stage), ("ner", ner_stage)):
        if getattr(config, name).enabled:
            out[name] = stage(getattr(config, name), tokens, backbone, corpus, ctx)
    return out


@flow(name="forgeline-evaluate")
def evaluate_flow(config: PipelineConfig, ctx: RunContext, trained: dict[str, Manifest],
                  corpus: Manifest) -> dict[str, Manifest]:
    """Perplexity and bits per byte against a unigram baseline, and samples; few-shot
    accuracy for each k; lm-evaluation-harness tasks when configured."""
    forward_stage_logs()
    logger = get_run_logger()
    final = final_model(trained)
    tuned = trained[final] if final not in (None, "pretrain") else None
    out = {"evaluate": evaluate_stage(config, trained["tokenize"], trained["pretrain"],
                                      tuned, ctx)}
    if _is_encoder(config):
        if config.fewshot.enabled:
            logger.info("fewshot: skipped, the masked-LM encoder does not score continuations "
                        "(pretrain.objective=masked)")
        return out
    if config.fewshot.enabled:
        out["fewshot"] = fewshot_stage(config, trained["tokenize"], trained[final], corpus, ctx)
    if config.lm_eval.enabled:
        out["lm_eval"] = lm_eval_stage(config, trained[final], out.get("fewshot"), ctx)
    return out


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
# every stat of these stages that starts with the prefix is a headline metric, as it is
# named (classify_accuracy, ner_f1, fewshot_accuracy_k0, dpo_preference_accuracy, ...)
TASK_METRIC_PREFIXES = {"pretrain": "mlm_", "domain": "domain_", "classify": "classify_",
                        "ner": "ner_", "dpo": "dpo_", "fewshot": "fewshot_",
                        "lm_eval": "lm_eval_"}


def headline_metrics(stages: dict[str, Manifest]) -> dict[str, float]:
    metrics = {f"documents_after_{n}": m["count"] for n, m in stages.items()
               if n in DATA_STAGES and not m.get("skipped")}
    if "tokenize" in stages:
        metrics["tokens"] = stages["tokenize"]["count"]
    for name, (stage, stat) in HEADLINE.items():
        value = stages.get(stage, {}).get("stats", {}).get(stat)
        if value is not None:
            metrics[name] = value
    for stage, prefix in TASK_METRIC_PREFIXES.items():
        for stat, value in stages.get(stage, {}).get("stats", {}).items():
            if stat.startswith(prefix) and isinstance(value, (int, float)) \
                    and not isinstance(value, bool):
                metrics[stat] = value
    return metrics


def _log_run_artifacts(tracker: Tracker, run_id: str, stages: dict[str, Manifest]) -> None:
    """The parent run carries what people open first: tokenizer, checkpoint, reports."""
    wanted = {"tokenize": ("tokenizer_model",), "pretrain": ("model", "loss_curve"),
              "finetune": ("model", "loss_curve"), "dpo": ("model", "loss_curve"),
              "evaluate": ("eval_report", "samples")}
    for stage, names in wanted.items():
        artifacts = stages.get(stage, {}).get("artifacts", {})
        for name in names:
            if name in artifacts:
                tracker.log_artifact(run_id, artifacts[name], artifact_path=stage)


def register_final_model(config: PipelineConfig, uri: str, parent_id: str,
                         stages: dict[str, Manifest], metrics: dict[str, float]
                         ) -> dict[str, Any] | None:
    """Log the final model (the last of dpo, finetune and domain that ran, else the
    pretrained one) on the pipeline's MLflow run as an MLflow model and register it as a new version of
    ``registry.model_name``, with the headline metrics. None when no training ran or
    ``registry.enabled`` is false.

    Every pipeline run that trains, or reuses finished training, registers a version of its
    own (its tags name the stage run the weights come from); a retry of the same flow run
    reuses the version its earlier attempt registered."""
    logger = get_run_logger()
    stage = final_model(stages) if config.registry.stage == "final" else \
        ("pretrain" if "pretrain" in stages else None)
    if stage is None:
        return None
    if _is_encoder(config):
        logger.info("the masked-LM encoder is not registered: the registry holds models "
                    "that generate text (pretrain.objective=causal)")
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
    label = {"finetune": "fine-tuned", "dpo": "preference-tuned",
             "domain": "domain-tuned"}.get(stage, "pretrained")
    logger.info("registered model %s version %s (%s), the %s model%s", registered.name,
                registered.version, registered.model_uri, label,
                "; the version registered by an earlier attempt of this run"
                if registered.reused else "")
    return registered.to_dict()


def evaluation_report(stages: dict[str, Manifest], decision, reports: Path) -> dict[str, Path]:
    """Every evaluation metric of the run in one Markdown report with plots (also a Prefect
    artifact): language modelling, classification, NER, few-shot, DPO, masked LM,
    lm-evaluation-harness and the champion decision."""
    from tasks.eval_report import write_eval_report

    sections: dict[str, dict] = {}
    language = dict(stages["evaluate"].get("stats", {}))
    if language:
        sections["language_model"] = language
    for name in ("classify", "ner", "fewshot", "dpo", "lm_eval", "domain"):
        if name in stages and not stages[name].get("skipped"):
            section = dict(stages[name].get("stats", {}))
            images = {k: v for k, v in stages[name].get("artifacts", {}).items()
                      if str(v).endswith(".png") and k != "loss_curve"}
            if images:
                section["images"] = images
            sections[name] = section
    mlm = {k: v for k, v in stages.get("pretrain", {}).get("stats", {}).items()
           if k.startswith("mlm_")}
    if mlm:
        sections["mlm"] = mlm
    if decision is not None:
        sections["champion"] = {
            "champion_decision": decision.decision, "champion_metric": decision.metric,
            "champion_margin": decision.margin, "challenger_score": decision.challenger_score,
            "champion_score": decision.champion_score,
            "challenger_version": decision.challenger_version,
            "champion_version_before": decision.champion_version_before,
            "champion_version_after": decision.champion_version_after}
    written = write_eval_report(sections, reports / "evaluation")
    report = next(p for p in written.values() if str(p).endswith(".md"))
    create_markdown_artifact(markdown=Path(report).read_text(encoding="utf-8"),
                             key="evaluation-report", description="forgeline evaluation report")
    return written


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
    if result.get("champion"):
        champion = result["champion"]
        lines += ["", f"Champion decision: **{champion['decision']}**"]
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
            stages.update(evaluate_flow(config, ctx, stages, corpus))
        metrics = headline_metrics(stages)
        tracker.log_metrics(parent_id, metrics)
        registered = register_final_model(config, uri, parent_id, stages, metrics)
        decision = None
        if registered:
            tracker.set_tags(parent_id, {"forgeline.registered_model": registered["model_uri"]})
            if config.champion.enabled and "evaluate" in stages:
                # both models scored on this run's held-out documents, each with its tokenizer
                decision = run_champion(
                    config.champion, tracker, parent_id, registered,
                    model_dir=stages[registered["stage"]]["output"],
                    tokenized_dir=stages["tokenize"]["output"], corpus_dir=corpus["output"])
            if decision is not None:
                metrics.update({k: v for k, v in (("champion_score", decision.champion_score),
                                                  ("challenger_score", decision.challenger_score))
                                if v is not None})
        if "evaluate" in stages:
            evaluation = evaluation_report(stages, decision, reports)
            for path in evaluation.values():
                tracker.log_artifact(parent_id, path, artifact_path="eval_report")
        tracker.set_tags(parent_id, {"forgeline.reused_stages": ",".join(
            n for n, m in stages.items() if m.get("reused"))})
        _log_run_artifacts(tracker, parent_id, stages)
        result = {"mlflow_run_id": parent_id, "tracking_uri": display_uri(uri), "workdir": str(work),
                  "data_report": str(report["report"]), "metrics": metrics,
                  "registered_model": registered,
                  "champion": decision.to_dict() if decision else None,
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
