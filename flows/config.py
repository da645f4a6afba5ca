"""The pipeline's configuration: one pydantic model per stage, composed into PipelineConfig.

Every field carries a description; the same text shows in ``forgeline config``, in
``forgeline run --help``, in the Prefect UI form and in ``configs/default.yaml``.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tasks.crawl import CrawlConfig
from tasks.dedup import DedupConfig
from tasks.evaluate import EvaluateConfig
from tasks.extract import ExtractConfig
from tasks.filter import FilterConfig
from tasks.finetune import FinetuneConfig
from tasks.pii import PiiConfig
from tasks.pretrain import PretrainConfig
from tasks.sources import SourceConfig
from tasks.tokenize import TokenizeConfig

STAGES = ("crawl", "extract", "filter", "dedup", "pii",
          "tokenize", "pretrain", "finetune", "evaluate")
DATA_STAGES = STAGES[:5]
StageName = Literal["crawl", "extract", "filter", "dedup", "pii",
                    "tokenize", "pretrain", "finetune", "evaluate"]


class ConfigError(ValueError):
    """The configuration is invalid; the message names the field and what to do."""


class PipelineConfig(BaseModel):
    """forgeline: raw web text to a trained, evaluated small language model."""

    model_config = ConfigDict(extra="forbid")

    experiment: str = Field(
        "forgeline", min_length=1,
        description="MLflow experiment that records this pipeline's runs.")
    source: SourceConfig = Field(
        default_factory=SourceConfig,
        description="Local documents to use instead of crawling.")
    crawl: CrawlConfig = Field(
        default_factory=CrawlConfig,
        description="Fetching pages over HTTP (the embedded Python docs when no seeds are given).")
    extract: ExtractConfig = Field(
        default_factory=ExtractConfig, description="HTML to main-content text.")
    filter: FilterConfig = Field(
        default_factory=FilterConfig, description="Quality rules; removed documents keep their reason.")
    dedup: DedupConfig = Field(
        default_factory=DedupConfig, description="Exact and MinHash near-duplicate removal.")
    pii: PiiConfig = Field(
        default_factory=PiiConfig, description="Detection and replacement of personal data.")
    tokenize: TokenizeConfig = Field(
        default_factory=TokenizeConfig, description="BPE tokenizer training and token shards.")
    pretrain: PretrainConfig = Field(
        default_factory=PretrainConfig, description="Self-supervised pretraining of the decoder.")
    finetune: FinetuneConfig = Field(
        default_factory=FinetuneConfig, description="Supervised fine-tuning on prompt/response pairs.")
    evaluate: EvaluateConfig = Field(
        default_factory=EvaluateConfig, description="Perplexity, bits per byte, baseline, samples.")

    @model_validator(mode="after")
    def _one_source(self) -> PipelineConfig:
        if self.source.paths and self.crawl.seeds:
            raise ValueError("source.paths and crawl.seeds are both set: use one source, "
                             "local files (source.paths) or the web (crawl.seeds)")
        if not self.source.paths and not self.crawl.enabled:
            raise ValueError("crawl.enabled is false and source.paths is empty, so there is "
                             "nothing to read: set source.paths, or enable the crawl")
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
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({exc})") from None


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
    return "\n".join(lines)


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


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """``{"crawl": {"max_pages": 5}}`` -> ``{"crawl.max_pages": 5}`` (MLflow params)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("\n...")


def _wrap(text: str, indent: str) -> list[str]:
    import textwrap

    return [f"{indent}# {line}" for line in textwrap.wrap(" ".join(text.split()), 88 - len(indent))]


def config_yaml(config: BaseModel, indent: str = "") -> str:
    """The config as YAML with every field's description as a comment above it."""
    lines: list[str] = []
    for name, field in type(config).model_fields.items():
        value = getattr(config, name)
        if field.description:
            lines.extend(_wrap(field.description, indent))
        if isinstance(value, BaseModel):
            lines.append(f"{indent}{name}:")
            lines.append(config_yaml(value, indent + "  "))
            if not indent:
                lines.append("")
        else:
            lines.append(f"{indent}{name}: {_yaml_value(value)}")
    return "\n".join(lines).rstrip() + ("\n" if not indent else "")
