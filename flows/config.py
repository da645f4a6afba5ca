"""The pipeline's configuration: one pydantic model per stage, composed into PipelineConfig.

Every field carries a description; the same text shows in ``forgeline config``, in
``forgeline run --help``, in the Prefect UI form and in ``configs/default.yaml``.

Importing this module loads no torch, Lightning, spaCy, MLflow or Prefect: the stage
modules keep those inside the functions that use them, so ``forgeline config`` and the
answer to a bad ``--set`` come at once. What leaves this module for people to read
(``flatten`` for MLflow params, ``config_yaml``, error messages) has credentials in URLs
masked (``https://***@host/``).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from flows.champion import ChampionConfig
from tasks.classify import ClassifyConfig
from tasks.crawl import CrawlConfig
from tasks.dedup import DedupConfig
from tasks.domain import DomainConfig
from tasks.dpo import DpoConfig
from tasks.evaluate import EvaluateConfig
from tasks.extract import ExtractConfig
from tasks.fewshot import FewshotConfig
from tasks.filter import FilterConfig
from tasks.finetune import FinetuneConfig
from tasks.lm_eval_adapter import LmEvalConfig
from tasks.ner import NerConfig
from tasks.pii import PiiConfig
from tasks.pretrain import PretrainConfig
from tasks.redact import redact_secrets
from tasks.sources import SourceConfig
from tasks.tokenize import TokenizeConfig

STAGES = ("crawl", "extract", "filter", "dedup", "pii",
          "tokenize", "pretrain", "finetune", "evaluate")
DATA_STAGES = STAGES[:5]
StageName = Literal["crawl", "extract", "filter", "dedup", "pii",
                    "tokenize", "pretrain", "finetune", "evaluate"]


class ExecutionConfig(BaseModel):
    """Where the data stages run: every shard is a Prefect task run on this engine."""

    model_config = ConfigDict(extra="forbid")

    engine: Literal["local", "dask"] = Field(
        "local", description="local: a pool of worker processes on this machine. dask: "
                             "prefect-dask's DaskTaskRunner, on a Dask LocalCluster it starts "
                             "(workers and threads below) or on the running Dask scheduler at "
                             "dask_address, so the same flow spreads over many machines. The "
                             "output is the same, byte for byte, whatever the engine.")
    workers: int = Field(
        0, ge=0, description="Worker processes (local, or a started Dask LocalCluster); 0 "
                             "means one per CPU core. Ignored with dask_address.")
    threads_per_worker: int = Field(
        1, ge=1, description="Threads in each Dask LocalCluster worker. The data stages are "
                             "CPU-bound Python, so more processes beat more threads.")
    dask_address: str = Field(
        "", description="Address of a running Dask scheduler (tcp://host:8786) to send the "
                        "shard tasks to; empty starts a local cluster. Its workers need "
                        "forgeline installed, the work directory on a shared path, and "
                        "PREFECT_API_URL pointing at your Prefect server.")

    @model_validator(mode="after")
    def _address_needs_dask(self) -> ExecutionConfig:
        if self.dask_address and self.engine != "dask":
            raise ValueError("execution.dask_address is set but execution.engine is "
                             f"{self.engine!r}; set execution.engine=dask to use the cluster")
        return self


class RegistryConfig(BaseModel):
    """The final model as an MLflow model in the Model Registry."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        True, description="Log the final model (fine-tuned if fine-tuning ran, else "
                          "pretrained) on the pipeline's MLflow run as an MLflow model that "
                          "generates text, and register it as a new version of model_name. "
                          "false skips both.")
    stage: Literal["final", "pretrain"] = Field(
        "final", description="Which model to log and register: 'final' (the fine-tuned one "
                             "when fine-tuning ran, else the pretrained one) or 'pretrain' "
                             "(the pretrained base model: what a schedule that continues "
                             "pretraining with pretrain.init_from must build on).")
    model_name: str = Field(
        "forgeline", min_length=1, max_length=256, pattern=r"^[^/:@]+$",
        description="Name of the registered model in the MLflow Model Registry (no '/', ':' "
                    "or '@'); each pipeline run that trains adds a version, loadable as "
                    "models:/<model_name>/<version>.")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the field and what to do."""


class PipelineConfig(BaseModel):
    """forgeline: raw web text to a trained, evaluated small language model."""

    model_config = ConfigDict(extra="forbid")

    experiment: str = Field(
        "forgeline", min_length=1,
        description="MLflow experiment that records this pipeline's runs.")
    execution: ExecutionConfig = Field(
        default_factory=ExecutionConfig,
        description="Where the data stages' shard tasks run: local processes or Dask.")
    source: SourceConfig = Field(
        default_factory=SourceConfig,
        description="Local documents to use instead of crawling.")
    crawl: CrawlConfig = Field(
        default_factory=CrawlConfig,
        description="Fetching pages over HTTP (the embedded Python docs when no seeds are given).")
    extract: ExtractConfig = Field(
        default_factory=ExtractConfig, description="HTML to main-content text.")
    filter: FilterConfig = Field(
        default_factory=FilterConfig,
        description="Language identification, quality rules (Gopher, C4, FineWeb) and "
                    "harmful-content blocklists; removed documents keep their reason.")
    dedup: DedupConfig = Field(
        default_factory=DedupConfig, description="Exact and MinHash near-duplicate removal.")
    pii: PiiConfig = Field(
        default_factory=PiiConfig, description="Detection and replacement of personal data.")
    tokenize: TokenizeConfig = Field(
        default_factory=TokenizeConfig, description="BPE tokenizer training and token shards.")
    pretrain: PretrainConfig = Field(
        default_factory=PretrainConfig, description="Self-supervised pretraining of the decoder.")
    domain: DomainConfig = Field(
        default_factory=DomainConfig,
        description="Domain-specific fine-tuning: continued next-token training on a chosen "
                    "subset of the corpus (by source, URL pattern or language), before the "
                    "other fine-tuning modes.")
    finetune: FinetuneConfig = Field(
        default_factory=FinetuneConfig,
        description="Supervised fine-tuning on prompt/response pairs (full, LoRA or prompt "
                    "tuning).")
    dpo: DpoConfig = Field(
        default_factory=DpoConfig,
        description="Preference optimisation (DPO) on chosen/rejected pairs, given or derived "
                    "with hard (adversarial) negatives; after supervised fine-tuning.")
    classify: ClassifyConfig = Field(
        default_factory=ClassifyConfig,
        description="Text classification: a head on the pretrained model, tuned on labelled "
                    "passages (given, or derived from the corpus); accuracy and macro-F1.")
    ner: NerConfig = Field(
        default_factory=NerConfig,
        description="Named-entity recognition (BIO tags): a token-classification head on the "
                    "pretrained model; entity-level precision, recall and F1.")
    evaluate: EvaluateConfig = Field(
        default_factory=EvaluateConfig, description="Perplexity, bits per byte, baseline, samples.")
    fewshot: FewshotConfig = Field(
        default_factory=FewshotConfig,
        description="Few-shot evaluation: multiple-choice questions scored by log-likelihood "
                    "with k solved examples in the prompt, for each k.")
    lm_eval: LmEvalConfig = Field(
        default_factory=LmEvalConfig,
        description="EleutherAI's lm-evaluation-harness on the final model, through "
                    "forgeline's LM adapter.")
    registry: RegistryConfig = Field(
        default_factory=RegistryConfig,
        description="The final model logged as an MLflow model and registered by name.")
    champion: ChampionConfig = Field(
        default_factory=ChampionConfig,
        description="Champion and challenger: the registered model takes the champion alias "
                    "only when it beats the current champion on the same held-out data.")

    @model_validator(mode="after")
    def _generative_modes_need_a_decoder(self) -> PipelineConfig:
        if self.pretrain.objective != "masked":
            return self
        wanted = [name for name in ("domain", "dpo", "lm_eval") if getattr(self, name).enabled]
        if wanted:
            raise ValueError(f"pretrain.objective is 'masked' (an encoder, which does not "
                             f"generate text), but {', '.join(n + '.enabled' for n in wanted)} "
                             "needs a next-token model: set pretrain.objective=causal, or "
                             "switch " + " and ".join(wanted) + " off")
        return self

    @model_validator(mode="after")
    def _one_source(self) -> PipelineConfig:
        if self.source.enabled and self.crawl.seeds and not self.source.include_crawl:
            raise ValueError("source (paths, files or datasets) and crawl.seeds are both set: "
                             "read local sources or crawl the web (crawl.seeds), or set "
                             "source.include_crawl to mix the crawl in with the sources")
        if self.source.include_crawl and not self.crawl.enabled:
            raise ValueError("source.include_crawl is set but crawl.enabled is false: enable "
                             "the crawl, or drop include_crawl")
        if not self.source.enabled and not self.crawl.enabled:
            raise ValueError("crawl.enabled is false and source.paths, source.files and "
                             "source.datasets are empty, so there is nothing to read: set "
                             "source.paths, or enable the crawl")
        return self


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """``"pretrain.max_steps=200"`` -> ``("pretrain.max_steps", 200)``; values are YAML."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. pretrain.max_steps=200")
    try:
        return key, yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(redact_secrets(f"--set {key}: value {raw!r} is not valid YAML "
                                         f"({exc})")) from None


def _field_names(model: type[BaseModel], loc: tuple) -> list[str]:
    """Names valid at ``loc`` (for did-you-mean hints)."""
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def describe_validation_error(exc: ValidationError, origin: str = "configuration") -> str:
    lines = [f"invalid {origin}:"]
    for error in exc.errors():
        loc = tuple(error["loc"])
        name = ".".join(str(p) for p in loc) or "(top level)"
        if error["type"] == "extra_forbidden":
            hint = difflib.get_close_matches(str(loc[-1]), _field_names(PipelineConfig, loc[:-1]), 1)
            message = "unknown setting" + (f"; did you mean {hint[0]!r}?" if hint else "")
        else:
            message = error["msg"].removeprefix("Value error, ")
            if "input" in error and not isinstance(error["input"], (dict, BaseModel)):
                message += f" (got {error['input']!r})"
        lines.append(f"  {name}: {message}")
    return redact_secrets("\n".join(lines))


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> PipelineConfig:
    """Read a YAML config file (optional), apply ``--set`` overrides, validate."""
    data: dict = {}
    origin = "configuration"
    if path is not None:
        path = Path(path)
        origin = f"configuration in {path}"
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, "
                              f"not a {type(data).__name__}")
    for item in overrides:
        _set_dotted(data, *parse_override(item))
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, origin)) from None


def flatten(data: dict, prefix: str = "", redacted: bool = True) -> dict[str, Any]:
    """``{"crawl": {"max_pages": 5}}`` -> ``{"crawl.max_pages": 5}`` (MLflow params).

    With ``redacted`` (the default) credentials in URLs are masked in the values
    (``https://***@example.org/``): params are for people to read."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}.", redacted))
        else:
            flat[name] = redact_secrets(value) if redacted else value
    return flat


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("\n...")


def _wrap(text: str, indent: str) -> list[str]:
    import textwrap

    return [f"{indent}# {line}" for line in textwrap.wrap(" ".join(text.split()), 88 - len(indent))]


def config_yaml(config: BaseModel, indent: str = "", redacted: bool = True) -> str:
    """The config as YAML with every field's description as a comment above it; with
    ``redacted`` (the default) credentials in URLs are masked (``https://***@host/``)."""
    lines: list[str] = []
    for name, field in type(config).model_fields.items():
        value = getattr(config, name)
        if field.description:
            lines.extend(_wrap(field.description, indent))
        if isinstance(value, BaseModel):
            lines.append(f"{indent}{name}:")
            lines.append(config_yaml(value, indent + "  ", redacted))
            if not indent:
                lines.append("")
        else:
            if isinstance(value, list) and any(isinstance(v, BaseModel) for v in value):
                value = [v.model_dump(mode="json") if isinstance(v, BaseModel) else v
                         for v in value]  # a list of sections (source.files, ...)
            lines.append(f"{indent}{name}: "
                         f"{_yaml_value(redact_secrets(value) if redacted else value)}")
    return "\n".join(lines).rstrip() + ("\n" if not indent else "")
