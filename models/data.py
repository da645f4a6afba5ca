"""Datasets over the tokenize stage's output: token windows for pretraining and
prompt/response pairs for supervised fine-tuning.

``train.bin`` / ``val.bin`` are flat arrays of token ids (documents joined by EOS) read
through a memmap, so a corpus larger than memory costs nothing to open.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
from torch.utils.data import Dataset


def read_meta(tokenized_dir: str | os.PathLike) -> dict:
    """The tokenize stage's ``meta.json`` (dtype, vocab_size, special ids, token counts)."""
    path = Path(tokenized_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {tokenized_dir} is not a tokenize output")
    return json.loads(path.read_text(encoding="utf-8"))


def open_tokens(path: str | os.PathLike, dtype: str) -> np.memmap:
    """A read-only memmap of a token file; an empty file gives an empty array."""
    path = Path(path)
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


class _TokenFile(Dataset):
    """Opens the memmap lazily, so each DataLoader worker maps the file itself."""

    def __init__(self, path: str | os.PathLike, dtype: str, context_length: int):
        self.path, self.dtype, self.context_length = Path(path), dtype, context_length
        self._tokens: np.ndarray | None = None
        self.num_tokens = len(open_tokens(self.path, dtype))

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = open_tokens(self.path, self.dtype)
        return self._tokens

    def window(self, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = torch.from_numpy(self.tokens[start:start + self.context_length + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]  # inputs (T,) and next-token targets (T,)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}


class RandomWindows(_TokenFile):
    """``num_samples`` windows of context+1 tokens at random offsets, fixed by ``seed``.

    Random offsets (as in nanoGPT) show the model every position of a document boundary
    and avoid an epoch structure; the offsets are drawn up front, so the order is the
    same in every run with the same seed.
    """

    def __init__(self, path: str | os.PathLike, dtype: str, context_length: int,
                 num_samples: int, seed: int = 0):
        super().__init__(path, dtype, context_length)
        if self.num_tokens < context_length + 1:
            raise ValueError(f"{self.path} holds {self.num_tokens} tokens, fewer than one "
                             f"context window of {context_length + 1}")
        high = self.num_tokens - context_length  # exclusive: the window must fit
        self.offsets = np.random.default_rng(seed).integers(0, high, size=num_samples)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.window(int(self.offsets[i]))


class StridedWindows(_TokenFile):
    """Non-overlapping windows in order, so every target token is scored exactly once.

    With ``max_windows`` only that many, spread evenly over the file, which keeps a
    quick validation representative of the whole set.
    """

    def __init__(self, path: str | os.PathLike, dtype: str, context_length: int,
                 max_windows: int | None = None):
        super().__init__(path, dtype, context_length)
        total = max(0, (self.num_tokens - 1) // context_length)
        starts = np.arange(total) * context_length
        if max_windows is not None and 0 < max_windows < total:
            starts = starts[np.linspace(0, total - 1, max_windows).round().astype(int)]
        self.starts = starts

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.window(int(self.starts[i]))

    @property
    def num_targets(self) -> int:
        return len(self.starts) * self.context_length


@dataclass
class Pair:
    prompt: str
    response: str


def encode_pair(sp: spm.SentencePieceProcessor, pair: Pair, context_length: int,
                eos_id: int) -> tuple[list[int], list[bool]] | None:
    """``[EOS] prompt response [EOS]`` cut to context+1 tokens, with the mask of tokens that
    are trained on (response and its EOS). The leading EOS marks a document start, as in
    pretraining. None when the prompt leaves no room for a response."""
    prompt = [eos_id] + sp.encode(pair.prompt)
    response = sp.encode(pair.response) + [eos_id]
    if len(prompt) >= context_length:
        return None
    ids = (prompt + response)[:context_length + 1]
    mask = ([False] * len(prompt) + [True] * len(response))[:context_length + 1]
    return ids, mask


class SFTDataset(Dataset):
    """Prompt/response pairs as fixed-length (inputs, targets, loss_mask) rows.

    Rows are padded to ``context_length`` with ``pad_id``; the mask is true only where the
    target is a response token, so the prompt and the padding never contribute to the loss.
    """

    def __init__(self, pairs: list[Pair], sp: spm.SentencePieceProcessor, context_length: int,
                 eos_id: int, pad_id: int):
        self.context_length, self.pad_id = context_length, pad_id
        self.rows = []
        self.skipped = 0
        for pair in pairs:
            encoded = encode_pair(sp, pair, context_length, eos_id)
            if encoded is None:
                self.skipped += 1
            else:
                self.rows.append(encoded)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, mask = self.rows[i]
        pad = self.context_length + 1 - len(ids)
        ids = torch.tensor(ids + [self.pad_id] * pad)
        mask = torch.tensor(mask + [False] * pad)
        return ids[:-1], ids[1:], mask[1:]  # the mask follows the targets


def collate_trimmed(rows: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """Stack SFT rows and cut the columns after the batch's last scored target: short pairs
    then cost only their own length, not the whole context."""
    inputs, targets, mask = (torch.stack(column) for column in zip(*rows))
    scored = mask.any(dim=0).nonzero()
    length = int(scored[-1]) + 1 if len(scored) else 1
    return inputs[:, :length], targets[:, :length], mask[:, :length]
