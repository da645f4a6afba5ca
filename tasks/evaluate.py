"""Evaluate stage: how well the models predict held-out text, against a unigram baseline,
and what they write.

Losses are measured over non-overlapping windows of ``val.bin`` (every target token scored
once). Perplexity is ``exp(loss)``; bits per byte divides the total information by the
UTF-8 bytes of the evaluated text, which makes numbers comparable across tokenizers. The
unigram baseline (add-one smoothed token frequencies of ``train.bin``) is what a model
that ignores context achieves: a trained model must beat it clearly.

A masked-LM encoder (``pretrain.objective: masked``) has no perplexity: it predicts a
masked token from both sides, so it gives no left-to-right probability of a text. It is
scored instead by its masked-token loss and accuracy on the same windows (masked as in
pretraining), against always answering the most frequent training token; and as it does
not generate, samples.md says so instead of holding samples.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.shards import write_text_atomic
from tasks.stage import StageInputError

if TYPE_CHECKING:  # torch loads when evaluation starts, not with the config
    import sentencepiece as spm
    import torch

    from models.data import StridedWindows
    from models.llama import Llama

log = logging.getLogger(__name__)

STAGE = "evaluate"
DEFAULT_PROMPTS = [
    "The json module",
    "def ",
    "class ",
    "### Title: json — JSON encoder and decoder\n### Text:\n",
]


class EvaluateConfig(BaseModel):
    """Validation metrics and text samples."""

    model_config = ConfigDict(extra="forbid")

    val_batches: int = Field(
        0, ge=0, description="Validation batches to score; 0 = the whole validation set.")
    batch_size: int = Field(16, ge=1, description="Windows per evaluation batch.")
    num_samples: int = Field(
        1, ge=0, le=20, description="Generations per prompt written to samples.md.")
    sample_prompts: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PROMPTS),
        description="Prompts to continue; the '### Title:' one uses the fine-tuning template.")
    max_new_tokens: int = Field(
        80, ge=1, le=4096, description="Tokens generated per sample.")
    temperature: float = Field(
        0.8, ge=0.0, description="Sampling temperature; 0 = always the most likely token.")
    top_k: int | None = Field(
        40, ge=1, description="Sample only among the k most likely tokens; empty = all.")
    seed: int = Field(0, description="Seed for sampling.")
    accelerator: Literal["auto", "cpu", "gpu", "cuda"] = Field(
        "auto", description="'auto' (a CUDA GPU when present), 'cpu', or 'gpu'/'cuda'.")


def model_metrics(model: Llama, data: StridedWindows, meta: dict, batch_size: int,
                  device: torch.device) -> dict:
    """Loss, perplexity and bits per byte of ``model`` on the evaluated windows."""
    from models.evaluation import bits_per_byte, evaluate_loss

    loss, tokens = evaluate_loss(model, data, batch_size, device)
    # only part of val.bin may be scored: credit it with its share of the bytes
    scored_bytes = meta["val_bytes"] * tokens / meta["val_tokens"]
    return {"val_loss": loss, "val_perplexity": math.exp(loss),
            "bits_per_byte": bits_per_byte(loss, tokens, scored_bytes), "tokens": tokens}


def baseline_metrics(tokenized_dir: Path, meta: dict, data: StridedWindows) -> dict:
    """The unigram model's metrics on exactly the targets the models were scored on."""
    import numpy as np

    from models.data import open_tokens
    from models.evaluation import bits_per_byte, unigram_cross_entropy, unigram_log_probs

    log_probs = unigram_log_probs(open_tokens(tokenized_dir / "train.bin", meta["dtype"]),
                                  meta["vocab_size"])
    val = open_tokens(tokenized_dir / "val.bin", meta["dtype"])
    targets = np.concatenate([val[s + 1:s + 1 + data.context_length] for s in data.starts])
    loss = unigram_cross_entropy(log_probs, targets.astype(np.int64))
    scored_bytes = meta["val_bytes"] * len(targets) / meta["val_tokens"]
    return {"val_loss": loss, "val_perplexity": math.exp(loss),
            "bits_per_byte": bits_per_byte(loss, len(targets), scored_bytes)}


NO_PERPLEXITY = ("a masked-LM encoder predicts each masked token from both sides, so it "
                 "assigns no left-to-right probability to a text: it has no perplexity or "
                 "bits per byte; its masked-token loss and accuracy are reported instead, "
                 "against always answering the most frequent training token")


def masked_metrics(models: dict[str, Llama], pretrained_dir: Path, tokenized_dir: Path,
                   meta: dict, data: StridedWindows, batch_size: int,
                   device: torch.device) -> dict:
    """Masked-token loss and accuracy of each encoder in ``models`` on ``data``'s windows,
    masked as pretraining masked them (its rates and seed from its config.json), and the
    most-frequent-token baseline on the same masked tokens."""
    from models.data import open_tokens
    from models.masked_lm import (
        VAL_STREAM,
        MaskedWindows,
        evaluate_masked,
        masked_baseline,
        token_counts,
    )
    from tasks.pretrain import masking_for

    config_path = Path(pretrained_dir) / "config.json"
    training = json.loads(config_path.read_text(encoding="utf-8")).get("training", {}) \
        if config_path.is_file() else {}
    masking = masking_for(training, meta, f"the tokenizer in {tokenized_dir}")
    windows = MaskedWindows(data, masking, training.get("seed", 0), VAL_STREAM)
    report: dict = {"note": NO_PERPLEXITY, "masking": {
        "mask_id": masking.mask_id, "mask_rate": masking.mask_rate,
        "mask_token_ratio": masking.mask_token_ratio,
        "random_token_ratio": masking.random_token_ratio}}
    label_counts = None
    for name, model in models.items():
        scores = evaluate_masked(model, windows, batch_size, device)
        report[name] = {"mlm_loss": scores.loss, "mlm_accuracy": scores.accuracy,
                        "masked_tokens": scores.masked_tokens}
        label_counts = scores.label_counts  # the same windows and masks for every model
    counts = token_counts(open_tokens(tokenized_dir / "train.bin", meta["dtype"]),
                          meta["vocab_size"])
    baseline = masked_baseline(counts, label_counts, (*masking.special_ids, masking.mask_id))
    report["most_frequent_token"] = {"mlm_accuracy": baseline["accuracy"],
                                     "mlm_loss_unigram": baseline["loss"],
                                     "token_id": baseline["token"]}
    return report


def write_samples(path: Path, config: EvaluateConfig, model: Llama, label: str,
                  sp: spm.SentencePieceProcessor, eos_id: int, device: torch.device) -> list[dict]:
    """Continue each prompt ``num_samples`` times; writes samples.md and returns the rows."""
    import torch

    from models.generation import decode_continuation, encode_prompt

    generator = torch.Generator(device=device).manual_seed(config.seed)
    rows = []
    settings = (f"temperature {config.temperature}, top_k {config.top_k}, "
                f"{config.max_new_tokens} new tokens at most")
    lines = [f"# Samples from the {label} model", "", settings, ""]
    for prompt in config.sample_prompts:
        # a leading EOS marks "start of a document", as every document followed one in training
        idx = torch.tensor([encode_prompt(sp, prompt, eos_id)], device=device)
        lines += [f"## {prompt.strip() or repr(prompt)}", ""]
        for _ in range(config.num_samples):
            out = model.generate(idx, config.max_new_tokens, config.temperature, config.top_k,
                                 stop_token=eos_id, generator=generator)
            text = decode_continuation(sp, out[0, idx.size(1):].tolist(), eos_id)
            rows.append({"prompt": prompt, "completion": text})
            lines += ["```text", prompt + text, "```", ""]
    write_text_atomic(path, "\n".join(lines))
    return rows


def evaluate(config: EvaluateConfig, tokenized_dir: Path, pretrained_dir: Path,
             finetuned_dir: Path | None, out_dir: Path) -> dict:
    """Score the pretrained (and fine-tuned) model on val.bin; write the report and samples.
    A causal model gets perplexity and bits per byte, an encoder masked-token metrics."""
    import sentencepiece as spm

    from models.checkpoint import load_model
    from models.data import StridedWindows, read_meta
    from models.evaluation import pick_device

    started = time.perf_counter()
    tokenized_dir, out_dir = Path(tokenized_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = read_meta(tokenized_dir)
    device = pick_device(config.accelerator)
    models = {"pretrained": load_model(Path(pretrained_dir) / "model.pt", device)}
    if finetuned_dir is not None:
        models["finetuned"] = load_model(Path(finetuned_dir) / "model.pt", device)
    causal = {name: model for name, model in models.items() if model.config.causal}
    encoders = {name: model for name, model in models.items() if not model.config.causal}
    # windows every model can read whole (a prompt-tuned model's soft prompt takes room)
    context = min(model.max_tokens for model in models.values())
    max_windows = config.val_batches * config.batch_size or None
    data = StridedWindows(tokenized_dir / "val.bin", meta["dtype"], context, max_windows)
    if len(data) == 0:
        raise StageInputError(STAGE, f"val.bin holds {data.num_tokens} tokens, fewer than one "
                                     f"window of {context + 1}; raise tokenize.val_fraction")

    report: dict = {"evaluated_tokens": data.num_targets, "val_tokens": meta["val_tokens"],
                    "val_bytes": meta["val_bytes"], "context_length": context}
    if causal:
        report["unigram"] = baseline_metrics(tokenized_dir, meta, data)
    for name, model in causal.items():
        report[name] = model_metrics(model, data, meta, config.batch_size, device)
        report[name]["ppl_ratio_vs_unigram"] = (report[name]["val_perplexity"]
                                                / report["unigram"]["val_perplexity"])
        log.info("evaluate: %s val loss %.3f, perplexity %.1f (unigram %.1f), %.3f bits/byte",
                 name, report[name]["val_loss"], report[name]["val_perplexity"],
                 report["unigram"]["val_perplexity"], report[name]["bits_per_byte"])
    if encoders:
        masked = masked_metrics(encoders, pretrained_dir, tokenized_dir, meta, data,
                                config.batch_size, device)
        baseline = masked.pop("most_frequent_token")
        report["masked_lm"] = {"note": masked.pop("note"), "masking": masked.pop("masking"),
                               "most_frequent_token": baseline}
        for name, scores in masked.items():
            report[name] = scores
            log.info("evaluate: %s is a masked-LM encoder (no perplexity): masked-token loss "
                     "%.3f, accuracy %.3f on %d masked tokens (most frequent token: %.3f)",
                     name, scores["mlm_loss"], scores["mlm_accuracy"],
                     scores["masked_tokens"], baseline["mlm_accuracy"])

    generators = [name for name in ("finetuned", "pretrained") if name in causal]
    if generators:
        label = generators[0]
        sp = spm.SentencePieceProcessor(model_file=str(tokenized_dir / "tokenizer.model"))
        report["samples"] = write_samples(out_dir / "samples.md", config, models[label],
                                          label, sp, meta["eos_id"], device)
        report["samples_model"] = label
    else:
        write_text_atomic(out_dir / "samples.md", "# Samples\n\nNone: the evaluated model is "
                          "a masked-LM encoder (bidirectional attention). It fills in masked "
                          "tokens and does not generate text; see its masked-token accuracy in "
                          "eval_report.json.\n")
        report["samples"], report["samples_model"] = [], None
        log.info("evaluate: no samples: a masked-LM encoder does not generate text")
    write_text_atomic(out_dir / "eval_report.json", json.dumps(report, indent=2))

    stats = {"evaluated_tokens": data.num_targets}
    for name in ["unigram", *causal] if causal else []:
        for key, value in report[name].items():
            if key != "tokens":
                stats[f"{name}_{key}"] = round(value, 5)
    if "pretrained" in causal:
        stats["ppl_ratio_vs_unigram"] = stats["pretrained_ppl_ratio_vs_unigram"]
    for name in encoders:
        for key in ("mlm_loss", "mlm_accuracy"):
            stats[f"{name}_{key}"] = round(report[name][key], 5)
    if "pretrained" in encoders:
        baseline = report["masked_lm"]["most_frequent_token"]
        stats.update({"mlm_accuracy": stats["pretrained_mlm_accuracy"],
                      "mlm_loss": stats["pretrained_mlm_loss"],
                      "mlm_baseline_accuracy": round(baseline["mlm_accuracy"], 5),
                      "mlm_baseline_loss": round(baseline["mlm_loss_unigram"], 5),
                      "mlm_masked_tokens": report["pretrained"]["masked_tokens"]})
    log.info("evaluate: done in %.1fs", time.perf_counter() - started)
    return {"count": data.num_targets, "unit": "tokens", "stats": stats,
            "artifacts": {"eval_report": "eval_report.json", "samples": "samples.md"}}
