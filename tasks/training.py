"""The one training runner: every training stage goes through ``run_training``.

A stage brings its LightningModule, its data (as a function from "samples already seen"
to a DataLoader) and its settings; the runner builds the Trainer, checkpoints, resumes,
forwards metrics, saves the model with its resolved config and plots the loss curve.

Checkpoints (``checkpoints/step-NNNNNN.ckpt`` in the stage's build directory, written to
a temporary name and renamed) hold Lightning's full state: weights, optimizer, learning
rate schedule, step counters, the metrics callback's history, and the RNG states. One is
written every ``checkpoint_every_steps`` optimizer steps and when the process gets
SIGTERM or SIGINT; the last ``keep_checkpoints`` are kept, and ``best.ckpt`` holds the
best validation loss. The resolved config sits beside them in ``checkpoints/config.json``.

A run that is killed (even by SIGKILL) and run again finds its newest checkpoint,
logs ``resuming from step N`` and continues: the data loaders are built to start after
the samples the checkpoint had consumed (every order is fixed by a seed up front), so no
batch is repeated or skipped and the losses are those of an uninterrupted run.

On several devices (processes started by ``tasks.launch``, torchrun or SLURM) every
process runs this too: each reads its own share of the samples (``ResumeSampler``), the
decisions to checkpoint, stop or keep a best checkpoint are taken together, and only
global rank zero writes files.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from tasks.launch import processes_to_start, stop_requested, stop_signal_handler
from tasks.shards import atomic_path, write_text_atomic

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
_STEP_FILE = re.compile(r"step-(\d+)\.ckpt$")


def checkpoint_every_field(default: int):
    """The fields every training stage's config shares (one definition, one description)."""
    return Field(default, ge=1, description="Write a checkpoint (weights, optimizer, schedule, "
                                            "RNG and data position) every N optimizer steps, "
                                            "and on SIGTERM or SIGINT; a rerun of an "
                                            "interrupted run resumes from the newest one.")


def keep_checkpoints_field():
    return Field(2, ge=1, description="Step checkpoints kept while training (older ones are "
                                      "deleted); best.ckpt, the best validation loss, is kept "
                                      "too.")


def early_stopping_field():
    return Field(0, ge=0, description="Stop when the validation loss has not improved for "
                                      "this many validations in a row; 0 = train all "
                                      "max_steps.")


def devices_field():
    return Field("auto", description="Devices per machine, one training process each: a "
                                     "number, -1 or 'auto' for all of the accelerator's (a "
                                     "CPU counts as one), or GPU indices such as '0,2'. With "
                                     "more than one, forgeline starts a process per device "
                                     "itself (also inside `forgeline run`); only rank zero "
                                     "writes files and logs to MLflow.")


def strategy_field():
    return Field("auto", description="Lightning strategy: 'auto' (DDP when there are several "
                                     "devices), 'ddp' (a copy of the model per device, "
                                     "gradients averaged; over gloo on CPU), 'fsdp' (weights, "
                                     "gradients and optimizer state sharded over GPUs) or "
                                     "another Lightning name. Each device reads its own "
                                     "batches: a step holds batch_size x grad_accum x devices "
                                     "x num_nodes samples.")


def num_nodes_field():
    return Field(1, ge=1, description="Machines to train on. Above 1 the processes must be "
                                      "started on every machine by an external launcher "
                                      "(torchrun --nnodes N --nproc-per-node <devices>, or "
                                      "SLURM's srun), which sets the ranks; without one the "
                                      "stage stops with an error, as forgeline starts "
                                      "processes on one machine only.")


def precision_field():
    return Field("auto", description="Lightning precision: 'auto' = 'bf16-mixed' on a CUDA GPU "
                                     "with bf16, else '32-true'.")


def accelerator_field():
    return Field("auto", description="Lightning accelerator: 'auto', 'cpu', 'gpu', 'cuda', "
                                     "'mps'.")


def num_threads_field():
    return Field(0, ge=0, description="CPU threads for torch; 0 = torch's default (all "
                                      "cores).")


def max_minutes_field():
    return Field(0.0, ge=0.0, description="Wall-clock budget for training, in minutes (a "
                                          "resumed run counts the time spent before the "
                                          "interruption); 0 = none.")


class TrainingInterrupted(Exception):
    """Training stopped on SIGTERM/SIGINT after writing a checkpoint; a rerun resumes."""

    def __init__(self, name: str, step: int):
        super().__init__(f"{name}: interrupted at step {step}; its checkpoint is kept and a "
                         "rerun resumes from it")
        self.name, self.step = name, step

    def __reduce__(self):
        return type(self), (self.name, self.step)


@dataclass
class TrainSettings:
    """What the runner needs from a stage's config (pretrain and finetune share these)."""

    name: str
    max_steps: int
    batch_size: int
    grad_accum: int
    grad_clip: float
    val_every_steps: int
    precision: str
    accelerator: str
    devices: str | int
    strategy: str
    log_every_steps: int
    checkpoint_every_steps: int
    keep_checkpoints: int
    early_stopping_patience: int = 0
    max_minutes: float = 0.0
    flops_per_token: int | None = None  # for FLOP/s and MFU
    peak_tflops: float = 0.0  # 0: a known GPU's bf16 peak, else no MFU
    num_nodes: int = 1

    @classmethod
    def of(cls, config, name: str, precision: str) -> TrainSettings:
        """The runner's settings from a stage config (pretrain's, finetune's, ...)."""
        return cls(
            name=name, max_steps=config.max_steps, batch_size=config.batch_size,
            grad_accum=getattr(config, "grad_accum", 1), grad_clip=config.grad_clip,
            val_every_steps=config.val_every_steps, precision=precision,
            accelerator=config.accelerator, devices=config.devices,
            strategy=getattr(config, "strategy", "auto"),
            log_every_steps=config.log_every_steps,
            checkpoint_every_steps=config.checkpoint_every_steps,
            keep_checkpoints=config.keep_checkpoints,
            early_stopping_patience=config.early_stopping_patience,
            max_minutes=config.max_minutes, peak_tflops=getattr(config, "peak_tflops", 0.0),
            num_nodes=getattr(config, "num_nodes", 1))


@dataclass
class TrainOutcome:
    trainer: Any
    callback: Any
    seconds: float
    resumed_from: int  # 0 for a fresh run

    @property
    def is_global_zero(self) -> bool:
        """True in the process that writes the model (the only one, unless distributed)."""
        return self.trainer.is_global_zero

    @property
    def world_size(self) -> int:
        return self.trainer.world_size

    def first_and_final_loss(self, steps: int = 5) -> tuple[float, float]:
        """The mean train loss of the first and of the last ``steps`` optimizer steps (one
        step alone is noisy): the ``train_loss_first`` and ``_final`` every stage reports."""
        losses = [loss for _, loss in self.callback.train_history]
        first, last = losses[:steps], losses[-steps:]
        return sum(first) / max(1, len(first)), sum(last) / max(1, len(last))


class ResumeSampler:
    """Indices ``start, start+1, ... total-1`` of a dataset whose order is fixed up front,
    while reporting the whole length: a resumed Lightning epoch counts its batches from
    where the checkpoint stopped, so the loader must not look shorter than the run.

    With ``world_size`` processes, rank ``r`` reads ``start+r, start+r+world_size, ...``
    (``start`` counts the samples of all ranks), so the ranks' shares are disjoint and
    together are the samples a single process would read, in the same order."""

    def __init__(self, start: int, total: int, rank: int = 0, world_size: int = 1):
        self.start, self.total = start, total
        self.shard(rank, world_size)

    def shard(self, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[int]:
        end = len(self) * self.world_size  # every rank gets as many samples
        return iter(range(self.start + self.rank, end, self.world_size))

    def __len__(self) -> int:
        return self.total // self.world_size


def checkpoint_files(out_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the step checkpoints in ``out_dir``, oldest first."""
    found = []
    for path in (Path(out_dir) / CHECKPOINTS).glob("step-*.ckpt"):
        match = _STEP_FILE.search(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def _rng_state() -> dict:
    import numpy as np
    import torch

    kind, keys, position, has_gauss, gauss = np.random.get_state()
    # plain lists and tensors only, so checkpoints load with torch's weights_only=True
    state = {"python": list(random.getstate()),
             "numpy": [kind, keys.tolist(), position, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def _stop_signals() -> Iterator[dict]:
    """SIGTERM/SIGINT set a flag (checked after each step) instead of killing the run at
    once, so that a checkpoint is written first."""
    flag: dict = {"signal": None}

    def handler(signum, frame):
        flag["signal"] = signum

    with stop_signal_handler(handler):
        yield flag


def _checkpoint_callback(settings: TrainSettings, out_dir: Path, stop: dict):
    from lightning.pytorch.callbacks import Callback

    class StepCheckpoints(Callback):
        """Atomic checkpoints every N optimizer steps, on a stop signal, and the best."""

        def __init__(self) -> None:
            self.last_saved = -1
            self.best = float("inf")

        def _save(self, trainer, path: Path) -> None:
            # every rank takes part (Lightning gathers the state); rank zero writes and
            # renames, so a checkpoint on disk is always complete
            tmp = path.with_name(f".{path.name}.tmp")
            trainer.save_checkpoint(tmp, weights_only=False)
            if trainer.is_global_zero:
                os.replace(tmp, path)
            trainer.strategy.barrier()

        def save_step(self, trainer) -> None:
            step = trainer.global_step
            if step == self.last_saved:
                return
            self._save(trainer, out_dir / CHECKPOINTS / f"step-{step:06d}.ckpt")
            self.last_saved = step
            if trainer.is_global_zero:
                for _, old in checkpoint_files(out_dir)[:-settings.keep_checkpoints]:
                    old.unlink(missing_ok=True)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if stop.get("rng") is not None:
                _set_rng_state(stop.pop("rng"))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            boundary = (batch_idx + 1) % settings.grad_accum == 0
            step = trainer.global_step
            if not boundary or step == 0:
                return
            # SIGINT reaches our handler; Lightning takes SIGTERM itself, notes it, and
            # raises after this hook: either way, the step is saved first
            signalled = stop["signal"] or (signal.SIGTERM if getattr(
                trainer, "received_sigterm", False) or stop_requested() else None)
            if trainer.world_size > 1:  # one rank's signal stops them all, at the same step
                anyone = trainer.strategy.reduce_boolean_decision(bool(signalled), all=False)
                signalled = signalled or (signal.SIGTERM if anyone else None)
            if signalled:
                self.save_step(trainer)
                trainer.should_stop = True
                stop["stopped"] = True
                log.warning("%s: signal %d: wrote a checkpoint at step %d and stopped",
                            settings.name, signalled, step)
            elif step % settings.checkpoint_every_steps == 0 and step < settings.max_steps:
                self.save_step(trainer)

        def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
            # Lightning also checks for SIGTERM after this callback's batch-end hook: a
            # signal that lands in between stops the fit there, so the step is saved here
            from lightning.pytorch.utilities.exceptions import SIGTERMException

            # (one process only: with several, the others would not join the save)
            if isinstance(exception, SIGTERMException) and trainer.world_size == 1 \
                    and trainer.global_step > 0 and trainer.global_step != self.last_saved:
                self.save_step(trainer)
                stop["stopped"] = True
                log.warning("%s: SIGTERM: wrote a checkpoint at step %d and stopped",
                            settings.name, trainer.global_step)

        def on_validation_end(self, trainer, pl_module) -> None:
            if trainer.sanity_checking:
                return
            val = trainer.callback_metrics.get("val_loss")
            val = float("inf") if val is None else float(val)
            if trainer.world_size > 1:  # every rank saves (a collective) or none does
                val = trainer.strategy.broadcast(val, src=0)
            if val >= self.best:
                return
            self.best = val
            self._save(trainer, out_dir / CHECKPOINTS / "best.ckpt")

        def state_dict(self) -> dict:
            return {"best": self.best}

        def load_state_dict(self, state: dict) -> None:
            self.best = state.get("best", float("inf"))

    return StepCheckpoints()


def run_training(settings: TrainSettings, module, train_loader: Callable[[int], Any],
                 val_loader, out_dir: Path, resolved_config: dict,
                 on_metrics: Callable | None = None,
                 files: dict[str, Path] | None = None) -> TrainOutcome:
    """Fit ``module`` for ``settings.max_steps`` optimizer steps, resuming from the newest
    checkpoint in ``out_dir`` if there is one; ``files`` (name -> path, e.g. the tokenizer)
    are copied into ``out_dir`` first, so that a checkpoint of an interrupted run can
    be used on its own. ``train_loader(samples_seen)`` must return
    the training batches that follow the first ``samples_seen`` samples, in a fixed order;
    with several processes its sampler must be a ``ResumeSampler`` (split here by rank)
    over a dataset sized for all of them (``samples_seen`` counts every rank's samples)."""
    from lightning.pytorch.callbacks import EarlyStopping
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from models.lightning import MetricsCallback, make_trainer, peak_flops

    if processes_to_start(settings, settings.name):
        # Lightning would start the other processes by running this program again
        raise RuntimeError(f"{settings.name}: training on several devices must be started "
                           "through tasks.launch.across_devices (or torchrun / SLURM)")
    out_dir = Path(out_dir)
    (out_dir / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    existing = checkpoint_files(out_dir)
    resume_step, ckpt_path = (existing[-1] if existing else (0, None))
    if ckpt_path is not None:
        log.info("%s: resuming from step %d (%s)", settings.name, resume_step, ckpt_path.name)
    original_hooks = (module.on_save_checkpoint, module.on_load_checkpoint)

    def save_rng(checkpoint: dict) -> None:
        original_hooks[0](checkpoint)
        checkpoint["forgeline_rng"] = _rng_state()

    def load_rng(checkpoint: dict) -> None:
        # applied at the first training batch: starting the data loaders draws random
        # numbers, which the uninterrupted run drew before the checkpoint was written
        original_hooks[1](checkpoint)
        stop["rng"] = checkpoint.get("forgeline_rng")

    peak, peak_source = peak_flops(settings.peak_tflops, settings.accelerator)
    if settings.flops_per_token:
        log.info("%s: %.1f MFLOPs per token; MFU against %s", settings.name,
                 settings.flops_per_token / 1e6, peak_source)
    metrics = MetricsCallback(on_metrics, settings.log_every_steps, name=settings.name,
                              flops_per_token=settings.flops_per_token, peak_flops=peak)
    with _stop_signals() as stop:
        module.on_save_checkpoint, module.on_load_checkpoint = save_rng, load_rng
        checkpoints = _checkpoint_callback(settings, out_dir, stop)
        callbacks = [metrics, checkpoints]
        if settings.early_stopping_patience:
            callbacks.append(EarlyStopping(monitor="val_loss", mode="min",
                                           patience=settings.early_stopping_patience,
                                           check_on_train_epoch_end=False))
        trainer = make_trainer(
            max_steps=settings.max_steps, grad_accum=settings.grad_accum,
            grad_clip=settings.grad_clip,
            val_every_steps=min(settings.val_every_steps, settings.max_steps),
            precision=settings.precision, accelerator=settings.accelerator,
            devices=settings.devices, strategy=settings.strategy,
            num_nodes=settings.num_nodes, callbacks=callbacks, root_dir=out_dir,
            max_minutes=settings.max_minutes or None)
        if trainer.is_global_zero:
            write_text_atomic(out_dir / CHECKPOINTS / "config.json",
                              json.dumps(resolved_config, indent=2, default=str))
            for name, source in (files or {}).items():
                with atomic_path(out_dir / name) as tmp:
                    shutil.copyfile(source, tmp)
        per_rank = settings.max_steps * settings.grad_accum * settings.batch_size
        loader = train_loader(resume_step * settings.grad_accum * settings.batch_size
                              * trainer.world_size)
        _shard(loader, trainer, per_rank, settings.name)
        started = time.perf_counter()
        try:
            try:
                trainer.fit(module, loader, val_loader,
                            ckpt_path=str(ckpt_path) if ckpt_path else None)
            except SIGTERMException:
                raise TrainingInterrupted(settings.name, trainer.global_step) from None
            seconds = time.perf_counter() - started
            if stop["signal"] is not None or stop.get("stopped"):
                raise TrainingInterrupted(settings.name, trainer.global_step)
            _gather_sharded_weights(trainer, module)
        finally:
            _end_single_process_group(trainer)
    if trainer.global_step < settings.max_steps:
        reason = (f"the wall-clock budget of {settings.max_minutes:g} minutes ran out"
                  if not _time_left(trainer) else "the validation loss stopped improving for "
                  f"{settings.early_stopping_patience} checks")
        log.info("%s: stopped at step %d of %d: %s", settings.name, trainer.global_step,
                 settings.max_steps, reason)
    return TrainOutcome(trainer, metrics, seconds, resume_step)


def _end_single_process_group(trainer) -> None:
    """A DDP-like strategy on one device opens a process group in this process and leaves
    it open; a later training stage here (on another device type, say) must not find it."""
    import torch.distributed as dist

    if trainer.world_size == 1 and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _shard(loader, trainer, per_rank: int, name: str) -> None:
    """Give each rank its share of the training samples (a single process reads them all)."""
    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, ResumeSampler):
        if trainer.world_size > 1:
            raise TypeError(f"{name}: training on {trainer.world_size} processes needs the "
                            "train loader's sampler to be a ResumeSampler")
        return
    sampler.shard(trainer.global_rank, trainer.world_size)
    if len(sampler) < per_rank:
        raise ValueError(f"{name}: the training data holds {sampler.total} samples, but "
                         f"{trainer.world_size} processes need {per_rank * trainer.world_size}"
                         " (is the dataset sized for the number of processes?)")


def _gather_sharded_weights(trainer, module) -> None:
    """Under FSDP each rank holds a shard of the weights: collect the full ones (every rank
    takes part) into rank zero's module, so the model can be evaluated and saved there."""
    from lightning.pytorch.strategies import FSDPStrategy

    if not isinstance(trainer.strategy, FSDPStrategy):
        return
    state = trainer.strategy.lightning_module_state_dict()  # full on rank zero only
    if not trainer.is_global_zero:
        return
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if name in state:
            tensor.data = state[name].to(tensor.device)


def _time_left(trainer) -> bool:
    """False once the Trainer's wall-clock budget (max_time) ran out."""
    timer = next((c for c in trainer.callbacks if type(c).__name__ == "Timer"), None)
    return timer is None or timer.time_remaining() is None or timer.time_remaining() > 0


def keep_only_best(out_dir: Path) -> None:
    """After a finished run the step checkpoints have served; the best one stays."""
    for _, path in checkpoint_files(out_dir):
        path.unlink(missing_ok=True)


def finish_model(outcome: TrainOutcome, model, out_dir: Path, resolved_config: dict,
                 val_points: list[tuple[int, float]], title: str,
                 extra: dict | None = None) -> None:
    """Save the trained model (``model.pt``), its resolved ``config.json`` and the loss
    curve; drop the step checkpoints of the finished run (``best.ckpt`` stays)."""
    from models.checkpoint import save_model
    from models.evaluation import plot_loss_curve

    if not outcome.is_global_zero:  # only global rank zero writes
        return
    save_model(out_dir / "model.pt", model.cpu(), extra)
    write_text_atomic(out_dir / "config.json", json.dumps(
        {**resolved_config, "resumed_from_step": outcome.resumed_from}, indent=2, default=str))
    plot_loss_curve(out_dir / "loss_curve.png", outcome.callback.train_history, val_points, title)
    keep_only_best(out_dir)
