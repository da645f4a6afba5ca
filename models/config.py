"""The model's and the trainer's settings, without torch or Lightning.

Loading a pipeline configuration validates these (a model shape that cannot be built,
a precision Lightning does not know) before any training starts; this module keeps that
cheap, so ``forgeline config`` and a bad ``--set`` answer at once.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Literal

# The settings Lightning accepts, as types: a config with any other value fails when it is
# loaded (and the Prefect UI offers these as choices) instead of when training starts.
Precision = Literal["auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true",
                    "64-true", "transformer-engine", "transformer-engine-float16"]
Accelerator = Literal["auto", "cpu", "gpu", "cuda", "mps", "tpu"]


def check_strategy(strategy: str) -> str:
    """A Lightning strategy name ('auto', 'ddp', 'fsdp', ...), or a ValueError listing them."""
    if strategy == "auto":
        return strategy
    from lightning.pytorch.strategies import StrategyRegistry  # only for a named strategy

    names = StrategyRegistry.available_strategies()
    if strategy not in names:
        raise ValueError(f"unknown Lightning strategy {strategy!r}; use 'auto' or one of "
                         f"{', '.join(sorted(names))}")
    if strategy.startswith(("ddp_spawn", "ddp_fork", "ddp_notebook")):
        raise ValueError(f"strategy {strategy!r} starts its processes from inside the "
                         "Trainer, which does not work within the pipeline; use 'ddp' "
                         "(forgeline starts one process per device itself)")
    return strategy


def check_devices(devices: str | int) -> str | int:
    """Lightning's ``devices``: a number >= 1, -1 or 'auto' (all), or device indices '0,2'."""
    text = str(devices).strip()
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if text == "auto" or text == "-1" or (
            parts and all(part.isdigit() for part in parts) and ("," in text or int(text) >= 1)):
        return devices if isinstance(devices, int) else text
    raise ValueError(f"devices must be a number of devices (1 or more), -1 or 'auto' for "
                     f"all, or a list of device indices such as '0,2'; got {devices!r}")


def default_mlp_hidden(d_model: int) -> int:
    """SwiGLU hidden size: 8/3 * d_model (same parameters as a 4x GELU MLP), rounded up to 32."""
    return 32 * math.ceil(8 * d_model / 3 / 32)


@dataclass
class ModelConfig:
    vocab_size: int
    context_length: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: as many as n_heads (plain multi-head attention)
    mlp_hidden: int | None = None  # None: default_mlp_hidden(d_model)
    rope_theta: float = 10000.0
    dropout: float = 0.0
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    causal: bool = True  # False: every position attends to every other (a masked-LM encoder)
    prompt_tokens: int = 0  # learned soft-prompt vectors put before the tokens (prompt tuning)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.mlp_hidden is None:
            self.mlp_hidden = default_mlp_hidden(self.d_model)
        self.validate()

    def validate(self) -> None:
        positive = ("vocab_size", "context_length", "d_model", "n_layers", "n_heads",
                    "n_kv_heads", "mlp_hidden")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"model {name} must be at least 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads "
                             f"({self.n_heads}); e.g. d_model={self.n_heads * 32}")
        if self.head_dim % 2:
            raise ValueError(f"the head size d_model/n_heads = {self.head_dim} must be even for "
                             "rotary embeddings; change d_model or n_heads")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                             f"({self.n_kv_heads}): each key/value head serves a group of "
                             "query heads")
        if not 0 <= self.prompt_tokens < self.context_length:
            raise ValueError(f"prompt_tokens ({self.prompt_tokens}) must be at least 0 and "
                             f"leave room in the context of {self.context_length} tokens")
        if self.prompt_tokens and not self.causal:
            raise ValueError("prompt tuning (prompt_tokens) needs a causal decoder")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def parameter_count(self, non_embedding: bool = False) -> int:
        """Parameters of the model this config builds, counted from the shapes (the token
        table once when tied; ``non_embedding`` leaves it out)."""
        d, m, kv = self.d_model, self.mlp_hidden, self.n_kv_heads * self.head_dim
        block = (d * d + d * 2 * kv + d * d) + (d * 2 * m + m * d) + 2 * d  # attn, mlp, norms
        body = self.n_layers * block + d + self.prompt_tokens * d  # + final norm, soft prompt
        table = self.vocab_size * d
        if non_embedding:
            return body + (0 if self.tie_embeddings else table)
        return body + table * (1 if self.tie_embeddings else 2)

    def flops_per_token(self) -> int:
        """Training FLOPs per token, forward and backward: 6 per weight a token meets in a
        matmul (the blocks and the output head) plus 12 * layers * width * context for
        attention's scores and mixing (PaLM, appendix B; nanoGPT's MFU estimate)."""
        matmul_weights = self.parameter_count(non_embedding=True)
        if self.tie_embeddings:
            matmul_weights += self.vocab_size * self.d_model  # the head reuses the table
        return 6 * matmul_weights + 12 * self.n_layers * self.d_model * self.context_length

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
