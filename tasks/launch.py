"""Training on several devices from inside a running flow.

Lightning's default way to train on several devices (``ddp``, ``fsdp``, ``deepspeed``, or
``auto`` with ``devices`` > 1) runs the command line again once per extra device. Inside
``forgeline run`` that command is the whole pipeline, so every device would run every
stage, with its own MLflow runs. Instead, a training stage decorated with
``across_devices`` starts its processes itself: one per device, with the environment of
an external launcher (``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``NODE_RANK``), so that Lightning treats them as already started. Each
process runs the same stage function with the same settings.

The calling process keeps what belongs to the flow: rank zero's metrics and log records
come back over a private socket and reach the caller's ``on_metrics`` (MLflow) and loggers
(Prefect) from here, and rank zero's result is the stage's result. An exception in any
process ends the others and is raised here, with the failed process's traceback as its
cause; a SIGTERM or Ctrl-C here asks every process to write a checkpoint and stop after
its current step (a second one ends them at once). The processes also end when this one
dies, even by SIGKILL.

On several machines (``num_nodes`` > 1) the processes must come from an external launcher
such as torchrun or SLURM's srun; under one (``LOCAL_RANK`` set, or a cluster environment
Lightning recognises) the stage runs in the process it was started in.

This module loads no torch or Lightning when imported: the configs import it. Starting
processes needs a POSIX system (a socket passed to the child, a session of its own).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Strategies whose Lightning launcher starts processes by running the command line again;
# "auto" picks "ddp" for several devices. The spawn/fork variants are refused by the config.
_SCRIPT_LAUNCHED = ("ddp", "fsdp", "deepspeed")

# In a process started here: set when the launching process asks it to stop.
_stop_event: threading.Event | None = None
# LOCAL_RANK as this process found it when it started: Lightning sets it in a process that
# trains on one device with a DDP-like strategy, which must not count as an external start.
_LOCAL_RANK_AT_START = "LOCAL_RANK" in os.environ


def device_count(devices: str | int, accelerator: str = "auto") -> int:
    """How many devices (processes) per machine Lightning will use for ``devices``: a
    number, -1 or 'auto' (all of the accelerator's devices; one CPU process), or a
    comma-separated list of device indices."""
    if isinstance(devices, str):
        text = devices.strip()
        if text == "auto":
            return _auto_device_count(accelerator)
        if "," in text:
            return len([part for part in text.split(",") if part.strip()])
        devices = int(text)
    return _auto_device_count(accelerator) if devices == -1 else devices


def _auto_device_count(accelerator: str) -> int:
    if accelerator in {"auto", "gpu", "cuda"}:
        from lightning.fabric.accelerators.cuda import num_cuda_devices

        count = num_cuda_devices()
        if count or accelerator != "auto":
            return count
    return 1  # a CPU, MPS or unknown accelerator: Lightning's auto count is one process


def is_distributed_strategy(strategy: str) -> bool:
    return strategy == "auto" or strategy.startswith(_SCRIPT_LAUNCHED)


def world_size(config) -> int:
    """The processes that train together (over all machines), from a stage config with
    ``strategy``, ``devices``, ``accelerator`` and ``num_nodes``: 1 unless the strategy is a
    multi-process one and there is more than one device or machine."""
    strategy = getattr(config, "strategy", "auto")
    num_nodes = getattr(config, "num_nodes", 1)
    if not is_distributed_strategy(strategy):
        return 1
    return max(1, device_count(config.devices, config.accelerator) * num_nodes)


def started_externally() -> bool:
    """True in a process started by torchrun, SLURM, LSF, MPI or this module (or one given
    LOCAL_RANK when it started): Lightning then starts no processes itself, and neither
    does ``across_devices``."""
    if _LOCAL_RANK_AT_START:
        return True
    from lightning.fabric.plugins.environments import (
        LSFEnvironment,
        MPIEnvironment,
        SLURMEnvironment,
        TorchElasticEnvironment,
    )

    return any(env.detect() for env in (TorchElasticEnvironment, SLURMEnvironment,
                                        LSFEnvironment, MPIEnvironment))


def processes_to_start(config, name: str = "training") -> int:
    """How many processes ``across_devices`` starts for ``config``: 0 = run in this one."""
    world = world_size(config)
    if world <= 1 or started_externally():
        return 0
    num_nodes = getattr(config, "num_nodes", 1)
    if num_nodes > 1:
        raise ValueError(
            f"{name}.num_nodes={num_nodes}: forgeline starts training processes on one "
            "machine only; for several machines start them with an external launcher on "
            f"each one, e.g. torchrun --nnodes {num_nodes} --nproc-per-node "
            f"{world // num_nodes} ..., or SLURM's srun")
    return world


def stop_requested() -> bool:
    """True in a process started here once the launching process asked it to stop."""
    return _stop_event is not None and _stop_event.is_set()


def across_devices(stage: Callable) -> Callable:
    """Run ``stage(config, ..., on_metrics=None)`` in one process per device when its
    config asks for several (see the module's docstring); else call it as it is."""
    signature = inspect.signature(stage)

    @functools.wraps(stage)
    def run(*args, **kwargs):
        arguments = signature.bind(*args, **kwargs).arguments
        config = arguments["config"]
        name = getattr(stage, "__name__", "training")
        processes = processes_to_start(config, name)
        if not processes:
            return stage(*args, **kwargs)
        on_metrics = arguments.pop("on_metrics", None)
        return run_processes((run.__module__, run.__qualname__), arguments, processes,
                             on_metrics, name)

    return run


class _RemoteTraceback(Exception):
    """The traceback of an exception raised in a training process (shown as the cause)."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_WORKER = "from tasks.launch import worker_main; worker_main()"


def run_processes(target: tuple[str, str], arguments: dict, processes: int,
                  on_metrics: Callable | None, name: str) -> Any:
    """Start ``processes`` ranks of ``module:qualname(**arguments, on_metrics=...)`` and wait
    for them; returns rank zero's result.

    Each is a fresh interpreter (``python -c``, so neither this program's command line nor
    its ``__main__`` module runs again) in its own session (a signal to this process group
    reaches only this process, which passes a stop on), talking to this process over a
    private socket pair: the stage's arguments go out; metrics, log records, the result or
    the error come back."""
    from multiprocessing.connection import Connection

    port = _free_port()
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1)
                                                           // processes))
    root = str(Path(__file__).resolve().parents[1])  # where `tasks` is imported from
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    log_level = logging.getLogger("tasks").getEffectiveLevel()
    log.info("%s: starting %d training processes (rendezvous on 127.0.0.1:%d)", name,
             processes, port)
    workers: list[subprocess.Popen] = []
    links: list[Any] = []
    try:
        with _stop_on_signals(name) as stop:
            for rank in range(processes):
                env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "WORLD_SIZE": str(processes), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "NODE_RANK": "0", "OMP_NUM_THREADS": threads,
                       "PYTHONPATH": path}
                mine, theirs = socket.socketpair()
                with mine, theirs:
                    workers.append(subprocess.Popen(
                        [sys.executable, "-c", _WORKER, str(theirs.fileno()),
                         str(os.getpid())], env=env, pass_fds=[theirs.fileno()],
                        start_new_session=True))
                    link = Connection(mine.detach())
                links.append(link)
                link.send((target, arguments, log_level))
            return _collect(workers, links, on_metrics, name, stop)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
        for worker in workers:
            worker.wait()
        for link in links:
            link.close()


@contextmanager
def stop_signal_handler(handler: Callable) -> Iterator[None]:
    """``handler`` for SIGTERM and SIGINT while the block runs, the previous handlers
    after it. Only the main thread can catch signals: elsewhere nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@contextmanager
def _stop_on_signals(name: str) -> Iterator[dict]:
    """SIGTERM/SIGINT here ask the processes to checkpoint and stop after their current
    step; a second one raises KeyboardInterrupt."""
    stop = {"signal": None, "sent": False}

    def handler(signum, frame):
        if stop["signal"] is not None:
            raise KeyboardInterrupt
        stop["signal"] = signum
        log.warning("%s: signal %d: the training processes stop after their current step "
                    "(again to end them at once)", name, signum)

    with stop_signal_handler(handler):
        yield stop


def _collect(workers: list, links: list, on_metrics: Callable | None, name: str,
             stop: dict) -> Any:
    """Forward metrics and log records until every process has ended; rank zero's result,
    or the first failure raised here."""
    from multiprocessing.connection import wait

    result: Any = None
    errors: list[tuple[int, tuple]] = []
    crashed: list[int] = []
    open_links = {link: rank for rank, link in enumerate(links)}
    reported: set[int] = set()
    while open_links and not errors and not crashed:
        if stop["signal"] is not None and not stop["sent"]:
            stop["sent"] = True
            for link in open_links:
                with contextlib.suppress(OSError):
                    link.send("stop")
        for link in wait(list(open_links), timeout=0.5):
            rank = open_links[link]
            try:
                kind, _, payload = link.recv()
            except (EOFError, OSError):  # the process ended
                del open_links[link]
                code = workers[rank].wait()
                if code != 0 and rank not in reported:
                    crashed.append(rank)
                continue
            if kind == "metrics":
                if on_metrics is not None:
                    on_metrics(*payload)
            elif kind == "log":
                _emit(payload)
            elif kind == "result":
                result = payload
            elif kind == "error":
                errors.append((rank, payload))
                reported.add(rank)
    for worker in workers:  # the others may wait for a failed one in a collective
        if worker.poll() is None and (errors or crashed):
            worker.kill()
    if errors:
        rank, (pickled, kind_name, message, text) = errors[0]
        exc = _unpickle(pickled) or RuntimeError(f"{name}: {kind_name}: {message}")
        raise exc from _RemoteTraceback(f"in training process rank {rank} of {len(workers)}:"
                                        f"\n{text}")
    if crashed:
        rank = crashed[0]
        code = workers[rank].returncode
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        with contextlib.suppress(ValueError):
            how = f"signal {signal.Signals(-code).name}" if code < 0 else how
        raise RuntimeError(f"{name}: training process rank {rank} of {len(workers)} ended "
                           f"with {how} without reporting an error (see its output above)")
    return result


def _emit(record: logging.LogRecord) -> None:
    logger = logging.getLogger(record.name)
    if logger.isEnabledFor(record.levelno):
        logger.handle(record)


def _unpickle(data: bytes | None) -> BaseException | None:
    if data is None:
        return None
    try:
        exc = pickle.loads(data)
    except Exception:  # noqa: BLE001 - an exception class that cannot be rebuilt here
        return None
    return exc if isinstance(exc, BaseException) else None


class _Link:
    """A training process's end of its socket to the launcher (sends from any thread)."""

    def __init__(self, connection, rank: int):
        self.connection, self.rank = connection, rank
        self.lock = threading.Lock()

    def send(self, kind: str, payload: Any) -> None:
        with self.lock:
            self.connection.send((kind, self.rank, payload))


class _LinkLogHandler(logging.Handler):
    """Sends log records to the launcher (message formatted, no live objects)."""

    def __init__(self, link: _Link, level: int):
        super().__init__(level)
        self.link = link

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record) if record.exc_info else record.getMessage()
            if self.link.rank:
                message = f"[rank {self.link.rank}] {message}"
            self.link.send("log", logging.makeLogRecord(
                {**record.__dict__, "msg": message, "args": None, "exc_info": None,
                 "exc_text": None}))
        except Exception:  # noqa: BLE001 - logging must never break training
            self.handleError(record)


def _listen(connection, parent_pid: int) -> None:
    """Take the launcher's stop request; end this process at once when the launcher is
    gone (its socket closes, even after a SIGKILL)."""
    global _stop_event
    _stop_event = threading.Event()
    try:  # Linux: the kernel also sends SIGKILL when the launcher dies
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        os._exit(1)

    def listen() -> None:
        while True:
            try:
                if connection.recv() == "stop":
                    _stop_event.set()
            except (EOFError, OSError):
                os._exit(1)

    threading.Thread(target=listen, name="launcher-link", daemon=True).start()


def worker_main() -> None:
    """A training process started by ``run_processes``: ``python -c ... FD PARENT_PID``."""
    from multiprocessing.connection import Connection

    connection = Connection(int(sys.argv[1]))
    rank = int(os.environ["RANK"])
    link = _Link(connection, rank)
    target, arguments, log_level = connection.recv()
    _listen(connection, int(sys.argv[2]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher handles Ctrl-C
    # every record goes to the launcher, whose logging settings decide what is shown (as
    # in one process): Lightning's own console handler would print it a second time
    logging.getLogger().addHandler(_LinkLogHandler(
        link, log_level if rank == 0 else max(log_level, logging.WARNING)))
    import lightning  # noqa: F401 - adds that handler when first imported

    logging.getLogger("lightning").handlers.clear()
    for name in ("tasks", "models"):
        logging.getLogger(name).setLevel(log_level)
    on_metrics = (lambda metrics, step: link.send("metrics", (metrics, step))) \
        if rank == 0 else None
    try:
        module, qualname = target
        stage = getattr(importlib.import_module(module), qualname)
        result = stage(**arguments, on_metrics=on_metrics)
        if rank == 0:
            link.send("result", result)
        code = 0
    except BaseException as exc:  # noqa: BLE001 - reported to the launcher
        try:
            pickled = pickle.dumps(exc)
        except Exception:  # noqa: BLE001
            pickled = None
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        link.send("error", (pickled, type(exc).__name__, str(exc), text))
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no interpreter teardown: a distributed group may still be open
