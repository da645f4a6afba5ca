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


def load_training_checkpoint(path: str | os.PathLike,
                             map_location: str | torch.device = "cpu") -> Llama:
    """The model of a training checkpoint (``checkpoints/step-NNNNNN.ckpt`` or
    ``best.ckpt``), shaped by the ``config.json`` the runner writes beside it."""
    import json

    path = Path(path)
    config_path = path.parent / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if not config_path.is_file():
        raise FileNotFoundError(f"{path} has no config.json beside it: the model's shape is "
                                "unknown (the training runner writes one with every checkpoint)")
    model_config = ModelConfig.from_dict(json.loads(config_path.read_text())["model"])
    payload = torch.load(path, map_location=map_location, weights_only=True)
    state = {key.removeprefix("model."): value for key, value in payload["state_dict"].items()
             if key.startswith("model.")}
    model = Llama(model_config)
    model.load_state_dict(state)
    return model.to(map_location).eval()
