"""Masked-language-model pretraining (BERT's cloze objective) for the encoder.

With ``causal=False`` the Llama stack attends in both directions; trained to restore
masked tokens it becomes a BERT-style encoder. ``mask_tokens`` chooses ``mask_rate`` of
the ordinary tokens of a window (special tokens never) and replaces 80% of the chosen
ones with the mask id, 10% with a random ordinary token and leaves 10% as they are
(Devlin et al. 2019; the shares are settings). Only the chosen positions are scored.

Every window's masking comes from a generator seeded by (seed, stream, sample index):
a resumed run masks its remaining batches exactly as the uninterrupted run would have,
and the validation windows are masked the same way at every validation, so their loss
and accuracy are comparable from step to step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from models.lightning import CausalLM, MetricsFn
from models.llama import IGNORE_INDEX, Llama

TRAIN_STREAM, VAL_STREAM = 0, 1  # training and validation windows are masked independently


def mask_tokens(ids: torch.Tensor, mask_rate: float, mask_id: int, vocab_size: int,
                special_ids: Iterable[int], generator: torch.Generator | None = None,
                mask_token_ratio: float = 0.8, random_token_ratio: float = 0.1,
                at_least_one: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking of token ids (..., T): ``(inputs, labels)``.

    Each position whose token is not special (``special_ids`` and ``mask_id``) is chosen
    with probability ``mask_rate``; with ``at_least_one`` a row (the last dimension) with
    ordinary tokens but none chosen gets one, so that every row is scored. A chosen
    token becomes ``mask_id`` with probability ``mask_token_ratio``, a random ordinary
    token with ``random_token_ratio``, and stays itself otherwise. ``labels`` holds the
    original token at chosen positions and IGNORE_INDEX elsewhere. Pure: every random
    number comes from ``generator``.
    """
    ids = torch.as_tensor(ids, dtype=torch.long)
    special = torch.tensor(sorted({int(i) for i in special_ids if i >= 0} | {int(mask_id)}),
                           dtype=torch.long)
    ordinary = ~torch.isin(ids, special)
    draw = torch.rand(ids.shape, generator=generator)
    chosen = (draw < mask_rate) & ordinary
    if at_least_one and ids.numel():
        rows, ordinary_rows, draw_rows = (chosen.view(-1, ids.size(-1)),
                                          ordinary.view(-1, ids.size(-1)),
                                          draw.view(-1, ids.size(-1)))
        empty = ~rows.any(dim=1) & ordinary_rows.any(dim=1)
        if empty.any():  # the ordinary position with the smallest draw, in each such row
            pick = draw_rows.masked_fill(~ordinary_rows, 2.0).argmin(dim=1)
            rows[empty.nonzero().squeeze(1), pick[empty]] = True
    labels = ids.masked_fill(~chosen, IGNORE_INDEX)
    action = torch.rand(ids.shape, generator=generator)
    to_mask = chosen & (action < mask_token_ratio)
    to_random = chosen & (action >= mask_token_ratio) & (
        action < mask_token_ratio + random_token_ratio)
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[special[special < vocab_size]] = False
    candidates = allowed.nonzero().squeeze(1)
    random_ids = candidates[torch.randint(len(candidates), ids.shape, generator=generator)]
    inputs = ids.masked_fill(to_mask, mask_id)
    inputs = torch.where(to_random, random_ids, inputs)
    return inputs, labels


def sample_seed(seed: int, stream: int, index: int) -> int:
    """A well-mixed 64-bit seed for one window from (seed, stream, index)."""
    entropy = [seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, stream, index]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])


@dataclass(frozen=True)
class Masking:
    """What ``mask_tokens`` needs besides the ids and the generator."""

    mask_id: int
    vocab_size: int
    special_ids: tuple[int, ...]
    mask_rate: float = 0.15
    mask_token_ratio: float = 0.8
    random_token_ratio: float = 0.1

    def apply(self, ids: torch.Tensor, generator: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor]:
        return mask_tokens(ids, self.mask_rate, self.mask_id, self.vocab_size,
                           self.special_ids, generator, self.mask_token_ratio,
                           self.random_token_ratio)


class MaskedWindows(Dataset):
    """(inputs, labels) rows: the first ``context_length`` tokens of each window of
    ``windows`` (RandomWindows or StridedWindows), masked by a generator seeded from
    (``seed``, ``stream``, the row's index), so row i is masked alike in every run."""

    def __init__(self, windows: Dataset, masking: Masking, seed: int, stream: int):
        self.windows, self.masking, self.seed, self.stream = windows, masking, seed, stream

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.windows[i][0]  # (T,): a window's inputs; its shifted targets go unused
        generator = torch.Generator().manual_seed(sample_seed(self.seed, self.stream, i))
        return self.masking.apply(ids, generator)


def masked_logits(model: Llama, hidden_fn: Callable, inputs: torch.Tensor,
                  labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, V) at the N masked positions and their labels (N,): the output head,
    a large share of a small model's compute, runs on those positions only."""
    scored = labels != IGNORE_INDEX
    return model.head(hidden_fn(inputs)[scored]), labels[scored]


class MaskedLM(CausalLM):
    """Cloze training on (inputs, labels) batches from ``MaskedWindows``: cross-entropy on
    the masked positions only; the optimizer and learning-rate schedule are CausalLM's.

    Validation logs the masked-token loss as ``val_loss`` (what the runner checkpoints and
    stops on) and the masked-token accuracy as ``val_mlm_accuracy``, both weighted by
    masked tokens; ``on_metrics`` also receives the accuracy after each validation."""

    def __init__(self, model: Llama, learning_rate: float, weight_decay: float,
                 warmup_steps: int, max_steps: int, min_lr_ratio: float,
                 betas: tuple[float, float] = (0.9, 0.95),
                 on_metrics: MetricsFn | None = None):
        if model.config.causal:
            raise ValueError("masked-LM training needs an encoder (ModelConfig causal=False)")
        super().__init__(model, learning_rate, weight_decay, warmup_steps, max_steps,
                         min_lr_ratio, betas)
        self.hidden_fn: Callable = model.hidden_states
        self.on_metrics = on_metrics

    def compile(self) -> None:
        self.hidden_fn = torch.compile(self.model.hidden_states)

    def compute_loss(self, batch) -> torch.Tensor:
        logits, targets = masked_logits(self.model, self.hidden_fn, batch[0], batch[1])
        if targets.numel() == 0:  # nothing masked (a batch of special tokens only)
            return logits.sum() * 0.0
        return F.cross_entropy(logits.float(), targets)

    def validation_step(self, batch, batch_idx: int) -> None:
        logits, targets = masked_logits(self.model, self.hidden_fn, batch[0], batch[1])
        count = targets.numel()
        if count == 0:
            return
        loss = F.cross_entropy(logits.float(), targets)
        accuracy = (logits.argmax(dim=-1) == targets).float().mean()
        # weighted by masked tokens: the epoch value is the mean over every masked token
        self.log("val_loss", loss, prog_bar=True, on_epoch=True, sync_dist=True,
                 batch_size=count)
        self.log("val_mlm_accuracy", accuracy, on_epoch=True, sync_dist=True,
                 batch_size=count)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        accuracy = self.trainer.callback_metrics.get("val_mlm_accuracy")
        if accuracy is None:
            return
        if self.on_metrics is not None and self.trainer.is_global_zero:
            self.on_metrics({"val_mlm_accuracy": float(accuracy)}, self.trainer.global_step)


@dataclass
class MaskedScores:
    loss: float  # mean cross-entropy (nats) over the masked tokens
    accuracy: float  # share of masked tokens predicted exactly (argmax)
    masked_tokens: int
    label_counts: np.ndarray  # (V,): how often each token was a masked label


@torch.no_grad()
def evaluate_masked(model: Llama, dataset: Dataset, batch_size: int,
                    device: torch.device | str = "cpu") -> MaskedScores:
    """Masked-token loss and accuracy of an encoder over every row of ``dataset``
    (``MaskedWindows``), weighted by masked tokens."""
    was_training = model.training
    model.eval()
    total, correct, count = 0.0, 0, 0
    label_counts = torch.zeros(model.config.vocab_size, dtype=torch.long)
    for inputs, labels in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        logits, targets = masked_logits(model, model.hidden_states, inputs.to(device),
                                        labels.to(device))
        logits = logits.float()
        total += F.cross_entropy(logits, targets, reduction="sum").double().item()
        correct += int((logits.argmax(dim=-1) == targets).sum())
        count += targets.numel()
        label_counts += torch.bincount(targets.cpu(), minlength=model.config.vocab_size)
    model.train(was_training)
    nan = float("nan")
    return MaskedScores(total / count if count else nan, correct / count if count else nan,
                        count, label_counts.numpy())


def token_counts(tokens: np.ndarray, vocab_size: int, chunk: int = 1 << 24) -> np.ndarray:
    """How often each id occurs in ``tokens`` (a memmap is read in chunks, never copied)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(tokens), chunk):
        counts += np.bincount(tokens[start:start + chunk], minlength=vocab_size)[:vocab_size]
    return counts


def masked_baseline(train_counts: np.ndarray, label_counts: np.ndarray,
                    special_ids: Iterable[int]) -> dict[str, float]:
    """What a model that ignores context scores on the same masked tokens: ``accuracy``
    of always answering the most frequent ordinary training token (specials are never
    masked, so never the answer), and ``loss`` of the add-one smoothed unigram
    distribution over the ordinary tokens; ``token`` is that most frequent id."""
    ordinary = np.ones(len(train_counts), dtype=bool)
    ordinary[[i for i in special_ids if 0 <= i < len(train_counts)]] = False
    counts = np.where(ordinary, train_counts, 0).astype(np.float64)
    top = int(counts.argmax())
    masked = int(label_counts.sum())
    if masked == 0:
        return {"accuracy": float("nan"), "loss": float("nan"), "token": top}
    smoothed = (counts + 1.0)[ordinary]
    log_probs = np.log(smoothed) - np.log(smoothed.sum())
    loss = float(-(label_counts[ordinary] * log_probs).sum() / masked)
    return {"accuracy": float(label_counts[top] / masked), "loss": loss, "token": top}
