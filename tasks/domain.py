"""Domain stage: continued causal-LM training of the model on one slice of the corpus.

The slice is chosen by the documents' ``source`` (the sources stage's name for where a
document came from), a regular expression on their ``url`` and their ``language`` (set by
the filter stage); a document must match every selector that is set. The selected
documents are encoded with the run's tokenizer, split by the same id hash as the tokenize
stage (documents held out of pretraining stay held out), and the model trains on random
windows of the training side, as in pretraining, fully or through an adapter
(models.adapters). The held-out in-domain loss before and after shows what was gained;
the loss on the general validation set (tokenized_dir/val.bin) before and after shows
what was forgotten. The output directory is a model directory like pretrain's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from models.adapters import AdapterSettings
from models.config import Accelerator, Precision, check_devices, check_strategy
from tasks.launch import across_devices, world_size
from tasks.shards import atomic_path, shard_paths, write_text_atomic
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

if TYPE_CHECKING:
    from models.lightning import MetricsFn

log = logging.getLogger(__name__)

STAGE = "domain"
DATA = "data"  # the selected documents' tokens while training (removed afterwards)
SELECTION = "selection.json"
FIRST_STEPS = 5  # train_loss_first / _final average this many steps
ENCODE_BATCH = 256


class DomainConfig(BaseModel):
    """Domain-specific fine-tuning: which documents, which weights, how long."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        False, description="Run domain fine-tuning: continue training the model on the "
                           "selected documents only. Needs at least one selector.")
    sources: list[str] = Field(
        default_factory=list,
        description="Keep documents whose `source` is one of these names (documents "
                    "without one count as 'crawl'); empty = any source.")
    url_pattern: str | None = Field(
        None, description="Keep documents whose URL matches this regular expression "
                          "(re.search, e.g. '^https?://docs\\.python\\.org/'); empty = any URL.")
    languages: list[str] = Field(
        default_factory=list,
        description="Keep documents whose `language` (from the filter stage) is one of these "
                    "codes, e.g. ['en']; case-insensitive; empty = any language.")
    adapter: AdapterSettings = Field(
        default_factory=AdapterSettings,
        description="What trains: every weight ('full'), LoRA adapters or a soft prompt.")
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="Dropout while training (a guard against overfitting a small domain); "
                    "0 = the model's own value. The saved model keeps its own value.")
    val_fraction: float = Field(
        0.1, gt=0.0, lt=1.0,
        description="Share of the selected documents held out (by a hash of the id) to "
                    "measure the in-domain loss before and after; documents held out of "
                    "pretraining are always held out here too.")
    learning_rate: float = Field(
        5e-4, gt=0.0,
        description="Peak AdamW learning rate; below pretraining's, so the model adapts "
                    "without forgetting too much (LoRA ~1e-3, prompt tuning ~1e-2 or more).")
    min_lr_ratio: float = Field(
        0.1, ge=0.0, le=1.0, description="Final learning rate as a fraction of the peak.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay on matrices.")
    warmup_steps: int = Field(10, ge=0, description="Optimizer steps of linear warmup.")
    max_steps: int = Field(100, ge=1, description="Optimizer steps of domain training.")
    batch_size: int = Field(16, ge=1, description="Windows per micro-batch (per device).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    grad_clip: float = Field(1.0, ge=0.0, description="Gradient-norm clip; 0 = none.")
    eval_windows: int = Field(
        64, ge=1,
        description="Context windows (spread over each set) that measure the in-domain and "
                    "the general held-out loss, before, during and after training.")
    val_every_steps: int = Field(
        25, ge=1, description="Measure the in-domain held-out loss every this many steps.")
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
    seed: int = Field(0, description="Seed for the window offsets, adapters and dropout.")
    num_threads: int = num_threads_field()

    _strategy = field_validator("strategy")(check_strategy)
    _devices = field_validator("devices")(check_devices)

    @field_validator("url_pattern")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"url_pattern {value!r} is not a valid regular expression: "
                                 f"{exc}") from exc
        return value or None

    @model_validator(mode="after")
    def _selected(self) -> DomainConfig:
        if self.enabled and not self.has_selector:
            raise ValueError("domain fine-tuning is enabled but selects no documents: set "
                             "domain.sources, domain.url_pattern or domain.languages")
        return self

    @property
    def has_selector(self) -> bool:
        return bool(self.sources or self.url_pattern or self.languages)

    def selectors(self) -> str:
        """The selectors in words, for messages."""
        parts = [f"sources={self.sources}" if self.sources else "",
                 f"url_pattern={self.url_pattern!r}" if self.url_pattern else "",
                 f"languages={self.languages}" if self.languages else ""]
        return ", ".join(p for p in parts if p)


def matches(config: DomainConfig, record: dict) -> bool:
    """True when the document matches every selector that is set."""
    if config.sources and (record.get("source") or "crawl") not in config.sources:
        return False
    if config.url_pattern and not re.search(config.url_pattern, record.get("url") or ""):
        return False
    if config.languages:
        wanted = {language.lower() for language in config.languages}
        if (record.get("language") or "").lower() not in wanted:
            return False
    return True


def selected_documents(config: DomainConfig, corpus_dir: Path):
    """(id, text) of the corpus documents that match, in corpus order."""
    import pyarrow.parquet as pq

    shards = shard_paths(corpus_dir)
    if not shards:
        raise StageInputError(STAGE, f"no corpus shards in {corpus_dir}: run the data stages "
                                     "first")
    for path in shards:
        parquet = pq.ParquetFile(path)
        names = set(parquet.schema_arrow.names)
        if config.languages and "language" not in names:
            raise StageInputError(STAGE, f"domain.languages is set but {path} has no "
                                         "'language' column; enable the filter stage's "
                                         "language identification or select by sources / "
                                         "url_pattern")
        columns = ["id", "text", "url", *(c for c in ("source", "language") if c in names)]
        for batch in parquet.iter_batches(batch_size=ENCODE_BATCH, columns=columns):
            for record in batch.to_pylist():
                if (record.get("text") or "").strip() and matches(config, record):
                    yield str(record["id"]), record["text"]


def build_domain_data(config: DomainConfig, corpus_dir: Path, tokenized_dir: Path,
                      data_dir: Path, sp, dtype: str, window: int) -> dict:
    """Encode the selected documents (each followed by EOS, as the tokenize stage does)
    into ``data_dir/train.bin`` and ``val.bin``; returns the counts and held-out ids.

    Documents are held out by the id hash, plus those held out of pretraining; when the
    held-out side has fewer tokens than one window (``window`` + 1), the documents with
    the smallest hashes move over until it has one."""
    import numpy as np

    data_dir.mkdir(parents=True, exist_ok=True)
    held_out_of_pretraining = read_val_ids(tokenized_dir)
    docs: list[tuple[str, int, int, bool]] = []  # id, start, length, held out
    position = 0
    texts: list[str] = []
    ids: list[str] = []
    with atomic_path(data_dir / "all.bin") as tmp, open(tmp, "wb") as out:
        def flush() -> None:
            nonlocal position
            for doc_id, encoded in zip(ids, sp.encode(texts, add_eos=True), strict=True):
                out.write(np.asarray(encoded, dtype=dtype).tobytes())
                held = doc_id in held_out_of_pretraining or \
                    is_validation(doc_id, config.val_fraction)
                docs.append((doc_id, position, len(encoded), held))
                position += len(encoded)
            texts.clear()
            ids.clear()

        for doc_id, text in selected_documents(config, corpus_dir):
            ids.append(doc_id)
            texts.append(text)
            if len(texts) >= ENCODE_BATCH:
                flush()
        flush()
    if not docs:
        (data_dir / "all.bin").unlink(missing_ok=True)
        raise StageInputError(STAGE, f"no document of the corpus in {corpus_dir} matches "
                                     f"{config.selectors()}; check the selectors against the "
                                     "corpus's source, url and language columns")
    need = window + 1
    total = sum(length for _, _, length, _ in docs)
    if len(docs) < 2 or total < 2 * need:
        raise StageInputError(STAGE, f"{len(docs)} document(s) ({total} tokens) match "
                                     f"{config.selectors()}; domain fine-tuning needs at least "
                                     f"2 documents and {2 * need} tokens (a window of {need} "
                                     "to train on and one to hold out); widen the selection")
    val_tokens = sum(length for _, _, length, held in docs if held)
    if val_tokens < need:  # too little held out for one window: move the first by hash
        by_hash = sorted((hashlib.sha256(d[0].encode("utf-8")).digest(), i)
                         for i, d in enumerate(docs) if not d[3])
        moved = 0
        for _, i in by_hash:
            if val_tokens >= need:
                break
            doc_id, start, length, _ = docs[i]
            docs[i] = (doc_id, start, length, True)
            val_tokens += length
            moved += 1
        log.info("domain: held out %d more document(s) so that the in-domain validation "
                 "set holds a window of %d tokens", moved, need)
    train_tokens = total - val_tokens
    if train_tokens < need:
        raise StageInputError(STAGE, f"after holding out {val_tokens} tokens for validation "
                                     f"only {train_tokens} tokens of the documents matching "
                                     f"{config.selectors()} are left to train on, fewer than "
                                     f"one window of {need}; widen the selection or lower "
                                     "domain.val_fraction")
    tokens = np.memmap(data_dir / "all.bin", dtype=dtype, mode="r")
    for side, wanted in (("train", False), ("val", True)):
        with atomic_path(data_dir / f"{side}.bin") as tmp, open(tmp, "wb") as out:
            for _, start, length, held in docs:
                if held is wanted:
                    out.write(np.asarray(tokens[start:start + length]).tobytes())
    del tokens
    (data_dir / "all.bin").unlink()
    val_ids = sorted(d[0] for d in docs if d[3])
    return {"documents": len(docs), "tokens": total, "val_documents": len(val_ids),
            "train_documents": len(docs) - len(val_ids), "train_tokens": train_tokens,
            "val_tokens": val_tokens, "val_ids": val_ids}


@across_devices
def domain_finetune(config: DomainConfig, tokenized_dir: Path, model_dir: Path,
                    corpus_dir: Path, out_dir: Path,
                    on_metrics: MetricsFn | None = None) -> dict:
    """Continue training the model in ``model_dir`` on the corpus documents that match the
    selectors; returns in-domain and general held-out losses before and after."""
    import lightning as L
    import sentencepiece as spm
    import torch
    from torch.utils.data import DataLoader

    from models.adapters import finish_model as finish_adapter
    from models.adapters import prepare_model, set_dropout, trainable_summary
    from models.checkpoint import load_model
    from models.data import RandomWindows, StridedWindows, read_meta
    from models.evaluation import evaluate_loss, pick_device
    from models.lightning import CausalLM, resolve_precision, set_threads

    tokenized_dir, model_dir = Path(tokenized_dir), Path(model_dir)
    corpus_dir, out_dir = Path(corpus_dir), Path(out_dir)
    if not config.has_selector:
        raise StageInputError(STAGE, "no selector is set: give domain.sources, "
                                     "domain.url_pattern or domain.languages")
    for name, path in (("model", model_dir / "model.pt"),
                       ("tokenizer", tokenized_dir / "tokenizer.model")):
        if not path.is_file():
            raise StageInputError(STAGE, f"the {name} file {path} is missing: run the earlier "
                                         "stages first")
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = read_meta(tokenized_dir)
    L.seed_everything(config.seed, workers=True, verbose=False)
    set_threads(config.num_threads)
    model = load_model(model_dir / "model.pt").train()
    if not model.config.causal:
        raise StageInputError(STAGE, f"the model in {model_dir} is a masked-LM encoder; "
                                     "domain fine-tuning continues causal-LM training of a "
                                     "decoder")
    method = config.adapter.method
    if method == "prompt_tuning" and \
            config.adapter.prompt_tokens >= model.config.context_length // 2:
        raise StageInputError(STAGE, f"domain.adapter.prompt_tokens="
                                     f"{config.adapter.prompt_tokens} would take half or more "
                                     f"of the model's context of {model.config.context_length}"
                                     " tokens; use fewer prompt tokens")
    own_dropout = model.config.dropout
    if config.dropout > 0:
        set_dropout(model, config.dropout)
    trained = prepare_model(model, config.adapter, seed=config.seed)
    shape = trained.config if method == "prompt_tuning" else model.config
    window = shape.context_length - shape.prompt_tokens

    sp = spm.SentencePieceProcessor(model_file=str(tokenized_dir / "tokenizer.model"))
    data_dir = out_dir / DATA
    counts = build_domain_data(config, corpus_dir, tokenized_dir, data_dir, sp, meta["dtype"],
                               window)
    log.info("domain: %d documents (%d tokens) match %s: %d to train on (%d tokens), %d "
             "held out (%d tokens)", counts["documents"], counts["tokens"], config.selectors(),
             counts["train_documents"], counts["train_tokens"], counts["val_documents"],
             counts["val_tokens"])
    samples = config.max_steps * config.batch_size * config.grad_accum * world_size(config)
    train_data = RandomWindows(data_dir / "train.bin", meta["dtype"], window, samples,
                               seed=config.seed)
    domain_val = StridedWindows(data_dir / "val.bin", meta["dtype"], window,
                                max_windows=config.eval_windows)
    general_val = StridedWindows(tokenized_dir / "val.bin", meta["dtype"], window,
                                 max_windows=config.eval_windows) \
        if (tokenized_dir / "val.bin").is_file() else None
    if general_val is not None and len(general_val) == 0:
        log.info("domain: %s holds less than one window: no general loss is measured",
                 tokenized_dir / "val.bin")
        general_val = None
    summary = trainable_summary(trained)
    log.info("domain: method %s trains %d of %d parameters (%.2f%%)", method,
             summary["trainable_params"], summary["total_params"],
             100 * summary["trainable_share"])

    device = pick_device(config.accelerator)

    def losses(net) -> tuple[float, float | None]:
        net = net.to(device)
        domain, _ = evaluate_loss(net, domain_val, config.batch_size, device)
        general = evaluate_loss(net, general_val, config.batch_size, device)[0] \
            if general_val is not None else None
        return domain, general

    domain_before, general_before = losses(model)  # the model as it came
    module = CausalLM(trained, config.learning_rate, config.weight_decay, config.warmup_steps,
                      config.max_steps, config.min_lr_ratio)
    precision = resolve_precision(config.precision, config.accelerator)
    resolved = {"model": shape.to_dict(), "domain": config.model_dump(mode="json"),
                "model_from": str(model_dir.resolve()),
                "selection": {k: v for k, v in counts.items() if k != "val_ids"}}
    settings = TrainSettings.of(config, STAGE, precision)
    settings.flops_per_token = shape.flops_per_token()

    def train_loader(samples_seen: int) -> DataLoader:
        return DataLoader(train_data, batch_size=config.batch_size,
                          sampler=ResumeSampler(samples_seen, len(train_data)),
                          generator=torch.Generator().manual_seed(config.seed))

    val_loader = DataLoader(domain_val, batch_size=config.batch_size,
                            generator=torch.Generator().manual_seed(config.seed))
    outcome = run_training(settings, module, train_loader, val_loader, out_dir, resolved,
                           on_metrics, files={"tokenizer.model": tokenized_dir / "tokenizer.model"})
    if not outcome.is_global_zero:
        return {}
    trainer, callback, seconds = outcome.trainer, outcome.callback, outcome.seconds
    domain_after, general_after = losses(trained)
    tuned = finish_adapter(trained, config.adapter, out_dir)
    set_dropout(tuned, own_dropout)

    first, final = outcome.first_and_final_loss(FIRST_STEPS)
    general_text = (f"; general held-out loss {general_before:.3f} -> {general_after:.3f}"
                    if general_val is not None else "")
    log.info("domain: %d steps in %.0fs; in-domain held-out loss %.3f -> %.3f%s",
             trainer.global_step, seconds, domain_before, domain_after, general_text)
    val_points = [p for p in callback.val_history if p[0] != trainer.global_step]
    finish_model(outcome, tuned, out_dir, resolved,
                 [(0, domain_before), *val_points, (trainer.global_step, domain_after)],
                 f"domain fine-tuning ({config.selectors()})",
                 extra={"adapter": method, "domain": config.selectors()})
    write_text_atomic(out_dir / SELECTION, json.dumps(
        {"selectors": {"sources": config.sources, "url_pattern": config.url_pattern,
                       "languages": config.languages}, **counts}, indent=2))
    shutil.rmtree(data_dir, ignore_errors=True)

    stats = {"domain_documents": counts["documents"], "domain_tokens": counts["tokens"],
             "domain_train_documents": counts["train_documents"],
             "domain_val_documents": counts["val_documents"],
             "domain_val_loss_before": round(domain_before, 5),
             "domain_val_loss_after": round(domain_after, 5),
             "domain_val_perplexity_after": round(math.exp(domain_after), 3),
             "train_loss_first": round(first, 5), "train_loss_final": round(final, 5),
             "trainable_params": summary["trainable_params"],
             "trainable_share": round(summary["trainable_share"], 6),
             "seconds": round(seconds, 2)}
    if general_val is not None:
        stats["general_val_loss_before"] = round(general_before, 5)
        stats["general_val_loss_after"] = round(general_after, 5)
    artifacts = {"model": "model.pt", "config": "config.json",
                 "tokenizer_model": "tokenizer.model", "loss_curve": "loss_curve.png",
                 "selection": SELECTION}
    if method != "full":
        artifacts["adapter"] = "adapter"
    return {"count": trainer.global_step, "unit": "steps", "stats": stats,
            "artifacts": artifacts, "method": method, "selectors": config.selectors(),
            "resumed_from_step": outcome.resumed_from}
