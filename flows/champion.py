"""Champion and challenger: a new model takes the registry alias only when it is better.

Every pipeline run that trains registers its final model as a new version of the
registered model (``forgeline``). That version is the challenger; the version holding
the alias (``champion``) is the champion. Both are scored by the SAME function on the SAME
data (by default :func:`tasks.heldout.score_model` on the documents this run's tokenize
stage held out of pretraining, each model through its own tokenizer, in bits per byte), and
the alias moves to the challenger only when it is better on ``metric`` by at least
``min_delta`` (strictly better: equal scores keep the champion). With no champion yet, the
challenger takes the alias (``first``).

What is recorded:

- the pipeline's parent MLflow run: the tag ``champion_decision`` (promoted | kept |
  first) and the metrics ``challenger_score`` and ``champion_score`` (the latter not when
  first), plus tags naming the metric and both versions (:func:`record_decision`);
- the challenger's model version: ``forgeline.champion_decision``, both scores, the metric
  and the version it was compared with; the champion's: ``forgeline.last_challenge`` (the
  challenger, the outcome and its score this time), and ``forgeline.dethroned_by`` when it
  lost the alias;
- a markdown summary for a Prefect artifact (:func:`decision_markdown`).

A champion whose files cannot be fetched or scored stops the run with
:class:`ChampionError` by default (``on_champion_error: fail``): silently replacing the
production model because its artifacts are unreachable would be the wrong default. With
``on_champion_error: replace`` it is treated as missing, with a warning: the challenger
takes the alias (``promoted``, no champion score, the reason in the tags).

A retried flow run (the same challenger version again) returns the decision recorded on
the version the first time, without scoring again, and finishes moving the alias if the
earlier attempt stopped before it.

The data caveat: the held-out documents are this run's. A champion trained by another
pipeline run on an overlapping corpus may have trained on some of them (different
``tokenize.val_fraction``, or a different corpus); keep the split settings fixed between
runs that compete.

Importing this module is cheap (pydantic only): MLflow, Prefect and torch load inside
the functions, so flows.config can hold :class:`ChampionConfig`.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from flows.tracking import Tracker

log = logging.getLogger(__name__)

# metric (a key of tasks.heldout.score_model's result) -> whether a larger value is better
GREATER_IS_BETTER: dict[str, bool] = {
    "bits_per_byte": False,
    "loss_per_byte": False,
}
DECISIONS = ("promoted", "kept", "first")
TAG = "forgeline."  # prefix of the tags set on model versions


class ChampionError(RuntimeError):
    """The champion could not be fetched or scored (and ``on_champion_error`` is 'fail')."""


class ChampionConfig(BaseModel):
    """Champion/challenger: the new model takes the registry alias only when it is better."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        True, description="Compare the newly registered model (the challenger) with the "
                          "version holding the alias (the champion) and move the alias when "
                          "the challenger is better. Needs registry.enabled.")
    alias: str = Field(
        "champion", min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_\-]+$",
        description="Registry alias that marks the best model so far; load it as "
                    "models:/<registry.model_name>@<alias>.")
    metric: str = Field(
        "bits_per_byte",
        description="What decides, computed on the held-out documents for both models with "
                    "each model's own tokenizer: 'bits_per_byte' (total negative "
                    "log-likelihood in bits per UTF-8 byte, lower is better) or "
                    "'loss_per_byte' (the same in nats).")
    greater_is_better: bool | None = Field(
        None, description="Direction of the metric; empty = the metric's own (lower is "
                          "better for bits_per_byte and loss_per_byte).")
    min_delta: float = Field(
        0.0, ge=0.0,
        description="Margin: the challenger takes the alias only when it beats the champion "
                    "by more than 0 and by at least this much on the metric (e.g. 0.01 bits "
                    "per byte). Equal scores always keep the champion.")
    max_documents: int = Field(
        200, ge=1, description="Score both models on at most this many held-out documents "
                               "(the tokenize stage's validation documents, corpus order).")
    max_chars: int = Field(
        4000, ge=100, description="Characters of each held-out document scored (its start).")
    batch_size: int = Field(16, ge=1, description="Windows per scoring batch.")
    accelerator: Literal["auto", "cpu", "gpu", "cuda"] = Field(
        "auto", description="Where scoring runs: 'auto' (a CUDA GPU when present), 'cpu', "
                            "or 'gpu'/'cuda'.")
    on_champion_error: Literal["fail", "replace"] = Field(
        "fail", description="When the champion's files cannot be fetched or scored: 'fail' "
                            "stops with an error naming the version; 'replace' treats it as "
                            "missing (a warning) and gives the alias to the challenger.")

    @model_validator(mode="after")
    def _known_direction(self) -> ChampionConfig:
        if self.greater_is_better is None and self.metric not in GREATER_IS_BETTER:
            raise ValueError(f"champion.metric {self.metric!r} has no known direction; use one "
                             f"of {', '.join(GREATER_IS_BETTER)} or set "
                             "champion.greater_is_better")
        return self

    def higher_is_better(self) -> bool:
        if self.greater_is_better is not None:
            return self.greater_is_better
        return GREATER_IS_BETTER[self.metric]


@dataclass
class Decision:
    """The outcome of one challenge."""

    decision: str  # promoted | kept | first
    metric: str
    greater_is_better: bool
    margin: float  # min_delta
    model_name: str
    alias: str
    challenger_version: str
    challenger_score: float
    champion_score: float | None  # None: no champion (first) or it could not be scored
    champion_version_before: str | None
    champion_version_after: str
    improvement: float | None = None  # how much better the challenger is (> 0: better)
    note: str = ""  # why a champion was treated as missing, ...
    reused: bool = False  # recorded by an earlier attempt of this flow run

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _improvement(challenger: float, champion: float, greater_is_better: bool) -> float:
    return challenger - champion if greater_is_better else champion - challenger


def _score_value(scores: dict, metric: str, which: str) -> float:
    if metric not in scores:
        raise ChampionError(f"scoring the {which} gave no {metric!r} (it gave "
                            f"{', '.join(sorted(scores))}); set champion.metric to one of them")
    value = float(scores[metric])
    if not math.isfinite(value):
        raise ChampionError(f"the {which}'s {metric} is {value}: not a number to compare")
    return value


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def challenge(tracking_uri: str, model_name: str, challenger_version: str | int,
              challenger_dir: str | Path, score: Callable[[Path], dict],
              config: ChampionConfig) -> Decision:
    """Score the registered version ``challenger_version`` (its files in ``challenger_dir``)
    and the version holding ``config.alias`` with ``score`` (model directory -> metrics),
    move the alias to the challenger when it wins (or when there is no champion), and tag
    both versions. Returns the :class:`Decision`."""
    from mlflow.tracking import MlflowClient

    from flows.model_registry import download_model

    challenger_version = str(challenger_version)
    client = MlflowClient(tracking_uri=tracking_uri)
    client.get_model_version(model_name, challenger_version)  # it exists: fail early
    recorded = _recorded(client, model_name, challenger_version, config)
    if recorded is not None:
        return recorded

    higher = config.higher_is_better()
    champion_version = _alias_version(client, model_name, config.alias)
    challenger_score = _score_value(score(Path(challenger_dir)), config.metric, "challenger")

    champion_score, note = None, ""
    if champion_version == challenger_version:  # e.g. the alias was set by hand
        champion_score = challenger_score
    elif champion_version is not None:
        try:
            with tempfile.TemporaryDirectory(prefix="forgeline-champion-") as tmp:
                champion_dir = download_model(f"models:/{model_name}/{champion_version}",
                                              tracking_uri, Path(tmp) / "model")
                champion_score = _score_value(score(champion_dir), config.metric, "champion")
        except Exception as exc:
            reason = (f"the champion, {model_name} version {champion_version} "
                      f"(@{config.alias}), could not be fetched or scored: "
                      f"{type(exc).__name__}: {exc}")
            if config.on_champion_error == "fail":
                raise ChampionError(f"{reason}. Fix or re-register it, move the alias, or set "
                                    "champion.on_champion_error=replace to let the "
                                    "challenger take its place") from exc
            log.warning("%s; treated as missing (champion.on_champion_error=replace)", reason)
            note = reason[:4000]

    improvement = None if champion_score is None else _improvement(
        challenger_score, champion_score, higher)
    if champion_version is None:
        decision = "first"
    elif champion_version == challenger_version:
        decision = "kept"
    elif champion_score is None:  # could not be scored, on_champion_error=replace
        decision = "promoted"
    else:
        decision = "promoted" if improvement > 0 and improvement >= config.min_delta else "kept"
    after = challenger_version if decision in ("promoted", "first") else champion_version
    result = Decision(decision=decision, metric=config.metric, greater_is_better=higher,
                      margin=config.min_delta, model_name=model_name, alias=config.alias,
                      challenger_version=challenger_version, challenger_score=challenger_score,
                      champion_score=champion_score, champion_version_before=champion_version,
                      champion_version_after=after, improvement=improvement, note=note)

    # the decision on the challenger first: a retry finds it and only finishes the move
    _tag_version(client, model_name, challenger_version, {
        "champion_decision": decision, "champion_metric": config.metric,
        "champion_greater_is_better": str(higher).lower(),
        "champion_margin": _fmt(config.min_delta),
        "challenger_score": _fmt(challenger_score), "champion_score": _fmt(champion_score),
        "compared_with": champion_version or "", "champion_note": note})
    if decision in ("promoted", "first"):
        client.set_registered_model_alias(model_name, config.alias, challenger_version)
    if champion_version is not None and champion_version != challenger_version:
        tags = {"last_challenge": f"version {challenger_version}: {decision}",
                "last_challenge_score": _fmt(champion_score)}
        if decision == "promoted":
            tags["dethroned_by"] = challenger_version
        _tag_version(client, model_name, champion_version, tags)
    log.info("champion/challenger on %s: %s version %s %s (%s %s) vs champion %s (%s); "
             "@%s -> version %s", config.metric, model_name, challenger_version, decision,
             config.metric, _fmt(challenger_score), champion_version or "none",
             _fmt(champion_score) or "-", config.alias, after)
    return result


def _alias_version(client, name: str, alias: str) -> str | None:
    """The version holding ``alias``, None when no version holds it."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _tag_version(client, name: str, version: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, f"{TAG}{key}", value)


def _recorded(client, name: str, version: str, config: ChampionConfig) -> Decision | None:
    """The decision an earlier attempt recorded on this version (same metric and alias),
    with the alias move finished if that attempt stopped before it."""
    tags = client.get_model_version(name, version).tags or {}
    decision = tags.get(f"{TAG}champion_decision")
    if decision not in DECISIONS or tags.get(f"{TAG}champion_metric") != config.metric:
        return None
    before = tags.get(f"{TAG}compared_with") or None
    champion = tags.get(f"{TAG}champion_score") or None
    challenger = float(tags[f"{TAG}challenger_score"])
    higher = tags.get(f"{TAG}champion_greater_is_better") == "true"
    after = version if decision in ("promoted", "first") else (before or version)
    if decision in ("promoted", "first"):
        current = _alias_version(client, name, config.alias)
        if current is None or current == before:  # nobody else took it meanwhile
            client.set_registered_model_alias(name, config.alias, version)
    champion_score = float(champion) if champion else None
    log.info("champion/challenger: %s version %s was already decided (%s) by an earlier "
             "attempt", name, version, decision)
    return Decision(decision=decision, metric=config.metric, greater_is_better=higher,
                    margin=float(tags.get(f"{TAG}champion_margin") or 0.0), model_name=name,
                    alias=config.alias, challenger_version=version,
                    challenger_score=challenger, champion_score=champion_score,
                    champion_version_before=before, champion_version_after=after,
                    improvement=None if champion_score is None else _improvement(
                        challenger, champion_score, higher),
                    note=tags.get(f"{TAG}champion_note", ""), reused=True)


def record_decision(tracker: Tracker, parent_run_id: str, decision: Decision) -> None:
    """The pipeline's parent run: tag ``champion_decision``, metrics ``challenger_score``
    and ``champion_score`` (when there was a champion to score), and tags naming the
    metric, the alias and both versions."""
    tracker.set_tags(parent_run_id, {
        "champion_decision": decision.decision, "champion_metric": decision.metric,
        "champion_alias": f"models:/{decision.model_name}@{decision.alias}",
        "champion_version": decision.champion_version_after,
        "challenger_version": decision.challenger_version,
        "champion_version_before": decision.champion_version_before or ""})
    metrics = {"challenger_score": decision.challenger_score}
    if decision.champion_score is not None:
        metrics["champion_score"] = decision.champion_score
    tracker.log_metrics(parent_run_id, metrics)


def decision_markdown(decision: Decision) -> str:
    """A short markdown report of the decision (the Prefect artifact, the run report)."""
    d = decision
    direction = "higher" if d.greater_is_better else "lower"
    verdict = {
        "first": f"no model held `@{d.alias}`: version {d.challenger_version} is the first "
                 "champion",
        "promoted": (f"version {d.challenger_version} beat version {d.champion_version_before}"
                     if d.champion_score is not None else
                     f"version {d.challenger_version} replaced version "
                     f"{d.champion_version_before}, which could not be scored")
                    + f" and now holds `@{d.alias}`",
        "kept": f"version {d.champion_version_before} keeps `@{d.alias}`; version "
                f"{d.challenger_version} did not beat it by the margin",
    }[d.decision]
    lines = [f"# Champion / challenger: {d.decision}", "", verdict + ".", "",
             (f"Metric: `{d.metric}` on the held-out documents ({direction} is better), "
             f"margin {d.margin:g}."), "",
             "| model | version | score |", "|---|---|---:|",
             (f"| challenger | `models:/{d.model_name}/{d.challenger_version}` | "
             f"{d.challenger_score:.4f} |")]
    if d.champion_version_before is not None:
        shown = "not scored" if d.champion_score is None else f"{d.champion_score:.4f}"
        lines.append(f"| champion before | `models:/{d.model_name}/{d.champion_version_before}`"
                     f" | {shown} |")
    if d.improvement is not None:
        lines += ["", f"Improvement: {d.improvement:+.4f} (needed > 0 and >= {d.margin:g})."]
    lines += ["", (f"`models:/{d.model_name}@{d.alias}` is now version "
                  f"{d.champion_version_after}.")]
    if d.note:
        lines += ["", f"Note: {d.note}"]
    return "\n".join(lines)


def heldout_scorer(config: ChampionConfig, tokenized_dir: str | Path,
                   corpus_dir: str | Path) -> Callable[[Path], dict]:
    """The score function of a pipeline run: :func:`tasks.heldout.score_model` on the
    documents its tokenize stage held out (read once, shared by both models)."""
    from tasks.heldout import heldout_texts, score_model

    texts = heldout_texts(tokenized_dir, corpus_dir, config.max_documents, config.max_chars)
    device = "auto" if config.accelerator == "auto" else (
        "cpu" if config.accelerator == "cpu" else "cuda")

    def score(model_dir: Path) -> dict:
        return score_model(model_dir, texts, config.batch_size, device)

    return score


def run_champion(config: ChampionConfig, tracker: Tracker, parent_run_id: str,
                 registered: dict[str, Any], model_dir: str | Path, tokenized_dir: str | Path,
                 corpus_dir: str | Path) -> Decision | None:
    """The pipeline's step, all in one: score the version just registered (``registered``:
    ``flows.pipeline.register_final_model``'s result; its files in ``model_dir``) against
    the champion on this run's held-out documents, record the decision on the parent run
    and publish it as the Prefect markdown artifact ``forgeline-champion`` (when inside a
    flow run). None when disabled or nothing was registered."""
    if not config.enabled or not registered or not registered.get("version"):
        return None
    score = heldout_scorer(config, tokenized_dir, corpus_dir)
    decision = challenge(tracker.uri, registered["name"], registered["version"], Path(model_dir),
                         score, config)
    record_decision(tracker, parent_run_id, decision)
    _publish(decision)
    return decision


def _publish(decision: Decision) -> None:
    from prefect.artifacts import create_markdown_artifact
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return
    create_markdown_artifact(markdown=decision_markdown(decision), key="forgeline-champion",
                             description="champion/challenger decision")
