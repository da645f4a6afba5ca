"""Parameter-efficient fine-tuning: LoRA (through peft) and prompt tuning for the decoder.

A training stage picks a method with :class:`AdapterSettings`, calls :func:`prepare_model`
on the pretrained :class:`~models.llama.Llama` before building its LightningModule (the
optimizer then takes only the parameters that require gradients), trains it through
``tasks.training.run_training`` as usual, and calls :func:`finish_model` for the plain
Llama to save as ``model.pt``:

- ``full``: every weight trains; the model is its own result.
- ``lora``: low-rank updates ``B @ A`` (Hu et al., 2021) beside the chosen linear layers,
  injected by peft; only they train. The result has them merged into the weights, so
  ``model.pt`` stays a plain Llama state dict; the adapter itself is saved in peft's
  format (``adapter/adapter_config.json`` + ``adapter_model.safetensors``).
- ``prompt_tuning``: a learned soft prompt of ``prompt_tokens`` vectors before every
  sequence (Lester et al., 2021); every pretrained weight stays frozen, so the result is
  the pretrained model plus ``prompt``, saved alone in ``adapter/prompt.safetensors``.

:func:`load_adapter` applies a saved adapter to the base model again. The settings class
imports neither torch nor peft, so a stage config that nests it stays cheap to load.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import torch

    from models.llama import Llama

log = logging.getLogger(__name__)

Method = Literal["full", "lora", "prompt_tuning"]
ADAPTER_DIR = "adapter"
PROMPT_FILE = "prompt.safetensors"
PROMPT_CONFIG = "prompt_config.json"
LORA_CONFIG = "adapter_config.json"
LINEAR_NAMES = ("q_proj", "kv_proj", "out_proj", "gate_up", "down")


class AdapterSettings(BaseModel):
    """Which weights fine-tuning changes: all of them, LoRA adapters, or a soft prompt."""

    model_config = ConfigDict(extra="forbid")

    method: Method = Field(
        "full", description="'full' trains every weight; 'lora' trains low-rank adapters "
                            "beside the linear layers in lora_targets (a few percent of the "
                            "parameters; use a higher learning rate, ~1e-3); 'prompt_tuning' "
                            "trains only a soft prompt of prompt_tokens vectors, every "
                            "pretrained weight frozen (use a much higher learning rate, "
                            "~3e-2 or more).")
    lora_rank: int = Field(
        8, ge=1, description="LoRA: rank r of each update B @ A (r x in + out x r "
                             "parameters per adapted layer).")
    lora_alpha: int = Field(
        16, ge=1, description="LoRA: the update is scaled by lora_alpha / lora_rank.")
    lora_dropout: float = Field(
        0.05, ge=0.0, lt=1.0, description="LoRA: dropout on the adapters' inputs.")
    lora_targets: list[str] = Field(
        default_factory=lambda: list(LINEAR_NAMES), min_length=1,
        description="LoRA: names of the linear layers that get adapters (peft "
                    "target_modules: a name matches the end of a module's path): q_proj, "
                    "kv_proj, out_proj (attention), gate_up, down (MLP).")
    prompt_tokens: int = Field(
        16, ge=1, description="Prompt tuning: learned vectors put before every sequence; "
                              "they take that many positions of the context.")
    prompt_init: Literal["vocab", "random"] = Field(
        "vocab", description="Prompt tuning: start from the embeddings of random vocabulary "
                             "tokens (Lester et al., steadier) or from N(0, 0.02) noise.")


def set_dropout(model: Llama, dropout: float) -> float:
    """Set the dropout of every layer of ``model`` (and its config); returns the old value."""
    from models.llama import Attention, SwiGLU

    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    previous = model.config.dropout
    model.config.dropout = dropout
    for module in model.modules():
        if isinstance(module, Attention | SwiGLU):
            module.dropout = dropout
    return previous


def _linear_names(model: Llama) -> list[str]:
    import torch

    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear)})


def prepare_model(model: Llama, settings: AdapterSettings, seed: int = 0) -> torch.nn.Module:
    """The module to train for ``settings.method``.

    full: ``model`` itself, every parameter trainable. lora: ``model`` wrapped by peft
    (in place: its linear layers get adapters) with only the adapters trainable; keep a
    copy first if the untouched model is needed. prompt_tuning: a new Llama with
    ``prompt_tokens`` soft-prompt vectors and ``model``'s weights (copied), everything but
    ``prompt`` frozen. ``seed`` fixes the adapters' or the prompt's initial values."""
    import torch

    if settings.method == "full":
        model.requires_grad_(True)
        return model
    if settings.method == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha,
                            lora_dropout=settings.lora_dropout,
                            target_modules=list(settings.lora_targets), bias="none")
        device = next(model.parameters()).device
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            torch.manual_seed(seed)  # the adapters' initial values, without moving the caller's RNG
            try:
                wrapped = get_peft_model(model, config)
            except ValueError as exc:
                raise ValueError(f"LoRA targets {settings.lora_targets} do not name linear "
                                 f"layers of the model (it has {_linear_names(model)}): "
                                 f"{exc}") from exc
        return wrapped
    if settings.method == "prompt_tuning":
        return _with_soft_prompt(model, settings, seed)
    raise ValueError(f"unknown adapter method {settings.method!r}")


def _with_soft_prompt(model: Llama, settings: AdapterSettings, seed: int) -> Llama:
    import torch

    from models.config import ModelConfig
    from models.llama import Llama

    n = settings.prompt_tokens
    config = ModelConfig.from_dict({**model.config.to_dict(), "prompt_tokens": n})
    weight = model.embed.weight
    tuned = Llama(config).to(device=weight.device, dtype=weight.dtype)
    state = {k: v for k, v in model.state_dict().items() if k != "prompt"}
    missing, unexpected = tuned.load_state_dict(state, strict=False)
    if unexpected or set(missing) != {"prompt"}:
        raise ValueError(f"copying the weights for prompt tuning failed: missing {missing}, "
                         f"unexpected {unexpected}")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if settings.prompt_init == "vocab":  # embeddings of random tokens (Lester et al.)
            ids = torch.randint(0, config.vocab_size, (n,), generator=generator)
            tuned.prompt.copy_(weight.detach().cpu()[ids])
        else:
            tuned.prompt.copy_(torch.randn(n, config.d_model, generator=generator) * 0.02)
    tuned.requires_grad_(False)
    tuned.prompt.requires_grad_(True)
    tuned.train(model.training)
    return tuned


def trainable_summary(module: torch.nn.Module) -> dict:
    """``{"trainable_params", "total_params", "trainable_share"}``; a tied tensor counts once."""
    seen: set[int] = set()
    trainable = total = 0
    for parameter in module.parameters():  # parameters() already skips shared tensors
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        total += parameter.numel()
        if parameter.requires_grad:
            trainable += parameter.numel()
    return {"trainable_params": trainable, "total_params": total,
            "trainable_share": trainable / total if total else 0.0}


def finish_model(module: torch.nn.Module, settings: AdapterSettings, out_dir: Path) -> Llama:
    """The plain Llama to save as ``model.pt`` after training ``module`` (what
    :func:`prepare_model` returned); for lora and prompt_tuning also writes the adapter to
    ``out_dir/adapter/``. LoRA: the adapters merged into the weights (peft's
    merge_and_unload), so that every later stage, the registry and exports use the tuned
    model as a plain one; the adapter alone (a few MB at most) stays in ``adapter/`` to share
    or to apply to the base model again (:func:`load_adapter`). Prompt tuning: the Llama with
    its soft prompt."""
    from models.llama import Llama

    adapter_dir = Path(out_dir) / ADAPTER_DIR
    if settings.method == "full":
        if not isinstance(module, Llama):
            raise TypeError(f"method 'full' expects a Llama, got {type(module).__name__}")
        return module
    if settings.method == "lora":
        from peft import PeftModel

        if not isinstance(module, PeftModel):
            raise TypeError(f"method 'lora' expects the peft model that prepare_model "
                            f"returned, got {type(module).__name__}")
        module.save_pretrained(str(adapter_dir))
        plain = module.merge_and_unload()
        log.info("LoRA adapter saved to %s and merged into model.pt", adapter_dir)
        return plain.requires_grad_(True)
    if settings.method == "prompt_tuning":
        if not isinstance(module, Llama) or module.prompt is None:
            raise TypeError("method 'prompt_tuning' expects the Llama with a soft prompt that "
                            "prepare_model returned")
        save_prompt(module, adapter_dir, settings)
        return module.requires_grad_(True)
    raise ValueError(f"unknown adapter method {settings.method!r}")


def save_prompt(model: Llama, adapter_dir: Path, settings: AdapterSettings | None = None) -> None:
    """Write the soft prompt (``prompt.safetensors``) and its shape (``prompt_config.json``)."""
    from safetensors.torch import save_file

    from tasks.shards import atomic_path

    adapter_dir = Path(adapter_dir)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(adapter_dir / PROMPT_FILE) as tmp:
        save_file({"prompt": model.prompt.detach().cpu().contiguous()}, str(tmp))
    info = {"method": "prompt_tuning", "prompt_tokens": model.config.prompt_tokens,
            "d_model": model.config.d_model, "vocab_size": model.config.vocab_size,
            "prompt_init": settings.prompt_init if settings else None}
    with atomic_path(adapter_dir / PROMPT_CONFIG) as tmp:
        Path(tmp).write_text(json.dumps(info, indent=2), encoding="utf-8")


def adapter_method(adapter_dir: Path) -> Method:
    """'lora' or 'prompt_tuning', from the files in an adapter directory."""
    adapter_dir = Path(adapter_dir)
    if (adapter_dir / LORA_CONFIG).is_file():
        return "lora"
    if (adapter_dir / PROMPT_CONFIG).is_file():
        return "prompt_tuning"
    raise FileNotFoundError(f"{adapter_dir} holds no adapter: neither {LORA_CONFIG} (LoRA) "
                            f"nor {PROMPT_CONFIG} (prompt tuning)")


def load_adapter(base: Llama, adapter_dir: Path) -> Llama:
    """The tuned model rebuilt from the base model it was trained from and a saved adapter
    directory (``base`` itself is left unchanged): LoRA merged into a copy of its weights,
    or a copy with the soft prompt put in front."""
    import torch

    adapter_dir = Path(adapter_dir)
    method = adapter_method(adapter_dir)
    if method == "lora":
        from peft import PeftModel

        wrapped = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir))
        return wrapped.merge_and_unload().requires_grad_(True)
    from safetensors.torch import load_file

    info = json.loads((adapter_dir / PROMPT_CONFIG).read_text(encoding="utf-8"))
    if info.get("d_model") != base.config.d_model:
        raise ValueError(f"the soft prompt in {adapter_dir} has width {info.get('d_model')}, "
                         f"the base model {base.config.d_model}: they do not belong together")
    tuned = _with_soft_prompt(base, AdapterSettings(method="prompt_tuning",
                                                    prompt_tokens=info["prompt_tokens"]), 0)
    prompt = load_file(str(adapter_dir / PROMPT_FILE))["prompt"]
    with torch.no_grad():
        tuned.prompt.copy_(prompt.to(tuned.prompt.device, tuned.prompt.dtype))
    return tuned.requires_grad_(True)
