"""The model: a small Llama-style decoder, its datasets and its Lightning training wrappers."""

from models.checkpoint import load_model, save_model
from models.llama import Llama, ModelConfig

__all__ = ["Llama", "ModelConfig", "load_model", "save_model"]
