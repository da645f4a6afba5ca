"""Task heads on the pretrained model: sequence classification and token classification.

``SequenceClassifier`` pools the backbone's final hidden states into one vector per text
(a causal decoder: the state of the last real token, the only one that has seen the whole
text; an encoder: the mean over the real tokens) and maps it to label logits;
``TokenClassifier`` maps every token's state to tag logits (NER). Both put dropout before
the linear head. ``ClassificationModule`` and ``TokenClassificationModule`` fine-tune them
through the one training runner: they subclass ``CausalLM``, so AdamW with decay groups,
the warmup + cosine schedule and gradient clipping are the same as in pretraining.

Batches are ``(ids, attention_mask, labels)``: ids (B, T) right-padded, attention_mask
(B, T) true at real tokens, labels (B,) for texts or (B, T) for tokens (``IGNORE_INDEX``
where a token carries no label). The datasets and the collate function that build them
from sentencepiece ids are here too.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from models.lightning import CausalLM
from models.llama import IGNORE_INDEX, Llama, ModelConfig
from tasks.shards import atomic_path


def set_backbone_dropout(model: Llama, dropout: float) -> None:
    """Dropout on the embeddings, attention and MLP outputs of a built model (the rate is
    read by the modules at construction, so a loaded model needs it set here)."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    model.config.dropout = dropout
    for block in model.blocks:
        block.attn.dropout = dropout
        block.mlp.dropout = dropout


class _Head(nn.Module):
    """Backbone + dropout + a linear layer from d_model to ``num_labels``."""

    kind = ""

    def __init__(self, backbone: Llama, num_labels: int, dropout: float = 0.1):
        super().__init__()
        if num_labels < 2:
            raise ValueError(f"a classifier needs at least 2 labels, got {num_labels}")
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.config.d_model, num_labels)
        nn.init.normal_(self.head.weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.head.bias)

    @property
    def config(self) -> ModelConfig:
        return self.backbone.config

    @property
    def num_labels(self) -> int:
        return self.head.out_features

    def states(self, ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(ids, dtype=torch.bool)
        return self.backbone.hidden_states(ids, attention_mask=attention_mask.bool())


class SequenceClassifier(_Head):
    """One label per text: logits (B, num_labels) from the pooled hidden state."""

    kind = "sequence"

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, C): the last real token's state for a causal model (right padding), the
        mean over real tokens for an encoder."""
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        mask = attention_mask.bool()
        if self.config.causal:
            last = (mask.long().sum(dim=1) - 1).clamp(min=0)  # (B,)
            return hidden[torch.arange(hidden.size(0), device=hidden.device), last]
        weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        pooled = self.pool(self.states(ids, attention_mask), attention_mask)
        logits = self.head(self.dropout(pooled))  # (B, L)
        if labels is None:
            return logits, None
        return logits, F.cross_entropy(logits.float(), labels)


class TokenClassifier(_Head):
    """One tag per token: logits (B, T, num_labels); the loss skips IGNORE_INDEX labels."""

    kind = "token"

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.head(self.dropout(self.states(ids, attention_mask)))  # (B, T, L)
        if labels is None:
            return logits, None
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                               ignore_index=IGNORE_INDEX)
        return logits, loss


class ClassificationModule(CausalLM):
    """Fine-tunes a ``SequenceClassifier`` on (ids, attention_mask, labels) batches; logs
    val_loss (watched by early stopping and best.ckpt) and val_accuracy."""

    def compute_loss(self, batch) -> torch.Tensor:
        ids, mask, labels = batch
        return self.forward_fn(ids, mask, labels)[1]

    def _scored(self, logits: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return logits.argmax(dim=-1) == labels, torch.ones_like(labels, dtype=torch.bool)

    def validation_step(self, batch, batch_idx: int) -> None:
        ids, mask, labels = batch
        logits, loss = self.forward_fn(ids, mask, labels)
        correct, counted = self._scored(logits, labels)
        count = int(counted.sum())
        if not count:
            return
        # weighted by what the batch scores, so the epoch means are exact
        self.log("val_loss", loss, prog_bar=True, on_epoch=True, sync_dist=True,
                 batch_size=count)
        self.log("val_accuracy", correct[counted].float().mean(), on_epoch=True,
                 sync_dist=True, batch_size=count)


class TokenClassificationModule(ClassificationModule):
    """Fine-tunes a ``TokenClassifier``; accuracy counts the labelled tokens only."""

    def _scored(self, logits: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return logits.argmax(dim=-1) == labels, labels != IGNORE_INDEX


# ---- data -------------------------------------------------------------------------------


def encode_text(encode: Callable[[str], list[int]], text: str, max_length: int,
                eos_id: int) -> list[int]:
    """``[EOS] text [EOS]`` cut to ``max_length`` ids: the leading EOS marks a document
    start as in pretraining, the closing one is the position a causal model pools."""
    if max_length < 3:
        raise ValueError(f"max_length must be at least 3, got {max_length}")
    return [eos_id] + encode(text)[:max_length - 2] + [eos_id]


def encode_words(encode: Callable[[str], list[int]], words: Sequence[str],
                 tags: Sequence[int], max_length: int, eos_id: int, unk_id: int = 0,
                 label_next: bool = False) -> tuple[list[int], list[int], int]:
    """Ids, per-token labels and the number of words that fit in ``max_length``.

    Each word is encoded on its own; its tag goes on its first sub-token and the other
    sub-tokens get IGNORE_INDEX. With ``label_next`` (for a causal model, which sees only
    the left context) the tag goes on the token after the word instead: the first
    sub-token of the next word, or the closing EOS, whose state has seen the whole word
    and what follows it (a function name's ``(``, say)."""
    ids, labels, fitted = [eos_id], [IGNORE_INDEX], 0
    room = max_length - 1  # the closing EOS
    pending = IGNORE_INDEX  # label_next: the previous word's tag, for this word's first piece
    for word, tag in zip(words, tags, strict=True):
        pieces = encode(word) or [unk_id]
        if len(ids) + len(pieces) > room:
            break
        first = pending if label_next else tag
        labels += [first] + [IGNORE_INDEX] * (len(pieces) - 1)
        pending = tag
        ids += pieces
        fitted += 1
    ids.append(eos_id)
    labels.append(pending if label_next and fitted else IGNORE_INDEX)
    return ids, labels, fitted


def label_positions(labels: Sequence[int]) -> list[int]:
    """The positions that carry a word's tag, in word order."""
    return [i for i, label in enumerate(labels) if label != IGNORE_INDEX]


class EncodedDataset(Dataset):
    """Rows of (ids, labels) lists: labels an int (a text) or a list (one per token)."""

    def __init__(self, rows: list[tuple[list[int], int | list[int]]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[list[int], int | list[int]]:
        return self.rows[i]


def pad_collate(pad_id: int) -> Callable:
    """A collate function: right-pad the ids to the batch's longest row, the attention
    mask true at real tokens, token labels padded with IGNORE_INDEX."""

    def collate(rows: list[tuple[list[int], int | list[int]]]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        length = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.bool)
        tokens = isinstance(rows[0][1], list)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long) if tokens \
            else torch.tensor([label for _, label in rows], dtype=torch.long)
        for i, (row, label) in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = True
            if tokens:
                labels[i, :len(label)] = torch.tensor(label)
        return ids, mask, labels

    return collate


@torch.no_grad()
def predict(model: _Head, dataset: Dataset, batch_size: int, collate: Callable,
            device: torch.device | str = "cpu") -> list:
    """Argmax predictions in eval mode: one label per text, or for token rows the list of
    predicted labels at the labelled positions."""
    from torch.utils.data import DataLoader

    was_training = model.training
    model.eval()
    out: list = []
    for ids, mask, labels in DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                        collate_fn=collate):
        logits = model(ids.to(device), mask.to(device))[0]
        best = logits.argmax(dim=-1).cpu()
        if best.dim() == 1:
            out += best.tolist()
        else:
            for row, row_labels in zip(best, labels, strict=True):
                out.append(row[row_labels != IGNORE_INDEX].tolist())
    model.train(was_training)
    return out


# ---- saving -----------------------------------------------------------------------------


def save_classifier(path: str | os.PathLike, model: _Head, labels: list[str],
                    extra: dict | None = None) -> None:
    """``{"kind", "labels", "model_config", "state_dict", **extra}`` (tensors on the CPU),
    written atomically; :func:`load_classifier` rebuilds it."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"kind": model.kind, "labels": list(labels), "dropout": model.dropout.p,
               "model_config": model.config.to_dict(), "state_dict": state, **(extra or {})}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_classifier(path: str | os.PathLike, map_location: str | torch.device = "cpu"
                    ) -> tuple[_Head, dict]:
    """The classifier saved by :func:`save_classifier`, in eval mode, and its payload
    without the weights (labels and whatever else was saved)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no classifier file at {path}")
    payload = torch.load(path, map_location=map_location, weights_only=True)
    cls = {"sequence": SequenceClassifier, "token": TokenClassifier}[payload["kind"]]
    model = cls(Llama(ModelConfig.from_dict(payload["model_config"])), len(payload["labels"]),
                payload.get("dropout", 0.0))
    model.load_state_dict(payload["state_dict"])
    info = {k: v for k, v in payload.items() if k != "state_dict"}
    return model.to(map_location).eval(), info
