"""The model: a small Llama-style decoder, its datasets and its Lightning training wrappers.

Importing the package loads no torch: ``models.config`` (the settings, validated when a
pipeline config is loaded) stays light, and the names below load their module on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from models.checkpoint import load_model, save_model
    from models.config import ModelConfig
    from models.llama import Llama

__all__ = ["Llama", "ModelConfig", "load_model", "save_model"]

_HOME = {"Llama": "models.llama", "ModelConfig": "models.config",
         "load_model": "models.checkpoint", "save_model": "models.checkpoint"}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
