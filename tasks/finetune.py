"""Finetune stage: supervised fine-tuning of the pretrained model on prompt/response pairs.

Pairs come from a JSON-lines file (``data_path``) or, by default, from the corpus itself:
the prompt is ``prompt_template`` filled with the document's title and the response is
the beginning of the document (``response_chars`` characters). A tiny model can learn this
within a minute, because documentation pages usually open by restating their title and
then follow a house style; the pretrained model has never seen the template, so the loss
on held-out pairs before and after fine-tuning shows plainly whether fine-tuning worked.
Only response tokens are trained on.

``adapter.method`` picks what trains (models.adapters): every weight (``full``), LoRA
adapters merged into model.pt afterwards (``lora``), or a soft prompt alone
(``prompt_tuning``); both of the latter also save the adapter in ``adapter/``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, field_validator

from models.adapters import AdapterSettings
from models.config import Accelerator, Precision, check_devices, check_strategy
from tasks.launch import across_devices, world_size
from tasks.shards import iter_records
from tasks.stage import StageInputError
from tasks.tokenize import is_validation, read_val_ids
from tasks.training import (
    ResumeSampler,
    TrainSettings,
    accelerator_field,
    checkpoint_every_field,
    devices_field,
    early_stopping_field,
    finish_model,
    keep_checkpoints_field,
    max_minutes_field,
    num_nodes_field,
    num_threads_field,
    precision_field,
    run_training,
    strategy_field,
)

if TYPE_CHECKING:  # torch and Lightning load when training starts, not with the config
    from models.data import Pair
    from models.lightning import MetricsFn

log = logging.getLogger(__name__)

STAGE = "finetune"
FIRST_STEPS = 5  # train_loss_first averages this many steps: one step alone is noisy


class FinetuneConfig(BaseModel):
    """Supervised fine-tuning: where the pairs come from and how long to train."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Run fine-tuning; when off, evaluate uses the "
                                            "pretrained model.")
    data_path: str | None = Field(
        None,
        description="A .jsonl file of {\"prompt\": ..., \"response\": ...} records. Empty = "
                    "derive title -> opening-text pairs from the corpus.")
    max_pairs: int = Field(
        2000, ge=2, description="Use at most this many pairs (the first ones), train + val.")
    val_fraction: float = Field(
        0.1, gt=0.0, lt=1.0,
        description="Share of pairs held out to measure the loss before and after fine-tuning "
                    "(chosen by a hash of the document id, stable across runs).")
    prompt_template: str = Field(
        "### Title: {title}\n### Text:\n",
        description="Prompt for pairs derived from the corpus; {title} is the document title "
                    "(or its first line, or its URL path, when it has none).")
    response_chars: int = Field(
        300, ge=10,
        description="Characters from the start of the document that form the response of "
                    "a derived pair (cut at a word boundary).")
    learning_rate: float = Field(
        5e-4, gt=0.0,
        description="Peak AdamW learning rate; well below pretraining's, so the model "
                    "learns the format without forgetting the language.")
    min_lr_ratio: float = Field(
        0.1, ge=0.0, le=1.0, description="Final learning rate as a fraction of the peak.")
    weight_decay: float = Field(
        0.0, ge=0.0, description="AdamW weight decay on weight matrices.")
    warmup_steps: int = Field(10, ge=0, description="Optimizer steps of linear warmup.")
    max_steps: int = Field(
        60, ge=1,
        description="Optimizer steps of fine-tuning; a few passes over a few hundred pairs "
                    "(more overfits them).")
    batch_size: int = Field(16, ge=1, description="Pairs per optimizer step (per device).")
    grad_clip: float = Field(1.0, ge=0.0, description="Gradient-norm clip; 0 = none.")
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="Dropout on the model while fine-tuning (a guard against overfitting a "
                    "few hundred pairs); 0 = keep the pretrained model's own value. The "
                    "saved model keeps the pretrained value.")
    adapter: AdapterSettings = Field(
        default_factory=AdapterSettings,
        description="What trains: every weight (method 'full'), LoRA adapters ('lora') or a "
                    "soft prompt ('prompt_tuning'), with their settings.")
    val_every_steps: int = Field(
        20, ge=1, description="Measure the held-out loss every this many steps.")
    log_every_steps: int = Field(
        5, ge=1, description="Report train loss and learning rate every N steps.")
    checkpoint_every_steps: int = checkpoint_every_field(50)
    keep_checkpoints: int = keep_checkpoints_field()
    early_stopping_patience: int = early_stopping_field()
    max_minutes: float = max_minutes_field()
    precision: Precision = precision_field()
    accelerator: Accelerator = accelerator_field()
    devices: str | int = devices_field()
    strategy: str = strategy_field()
    num_nodes: int = num_nodes_field()
    seed: int = Field(0, description="Seed for the order of pairs and dropout.")
    num_threads: int = num_threads_field()

    _strategy = field_validator("strategy")(check_strategy)
    _devices = field_validator("devices")(check_devices)


def document_title(record: dict) -> str:
    """The title, else the first non-empty line (up to 80 characters), else the URL path."""
    title = (record.get("title") or "").strip()
    if title:
        return title
    for line in (record.get("text") or "").splitlines():
        if line.strip():
            return line.strip()[:80]
    return urlparse(record.get("url") or "").path.strip("/") or "untitled"


def opening_text(text: str, max_chars: int) -> str:
    """The first ``max_chars`` characters, cut back to the last whitespace when possible."""
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    space = max(cut.rfind(" "), cut.rfind("\n"))
    return cut[:space] if space > max_chars // 2 else cut


def corpus_pairs(config: FinetuneConfig, corpus_dir: Path) -> list[tuple[str, Pair]]:
    """(document id, pair) for the first ``max_pairs`` documents with text."""
    from models.data import Pair

    pairs = []
    for record in iter_records(corpus_dir):
        text = (record.get("text") or "").strip()
        if not text:
            continue
        prompt = config.prompt_template.replace("{title}", document_title(record))
        pairs.append((str(record["id"]), Pair(prompt, opening_text(text, config.response_chars))))
        if len(pairs) >= config.max_pairs:
            break
    return pairs


def file_pairs(path: Path, max_pairs: int) -> list[tuple[str, Pair]]:
    """Pairs from a JSON-lines file; a bad line is reported as file:line."""
    from models.data import Pair

    if not path.is_file():
        raise StageInputError(STAGE, f"finetune.data_path {path} does not exist or is not a file")
    pairs = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise StageInputError(STAGE, f"cannot read finetune.data_path {path}: {exc}") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise StageInputError(STAGE, f"{path}:{number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or not all(
                isinstance(record.get(k), str) and record[k].strip()
                for k in ("prompt", "response")):
            raise StageInputError(STAGE, f"{path}:{number}: expected an object with non-empty "
                                         "string fields \"prompt\" and \"response\"")
        pairs.append((f"{path.name}:{number}", Pair(record["prompt"], record["response"])))
        if len(pairs) >= max_pairs:
            break
    return pairs


def split_pairs(pairs: list[tuple[str, Pair]], val_fraction: float,
                held_out: frozenset[str] | set[str] = frozenset()
                ) -> tuple[list[Pair], list[Pair]]:
    """Split by the same id hash as the tokenizer; ids in ``held_out`` (the documents the
    tokenize stage held out of pretraining) always validate, so the fine-tuned model never
    trains on them either. At least one pair lands on each side."""
    if len(pairs) < 2:
        raise StageInputError(STAGE, f"{len(pairs)} prompt/response pair(s) found; at least 2 "
                                     "are needed (one to train, one to validate)")
    train, val = [], []
    for key, pair in pairs:
        (val if key in held_out or is_validation(key, val_fraction) else train).append((key, pair))
    if not val:
        val.append(train.pop())
    if not train:
        movable = [i for i, (k, _) in enumerate(val) if k not in held_out]
        if not movable:
            raise StageInputError(STAGE, f"all {len(val)} pairs come from documents held out of "
                                         "pretraining; provide more documents or pairs")
        train.append(val.pop(movable[-1]))
    return [p for _, p in train], [p for _, p in val]


def pair_order(pairs: int, samples: int, seed: int) -> list[int]:
    """``samples`` indices into ``pairs`` items: seeded permutations, one per epoch."""
    import numpy as np

    rng = np.random.default_rng(seed)
    epochs = -(-samples // pairs)
    return np.concatenate([rng.permutation(pairs) for _ in range(epochs)])[:samples].tolist()


@across_devices
def finetune(config: FinetuneConfig, tokenized_dir: Path, pretrained_dir: Path,
             corpus_dir: Path, out_dir: Path, on_metrics: MetricsFn | None = None) -> dict:
    """Fine-tune the pretrained model on response tokens; returns losses before and after."""
    import lightning as L
    import sentencepiece as spm
    import torch
    from torch.utils.data import DataLoader, Subset

    from models.adapters import finish_model as finish_adapter
    from models.adapters import prepare_model, set_dropout, trainable_summary
    from models.checkpoint import load_model
    from models.data import SFTDataset, collate_trimmed, read_meta
    from models.evaluation import evaluate_loss, pick_device
    from models.lightning import SupervisedFineTuning, resolve_precision, set_threads

    tokenized_dir, pretrained_dir, out_dir = Path(tokenized_dir), Path(pretrained_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = read_meta(tokenized_dir)
    if config.data_path:
        pairs, held_out = file_pairs(Path(config.data_path), config.max_pairs), set()
    else:  # pairs from the corpus: documents held out of pretraining stay held out
        pairs, held_out = corpus_pairs(config, Path(corpus_dir)), read_val_ids(tokenized_dir)
    train_pairs, val_pairs = split_pairs(pairs, config.val_fraction, held_out)

    L.seed_everything(config.seed, workers=True, verbose=False)
    set_threads(config.num_threads)
    model = load_model(pretrained_dir / "model.pt").train()
    method = config.adapter.method
    if method == "prompt_tuning" and config.adapter.prompt_tokens >= model.config.context_length // 2:
        raise StageInputError(STAGE, f"finetune.adapter.prompt_tokens="
                                     f"{config.adapter.prompt_tokens} would take half or more "
                                     f"of the model's context of {model.config.context_length} "
                                     "tokens; use fewer prompt tokens")
    pretrained_dropout = set_dropout(model, config.dropout) if config.dropout > 0 \
        else model.config.dropout
    trained = prepare_model(model, config.adapter, seed=config.seed)  # model itself if full
    shape = trained.config if method == "prompt_tuning" else model.config
    context = shape.context_length - shape.prompt_tokens  # what the soft prompt leaves
    sp = spm.SentencePieceProcessor(model_file=str(tokenized_dir / "tokenizer.model"))
    train_data = SFTDataset(train_pairs, sp, context, meta["eos_id"], meta["pad_id"])
    val_data = SFTDataset(val_pairs, sp, context, meta["eos_id"], meta["pad_id"])
    if len(train_data) == 0 or len(val_data) == 0:
        raise StageInputError(STAGE, f"every prompt fills the model's context of {context} "
                                     "tokens, leaving no room for a response; shorten the "
                                     "prompts (finetune.prompt_template) or raise "
                                     "pretrain.context_length")
    log.info("finetune: %d train / %d val pairs (%d skipped: prompt longer than the context)",
             len(train_data), len(val_data), train_data.skipped + val_data.skipped)

    summary = trainable_summary(trained)
    log.info("finetune: method %s trains %d of %d parameters (%.2f%%), dropout %g", method,
             summary["trainable_params"], summary["total_params"],
             100 * summary["trainable_share"], shape.dropout)

    device = pick_device(config.accelerator)
    # the pretrained model's loss (LoRA's fresh adapters add zero; the soft prompt is new)
    val_before, _ = evaluate_loss(model.to(device), val_data, config.batch_size, device,
                                  collate_trimmed)
    module = SupervisedFineTuning(trained, config.learning_rate, config.weight_decay,
                                  config.warmup_steps, config.max_steps, config.min_lr_ratio)
    precision = resolve_precision(config.precision, config.accelerator)
    resolved = {"model": shape.to_dict(), "finetune": config.model_dump(mode="json"),
                "pretrained_from": str(pretrained_dir.resolve()),
                "pairs_train": len(train_data), "pairs_val": len(val_data)}
    # the order of pairs for the whole run, fixed up front (epochs of seeded permutations),
    # so a resumed run continues it exactly
    order = pair_order(len(train_data), config.max_steps * config.batch_size
                       * world_size(config), config.seed)
    ordered = Subset(train_data, order)

    def train_loader(samples_seen: int) -> DataLoader:
        return DataLoader(ordered, batch_size=config.batch_size, collate_fn=collate_trimmed,
                          sampler=ResumeSampler(samples_seen, len(ordered)),
                          generator=torch.Generator().manual_seed(config.seed))

    val_loader = DataLoader(val_data, batch_size=config.batch_size, collate_fn=collate_trimmed,
                            generator=torch.Generator().manual_seed(config.seed))
    settings = TrainSettings.of(config, "finetune", precision)
    settings.flops_per_token = shape.flops_per_token()
    outcome = run_training(settings, module, train_loader, val_loader, out_dir, resolved,
                           on_metrics, files={"tokenizer.model": tokenized_dir / "tokenizer.model"})
    if not outcome.is_global_zero:  # rank zero evaluates, writes and reports
        return {}
    trainer, callback, seconds = outcome.trainer, outcome.callback, outcome.seconds
    val_after, val_tokens = evaluate_loss(trained.to(device), val_data, config.batch_size,
                                          device, collate_trimmed)
    tuned = finish_adapter(trained, config.adapter, out_dir)  # the plain Llama for model.pt
    set_dropout(tuned, pretrained_dropout)

    first, final = outcome.first_and_final_loss(FIRST_STEPS)
    log.info("finetune: %d steps in %.0fs; held-out response loss %.3f -> %.3f "
             "(%d tokens); train loss %.3f -> %.3f", trainer.global_step, seconds, val_before,
             val_after, val_tokens, first, final)

    val_points = [p for p in callback.val_history if p[0] != trainer.global_step]
    finish_model(outcome, tuned, out_dir, resolved,
                 [(0, val_before), *val_points, (trainer.global_step, val_after)],
                 "fine-tuning (response tokens only)",
                 extra={"prompt_template": config.prompt_template, "adapter": method})
    artifacts = {"model": "model.pt", "config": "config.json",
                 "tokenizer_model": "tokenizer.model", "loss_curve": "loss_curve.png"}
    if method != "full":
        artifacts["adapter"] = "adapter"
    return {
        "count": trainer.global_step,
        "unit": "steps",
        "stats": {"pairs_train": len(train_data), "pairs_val": len(val_data),
                  "train_loss_first": round(first, 5), "train_loss_final": round(final, 5),
                  "val_loss_before": round(val_before, 5), "val_loss_after": round(val_after, 5),
                  "val_perplexity_after": round(math.exp(val_after), 3),
                  "trainable_params": summary["trainable_params"],
                  "trainable_share": round(summary["trainable_share"], 6),
                  "seconds": round(seconds, 2)},
        "artifacts": artifacts,
        "method": method,
        "resumed_from_step": outcome.resumed_from,
    }
