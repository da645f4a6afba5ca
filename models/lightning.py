"""Lightning wrappers for training the decoder: causal-LM pretraining, supervised
fine-tuning, a metrics callback that feeds the caller's tracker, and the Trainer setup
shared by both stages.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from datetime import timedelta

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from models.config import Accelerator, Precision, check_strategy  # noqa: F401 (re-exported)
from models.llama import Llama

log = logging.getLogger(__name__)


def _ignore_known_warnings() -> None:
    # Lightning 2.6 calls a torch API that torch 2.10+ deprecates, on every batch: not ours
    # to fix. Set again by make_trainer, in case the filters were reset since this import.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


_ignore_known_warnings()

MetricsFn = Callable[[dict[str, float], int], None]


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_lr_ratio`` at ``max_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class CausalLM(L.LightningModule):
    """Next-token prediction on (inputs, targets) batches, AdamW with warmup + cosine LR."""

    def __init__(self, model: Llama, learning_rate: float, weight_decay: float,
                 warmup_steps: int, max_steps: int, min_lr_ratio: float,
                 betas: tuple[float, float] = (0.9, 0.95)):
        super().__init__()
        self.model = model
        self.forward_fn: Callable = model  # replaced by a compiled version with compile()
        self.learning_rate, self.weight_decay, self.betas = learning_rate, weight_decay, betas
        self.warmup_steps, self.max_steps, self.min_lr_ratio = (
            warmup_steps, max_steps, min_lr_ratio)
        # the last micro-batch's loss, left on the device: reading it (.item()) every step
        # would make the host wait for the GPU each step instead of queueing the next one
        self.last_loss: torch.Tensor | None = None

    def compile(self) -> None:
        self.forward_fn = torch.compile(self.model)

    def compute_loss(self, batch) -> torch.Tensor:
        inputs, targets = batch[0], batch[1]
        return self.forward_fn(inputs, targets)[1]

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        self.last_loss = loss.detach()
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        self.log("val_loss", self.compute_loss(batch), prog_bar=True, on_epoch=True,
                 sync_dist=True)  # the same on every rank (a no-op in one process)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None) -> None:
        if optimizer.defaults.get("fused") and gradient_clip_val:
            # no grad scaler (bf16 or float32): the gradients are true ones, clip them as
            # they are (Lightning refuses to clip for a fused optimizer, as if one were used)
            torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val,
                                            gradient_clip_algorithm)

    def configure_optimizers(self):
        # decay matrices only: norms' gains are not weights to shrink toward zero
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2],
                   "weight_decay": self.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        # one fused kernel for the whole update on CUDA (torch's fastest AdamW there), unless
        # a float16 grad scaler must unscale the gradients before they are clipped
        # (and not under FSDP, whose gradient norm must be taken across the shards)
        scaled = sharded = False
        if self._trainer is not None:
            from lightning.pytorch.strategies import FSDPStrategy

            scaled = str(self.trainer.precision).startswith("16")
            sharded = isinstance(self.trainer.strategy, FSDPStrategy)
        fused = all(p.is_cuda for p in params) and not scaled and not sharded
        optimizer = torch.optim.AdamW(groups, lr=self.learning_rate, betas=self.betas,
                                      fused=fused or None)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, self.warmup_steps, self.max_steps,
                                              self.min_lr_ratio))
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class SupervisedFineTuning(CausalLM):
    """Fine-tuning on (inputs, targets, loss_mask) batches: only response tokens count."""

    def compute_loss(self, batch) -> torch.Tensor:
        inputs, targets, loss_mask = batch
        return self.forward_fn(inputs, targets, loss_mask)[1]


class MetricsCallback(Callback):
    """Records the loss history and forwards metrics to ``on_metrics(metrics, step)``.

    Every optimizer step's train loss (mean over its micro-batches) is kept for the loss
    curve; every ``log_every`` steps the caller gets train_loss, lr and tokens_per_second,
    and after each validation val_loss. The losses stay on the device until a log step
    needs them, so training never waits on a host read between log steps.
    """

    def __init__(self, on_metrics: MetricsFn | None, log_every: int, name: str = "train",
                 flops_per_token: int | None = None, peak_flops: float | None = None):
        self.on_metrics, self.log_every, self.name = on_metrics, max(1, log_every), name
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self._window_steps = 0
        self.train_history: list[tuple[int, float]] = []
        self.val_history: list[tuple[int, float]] = []
        self.tokens_seen = 0
        self._micro_losses: list[torch.Tensor] = []
        self._pending: list[tuple[int, torch.Tensor]] = []  # steps' losses not yet read
        self._last_step = 0
        self._window_tokens = 0
        self._window_start = time.perf_counter()
        self.train_seconds = 0.0
        self._step_started: float | None = None

    def flush(self) -> None:
        """Read the pending steps' losses into ``train_history`` (one host sync for all)."""
        if self._pending:
            values = torch.stack([loss for _, loss in self._pending]).float().cpu().tolist()
            self.train_history += [(step, value) for (step, _), value
                                   in zip(self._pending, values, strict=True)]
            self._pending = []

    def state_dict(self) -> dict:
        """Kept in checkpoints, so a resumed run's loss curve and totals start where the
        interrupted run stopped."""
        self.flush()
        return {"train_history": self.train_history, "val_history": self.val_history,
                "tokens_seen": self.tokens_seen, "train_seconds": self.train_seconds,
                "last_step": self._last_step}

    def load_state_dict(self, state: dict) -> None:
        self.train_history = [tuple(p) for p in state.get("train_history", [])]
        self.val_history = [tuple(p) for p in state.get("val_history", [])]
        self.tokens_seen = state.get("tokens_seen", 0)
        self.train_seconds = state.get("train_seconds", 0.0)
        self._last_step = state.get("last_step", 0)

    def _emit(self, metrics: dict[str, float], step: int) -> None:
        if self.on_metrics is not None:
            self.on_metrics(metrics, step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.train_seconds += time.perf_counter() - (self._step_started or time.perf_counter())
        tokens = batch[0].numel()
        self.tokens_seen += tokens
        self._window_tokens += tokens
        if pl_module.last_loss is not None:
            self._micro_losses.append(pl_module.last_loss)
        step = trainer.global_step
        if step == self._last_step or not self._micro_losses:
            return  # still accumulating gradients for this optimizer step
        loss = torch.stack(self._micro_losses).mean() if len(self._micro_losses) > 1 \
            else self._micro_losses[0]
        self._micro_losses = []
        self._last_step = step
        self._pending.append((step, loss))
        self._window_steps += 1
        if step % self.log_every == 0 or step == 1:
            self.flush()
            loss = self.train_history[-1][1]
            elapsed = max(time.perf_counter() - self._window_start, 1e-9)
            tokens_per_second = self._window_tokens / elapsed
            metrics = {"train_loss": loss, "lr": trainer.optimizers[0].param_groups[0]["lr"],
                       "tokens_per_second": tokens_per_second,
                       "step_time_seconds": elapsed / max(1, self._window_steps),
                       "peak_memory_mb": peak_memory_mb(pl_module.device)}
            if self.flops_per_token:
                # per device: each one processes the tokens of its own batches
                metrics["flops_per_second"] = tokens_per_second * self.flops_per_token
                if self.peak_flops:
                    metrics["mfu"] = metrics["flops_per_second"] / self.peak_flops
            self._emit(metrics, step)
            self._window_tokens, self._window_start = 0, time.perf_counter()
            self._window_steps = 0

    def on_train_end(self, trainer, pl_module) -> None:
        self.flush()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or "val_loss" not in trainer.callback_metrics:
            return
        val_loss = float(trainer.callback_metrics["val_loss"])
        self.flush()
        self.val_history.append((trainer.global_step, val_loss))
        self._emit({"val_loss": val_loss}, trainer.global_step)
        train_loss = self.train_history[-1][1] if self.train_history else float("nan")
        log.info("%s: step %d/%d, train loss %.3f, val loss %.3f, %.0f tokens/s",
                 self.name, trainer.global_step, trainer.max_steps, train_loss, val_loss,
                 self.tokens_seen / max(self.train_seconds, 1e-9))
        self._window_start = time.perf_counter()  # validation time is not training speed


# Dense bf16 tensor-core peaks (FLOP/s, without sparsity) from the vendors' data sheets,
# by a name the device reports; the first match wins, so longer names come first.
GPU_BF16_PEAK_FLOPS = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12),
                       ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12),
                       ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12))


def peak_flops(peak_tflops: float, accelerator: str) -> tuple[float | None, str]:
    """The peak that MFU is measured against, and where it comes from: the configured
    value, else the bf16 dense peak of a known CUDA GPU; None (no MFU) otherwise."""
    if peak_tflops > 0:
        return peak_tflops * 1e12, f"configured peak {peak_tflops:g} TFLOP/s"
    if accelerator in {"auto", "gpu", "cuda"} and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, flops in GPU_BF16_PEAK_FLOPS:
            if key in name:
                return flops, f"{name} bf16 dense peak {flops / 1e12:g} TFLOP/s"
        return None, f"{name}: peak unknown, set pretrain.peak_tflops for MFU"
    return None, "no peak on CPU: set pretrain.peak_tflops for MFU"


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: the GPU's allocations on CUDA, else this process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def resolve_precision(precision: str, accelerator: str) -> str:
    """``"auto"``: bf16 mixed precision on a CUDA GPU that supports it, else full float32."""
    if precision != "auto":
        return precision
    wants_gpu = accelerator in {"auto", "gpu", "cuda"}
    if wants_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def show_progress() -> bool:
    """Progress bars follow the project rule: on a terminal, or as FORGELINE_PROGRESS says."""
    setting = os.environ.get("FORGELINE_PROGRESS", "").strip()
    if setting:
        return setting not in {"0", "false", "no"}
    return sys.stderr.isatty()


def set_threads(num_threads: int) -> None:
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 matmuls: free speed on Ampere+


def make_trainer(*, max_steps: int, grad_accum: int, grad_clip: float, val_every_steps: int,
                 precision: str, accelerator: str, devices: str | int, strategy: str,
                 callbacks: list[Callback], root_dir: str | os.PathLike,
                 max_minutes: float | None = None, num_nodes: int = 1) -> L.Trainer:
    """A Trainer counted in optimizer steps, without its own logger or checkpoints: the
    caller tracks metrics (through the callback) and saves the model itself. On several
    devices the caller's sampler gives each rank its share (``ResumeSampler``), so
    Lightning does not replace it with a DistributedSampler."""
    _ignore_known_warnings()
    return L.Trainer(
        max_steps=max_steps, max_epochs=-1, accumulate_grad_batches=grad_accum,
        gradient_clip_val=grad_clip if grad_clip > 0 else None,
        val_check_interval=val_every_steps * grad_accum, check_val_every_n_epoch=None,
        num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=show_progress(), enable_model_summary=False,
        precision=precision, accelerator=accelerator, devices=devices, strategy=strategy,
        num_nodes=num_nodes, use_distributed_sampler=False,
        callbacks=callbacks, default_root_dir=str(root_dir),
        max_time=timedelta(minutes=max_minutes) if max_minutes else None,
    )
