"""One thin Prefect task per stage: pick the inputs, run the pure core through the keyed
stage runner (reusing finished output), and record the stage as a nested MLflow run."""

from __future__ import annotations

import glob
import importlib.metadata
import platform
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, SecretStr

import models
import tasks.charset
import tasks.classify
import tasks.crawl
import tasks.dedup
import tasks.docserver
import tasks.domain
import tasks.dpo
import tasks.evaluate
import tasks.extract
import tasks.fewshot
import tasks.filter
import tasks.finetune
import tasks.labelled
import tasks.launch
import tasks.lm_eval_adapter
import tasks.minhash
import tasks.ner
import tasks.pii
import tasks.pii_engine
import tasks.pretrain
import tasks.shard_runner
import tasks.shards
import tasks.sources
import tasks.tokenize
import tasks.training
import tasks.warc
from flows.config import PipelineConfig, flatten
from flows.engine import RETRIES, prefect_mapper
from flows.tracking import Tracker
from tasks.stage import load_manifest, run_stage_in, stage_dir

Manifest = dict[str, Any]


class RunContext(BaseModel):
    """Where a pipeline run writes and records (passed to every subflow and task)."""

    workdir: str
    tracking_uri: SecretStr  # may hold a password: Prefect stores and shows it masked
    experiment: str
    parent_run_id: str




# Stages whose MLflow runs also get MLflow's system metrics (CPU, memory, GPU).
TRAINING_STAGES = frozenset({"pretrain", "domain", "finetune", "dpo", "classify", "ner"})

# Reading sources (files, archives, datasets) instead of, or besides, crawling.
SOURCE_LIBRARIES = ("fastwarc", "charset-normalizer", "datasets", "pyarrow")
# A new release of one of these can change a stage's output, so its version is in the key.
STAGE_LIBRARIES = {
    "crawl": ("httpx", "httpcore", "lxml", "warcio", "charset-normalizer", "protego"), "extract": ("trafilatura", "lxml"), "filter": ("py3langid",),
    "dedup": ("datasketch", "pyarrow", "pandas"), "pii": ("presidio-analyzer", "presidio-anonymizer", "spacy"),
    "tokenize": ("sentencepiece",), "pretrain": ("torch", "lightning"),
    "domain": ("torch", "lightning", "sentencepiece", "peft"),
    "finetune": ("torch", "lightning", "sentencepiece", "peft"),
    "dpo": ("torch", "lightning", "sentencepiece", "peft", "scipy"),
    "classify": ("torch", "lightning", "sentencepiece", "datasets", "scikit-learn"),
    "ner": ("torch", "lightning", "sentencepiece", "datasets", "seqeval"),
    "evaluate": ("torch", "sentencepiece"), "fewshot": ("torch", "sentencepiece"),
    "lm_eval": ("torch", "sentencepiece", "lm_eval"),
}


def library_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def run_tracked(ctx: RunContext, stage: str, section: BaseModel | None,
                build: Callable[[Path, Callable | None], dict], *, inputs: list[Manifest] = (),
                code: list = (), extra_key: dict | None = None,
                resumable: bool = False, tags: dict[str, str] | None = None,
                libraries: tuple[str, ...] | None = None,
                record: Callable[[Tracker, str, Manifest], None] | None = None) -> Manifest:
    """Run one stage (or reuse its finished output) inside a nested MLflow run.

    The output is keyed by the stage's settings, its inputs, ``code`` (plus the shard
    writer), ``extra_key`` and the versions of the libraries that compute it
    (``libraries``, default ``STAGE_LIBRARIES[stage]``). A
    ``resumable`` stage keeps its finished shards when it fails or is killed. ``record``
    (tracker, stage run id, manifest) logs more to a newly recorded stage run (nested runs
    of cross-validation folds, say) before it is finished."""
    logger = get_run_logger()
    code = [*code, tasks.shards, tasks.shard_runner]
    libraries = STAGE_LIBRARIES[stage] if libraries is None else libraries
    extra_key = {**(extra_key or {}), "libraries": library_versions(libraries)}
    tracker = Tracker(ctx.tracking_uri.get_secret_value(), ctx.experiment)
    where = stage_dir(stage, workdir=ctx.workdir, config=section, inputs=inputs, code=code,
                      extra_key=extra_key)
    finished = load_manifest(where)
    if finished is not None:
        recorded = tracker.finished_stage_run(ctx.parent_run_id, stage, finished["key"])
        if recorded:  # a retry of this flow run: its earlier attempt recorded this stage
            logger.info("%s: reusing finished output %s (%s %s), already recorded in MLflow "
                        "run %s", stage, where, finished["count"], finished["unit"], recorded)
            return {**finished, "reused": True, "mlflow_run_id": recorded}
    params = flatten(section.model_dump(mode="json"), f"{stage}.") if section else {}
    run_id = tracker.start_stage(ctx.parent_run_id, stage, params, tags)
    on_metrics = tracker.metrics_callback(run_id)
    try:
        monitor = tracker.system_metrics(run_id) if stage in TRAINING_STAGES else nullcontext()
        with monitor:
            manifest = run_stage_in(where, stage, lambda out_dir: build(out_dir, on_metrics),
                                    inputs=inputs, log=logger.info, resumable=resumable)
    except BaseException as exc:
        tracker.set_tags(run_id, {"error": str(exc)[:5000]})
        tracker.finish(run_id, ok=False)
        raise
    tracker.log_metrics(run_id, {"count": manifest["count"], "seconds": manifest["seconds"],
                                 **manifest["stats"]})
    tracker.set_tags(run_id, {"reused": manifest["reused"], "output": manifest["output"],
                              "stage_key": manifest["key"],
                              **{f"info.{k}": v for k, v in manifest["info"].items()
                                 if k != "folds"}})  # folds: runs of their own
    tracker.log_artifact(run_id, Path(manifest["dir"]) / "manifest.json")
    for path in manifest["artifacts"].values():
        tracker.log_artifact(run_id, path)
    if record is not None:
        record(tracker, run_id, manifest)
    tracker.finish(run_id)
    return {**manifest, "mlflow_run_id": run_id}


def _fingerprint(paths: list[str]) -> list[list]:
    """Names, sizes and modification times of local inputs (files, folders, globs): a
    cheap change detector."""
    rows = []
    for root in paths:
        root_path = Path(root).expanduser()
        if glob.has_magic(root):
            files = sorted(Path(p) for p in glob.glob(str(root_path), recursive=True))
        else:
            files = sorted(p for p in root_path.rglob("*") if p.is_file()) \
                if root_path.is_dir() else [root_path]
        for file in files:
            stat = file.stat() if file.exists() else None
            rows.append([str(file.resolve()), stat.st_size if stat else -1,
                         stat.st_mtime_ns if stat else -1])
    return rows


@task(name="crawl", retries=2, retry_delay_seconds=[5, 30], **RETRIES)
def crawl_stage(config: PipelineConfig, ctx: RunContext) -> Manifest:
    """Read the configured sources (files, archives, datasets), or crawl the seeds or the
    embedded Python docs."""
    snapshot = tasks.crawl.resolve_snapshot(config.crawl.snapshot)
    crawl_key = {"snapshot": snapshot}
    crawl_code = [tasks.crawl, *tasks.crawl.CODE_MODULES, tasks.charset]
    if not config.crawl.seeds:  # this Python's docs, served on loopback by tasks.docserver
        crawl_key["python_docs"] = platform.python_version()
        crawl_code.append(tasks.docserver)
    if not config.source.enabled:  # resumable: a killed crawl goes on from its frontier
        manifest = run_tracked(ctx, "crawl", config.crawl,
                               lambda out_dir, _: tasks.crawl.crawl(config.crawl, out_dir),
                               code=crawl_code, extra_key=crawl_key, resumable=True)
        _crawl_report_artifact(manifest["stats"])
        return manifest

    local = [entry for source in config.source.sources()
             for entry in getattr(source, "paths", None) or [getattr(source, "dataset", "")]
             if glob.has_magic(entry) or (entry and Path(entry).expanduser().exists())]
    extra = {"files": _fingerprint(local)}
    code = [tasks.sources, tasks.warc, tasks.charset]
    if config.source.include_crawl:  # the crawl, then its pages as the source 'crawl'
        extra.update(crawl=config.crawl.model_dump(mode="json"), **crawl_key)
        code += crawl_code

    def build(out: Path, _) -> dict:
        if not config.source.include_crawl:
            return tasks.sources.ingest_local(config.source, out)
        crawled = tasks.crawl.crawl(config.crawl, out / "crawl")
        result = tasks.sources.ingest_local(config.source, out, crawled=out / "crawl" / "data")
        result["stats"].update({f"crawl.{k}": v for k, v in crawled["stats"].items()
                                if isinstance(v, (int, float))})
        result["artifacts"] = {k: f"crawl/{v}" for k, v in crawled.get("artifacts", {}).items()}
        return result

    libraries = SOURCE_LIBRARIES + (STAGE_LIBRARIES["crawl"] if config.source.include_crawl
                                    else ())
    manifest = run_tracked(ctx, "crawl", config.source, build, code=code, extra_key=extra,
                           resumable=True, libraries=libraries)
    if config.source.include_crawl:
        _crawl_report_artifact({k.removeprefix("crawl."): v for k, v in manifest["stats"].items()
                                if k.startswith("crawl.")})
    return manifest


def _crawl_report_artifact(stats: dict) -> None:
    """The crawl report (responses by status, URLs not kept by reason, robots and SSRF
    refusals, bytes, pages/s) as a Prefect markdown artifact."""
    create_markdown_artifact(markdown=tasks.crawl.crawl_report_markdown(stats),
                             key="crawl-report", description="forgeline crawl report")


def _data_stage(name: str, core: Callable, modules: list,
                extra_key: Callable[[BaseModel], dict] | None = None) -> Callable:
    """A data stage in the data flow: its shards (and dedup's bands) are task runs on the
    flow's task runner, and finished shards are kept across kills and retries."""
    def stage(section: BaseModel, upstream: Manifest, ctx: RunContext) -> Manifest:
        return run_tracked(
            ctx, name, section,
            lambda out, _: core(section, Path(upstream["output"]), out, mapper=prefect_mapper),
            inputs=[upstream], code=modules, resumable=True,
            extra_key=extra_key(section) if extra_key else None)
    stage.__name__ = f"{name}_stage"
    stage.__doc__ = core.__doc__
    return stage


extract_stage = _data_stage("extract", tasks.extract.extract_text, [tasks.extract])
filter_stage = _data_stage("filter", tasks.filter.filter_documents, tasks.filter.CODE,
                           tasks.filter.key_inputs)
dedup_stage = _data_stage("dedup", tasks.dedup.deduplicate, [tasks.dedup, tasks.minhash])
# Installing a spaCy NER model changes what the pii stage finds, so it is part of the key.
pii_stage = _data_stage("pii", tasks.pii.scrub_pii, [tasks.pii, tasks.pii_engine], lambda section: {
    "ner_model": section.spacy_model if tasks.pii.model_installed(section.spacy_model) else None})

MODEL_CODE = [Path(models.__file__).parent]


def tokenize_stage(config: PipelineConfig, corpus: Manifest, ctx: RunContext,
                   init: dict | None = None) -> Manifest:
    """Train the tokenizer here (or take the one of the model that pretraining continues,
    ``init``), then encode the shards as task runs on the train flow's task runner
    (``execution``), joined in shard order."""
    tokenizer = Path(init["dir"]) / "tokenizer.model" if init else None
    return run_tracked(
        ctx, "tokenize", config.tokenize,
        lambda out, _: tasks.tokenize.tokenize_corpus(
            config.tokenize, Path(corpus["output"]), out, mapper=prefect_mapper,
            tokenizer=tokenizer),
        inputs=[corpus], code=[tasks.tokenize],
        extra_key={"tokenizer": init["tokenizer_sha256"]} if init else None,
        tags={"forgeline.tokenizer_of": init["resolved"]} if init else None)


@task(name="pretrain", **RETRIES)
def pretrain_stage(config: PipelineConfig, tokens: Manifest, ctx: RunContext,
                   init: dict | None = None) -> Manifest:
    """Pretrain a fresh model, or continue the one ``init`` names (pretrain.init_from)."""
    return run_tracked(
        ctx, "pretrain", config.pretrain,
        lambda out, on_metrics: tasks.pretrain.pretrain(
            config.pretrain, Path(tokens["output"]), out, on_metrics=on_metrics,
            init_model=Path(init["dir"]) if init else None),
        extra_key={"init_model": init["sha256"]} if init else None,
        tags={"forgeline.parent_model": init["resolved"],
              "forgeline.parent_model_sha256": init["sha256"]} if init else None,
        inputs=[tokens], code=[tasks.pretrain, tasks.training, tasks.launch, *MODEL_CODE],
        resumable=True)


TRAINING_CODE = [tasks.training, tasks.launch, *MODEL_CODE]


def _labelled_key(section: BaseModel) -> dict | None:
    """Local labelled data (files, a saved dataset) changes the output without a change of
    settings: their names, sizes and times are in the key."""
    paths = [getattr(section, name, None) for name in ("data_path", "dataset")]
    local = [p for p in paths if p and Path(p).expanduser().exists()]
    return {"data": _fingerprint(local)} if local else None


def _model_stage(name: str, core: Callable, modules: list, *, with_corpus: bool = True,
                 resumable: bool = True,
                 record: Callable[[Tracker, str, Manifest], None] | None = None) -> Callable:
    """A training or scoring stage on a model directory (``model``: the output of an
    earlier training stage), the run's tokens and, when ``with_corpus``, the corpus."""
    def stage(section: BaseModel, tokens: Manifest, model: Manifest, corpus: Manifest,
              ctx: RunContext) -> Manifest:
        inputs = [tokens, model] + ([corpus] if with_corpus else [])
        return run_tracked(
            ctx, name, section,
            lambda out, on_metrics: core(section, Path(tokens["output"]), Path(model["output"]),
                                         Path(corpus["output"]), out, on_metrics=on_metrics),
            inputs=inputs, resumable=resumable, code=[*modules, *TRAINING_CODE],
            extra_key=_labelled_key(section), record=record)
    stage.__name__ = f"{name}_stage"
    stage.__doc__ = core.__doc__
    return task(name=name, **RETRIES)(stage)


def record_folds(tracker: Tracker, run_id: str, manifest: Manifest) -> None:
    """Each cross-validation fold as a run nested in the stage's run, with its metrics and
    artifacts (confusion matrix, ...)."""
    folds = manifest.get("info", {}).get("folds") or []
    if len(folds) < 2:
        return
    stage = tracker.client.get_run(run_id).data.tags.get("forgeline.stage", "stage")
    for fold in folds:
        number = fold.get("fold")
        child = tracker.start_stage(run_id, f"{stage}-fold-{number}", {"fold": number},
                                    tags={"forgeline.fold": str(number),
                                          "forgeline.folds": str(len(folds))})
        tracker.log_metrics(child, fold.get("metrics", {}))
        for path in (fold.get("artifacts") or {}).values():  # relative to the stage's dir
            tracker.log_artifact(child, Path(manifest["dir"]) / path)
        tracker.finish(child)


def _finetune_core(section, tokens_dir, model_dir, corpus_dir, out, on_metrics=None):
    return tasks.finetune.finetune(section, tokens_dir, model_dir, corpus_dir, out,
                                   on_metrics=on_metrics)


_finetune_core.__doc__ = tasks.finetune.finetune.__doc__
domain_stage = _model_stage("domain", tasks.domain.domain_finetune, [tasks.domain,
                                                                     tasks.tokenize])
finetune_stage = _model_stage("finetune", _finetune_core, [tasks.finetune, tasks.tokenize])
dpo_stage = _model_stage("dpo", tasks.dpo.dpo, [tasks.dpo, tasks.finetune, tasks.tokenize])
classify_stage = _model_stage("classify", tasks.classify.classify,
                              [tasks.classify, tasks.labelled, tasks.finetune,
                               tasks.tokenize],
                              record=record_folds)
ner_stage = _model_stage("ner", tasks.ner.ner, [tasks.ner, tasks.classify, tasks.labelled,
                                                tasks.finetune, tasks.tokenize],
                         record=record_folds)


@task(name="evaluate", retries=1, **RETRIES)
def evaluate_stage(config: PipelineConfig, tokens: Manifest, pretrained: Manifest,
                   finetuned: Manifest | None, ctx: RunContext) -> Manifest:
    """Perplexity and bits per byte of the pretrained and the final model, samples."""
    inputs = [tokens, pretrained] + ([finetuned] if finetuned else [])
    return run_tracked(
        ctx, "evaluate", config.evaluate,
        lambda out, _: tasks.evaluate.evaluate(
            config.evaluate, Path(tokens["output"]), Path(pretrained["output"]),
            Path(finetuned["output"]) if finetuned else None, out),
        inputs=inputs, code=[tasks.evaluate, tasks.pretrain, tasks.tokenize, *MODEL_CODE])


@task(name="fewshot", retries=1, **RETRIES)
def fewshot_stage(config: PipelineConfig, tokens: Manifest, model: Manifest, corpus: Manifest,
                  ctx: RunContext) -> Manifest:
    """Multiple-choice accuracy with k = 0 and k > 0 solved examples in the prompt."""
    section = config.fewshot
    return run_tracked(
        ctx, "fewshot", section,
        lambda out, _: tasks.fewshot.fewshot(section, Path(tokens["output"]),
                                             Path(model["output"]), Path(corpus["output"]), out),
        inputs=[tokens, model, corpus], code=[tasks.fewshot, tasks.tokenize, *MODEL_CODE],
        extra_key=_labelled_key(section))


@task(name="lm_eval", retries=1, **RETRIES)
def lm_eval_stage(config: PipelineConfig, model: Manifest, fewshot: Manifest | None,
                  ctx: RunContext) -> Manifest:
    """lm-evaluation-harness tasks on the final model, through forgeline's adapter; the task
    forgeline_fewshot is the few-shot stage's questions, run offline."""
    section = config.lm_eval
    include = [section.include_path] if section.include_path else []
    return run_tracked(
        ctx, "lm_eval", section,
        lambda out, on_metrics: tasks.lm_eval_adapter.lm_eval_stage(
            section, Path(model["output"]), out,
            fewshot_dir=Path(fewshot["output"]) if fewshot else None, on_metrics=on_metrics),
        inputs=[model] + ([fewshot] if fewshot else []),
        code=[tasks.lm_eval_adapter, tasks.fewshot, *MODEL_CODE],
        extra_key={"tasks": _fingerprint(include)} if include else None)


DATA_STAGE_TASKS = {"extract": extract_stage, "filter": filter_stage,
                    "dedup": dedup_stage, "pii": pii_stage}
