"""The per-shard contract of the data stages, and the one loop that runs it.

A data stage is written once, as a ``ShardStep``: a function of a batch of documents
from one input shard, returning for each document either the record to keep or a
``Removed`` record with its reason. ``run_shard`` applies a step to one input shard and
writes, under the stage's directory,

* ``data/<shard>.parquet``: the kept documents (absent when none was kept),
* ``removed/<shard>.parquet``: the removed ones with a ``reason`` column,
* ``shards/<shard>.json``: the shard's statistics, written last: the completion marker.

A shard whose marker exists is finished and never recomputed, so a stage killed halfway
(or a Prefect flow-run retry) redoes only its unfinished shards, as datatrove's
completion files do. Output shards keep their input shard's name, so a stage's output is
the same, shard for shard and row for row, whatever ran it and in what order.

``run_sharded`` maps ``run_shard`` over every input shard with a ``Mapper`` (a plain loop
here; Prefect tasks on the configured task runner in ``flows/``) and merges the shards'
statistics into the stage's. One document that makes a step raise never fails the stage:
it goes to ``removed/`` with reason ``<stage>_error``, and only its error's class (never
its text, which may quote the document) reaches the log and the statistics.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pyarrow.parquet as pq
from pydantic import BaseModel

from tasks.progress import progress
from tasks.shards import shard_paths, write_shard, write_text_atomic
from tasks.stage import StageInputError

log = logging.getLogger(__name__)

DATA, REMOVED, MARKERS = "data", "removed", "shards"


@dataclass
class Removed:
    """A document a step removes: the record to keep in removed/ (with any extra columns,
    such as ``detail``) and why."""

    record: dict
    reason: str


class ShardStep:
    """One data stage, as a function of batches of documents from one shard.

    Subclasses set ``name`` and implement ``apply``; the runner does the looping, writing,
    statistics, failure isolation and completion markers. A step is built in the worker
    that runs the shard, from the stage's config (it must be picklable): expensive engines
    belong in a per-process cache, not in ``__init__``.
    """

    name: ClassVar[str]
    batch_size: ClassVar[int] = 64
    columns: ClassVar[list[str] | None] = None  # input columns to read (None: all)
    first_row: int = 0  # the shard row of the batch's first record, set by the runner

    def __init__(self, config: BaseModel):
        self.config = config

    def open_shard(self, shard: str) -> None:
        """Called before the first batch of each shard (``shard`` is its file name)."""

    def apply(self, records: list[dict], stats: Counter) -> Sequence[dict | Removed]:
        """One outcome per record, in order. Count what is worth tracking in ``stats``."""
        raise NotImplementedError

    @classmethod
    def summary(cls, config: BaseModel, stats: dict) -> str:
        """A line for the stage's log after all shards ran (beyond kept/removed counts)."""
        return ""

    @classmethod
    def check_result(cls, config: BaseModel, stats: dict) -> None:
        """Raise StageInputError when the merged result is unusable (say, nothing kept)."""
        if stats.get("kept", 0) == 0:
            removed = {k.removeprefix("removed_"): v for k, v in stats.items()
                       if k.startswith("removed_") and v}
            raise StageInputError(cls.name, f"no document kept out of "
                                            f"{stats.get('input_documents', 0)} ({removed}); "
                                            "check the earlier stages' output and this stage's "
                                            "settings")


def _apply_isolated(step: ShardStep, records: list[dict], stats: Counter, first_row: int
                    ) -> list[dict | Removed]:
    """``step.apply`` on a batch; if it raises, again document by document, so that only
    the documents that fail on their own are removed (reason ``<stage>_error``)."""
    batch_stats: Counter = Counter()
    try:
        step.first_row = first_row
        outcomes = list(step.apply(records, batch_stats))
    except StageInputError:
        raise
    except Exception:
        if len(records) == 1:
            raise
        outcomes = []
        for row, record in enumerate(records, first_row):
            try:
                outcomes.extend(_apply_isolated(step, [record], stats, row))
            except StageInputError:
                raise
            except Exception as exc:  # noqa: BLE001 - one bad document never fails a stage
                error = type(exc).__name__
                log.warning("%s: document %r raised %s; moved to removed/ as %s_error",
                            step.name, str(record.get("id")), error, step.name)
                stats[f"errors_{error}"] += 1
                outcomes.append(Removed({**record, "detail": error}, f"{step.name}_error"))
        return outcomes
    if len(outcomes) != len(records):
        raise RuntimeError(f"{step.name}: apply returned {len(outcomes)} outcomes for "
                           f"{len(records)} records")
    stats.update(batch_stats)
    return outcomes


def marker_path(stage_dir: Path, shard: str) -> Path:
    return Path(stage_dir) / MARKERS / f"{Path(shard).stem}.json"


def run_shard(step_class: type[ShardStep], config: BaseModel, input_shard: str | Path,
              stage_dir: str | Path) -> dict[str, Any]:
    """Apply a step to one input shard (or reuse its finished output); its statistics."""
    input_shard, stage_dir = Path(input_shard), Path(stage_dir)
    marker = marker_path(stage_dir, input_shard.name)
    if marker.exists():
        return {**json.loads(marker.read_text(encoding="utf-8")), "reused": True}
    step = step_class(config)
    step.open_shard(input_shard.name)
    stats: Counter = Counter()
    kept: list[dict] = []
    removed: list[dict] = []
    parquet = pq.ParquetFile(input_shard)
    for batch in parquet.iter_batches(batch_size=step.batch_size, columns=step.columns):
        records = batch.to_pylist()
        first_row = stats["input_documents"]
        stats["input_documents"] += len(records)
        for outcome in _apply_isolated(step, records, stats, first_row):
            if isinstance(outcome, Removed):
                stats[f"removed_{outcome.reason}"] += 1
                removed.append({**outcome.record, "reason": outcome.reason})
            else:
                kept.append(outcome)
    stats["kept"] = len(kept)
    for record in kept:  # the mix of sources after this stage (documents, words)
        source = record.get("source") or "crawl"
        stats[f"source.{source}.documents"] += 1
        stats[f"source.{source}.words"] += len((record.get("text") or "").split())
    if kept:
        write_shard(kept, stage_dir / DATA / input_shard.name)
    if removed:
        write_shard(removed, stage_dir / REMOVED / input_shard.name)
    result = {"shard": input_shard.name, "stats": dict(sorted(stats.items()))}
    write_text_atomic(marker, json.dumps(result, sort_keys=True))
    return {**result, "reused": False}


# (label, function, argument tuples) -> the function's results, in the order of the tuples
Mapper = Callable[[str, Callable[..., Any], list[tuple]], list[Any]]


def serial_mapper(label: str, function: Callable[..., Any], arguments: list[tuple]) -> list:
    """Run every item here, one after the other (tests, benchmarks, no orchestrator)."""
    return [function(*args) for args in progress(arguments, desc=label, unit="shard")]


class ProcessPoolMapper:
    """Run the items in a pool of worker processes, without an orchestrator (scripts and
    benchmarks; the pipeline maps through Prefect instead). Use as a context manager.

    ``warm_up`` (a picklable function) runs once in every worker before any item, so
    per-process engines (Presidio's, say) are built before the clock starts."""

    def __init__(self, workers: int, warm_up: Callable[[], Any] | None = None):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.workers = workers
        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        if warm_up is not None:
            # one warm-up per worker: each blocks until all have started one
            barrier = multiprocessing.Manager().Barrier(workers)
            for future in [self.pool.submit(_warm, warm_up, barrier) for _ in range(workers)]:
                future.result()

    def __call__(self, label: str, function: Callable[..., Any], arguments: list[tuple]) -> list:
        futures = [self.pool.submit(function, *args) for args in arguments]
        return [future.result() for future in progress(futures, desc=label, unit="task")]

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(cancel_futures=True)


def _warm(function: Callable[[], Any], barrier) -> None:
    function()
    barrier.wait(timeout=600)


def merge_stats(results: list[dict]) -> dict[str, int]:
    """The stage's statistics: the sum of its shards'."""
    total: Counter = Counter()
    for result in results:
        total.update(result["stats"])
    return dict(sorted(total.items()))


def require_shards(stage: str, input_dir: Path) -> list[Path]:
    shards = shard_paths(input_dir)
    if not shards:
        raise StageInputError(stage, f"no documents in {input_dir} (no shard-*.parquet "
                                     "files); run the previous stage first or check "
                                     "source.paths")
    return shards


def run_sharded(step_class: type[ShardStep], config: BaseModel, input_dir: str | Path,
                stage_dir: str | Path, mapper: Mapper | None = None) -> dict[str, Any]:
    """Run a step over every shard of ``input_dir`` into ``stage_dir``; the stage's result
    (``count`` kept documents and the merged ``stats``) for ``run_stage``."""
    name = step_class.name
    input_dir, stage_dir = Path(input_dir), Path(stage_dir)
    shards = require_shards(name, input_dir)
    started = time.perf_counter()
    results = (mapper or serial_mapper)(
        name, run_shard, [(step_class, config, str(path), str(stage_dir)) for path in shards])
    stats = merge_stats(results)
    reused = sum(bool(r.get("reused")) for r in results)
    seconds = time.perf_counter() - started
    if stats.get("input_documents", 0) == 0:
        raise StageInputError(name, f"the input {input_dir} holds no documents; check the "
                                    "earlier stages' removed/ folders")
    removed = {k.removeprefix("removed_"): v for k, v in stats.items()
               if k.startswith("removed_") and v}
    log.info("%s: kept %d of %d documents from %d shards (%d finished earlier) in %.1fs; "
             "removed %s", name, stats.get("kept", 0), stats["input_documents"], len(shards),
             reused, seconds, removed or "none")
    errors = {k.removeprefix("errors_"): v for k, v in stats.items() if k.startswith("errors_")}
    if errors:
        log.warning("%s: %d documents raised errors and were removed as %s_error: %s", name,
                    sum(errors.values()), name, errors)
    line = step_class.summary(config, stats)
    if line:
        log.info("%s: %s", name, line)
    step_class.check_result(config, stats)
    return {"count": stats.get("kept", 0), "stats": stats, "shards": len(shards),
            "shards_reused": reused}
