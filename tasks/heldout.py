"""Held-out text and a tokenizer-independent score for any model directory.

The champion/challenger comparison scores two models that may have different tokenizers
(a new vocabulary, a different corpus), so it cannot compare token losses or perplexities.
It scores raw text instead: the documents the tokenize stage held out of pretraining
(``val_ids.json``), each model reading them through ITS OWN tokenizer, and reports bits
per byte, the total negative log-likelihood in bits divided by the UTF-8 bytes of the text.

The documents are laid out as in training (``EOS doc EOS doc ... EOS``: a leading EOS
marks the start of a document and every document ends with one) and read in
non-overlapping windows of the model's context (``model.max_tokens``), so every target
token, end-of-document tokens included, is scored exactly once, as the evaluate stage does
on ``val.bin``. Pure: no MLflow, no Prefect; torch and sentencepiece load when scoring.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from tasks.shards import iter_records
from tasks.stage import StageInputError
from tasks.tokenize import VAL_IDS, read_val_ids

log = logging.getLogger(__name__)

STAGE = "champion"
MODEL_FILES = ("model.pt", "tokenizer.model")


def heldout_texts(tokenized_dir: str | Path, corpus_dir: str | Path, max_documents: int = 200,
                  max_chars: int = 4000) -> list[str]:
    """The texts of the documents held out of pretraining by the tokenize stage whose
    output is ``tokenized_dir``, read from the corpus it tokenized (``corpus_dir``), in the
    corpus's order: at most ``max_documents`` (0 = all) non-empty texts, each cut to its
    first ``max_chars`` characters (0 = whole)."""
    tokenized_dir, corpus_dir = Path(tokenized_dir), Path(corpus_dir)
    if not (tokenized_dir / VAL_IDS).is_file():
        raise StageInputError(STAGE, f"{tokenized_dir / VAL_IDS} is missing: {tokenized_dir} is "
                                     "not the output of a tokenize stage (which lists the "
                                     "documents it held out of pretraining there)")
    val_ids = read_val_ids(tokenized_dir)
    if not val_ids:
        raise StageInputError(STAGE, f"{tokenized_dir / VAL_IDS} lists no held-out document; "
                                     "raise tokenize.val_fraction")
    if not corpus_dir.is_dir():
        raise StageInputError(STAGE, f"the corpus {corpus_dir} does not exist")
    texts: list[str] = []
    for record in iter_records(corpus_dir, columns=["id", "text"]):
        if str(record["id"]) not in val_ids:
            continue
        text = record.get("text") or ""
        if max_chars:
            text = text[:max_chars]
        if text.strip():
            texts.append(text)
            if max_documents and len(texts) >= max_documents:
                break
    if not texts:
        raise StageInputError(STAGE, f"none of the {len(val_ids)} documents held out in "
                                     f"{tokenized_dir / VAL_IDS} has text in {corpus_dir}: is "
                                     "it the corpus that tokenize stage read?")
    log.info("held-out evaluation data: %d documents, %d characters", len(texts),
             sum(map(len, texts)))
    return texts


def score_model(model_dir: str | Path, texts: list[str], batch_size: int = 16,
                device: str = "auto") -> dict[str, float]:
    """How well the model in ``model_dir`` (model.pt + tokenizer.model) predicts ``texts``,
    per UTF-8 byte, so that models with different tokenizers are comparable.

    Returns ``bits_per_byte`` (total NLL in bits / bytes), ``loss_per_byte`` (nats / byte),
    ``loss_per_token`` (nats / token, this model's tokens: not comparable across
    tokenizers), ``tokens`` (targets scored), ``bytes`` and ``documents``. ``device``:
    'auto' (a CUDA GPU when there is one), 'cpu', 'cuda', 'cuda:1', ..."""
    import sentencepiece as spm
    import torch
    from torch.nn import functional as F

    from models.checkpoint import load_model
    from models.evaluation import pick_device

    model_dir = Path(model_dir)
    missing = [name for name in MODEL_FILES if not (model_dir / name).is_file()]
    if missing:
        raise StageInputError(STAGE, f"{model_dir} is not a model directory: no "
                                     f"{' or '.join(missing)} in it")
    if not texts:
        raise StageInputError(STAGE, "no evaluation text to score the model on")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    started = time.perf_counter()
    where = pick_device("auto") if device in ("auto", "", None) else torch.device(device)
    model = load_model(model_dir / "model.pt", map_location=where)
    if not model.config.causal:
        raise StageInputError(STAGE, f"{model_dir} holds a masked-LM encoder (causal=false), "
                                     "which assigns no probability to text left to right; "
                                     "score a causal language model")
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    eos = sp.eos_id()
    if eos < 0:
        raise StageInputError(STAGE, f"{model_dir / 'tokenizer.model'} has no EOS token")
    if sp.get_piece_size() > model.config.vocab_size:
        raise StageInputError(STAGE, f"{model_dir}: the tokenizer has {sp.get_piece_size()} "
                                     f"tokens but the model only {model.config.vocab_size}")

    stream = [eos]  # EOS doc EOS doc ... EOS, as documents are laid out in training
    for ids in sp.encode(texts):
        stream.extend(ids)
        stream.append(eos)
    tokens = torch.tensor(stream, dtype=torch.long)
    window = model.max_tokens
    starts = list(range(0, len(stream) - 1, window))  # each target token scored once
    total = 0.0
    with torch.inference_mode():
        full = [s for s in starts if s + window + 1 <= len(stream)]
        for i in range(0, len(full), batch_size):
            chunk = torch.stack([tokens[s:s + window + 1] for s in full[i:i + batch_size]])
            total += _nll(model, chunk.to(where), F)
        if len(full) < len(starts):  # the last, shorter window
            total += _nll(model, tokens[starts[-1]:].unsqueeze(0).to(where), F)
    scored = len(stream) - 1
    num_bytes = sum(len(text.encode("utf-8")) for text in texts)
    result = {"bits_per_byte": total / (num_bytes * math.log(2)),
              "loss_per_byte": total / num_bytes, "loss_per_token": total / scored,
              "tokens": scored, "bytes": num_bytes, "documents": len(texts)}
    log.info("scored %s: %.4f bits/byte over %d bytes (%d tokens, %d windows of %d) in %.1fs",
             model_dir, result["bits_per_byte"], num_bytes, scored, len(starts), window,
             time.perf_counter() - started)
    return result


def _nll(model, chunk, F) -> float:
    """Summed next-token NLL (nats) of rows (B, T+1) of token ids."""
    logits = model(chunk[:, :-1])[0].float()
    return F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(),
                           reduction="sum").double().item()
