"""Pretrain stage: train the decoder from scratch on the tokenized corpus.

``objective`` picks what is learned: "causal" (the default) trains the decoder to predict
the next token; "masked" trains a bidirectional encoder (BERT-style) to restore masked
tokens (``models.masked_lm``), validated by masked-token loss and accuracy instead of
perplexity, against the accuracy of always answering the most frequent training token.

Training reads random windows of ``train.bin`` for exactly ``max_steps`` optimizer steps
(no epochs: the corpus is small and a fixed step budget keeps the run time predictable),
validates on evenly spread windows of ``val.bin``, and saves ``model.pt`` (plain torch,
loadable without Lightning), the resolved ``config.json``, the tokenizer and a loss plot.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from models.config import Accelerator, ModelConfig, Precision, check_devices, check_strategy
from tasks.launch import across_devices, world_size
from tasks.shards import file_sha256
from tasks.stage import StageInputError
from tasks.training import (
    ResumeSampler,
    TrainSettings,
    checkpoint_every_field,
    devices_field,
    early_stopping_field,
    finish_model,
    keep_checkpoints_field,
    max_minutes_field,
    num_nodes_field,
    run_training,
    strategy_field,
)

if TYPE_CHECKING:  # torch and Lightning load when training starts, not with the config
    from models.lightning import MetricsFn

log = logging.getLogger(__name__)

STAGE = "pretrain"


# Model shapes by name: from a test-sized model to GPT-2 small's (Radford et al. 2019).
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"d_model": 32, "n_layers": 2, "n_heads": 2, "context_length": 64},
    "small": {"d_model": 128, "n_layers": 4, "n_heads": 4, "context_length": 256},
    "medium": {"d_model": 384, "n_layers": 6, "n_heads": 6, "context_length": 512},
    "gpt2-small": {"d_model": 768, "n_layers": 12, "n_heads": 12, "context_length": 1024},
}


class PretrainConfig(BaseModel):
    """Model size and training schedule for pretraining.

    The defaults train a 1.3M-parameter model (with a 4096-token vocabulary) for about
    four minutes on a 2-core CPU (~10k tokens/s): 2M tokens, enough to beat a unigram
    model many times over on a few MB of documentation.
    """

    model_config = ConfigDict(extra="forbid")

    preset: Literal["tiny", "small", "medium", "gpt2-small"] | None = Field(
        None, description="A model size by name; its shape fields replace those left at their "
                          "defaults here, so any field can still be set on top. With a "
                          "4096-token vocabulary: tiny (tests, 0.16M parameters), small (the "
                          "defaults, 1.3M), medium (12M), gpt2-small (768 wide, 12 layers, 12 "
                          "heads, 1024 context: 88M; 124M with GPT-2's 50257-token "
                          "vocabulary). Empty: the fields as given.")
    init_from: str = Field(
        "", description="Continue training an earlier model instead of fresh weights: a "
                        "training stage's output directory, an MLflow run id, or a runs:/ or "
                        "models:/ URI (models:/forgeline/latest, models:/forgeline/3, "
                        "models:/forgeline@champion). Its shape is kept (preset and the shape "
                        "fields here are ignored) and the corpus is encoded with its "
                        "tokenizer (tokenize reuses it instead of training one). Empty: a "
                        "fresh model.")
    objective: Literal["causal", "masked"] = Field(
        "causal", description="What the model learns: 'causal' = predict each next token "
                              "(a decoder that generates text); 'masked' = restore masked "
                              "tokens from both sides (a BERT-style encoder with "
                              "bidirectional attention, for classification and tagging; it "
                              "does not generate, so generative fine-tuning and samples are "
                              "skipped).")
    mask_rate: float = Field(
        0.15, gt=0.0, lt=1.0,
        description="objective 'masked': share of the ordinary tokens (never EOS, BOS, PAD "
                    "or UNK) chosen in each window for the model to restore; only they count "
                    "in the loss. Every window gets at least one.")
    mask_token_ratio: float = Field(
        0.8, ge=0.0, le=1.0,
        description="objective 'masked': share of the chosen tokens replaced by <mask> "
                    "(BERT: 0.8).")
    random_token_ratio: float = Field(
        0.1, ge=0.0, le=1.0,
        description="objective 'masked': share of the chosen tokens replaced by a random "
                    "ordinary token (BERT: 0.1); the rest of the chosen tokens (1 - "
                    "mask_token_ratio - random_token_ratio) stay as they are, so that the model "
                    "cannot assume that a visible token is never the one asked for.")
    init_if_missing: Literal["error", "fresh"] = Field(
        "error", description="When init_from names a registered model that has no version "
                             "yet: 'error' stops the run; 'fresh' starts from new weights (the "
                             "first run of a schedule that continues its own model).")
    d_model: int = Field(128, ge=8, description="Width of the model (embedding size).")
    n_layers: int = Field(4, ge=1, description="Number of transformer blocks.")
    n_heads: int = Field(4, ge=1, description="Attention heads; must divide d_model.")
    n_kv_heads: int | None = Field(
        None, ge=1,
        description="Key/value heads for grouped-query attention; must divide n_heads. "
                    "Empty = n_heads (ordinary multi-head attention).")
    context_length: int = Field(
        256, ge=8, description="Tokens the model sees at once (training window length).")
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="Dropout probability; 0 suits short runs that never overfit.")
    learning_rate: float = Field(
        3e-3, gt=0.0, description="Peak AdamW learning rate, reached after the warmup.")
    min_lr_ratio: float = Field(
        0.1, ge=0.0, le=1.0,
        description="Final learning rate as a fraction of the peak (cosine decay target).")
    weight_decay: float = Field(
        0.1, ge=0.0, description="AdamW weight decay, applied to weight matrices only.")
    warmup_steps: int = Field(
        30, ge=0, description="Optimizer steps of linear learning-rate warmup.")
    max_steps: int = Field(
        500, ge=1, description="Optimizer steps to train; the main knob for run time.")
    batch_size: int = Field(16, ge=1, description="Windows per micro-batch.")
    grad_accum: int = Field(
        1, ge=1,
        description="Micro-batches per optimizer step (effective batch = batch_size x "
                    "grad_accum x devices).")
    grad_clip: float = Field(
        1.0, ge=0.0, description="Clip the gradient norm to this value; 0 = no clipping.")
    val_every_steps: int = Field(
        100, ge=1, description="Validate every this many optimizer steps.")
    val_batches: int = Field(
        8, ge=1, description="Validation batches per check, spread evenly over val.bin.")
    precision: Precision = Field(
        "auto",
        description="Lightning precision: 'auto' = 'bf16-mixed' on a CUDA GPU with bf16, "
                    "else '32-true'; or any Lightning value such as '16-mixed'.")
    accelerator: Accelerator = Field(
        "auto", description="Lightning accelerator: 'auto', 'cpu', 'gpu', 'cuda', 'mps'.")
    devices: str | int = devices_field()
    strategy: str = strategy_field()
    num_nodes: int = num_nodes_field()
    compile: bool = Field(
        False, description="torch.compile the model: faster steps on GPU after a slow start.")
    seed: int = Field(0, description="Seed for initialisation and the order of windows.")
    num_threads: int = Field(
        0, ge=0, description="CPU threads for torch; 0 = torch's default (all cores).")
    log_every_steps: int = Field(
        10, ge=1, description="Report train loss, learning rate, tokens/s, step time, FLOP/s, "
                              "MFU and peak memory every N steps.")
    peak_tflops: float = Field(
        0.0, ge=0.0, description="The hardware's peak dense TFLOP/s that MFU (model FLOPs "
                                 "utilisation) is measured against; 0 = the bf16 dense peak "
                                 "of a known GPU (H100, A100, L4, ...), and no MFU on CPU "
                                 "unless set.")
    checkpoint_every_steps: int = checkpoint_every_field(100)
    keep_checkpoints: int = keep_checkpoints_field()
    early_stopping_patience: int = early_stopping_field()
    max_minutes: float = max_minutes_field()

    _strategy = field_validator("strategy")(check_strategy)
    _devices = field_validator("devices")(check_devices)

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        """The preset's shape, except where a field is set to something other than its
        default (the Prefect form sends every field, so 'left at the default' is the test)."""
        if not isinstance(data, dict) or not data.get("preset"):
            return data
        shape = MODEL_PRESETS.get(data["preset"])
        if shape is None:
            return data  # the Literal check names the valid presets
        data = dict(data)
        for name, value in shape.items():
            if data.get(name, cls.model_fields[name].default) == cls.model_fields[name].default:
                data[name] = value
        return data

    @model_validator(mode="after")
    def _model_shape_is_buildable(self) -> PretrainConfig:
        model_config_for(self, vocab_size=256)  # the shape's own checks, before any work
        return self

    @model_validator(mode="after")
    def _replacement_shares_fit(self) -> PretrainConfig:
        if self.mask_token_ratio + self.random_token_ratio > 1.0 + 1e-9:
            raise ValueError(f"mask_token_ratio ({self.mask_token_ratio}) + random_token_ratio "
                             f"({self.random_token_ratio}) must be at most 1: they are shares "
                             "of the same chosen tokens (BERT: 0.8 and 0.1)")
        return self


def model_config_for(config: PretrainConfig, vocab_size: int) -> ModelConfig:
    """The ModelConfig, with its validation errors phrased as pretrain settings."""
    try:
        return ModelConfig(vocab_size=vocab_size, context_length=config.context_length,
                           d_model=config.d_model, n_layers=config.n_layers,
                           n_heads=config.n_heads, n_kv_heads=config.n_kv_heads,
                           dropout=config.dropout, causal=config.objective == "causal")
    except ValueError as exc:
        raise ValueError(f"invalid model shape: {exc}") from exc


def special_ids(meta: dict) -> tuple[int, ...]:
    """The tokenizer's special ids (never masked, never a random replacement)."""
    return tuple(sorted({meta[name] for name in ("unk_id", "bos_id", "eos_id", "pad_id")
                         if meta.get(name, -1) >= 0}))


def masking_for(settings: dict, meta: dict, source: str = "the tokenizer"):
    """The masking of a masked-LM run: ``settings`` holds mask_rate, mask_token_ratio and
    random_token_ratio (a PretrainConfig's dump, or the ``training`` part of a model's
    config.json); the ids come from the tokenize stage's meta.json."""
    from models.masked_lm import Masking
    from tasks.tokenize import resolve_mask_id

    defaults = PretrainConfig.model_fields
    value = {name: settings.get(name, defaults[name].default)
             for name in ("mask_rate", "mask_token_ratio", "random_token_ratio")}
    return Masking(mask_id=resolve_mask_id(meta, source), vocab_size=meta["vocab_size"],
                   special_ids=special_ids(meta), **value)


def check_tokens(meta: dict, context_length: int) -> None:
    needed = context_length + 1
    if meta["train_tokens"] < needed:
        raise StageInputError(STAGE, f"train.bin holds {meta['train_tokens']} tokens, fewer than "
                                     f"one context window ({needed}); lower "
                                     "pretrain.context_length or provide more text")
    if meta["val_tokens"] < needed:
        raise StageInputError(STAGE, f"val.bin holds {meta['val_tokens']} tokens, fewer than one "
                                     f"context window ({needed}); raise tokenize.val_fraction, "
                                     "lower pretrain.context_length or provide more text")


def load_parent_model(init_model: Path, tokenized_dir: Path, meta: dict):
    """The model training continues from, after checking that the corpus was encoded with
    its tokenizer (the same ids mean the same pieces)."""
    from models.checkpoint import load_model

    init_model = Path(init_model)
    for name in ("model.pt", "tokenizer.model"):
        if not (init_model / name).is_file():
            raise StageInputError(STAGE, f"pretrain.init_from: {init_model} holds no {name}")
    if file_sha256(init_model / "tokenizer.model") != \
            file_sha256(tokenized_dir / "tokenizer.model"):
        raise StageInputError(
            STAGE, f"the corpus in {tokenized_dir} was encoded with another tokenizer than "
                   f"the model in {init_model} was trained with: the same ids would mean "
                   "other pieces. Tokenize with the model's tokenizer (the pipeline does this "
                   "by itself when pretrain.init_from is set)")
    parent = load_model(init_model / "model.pt")
    if parent.config.vocab_size != meta["vocab_size"]:
        raise StageInputError(STAGE, f"the model in {init_model} has {parent.config.vocab_size} "
                                     f"token embeddings, the tokenizer {meta['vocab_size']}")
    return parent


@across_devices
def pretrain(config: PretrainConfig, tokenized_dir: Path, out_dir: Path,
             on_metrics: MetricsFn | None = None, init_model: Path | None = None) -> dict:
    """Train a model on ``tokenized_dir``'s train.bin, fresh or, with ``init_model`` (a
    directory with model.pt and tokenizer.model), continuing that one; returns steps and
    final losses (and, for ``objective`` "masked", masked-token loss and accuracy)."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from models.data import RandomWindows, StridedWindows, read_meta
    from models.lightning import CausalLM, resolve_precision, set_threads
    from models.llama import Llama

    tokenized_dir, out_dir = Path(tokenized_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = read_meta(tokenized_dir)
    masked = config.objective == "masked"
    parent = None
    if init_model is not None:
        parent = load_parent_model(init_model, tokenized_dir, meta)
        shape = parent.config
        config = config.model_copy(update={
            "preset": None, "d_model": shape.d_model, "n_layers": shape.n_layers,
            "n_heads": shape.n_heads, "n_kv_heads": shape.n_kv_heads,
            "context_length": shape.context_length})
    check_tokens(meta, config.context_length)
    model_config = model_config_for(config, meta["vocab_size"])
    if parent is not None:  # its exact shape (and this run's dropout and objective)
        model_config = continued_config(parent.config, config, init_model)
    masking = masking_for(config.model_dump(), meta, f"the tokenizer in {tokenized_dir}") \
        if masked else None
    L.seed_everything(config.seed, workers=True, verbose=False)
    set_threads(config.num_threads)

    model = Llama(model_config)
    if parent is not None:
        model.load_state_dict(parent.state_dict())
        log.info("pretrain: continuing from the model in %s (%.2fM parameters, context %d)",
                 init_model, model.num_params() / 1e6, model_config.context_length)
    if masked:
        from models.masked_lm import MaskedLM

        module = MaskedLM(model, config.learning_rate, config.weight_decay,
                          config.warmup_steps, config.max_steps, config.min_lr_ratio,
                          on_metrics=on_metrics)
    else:
        module = CausalLM(model, config.learning_rate, config.weight_decay,
                          config.warmup_steps, config.max_steps, config.min_lr_ratio)
    if config.compile:
        module.compile()
    samples = config.max_steps * config.batch_size * config.grad_accum * world_size(config)
    train_data = RandomWindows(tokenized_dir / "train.bin", meta["dtype"],
                               config.context_length, samples, seed=config.seed)
    val_data = StridedWindows(tokenized_dir / "val.bin", meta["dtype"], config.context_length,
                              max_windows=config.val_batches * config.batch_size)
    before = None
    if masked:
        from models.evaluation import pick_device
        from models.masked_lm import (
            TRAIN_STREAM,
            VAL_STREAM,
            MaskedWindows,
            evaluate_masked,
        )

        # each window masked by a generator seeded from its index: the same masks after
        # a resume, and the same validation masks at every validation
        train_data = MaskedWindows(train_data, masking, config.seed, TRAIN_STREAM)
        val_data = MaskedWindows(val_data, masking, config.seed, VAL_STREAM)
        log.info("pretrain: masked-LM objective (a bidirectional encoder): %.0f%% of the "
                 "ordinary tokens chosen, %.0f%% of them -> <mask> (id %d), %.0f%% -> a random "
                 "token, %.0f%% kept", 100 * masking.mask_rate,
                 100 * masking.mask_token_ratio, masking.mask_id,
                 100 * masking.random_token_ratio,
                 100 * (1 - masking.mask_token_ratio - masking.random_token_ratio))
        device = pick_device(config.accelerator)  # the trainer's device too
        before = evaluate_masked(model.to(device), val_data, config.batch_size, device)
    precision = resolve_precision(config.precision, config.accelerator)
    log.info("pretrain: %.2fM parameters, %.1f MFLOPs per token (%s), %d steps of %d x %d "
             "tokens on %s, precision %s", model.num_params() / 1e6,
             model_config.flops_per_token() / 1e6, model_config, config.max_steps,
             config.batch_size * config.grad_accum, config.context_length, config.accelerator,
             precision)

    resolved = {"model": model_config.to_dict(), "training": config.model_dump(mode="json"),
                "objective": config.objective,
                "resolved": {"precision": precision}, "tokenizer": meta,
                "params": model.num_params(),
                "init_from": ({"model_dir": str(init_model),
                               "model_sha256": file_sha256(Path(init_model) / "model.pt")}
                              if init_model is not None else None)}
    if masking is not None:
        resolved["masking"] = dataclasses.asdict(masking)
    settings = TrainSettings.of(config, "pretrain", precision)
    settings.flops_per_token = model_config.flops_per_token()

    def train_loader(samples_seen: int) -> DataLoader:
        return DataLoader(train_data, batch_size=config.batch_size,
                          sampler=ResumeSampler(samples_seen, len(train_data)),
                          generator=torch.Generator().manual_seed(config.seed))

    # the loaders' own generators: starting one then draws nothing from the global RNG,
    # whose sequence (dropout) a resumed run must continue exactly
    val_loader = DataLoader(val_data, batch_size=config.batch_size,
                            generator=torch.Generator().manual_seed(config.seed))
    outcome = run_training(settings, module, train_loader, val_loader, out_dir, resolved,
                           on_metrics, files={"tokenizer.model": tokenized_dir / "tokenizer.model"})
    if not outcome.is_global_zero:  # rank zero evaluates, writes and reports
        return {}
    trainer, callback, seconds = outcome.trainer, outcome.callback, outcome.seconds
    resolved["resolved"].update({"accelerator": trainer.accelerator.__class__.__name__,
                                 "num_devices": trainer.num_devices,
                                 "world_size": trainer.world_size})

    train_loss_final = _mean_last(callback.train_history, 10)
    tokens_per_second = callback.tokens_seen / max(callback.train_seconds, 1e-9)
    if masked:
        scores = masked_stats(model, val_data, before, tokenized_dir, meta, masking,
                              config.batch_size, module.device)
        val_loss = scores["mlm_loss"]
        log.info("pretrain: %d steps in %.0fs (%.0f tokens/s), train loss %.3f, masked-token "
                 "loss %.3f, accuracy %.3f (%.3f before training; always the most frequent "
                 "token: %.3f)", trainer.global_step, seconds, tokens_per_second,
                 train_loss_final, val_loss, scores["mlm_accuracy"],
                 scores["mlm_accuracy_initial"], scores["mlm_baseline_accuracy"])
        quality = {"val_loss": round(val_loss, 5), **scores}
        title, extra = "masked-LM pretraining", {"objective": "masked",
                                                 "mask_id": masking.mask_id}
    else:
        from models.evaluation import evaluate_loss

        val_loss, _ = evaluate_loss(model, val_data, config.batch_size, module.device)
        log.info("pretrain: %d steps in %.0fs (%.0f tokens/s), train loss %.3f, val loss %.3f "
                 "(perplexity %.1f)", trainer.global_step, seconds, tokens_per_second,
                 train_loss_final, val_loss, math.exp(val_loss))
        quality = {"val_loss": round(val_loss, 5),
                   "val_perplexity": round(math.exp(val_loss), 3)}
        title, extra = "pretraining", None

    val_points = [p for p in callback.val_history if p[0] != trainer.global_step]
    finish_model(outcome, model, out_dir, resolved, val_points + [(trainer.global_step, val_loss)],
                 f"{title} ({model.num_params() / 1e6:.2f}M parameters)", extra=extra)
    return {
        "count": trainer.global_step,
        "unit": "steps",
        "stats": {"params": model.num_params(),
                  "params_non_embedding": model_config.parameter_count(non_embedding=True),
                  "flops_per_token": model_config.flops_per_token(),
                  "train_loss_final": round(train_loss_final, 5), **quality,
                  "tokens_seen": callback.tokens_seen * trainer.world_size,
                  "tokens_per_second": round(tokens_per_second, 1), "seconds": round(seconds, 2)},
        "artifacts": {"model": "model.pt", "config": "config.json",
                      "tokenizer_model": "tokenizer.model", "loss_curve": "loss_curve.png"},
        "resumed_from_step": outcome.resumed_from,
        "continued_from": resolved["init_from"]["model_sha256"] if parent is not None else None,
    }


def continued_config(parent: ModelConfig, config: PretrainConfig,
                     init_model: Path) -> ModelConfig:
    """The parent model's exact shape with this run's dropout and objective: a decoder
    continued with the masked objective becomes an encoder (the weights fit either)."""
    causal = config.objective == "causal"
    if parent.causal != causal:
        log.info("pretrain: the model in %s was trained as %s; it continues as %s", init_model,
                 "a causal decoder" if parent.causal else "a masked-LM encoder",
                 "a causal decoder" if causal else "a masked-LM encoder")
    try:
        return dataclasses.replace(parent, dropout=config.dropout, causal=causal)
    except ValueError as exc:
        raise StageInputError(STAGE, f"pretrain.init_from: the model in {init_model} cannot "
                                     f"continue with objective {config.objective!r}: "
                                     f"{exc}") from exc


def masked_stats(model, val_data, before, tokenized_dir: Path, meta: dict, masking,
                 batch_size: int, device) -> dict[str, float]:
    """The masked-LM quality numbers: loss and accuracy on the validation windows' masked
    tokens (``before``: the same before training), and the most-frequent-token baseline
    on the same tokens."""
    from models.data import open_tokens
    from models.masked_lm import evaluate_masked, masked_baseline, token_counts

    scores = evaluate_masked(model, val_data, batch_size, device)
    counts = token_counts(open_tokens(tokenized_dir / "train.bin", meta["dtype"]),
                          meta["vocab_size"])
    if counts[masking.mask_id]:
        log.warning("pretrain: the mask id %d occurs %d times in train.bin: those tokens read "
                    "as masked to the model", masking.mask_id, int(counts[masking.mask_id]))
    baseline = masked_baseline(counts, scores.label_counts,
                               (*masking.special_ids, masking.mask_id))
    return {"mlm_loss": round(scores.loss, 5), "mlm_accuracy": round(scores.accuracy, 5),
            "mlm_accuracy_initial": round(before.accuracy, 5),
            "mlm_loss_initial": round(before.loss, 5),
            "mlm_baseline_accuracy": round(baseline["accuracy"], 5),
            "mlm_baseline_loss": round(baseline["loss"], 5),
            "mlm_masked_tokens": scores.masked_tokens}


def _mean_last(history: list[tuple[int, float]], n: int) -> float:
    """Mean of the last n recorded losses: one batch's loss alone is noisy."""
    tail = [loss for _, loss in history[-n:]]
    return sum(tail) / len(tail) if tail else float("nan")
