"""Measuring a model outside the training loop: exact token-weighted loss, the unigram
baseline, and the loss-curve plot saved beside every training run."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from models.llama import Llama
from tasks.shards import atomic_path


def pick_device(accelerator: str = "auto") -> torch.device:
    if accelerator in {"auto", "gpu", "cuda"} and torch.cuda.is_available():
        if "LOCAL_RANK" in os.environ:  # one of several training processes: its own GPU
            return torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
        return torch.device("cuda")
    return torch.device("cpu")


@torch.no_grad()
def evaluate_loss(model: Llama, dataset: Dataset, batch_size: int,
                  device: torch.device | str = "cpu",
                  collate_fn: Callable | None = None) -> tuple[float, int]:
    """Mean cross-entropy in nats over every scored target token, and how many there were.

    Rows are (inputs, targets) or (inputs, targets, loss_mask); the mean is weighted by
    tokens, not batches, so a short last batch counts for what it holds.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                  collate_fn=collate_fn):
        inputs, targets = batch[0].to(device), batch[1].to(device)
        logits = model(inputs)[0].float()  # (B, T, V)
        losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        if len(batch) > 2:
            mask = batch[2].to(device).flatten()
            losses = losses[mask]
        total += losses.double().sum().item()
        count += losses.numel()
    model.train(was_training)
    return (total / count if count else float("nan")), count


def unigram_log_probs(train_tokens: np.ndarray, vocab_size: int,
                      chunk: int = 1 << 24) -> np.ndarray:
    """Add-one smoothed log p(token) from train token counts, counted in chunks so a large
    memmap is never copied whole."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(train_tokens), chunk):
        counts += np.bincount(train_tokens[start:start + chunk], minlength=vocab_size)[:vocab_size]
    return np.log(counts + 1.0) - math.log(counts.sum() + vocab_size)


def unigram_cross_entropy(log_probs: np.ndarray, targets: np.ndarray) -> float:
    """Mean negative log-probability (nats) of ``targets`` under the unigram model."""
    counts = np.bincount(targets, minlength=len(log_probs))[:len(log_probs)]
    return float(-(counts * log_probs).sum() / max(len(targets), 1))


def bits_per_byte(loss_nats: float, tokens: int, num_bytes: float) -> float:
    """Total information in bits divided by the bytes of text it encodes: comparable across
    tokenizers, unlike perplexity."""
    return loss_nats * tokens / (num_bytes * math.log(2))


def plot_loss_curve(path: str | os.PathLike, train: Sequence[tuple[int, float]],
                    val: Sequence[tuple[int, float]], title: str,
                    baseline: float | None = None) -> None:
    """Train (and validation) loss against optimizer step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1, alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", linewidth=2)
    if baseline is not None:
        ax.axhline(baseline, linestyle="--", color="gray", label="unigram baseline")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
