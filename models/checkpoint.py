"""Plain ``model.pt`` files: a state_dict plus the model config, loadable without Lightning."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from models.llama import Llama, ModelConfig
from tasks.shards import atomic_path


def save_model(path: str | os.PathLike, model: Llama, extra: dict | None = None) -> None:
    """Write ``{"model_config", "state_dict", **extra}`` atomically, tensors moved to CPU."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"model_config": model.config.to_dict(), "state_dict": state, **(extra or {})}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Llama:
    """Rebuild the model saved by :func:`save_model`, in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    payload = torch.load(path, map_location=map_location, weights_only=True)
    model = Llama(ModelConfig.from_dict(payload["model_config"]))
    model.load_state_dict(payload["state_dict"])
    return model.to(map_location).eval()
