"""Classify stage: text classification with a head on the pretrained model.

The examples are the user's (``data_path`` or ``dataset``) or derived from the corpus
(see ``tasks.labelled``: which pydoc section a passage comes from). The backbone (a
causal decoder or a masked-LM encoder) gets dropout and a freshly initialised linear
head, and the whole classifier is fine-tuned through the one training runner, with
weight decay and early stopping on the held-out loss as the guards against
overfitting; the best checkpoint by held-out loss is the tuned model.

Measured on the held-out examples: accuracy and macro-F1 of the tuned classifier, of the
same backbone with its untuned head (what fine-tuning adds), and of always answering the
training set's most common label (the majority baseline); a confusion matrix (PNG) and a
metrics JSON with the per-label report. With ``folds`` >= 2 every fold is trained in
``fold-<k>/``, the stats hold the mean and standard deviation over folds, and the result
lists each fold (for nested MLflow runs); the confusion matrix sums the folds, whose
held-out sets together cover every example once.

``tune_folds`` and ``TuningConfig`` are shared with the ner stage (``tasks.ner``).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from models.config import Accelerator, Precision, check_devices
from tasks.labelled import (
    TextExample,
    data_path_field,
    dataset_field,
    derived_classification,
    dev_split,
    folds_field,
    id_column_field,
    load_text_examples,
    max_examples_field,
    nothing_derived,
    split_examples,
    split_field,
    streaming_field,
    val_fraction_field,
)
from tasks.launch import across_devices, world_size
from tasks.shards import write_text_atomic
from tasks.stage import StageInputError
from tasks.tokenize import read_val_ids
from tasks.training import (
    CHECKPOINTS,
    ResumeSampler,
    TrainSettings,
    accelerator_field,
    checkpoint_every_field,
    devices_field,
    keep_checkpoints_field,
    keep_only_best,
    max_minutes_field,
    num_threads_field,
    precision_field,
    run_training,
)

if TYPE_CHECKING:
    from models.lightning import MetricsFn

log = logging.getLogger(__name__)

STAGE = "classify"


class TuningConfig(BaseModel):
    """Settings every task fine-tuning stage shares (classify, ner)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Run this stage.")
    data_path: str = data_path_field("with a text and a label")
    dataset: str = dataset_field()
    split: str = split_field()
    streaming: bool = streaming_field()
    id_column: str = id_column_field()
    label_names: list[str] = Field(
        default_factory=list,
        description="Names of integer labels, in class-id order, when the data does not "
                    "declare them (a Hugging Face ClassLabel feature does).")
    max_examples: int = max_examples_field(20000)
    val_fraction: float = val_fraction_field()
    folds: int = folds_field()
    dropout: float = Field(
        0.1, ge=0.0, lt=1.0,
        description="Dropout in the backbone (embeddings, attention, MLP) and before the "
                    "head while tuning: the guard against overfitting a small labelled set.")
    learning_rate: float = Field(
        2e-3, gt=0.0, description="Peak AdamW learning rate (backbone and head).")
    min_lr_ratio: float = Field(
        0.1, ge=0.0, le=1.0, description="Final learning rate as a fraction of the peak.")
    weight_decay: float = Field(
        0.01, ge=0.0, description="AdamW weight decay on weight matrices.")
    warmup_steps: int = Field(10, ge=0, description="Optimizer steps of linear warmup.")
    max_steps: int = Field(80, ge=1, description="Optimizer steps of tuning (per fold).")
    batch_size: int = Field(16, ge=1, description="Examples per optimizer step (per device).")
    max_length: int = Field(
        96, ge=8, description="Tokens per example (longer ones are cut; at most the model's "
                              "context).")
    grad_clip: float = Field(1.0, ge=0.0, description="Gradient-norm clip; 0 = none.")
    val_every_steps: int = Field(
        20, ge=1, description="Measure the held-out loss every this many steps.")
    log_every_steps: int = Field(
        10, ge=1, description="Report train loss and learning rate every N steps.")
    early_stopping_patience: int = Field(
        3, ge=0, description="Stop when the development loss has not improved for this many "
                             "validations in a row (the best checkpoint is the tuned "
                             "model); 0 = train all max_steps.")
    dev_fraction: float = Field(
        0.1, gt=0.0, lt=1.0,
        description="Share of the training examples (whole groups, by a hash of their key) "
                    "set aside as development data: it picks the best checkpoint and stops "
                    "training early, so the held-out examples the metrics are reported on "
                    "never choose the model.")
    checkpoint_every_steps: int = checkpoint_every_field(100)
    keep_checkpoints: int = keep_checkpoints_field()
    max_minutes: float = max_minutes_field()
    precision: Precision = precision_field()
    accelerator: Accelerator = accelerator_field()
    devices: str | int = devices_field()
    seed: int = Field(0, description="Seed for the head's initialisation, the order of "
                                     "examples and dropout.")
    num_threads: int = num_threads_field()

    _devices = field_validator("devices")(check_devices)


class ClassifyConfig(TuningConfig):
    """Text classification: labelled texts (or the derived section task), a head on the
    pretrained model, accuracy and macro-F1 on held-out data."""

    text_column: str = Field("text", description="Column (JSON key) holding the text.")
    label_column: str = Field(
        "label", description="Column holding the label: a string, or an integer class id "
                             "(named by the dataset's ClassLabel feature or label_names).")
    labels: list[str] = Field(
        default_factory=list,
        description="The allowed labels; a record with another one is an error. Empty = "
                    "every label found.")
    label_by: Literal["section", "document"] = Field(
        "section",
        description="Derived task only: label a passage by the pydoc section it comes from "
                    "(module text, classes, functions, data, topic page), split by document; "
                    "or by its document (which module), split by passage, since each module "
                    "is one page. A corpus without pydoc sections falls back to document.")
    passage_chars: int = Field(
        256, ge=40, description="Derived task only: characters per passage (cut at line "
                                "ends).")
    num_labels: int = Field(
        4, ge=2, description="Derived task only: keep the labels with the most passages.")
    max_per_label: int = Field(
        250, ge=1, description="Derived task only: at most this many passages per label "
                               "(balances the classes and bounds the run time).")


# ---- the fold runner shared with ner ----------------------------------------------------


@dataclass
class TaskSpec:
    """What differs between classification and NER for :func:`tune_folds`."""

    stage: str
    labels: list[str]
    head: type  # SequenceClassifier or TokenClassifier
    module: type  # its LightningModule
    encode: Callable[[list], Any]  # examples -> EncodedDataset
    score: Callable[[list, Any, list], tuple[dict, dict]]  # (metrics, details)
    summary: str  # the metric that picks the fold whose classifier is saved
    extra: dict  # saved with the classifier (max_length, label_next, ...)


def majority_predictions(dataset, label: int) -> list:
    """The most common training label everywhere: one per text, or one per labelled token."""
    from models.heads import label_positions

    return [label if isinstance(labels, int) else [label] * len(label_positions(labels))
            for _, labels in dataset.rows]


def most_common_label(dataset) -> int:
    counts: Counter = Counter()
    for _, labels in dataset.rows:
        if isinstance(labels, int):
            counts[labels] += 1
        else:
            counts.update(label for label in labels if label >= 0)
    return counts.most_common(1)[0][0]


def _restore_best(module, run_dir: Path) -> bool:
    """Load best.ckpt (the lowest held-out loss) into the module; False if there is none."""
    import torch

    best = run_dir / CHECKPOINTS / "best.ckpt"
    if not best.is_file():
        return False
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    return True


def _prefixed(on_metrics: MetricsFn | None, prefix: str) -> MetricsFn | None:
    if on_metrics is None or not prefix:
        return on_metrics
    return lambda metrics, step: on_metrics({f"{prefix}{k}": v for k, v in metrics.items()},
                                            step)


def tune_fold(spec: TaskSpec, config: TuningConfig, train: list, val: list, run_dir: Path,
              model_dir: Path, tokenized_dir: Path, on_metrics: MetricsFn | None,
              fold: int | None) -> dict | None:
    """Train one classifier on ``train`` in ``run_dir`` and measure it, untuned and the
    majority baseline on ``val``; None in a process other than global rank zero."""
    import lightning as L
    from torch.utils.data import DataLoader, Subset

    from models.checkpoint import load_model
    from models.evaluation import pick_device, plot_loss_curve
    from models.heads import pad_collate, predict, set_backbone_dropout
    from models.lightning import resolve_precision, set_threads
    from tasks.finetune import pair_order

    started = time.perf_counter()
    name = spec.stage if fold is None else f"{spec.stage} fold {fold}"
    L.seed_everything(config.seed, workers=True, verbose=False)
    set_threads(config.num_threads)
    backbone = load_model(model_dir / "model.pt").train()
    set_backbone_dropout(backbone, config.dropout)
    model = spec.head(backbone, len(spec.labels), config.dropout)
    train, dev = dev_split(train, config.dev_fraction)
    train_data, dev_data, val_data = spec.encode(train), spec.encode(dev), spec.encode(val)
    collate = pad_collate(spec.extra["pad_id"])
    device = pick_device(config.accelerator)
    untuned = predict(model.to(device), val_data, config.batch_size, collate, device)
    majority = majority_predictions(val_data, most_common_label(train_data))

    module = spec.module(model, config.learning_rate, config.weight_decay,
                         config.warmup_steps, config.max_steps, config.min_lr_ratio)
    precision = resolve_precision(config.precision, config.accelerator)
    resolved = {"model": backbone.config.to_dict(), spec.stage: config.model_dump(mode="json"),
                "labels": spec.labels, "fold": fold, "pretrained_from": str(model_dir.resolve()),
                "examples_train": len(train), "examples_dev": len(dev),
                "examples_val": len(val)}
    order = pair_order(len(train_data), config.max_steps * config.batch_size
                       * world_size(config), config.seed)
    ordered = Subset(train_data, order)

    def train_loader(samples_seen: int) -> DataLoader:
        return DataLoader(ordered, batch_size=config.batch_size, collate_fn=collate,
                          sampler=ResumeSampler(samples_seen, len(ordered)))

    # the development examples choose the checkpoint; the held-out ones only measure it
    val_loader = DataLoader(dev_data, batch_size=config.batch_size, collate_fn=collate)
    settings = TrainSettings.of(config, name, precision)
    settings.flops_per_token = backbone.config.flops_per_token()
    log.info("%s: %d train / %d development / %d held-out examples, %d labels, %s backbone",
             name, len(train), len(dev), len(val), len(spec.labels), "causal" if backbone.config.causal else "encoder")
    outcome = run_training(settings, module, train_loader, val_loader, run_dir, resolved,
                           on_metrics, files={"tokenizer.model": tokenized_dir / "tokenizer.model"})
    if not outcome.is_global_zero:
        return None
    restored = _restore_best(module, run_dir)
    tuned = predict(model.to(device), val_data, config.batch_size, collate, device)

    metrics: dict[str, float] = {}
    details: dict = {}
    for prefix, predictions in (("", tuned), ("untuned_", untuned), ("majority_", majority)):
        scores, info = spec.score(val, val_data, predictions)
        metrics.update({f"{spec.stage}_{prefix}{k}": round(v, 5) for k, v in scores.items()})
        if not prefix:
            details = info
    steps = outcome.trainer.global_step
    metrics.update({f"{spec.stage}_examples_train": len(train),
                    f"{spec.stage}_examples_dev": len(dev),
                    f"{spec.stage}_examples_val": len(val), f"{spec.stage}_steps": steps})
    callback = outcome.callback
    plot_loss_curve(run_dir / "loss_curve.png", callback.train_history, callback.val_history,
                    f"{name}: loss (best checkpoint {'restored' if restored else 'not found'})")
    keep_only_best(run_dir)
    seconds = time.perf_counter() - started
    log.info("%s: %d steps in %.0fs (train %.0fs); %s", name, steps, seconds, outcome.seconds,
             ", ".join(f"{k.removeprefix(spec.stage + '_')} {v:.3f}" for k, v in metrics.items()
                       if isinstance(v, float)))
    return {"metrics": metrics, "details": details, "tuned": tuned, "model": model.cpu(),
            "seconds": seconds,
            "history": {"train_loss": callback.train_history, "val_loss": callback.val_history}}


def tune_folds(spec: TaskSpec, config: TuningConfig, splits: list[tuple[list, list]],
               model_dir: Path, tokenized_dir: Path, out_dir: Path,
               on_metrics: MetricsFn | None,
               write_fold: Callable[[Path, dict, list], dict]) -> dict:
    """Run every split (``fold-<k>/`` with several), save the classifier of the best one
    in ``out_dir`` and return the stage result with the mean (and spread) of the metrics.
    ``write_fold(dir, result, val)`` writes a fold's files and returns their names."""
    from models.heads import save_classifier

    folds = len(splits)
    results, fold_entries = [], []
    best = None
    for fold, (train, val) in enumerate(splits):
        run_dir = out_dir if folds == 1 else out_dir / f"fold-{fold}"
        result = tune_fold(spec, config, train, val, run_dir, model_dir, tokenized_dir,
                           _prefixed(on_metrics, f"fold{fold}_" if folds > 1 else ""),
                           fold if folds > 1 else None)
        if result is None:  # not rank zero: the files and the report are rank zero's
            continue
        artifacts = write_fold(run_dir, result, val)
        results.append((result, val))
        summary = result["metrics"][spec.summary]
        if best is None or summary > best[0]:
            if best is not None:
                best[1]["model"] = None
            best = (summary, result, fold)
        else:
            result["model"] = None
        if folds > 1:
            prefix = f"fold-{fold}/"
            fold_entries.append({"fold": fold, "metrics": result["metrics"], "dir": f"fold-{fold}",
                                 "artifacts": {k: prefix + v for k, v in artifacts.items()},
                                 "history": result["history"]})
    if not results:
        return {}
    _, chosen, chosen_fold = best
    save_classifier(out_dir / "classifier.pt", chosen["model"], spec.labels,
                    {**spec.extra, "stage": spec.stage, "fold": chosen_fold if folds > 1 else None,
                     "config": config.model_dump(mode="json")})
    shutil.copyfile(tokenized_dir / "tokenizer.model", out_dir / "tokenizer.model")
    metric_names = [k for k in results[0][0]["metrics"]]
    stats: dict[str, float] = {}
    for name in metric_names:
        values = [r["metrics"][name] for r, _ in results]
        if name.endswith(("_examples_val", "_steps")):  # every fold's: the total
            stats[name] = sum(values)
            continue
        if name.endswith(("_examples_train", "_examples_dev")):
            stats[name] = round(sum(values) / len(values), 1)
            continue
        stats[name] = round(sum(values) / len(values), 5)
        tuned = not any(part in name for part in ("_untuned_", "_majority_"))
        if folds > 1 and tuned:
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
            stats[f"{name}_std"] = round(std, 5)
    stats[f"{spec.stage}_labels"] = len(spec.labels)
    stats[f"{spec.stage}_folds"] = folds
    stats[f"{spec.stage}_seconds"] = round(sum(r["seconds"] for r, _ in results), 2)
    write_text_atomic(out_dir / "config.json", json.dumps(
        {spec.stage: config.model_dump(mode="json"), "labels": spec.labels, **spec.extra,
         "model": chosen["model"].config.to_dict(), "pretrained_from": str(model_dir.resolve()),
         "saved_fold": chosen_fold if folds > 1 else None}, indent=2))
    evaluated = sum(len(val) for _, val in results)
    answer = {"count": evaluated, "unit": "held-out examples", "stats": stats,
              "artifacts": {"classifier": "classifier.pt", "tokenizer_model": "tokenizer.model",
                            "config": "config.json"},
              "labels": spec.labels, "results": results}
    if folds > 1:
        answer["folds"] = fold_entries
        answer["saved_fold"] = chosen_fold
    return answer


# ---- classification ---------------------------------------------------------------------


def classification_scores(gold: list[int], predicted: list[int], labels: list[str]
                          ) -> tuple[dict[str, float], dict]:
    """Accuracy and macro-F1 (over the labels that occur in the gold or the predictions,
    as scikit-learn computes it), and the per-label report and confusion matrix."""
    n = len(labels)
    matrix = [[0] * n for _ in range(n)]
    for g, p in zip(gold, predicted, strict=True):
        matrix[g][p] += 1
    report, f1s = {}, []
    for i, label in enumerate(labels):
        tp = matrix[i][i]
        support = sum(matrix[i])
        predicted_count = sum(row[i] for row in matrix)
        precision = tp / predicted_count if predicted_count else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        report[label] = {"precision": round(precision, 5), "recall": round(recall, 5),
                         "f1": round(f1, 5), "support": support}
        if support or predicted_count:
            f1s.append(f1)
    accuracy = sum(matrix[i][i] for i in range(n)) / max(1, len(gold))
    macro_f1 = sum(f1s) / len(f1s) if f1s else 0.0
    return {"accuracy": accuracy, "macro_f1": macro_f1}, {"per_label": report,
                                                          "confusion_matrix": matrix}


def plot_confusion(path: Path, matrix: list[list[int]], labels: list[str], title: str) -> None:
    """The confusion matrix as a PNG: true labels down, predicted across, counts in cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from tasks.shards import atomic_path

    data = np.asarray(matrix, dtype=float)
    size = max(4.0, 0.6 * len(labels) + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1, size), dpi=100)
    rows = data.sum(axis=1, keepdims=True)
    image = ax.imshow(np.divide(data, rows, out=np.zeros_like(data), where=rows > 0),
                      cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of the true label")
    ticks = range(len(labels))
    short = [label if len(label) <= 24 else label[:23] + "…" for label in labels]
    ax.set_xticks(ticks, short, rotation=45, ha="right")
    ax.set_yticks(ticks, short)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_title(title)
    if len(labels) <= 30:
        for i in ticks:
            for j in ticks:
                share = data[i, j] / rows[i, 0] if rows[i, 0] else 0.0
                ax.text(j, i, f"{int(data[i, j])}", ha="center", va="center", fontsize=8,
                        color="white" if share > 0.5 else "black")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _write_metrics(path: Path, metrics: dict, details: dict, extra: dict | None = None) -> None:
    write_text_atomic(path, json.dumps({"metrics": metrics, **details, **(extra or {})},
                                       indent=2, default=str))


def load_examples(config: ClassifyConfig, corpus_dir: Path,
                  held_out: frozenset[str] | set[str] = frozenset()
                  ) -> tuple[list[TextExample], bool]:
    """The labelled examples and whether they were derived from the corpus (``held_out``:
    documents a derived task must hold out, those held out of pretraining)."""
    if config.data_path or config.dataset:
        return load_text_examples(STAGE, config), False
    return derived_classification(STAGE, Path(corpus_dir), config, held_out), True


@across_devices
def classify(config: ClassifyConfig, tokenized_dir: Path, model_dir: Path, corpus_dir: Path,
             out_dir: Path, on_metrics: MetricsFn | None = None) -> dict:
    """Fine-tune a classifier on the labelled (or derived) texts; see the module docstring."""
    from models.heads import (
        ClassificationModule,
        EncodedDataset,
        SequenceClassifier,
        encode_text,
    )

    tokenized_dir, model_dir, out_dir = Path(tokenized_dir), Path(model_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_config = saved_model_config(model_dir, STAGE)
    derived = not (config.data_path or config.dataset)
    held_out = read_val_ids(tokenized_dir) if derived and config.folds == 1 else set()
    try:
        examples, _ = load_examples(config, corpus_dir, held_out)
        splits = split_examples(STAGE, examples, config.val_fraction, config.folds, held_out)
    except StageInputError as exc:
        if not derived:
            raise
        return nothing_derived(STAGE, exc)
    labels = list(config.labels) or sorted({e.label for e in examples})
    if len({e.label for e in examples}) < 2:
        raise StageInputError(STAGE, f"{len(examples)} example(s) with "
                                     f"{len({e.label for e in examples})} label(s); a "
                                     "classifier needs at least 2 labels")
    index = {label: i for i, label in enumerate(labels)}
    unknown = next((e for e in examples if e.label not in index), None)
    if unknown is not None:
        raise StageInputError(STAGE, f"{unknown.where}: label {unknown.label!r} is not in "
                                     f"{STAGE}.labels ({', '.join(labels)})")

    sp, eos_id, pad_id, _ = load_tokenizer(tokenized_dir)
    max_length = min(config.max_length, max_tokens(model_config))
    cache: dict[str, list[int]] = {}

    def encode(items: list[TextExample]) -> EncodedDataset:
        rows = []
        for e in items:
            if e.text not in cache:
                cache[e.text] = encode_text(sp.encode, e.text, max_length, eos_id)
            rows.append((cache[e.text], index[e.label]))
        return EncodedDataset(rows)

    def score(val: list[TextExample], data, predicted: list[int]) -> tuple[dict, dict]:
        return classification_scores([label for _, label in data.rows], predicted, labels)

    def write_fold(run_dir: Path, result: dict, val: list) -> dict:
        matrix = result["details"]["confusion_matrix"]
        plot_confusion(run_dir / "confusion_matrix.png", matrix, labels,
                       f"{STAGE}: held-out confusion matrix ({len(val)} examples)")
        _write_metrics(run_dir / "metrics.json", result["metrics"], result["details"],
                       {"labels": labels})
        return {"metrics": "metrics.json", "confusion_matrix": "confusion_matrix.png",
                "loss_curve": "loss_curve.png"}

    spec = TaskSpec(STAGE, labels, SequenceClassifier, ClassificationModule, encode, score,
                    f"{STAGE}_macro_f1", {"max_length": max_length, "eos_id": eos_id,
                                          "pad_id": pad_id, "derived": derived})
    answer = tune_folds(spec, config, splits, model_dir, tokenized_dir, out_dir, on_metrics,
                        write_fold)
    if not answer:
        return {}
    results = answer.pop("results")
    if len(results) > 1:  # the folds' held-out sets cover every example once: sum them
        matrix = [[sum(r["details"]["confusion_matrix"][i][j] for r, _ in results)
                   for j in range(len(labels))] for i in range(len(labels))]
        plot_confusion(out_dir / "confusion_matrix.png", matrix, labels,
                       f"{STAGE}: confusion over {len(results)} folds "
                       f"({answer['count']} held-out examples)")
        details = {"confusion_matrix": matrix,
                   "folds": [{"fold": i, "metrics": r["metrics"],
                              "per_label": r["details"]["per_label"]}
                             for i, (r, _) in enumerate(results)]}
        _write_metrics(out_dir / "metrics.json", answer["stats"], details, {"labels": labels})
    answer["artifacts"].update({"metrics": "metrics.json",
                                "confusion_matrix": "confusion_matrix.png"})
    if len(results) == 1:
        answer["artifacts"]["loss_curve"] = "loss_curve.png"
    answer["derived"] = derived
    stats = answer["stats"]
    log.info("%s: accuracy %.3f (untuned %.3f, majority %.3f), macro-F1 %.3f (untuned %.3f, "
             "majority %.3f) on %d held-out examples", STAGE, stats[f"{STAGE}_accuracy"],
             stats[f"{STAGE}_untuned_accuracy"], stats[f"{STAGE}_majority_accuracy"],
             stats[f"{STAGE}_macro_f1"], stats[f"{STAGE}_untuned_macro_f1"],
             stats[f"{STAGE}_majority_macro_f1"], answer["count"])
    return answer


def load_tokenizer(tokenized_dir: Path) -> tuple[Any, int, int, int]:
    """The sentencepiece processor and the EOS, padding and unknown ids of a tokenize
    output (padding falls back to EOS when the tokenizer has no pad piece)."""
    import sentencepiece as spm

    from models.data import read_meta

    meta = read_meta(tokenized_dir)
    eos_id = meta["eos_id"]
    pad_id = meta["pad_id"] if meta.get("pad_id", -1) >= 0 else eos_id
    unk_id = max(0, meta.get("unk_id", 0))
    sp = spm.SentencePieceProcessor(model_file=str(Path(tokenized_dir) / "tokenizer.model"))
    return sp, eos_id, pad_id, unk_id


def saved_model_config(model_dir: Path, stage: str) -> dict:
    """The model config saved in ``model_dir/model.pt`` (a StageInputError if missing)."""
    import torch

    path = Path(model_dir) / "model.pt"
    if not path.is_file():
        raise StageInputError(stage, f"{path} is missing: {stage} needs a pretrained model "
                                     "(a model directory with model.pt)")
    return torch.load(path, map_location="cpu", weights_only=True)["model_config"]


def max_tokens(model_config: dict) -> int:
    """The tokens a sequence may hold: the context less a soft prompt's positions."""
    return int(model_config["context_length"]) - int(model_config.get("prompt_tokens", 0))
