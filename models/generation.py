"""Text in, text out: a trained model and its tokenizer behind one ``generate`` call.

A model directory holds what the training stages write: ``model.pt`` (weights and model
config), ``tokenizer.model`` (sentencepiece) and ``config.json`` (the resolved training
settings, for people). A prompt is encoded as in training: an EOS first (every document
followed one), then the prompt's tokens; generation stops at the next EOS and only the
continuation is returned.

Used by the evaluate stage's samples, the MLflow model (``flows.model_registry``) and the
``forgeline generate`` command; it imports neither MLflow nor Prefect.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import sentencepiece as spm

    from models.llama import Llama

MODEL_FILES = ("model.pt", "tokenizer.model", "config.json")


def encode_prompt(sp: spm.SentencePieceProcessor, prompt: str, eos_id: int) -> list[int]:
    """The prompt's token ids after a leading EOS, which marks the start of a document."""
    return [eos_id, *sp.encode(prompt)]


def decode_continuation(sp: spm.SentencePieceProcessor, ids: list[int], eos_id: int) -> str:
    """The text of generated ids up to (not including) the first EOS."""
    if eos_id in ids:
        ids = ids[:ids.index(eos_id)]
    return sp.decode(ids)


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else a CUDA GPU when there is one, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class TextGenerator:
    """A model and its tokenizer: ``generate(prompt) -> continuation``."""

    def __init__(self, model: Llama, tokenizer: spm.SentencePieceProcessor,
                 device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_id()
        if self.eos_id < 0:
            raise ValueError("the tokenizer has no EOS token; generation needs one to know "
                             "where a document starts and ends")
        if tokenizer.get_piece_size() > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.get_piece_size()} tokens but the "
                             f"model only {model.config.vocab_size}: they do not belong together")

    @property
    def context_length(self) -> int:
        """Tokens the model reads at once (a soft prompt's positions left out)."""
        return self.model.max_tokens

    def generate(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8,
                 top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None) -> str:
        """The continuation of ``prompt`` (without the prompt): at most ``max_new_tokens``
        tokens, ending early at EOS. ``temperature`` 0 is greedy; ``top_k`` and ``top_p``
        (nucleus) limit the candidates; ``seed`` makes sampling repeatable."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be at least 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be at least 0, got {temperature}")
        if max_new_tokens == 0:
            return ""
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(int(seed))
        prompt_ids = encode_prompt(self.tokenizer, prompt, self.eos_id)
        idx = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        out = self.model.generate(idx, max_new_tokens, temperature=temperature,
                                  top_k=top_k or None, stop_token=self.eos_id,
                                  generator=generator, top_p=top_p)
        return decode_continuation(self.tokenizer, out[0, len(prompt_ids):].tolist(),
                                   self.eos_id)


def load_generator(model_dir: str | os.PathLike,
                   device: str | torch.device | None = None) -> TextGenerator:
    """The generator for a model directory holding ``model.pt`` and ``tokenizer.model``
    (as a training stage writes it, or as ``flows.model_registry.download_model`` returns
    it), on ``device`` (default: a CUDA GPU when there is one, else the CPU)."""
    import sentencepiece as spm

    from models.checkpoint import load_model

    model_dir = Path(model_dir)
    missing = [name for name in MODEL_FILES[:2] if not (model_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{model_dir} is not a model directory: no "
                                f"{' or '.join(missing)} in it")
    where = default_device(device)
    model = load_model(model_dir / "model.pt", map_location=where)
    tokenizer = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    return TextGenerator(model, tokenizer, where)
